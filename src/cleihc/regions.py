"""Regions: annotation files a user hands in, and the automatic skin compartments.

Every region is a named polygonal geometry in level-0 pixels. Regions come from two places:

* **Files** (``--regions``): QuPath GeoJSON, Aperio ImageScope XML and ASAP XML, read by :func:`read_regions`
  (format by content, never by extension). Files are data: JSON through :mod:`json` with NaN/Infinity refused,
  XML through :mod:`defusedxml` (no entity expansion, no DTD, no external references), a size cap, and every
  coordinate checked. Anything malformed or hostile raises a one-line :class:`~cleihc.errors.RegionsError`.
* **Automatic skin compartments** from :func:`skin_compartments`: the epidermis (the dense nuclear layer at the
  tissue surface), the dermis, and depth bands below the dermo-epidermal junction (DEJ).

A file's region replaces the automatic region of the same name (:func:`merge_regions`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import defusedxml
import defusedxml.ElementTree as SafeET
import edt
import numpy as np
import shapely
from scipy import ndimage as ndi
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry

from cleihc.errors import RegionsError
from cleihc.geometry import (
    feature_collection,
    label_sizes,
    mask_to_polygons,
    polygonal,
    rasterize,
    to_feature,
)
from cleihc.io import atomic_write
from cleihc.slide import slide_stem

__all__ = [
    "COMPARTMENT_NAMES",
    "REGION_FILE_EXTENSIONS",
    "CompartmentParams",
    "Compartments",
    "Region",
    "compartments_from_epidermis",
    "merge_regions",
    "rasterize",
    "read_regions",
    "regions_file_for_slide",
    "regions_for_slide",
    "regions_to_geojson",
    "skin_compartments",
    "write_geojson",
]

log = logging.getLogger(__name__)

#: Largest annotation file accepted; real QuPath/ImageScope exports of a biopsy are a few MB.
MAX_FILE_BYTES = 200 * 1024 * 1024
#: Extensions looked for in a ``--regions`` folder, in this order.
REGION_FILE_EXTENSIONS = (".geojson", ".json", ".xml")
#: The automatic compartments, in table order.
COMPARTMENT_NAMES = ("epidermis", "dermis", "papillary_dermis", "superficial_dermis", "deep_dermis")
_MAX_VERTICES = 50_000_000  # beyond this a file is hostile, not an annotation
_ELLIPSE_SEGMENTS = 128


@dataclass(frozen=True)
class Region:
    """A named region of a slide.

    Attributes
    ----------
    name : str
        The region's name; one table row per name.
    geometry : shapely Polygon or MultiPolygon
        Valid, non-empty, in level-0 pixel coordinates.
    source : str
        ``"auto"`` for automatic regions, else the path of the file it came from.
    properties : dict
        Extra information (format, number of shapes merged, ...), JSON-serialisable.
    """

    name: str
    geometry: BaseGeometry
    source: str
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def area_px(self) -> float:
        """Area in level-0 pixels²."""
        return float(self.geometry.area)


# ---------------------------------------------------------------------------------------------------------------
# Reading annotation files
# ---------------------------------------------------------------------------------------------------------------
class _Bad(Exception):
    """Internal: a reason a file is unusable; turned into RegionsError with the file's path."""


#: Largest coordinate taken as level-0 pixels: far beyond any slide (TIFF sizes are 32-bit), and small enough that
#: areas stay finite.
MAX_COORDINATE_PX = 2.0**32


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Bad(f"{what} is not a number ({_shown(value)})")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond any float
        raise _Bad(f"{what} is not a number ({_shown(value)})") from None
    if not math.isfinite(v):
        raise _Bad(f"{what} is not finite ({_shown(value)})")
    if abs(v) > MAX_COORDINATE_PX:
        raise _Bad(f"{what} is {v:.3g}, not a level-0 pixel coordinate of any slide")
    return v


def _json_number(value: Any, what: str) -> float:
    # JSON coordinates must be numbers, not strings.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"{what} is not a number ({_shown(value)})")
    return _number(value, what)


def _ring(points: Sequence[tuple[float, float]], what: str) -> list[tuple[float, float]]:
    distinct = {tuple(p) for p in points}
    if len(distinct) < 3:
        raise _Bad(f"{what} has fewer than 3 distinct vertices (an empty polygon)")
    return list(points)


def _clean(geometry: BaseGeometry, what: str, repaired: list[str]) -> MultiPolygon:
    """Valid polygonal geometry; invalid input (self-intersections, ...) is repaired and logged.

    A polygon is repaired ring by ring: its outline is what the hand enclosed (make_valid's "structure" method: a
    pen stroke that overshoots its start, or an outline traced twice, keeps its area) and its holes are
    subtracted from it (a hole drawn outside the outline removes nothing; overlapping holes remove their union).
    make_valid's default even-odd repair would turn a doubly traced outline into a sliver and a stray hole into
    area.
    """
    if geometry.is_valid:
        return polygonal(geometry)
    repaired.append(f"{what} ({shapely.is_valid_reason(geometry)})")
    parts = [geometry] if isinstance(geometry, Polygon) else list(getattr(geometry, "geoms", [geometry]))
    fixed = []
    for part in parts:
        if not isinstance(part, Polygon):
            fixed.append(polygonal(shapely.make_valid(part, method="structure")))
            continue
        shell = _valid_ring_area(part.exterior)
        holes = [_valid_ring_area(h) for h in part.interiors]
        fixed.append(polygonal(shell.difference(shapely.union_all(holes)) if holes else shell))
    return polygonal(shapely.union_all(fixed))


def _valid_ring_area(ring: Any) -> BaseGeometry:
    area = Polygon(ring)
    return area if area.is_valid else shapely.make_valid(area, method="structure")


# --- GeoJSON ----------------------------------------------------------------------------------------------------
def _reject_constant(name: str) -> float:
    raise _Bad(f"invalid JSON number {name}")


def _geojson_polygon(coords: Any, what: str) -> Polygon:
    if not isinstance(coords, list) or not coords:
        raise _Bad(f"{what} has no rings")
    rings = []
    for k, ring in enumerate(coords):
        if not isinstance(ring, list):
            raise _Bad(f"{what} ring {k} is not a list of positions")
        pts = []
        for pos in ring:
            if not isinstance(pos, list | tuple) or len(pos) < 2:
                raise _Bad(f"{what} ring {k} has a position that is not [x, y]")
            pts.append((_json_number(pos[0], f"{what} x"), _json_number(pos[1], f"{what} y")))
        rings.append(_ring(pts, f"{what} ring {k}"))
    return Polygon(rings[0], rings[1:])


def _geojson_geometry(geom: Any, what: str, skipped: list[str], depth: int = 0) -> list[Polygon]:
    if geom is None:
        skipped.append(f"{what} (no geometry)")
        return []
    if not isinstance(geom, dict) or not isinstance(geom.get("type"), str):
        raise _Bad(f"{what} geometry is not a GeoJSON geometry object")
    kind = geom["type"]
    if kind == "Polygon":
        return [_geojson_polygon(geom.get("coordinates"), what)]
    if kind == "MultiPolygon":
        coords = geom.get("coordinates")
        if not isinstance(coords, list):
            raise _Bad(f"{what} MultiPolygon coordinates are not a list")
        return [_geojson_polygon(c, f"{what} part {k}") for k, c in enumerate(coords)]
    if kind == "GeometryCollection":
        parts = geom.get("geometries")
        if not isinstance(parts, list) or depth > 8:
            raise _Bad(f"{what} GeometryCollection is malformed or nested too deeply")
        return [p for g in parts for p in _geojson_geometry(g, what, skipped, depth + 1)]
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        skipped.append(f"{what} ({kind})")
        return []
    raise _Bad(f"{what} has unknown geometry type {kind!r}")


def _feature_name(props: Any) -> str:
    if isinstance(props, dict):
        cls = props.get("classification")
        if isinstance(cls, dict) and isinstance(cls.get("name"), str) and cls["name"].strip():
            return cls["name"].strip()
        if isinstance(cls, dict) and isinstance(cls.get("names"), list):
            # QuPath 0.5 derived classes: {"names": ["Tumor", "Positive"]}, shown as "Tumor: Positive".
            parts = [n.strip() for n in cls["names"] if isinstance(n, str) and n.strip()]
            if parts:
                return ": ".join(parts)
        if isinstance(cls, str) and cls.strip():
            return cls.strip()
        name = props.get("name")
        if isinstance(name, str) and name.strip():
            return name.strip()
    return "annotation"


def _read_geojson(text: str) -> tuple[list[tuple[str, list[Polygon], list[Polygon]]], list[str]]:
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise _Bad("JSON is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise _Bad(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise _Bad("FeatureCollection has no 'features' list")
    elif isinstance(data, list):
        features = data
    elif isinstance(data, dict) and ("geometry" in data or data.get("type") == "Feature"):
        features = [data]
    elif isinstance(data, dict) and isinstance(data.get("type"), str):
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise _Bad("not GeoJSON: expected a FeatureCollection, a list of Features, a Feature or a geometry")
    shapes: list[tuple[str, list[Polygon], list[Polygon]]] = []
    skipped: list[str] = []
    for k, feat in enumerate(features):
        if not isinstance(feat, dict) or "geometry" not in feat:
            raise _Bad(f"feature {k} is not a GeoJSON Feature")
        props = feat.get("properties")
        object_type = _object_type(feat, props)
        if object_type not in (None, "annotation"):
            # QuPath detections/cells/tiles are measurements, not regions to measure in.
            skipped.append(f"feature {k} (a QuPath {object_type} object)")
            continue
        name = _feature_name(props)
        polygons = _geojson_geometry(feat["geometry"], f"feature {k}", skipped)
        kind = feat["geometry"].get("type") if isinstance(feat["geometry"], dict) else None
        if not polygons and kind in ("Polygon", "MultiPolygon", "GeometryCollection"):
            skipped.append(f"feature {k} ({name!r}: an empty geometry)")
        shapes.append((name, polygons, []))
    return shapes, skipped


#: QuPath's object types (``properties.objectType``; ``type`` and ``object_type`` are accepted aliases).
_QUPATH_TYPES = {"annotation", "detection", "cell", "tile", "tmacore", "tma_core", "root"}
#: QuPath v0.2 wrote the type as the feature's ``id`` (QuPath's own reader still maps these).
_QUPATH_V02_IDS = {
    "pathannotationobject": "annotation",
    "pathdetectionobject": "detection",
    "pathcellobject": "cell",
    "pathtileobject": "tile",
    "tmacoreobject": "tmaCore",
    "pathrootobject": "root",
}


def _object_type(feat: dict[str, Any], props: Any) -> str | None:
    """A feature's QuPath object type ("annotation", "detection", ...; lower case), None when not said."""
    if isinstance(props, dict):
        for key in ("objectType", "object_type", "type"):
            value = props.get(key)
            if isinstance(value, str) and value.strip().lower() in _QUPATH_TYPES:
                kind = value.strip().lower()
                return "annotation" if kind == "annotation" else value.strip()
    legacy = feat.get("id")
    if isinstance(legacy, str) and legacy.strip().lower() in _QUPATH_V02_IDS:
        return _QUPATH_V02_IDS[legacy.strip().lower()]
    return None


# --- XML --------------------------------------------------------------------------------------------------------
def _local(tag: Any) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _children(node: Any, name: str) -> list[Any]:
    return [c for c in node if _local(c.tag) == name]


def _ellipse(xs: Sequence[float], ys: Sequence[float]) -> Polygon:
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 <= x0 or y1 <= y0:
        raise _Bad("an ellipse has a zero-size bounding box")
    t = np.linspace(0.0, 2.0 * np.pi, _ELLIPSE_SEGMENTS, endpoint=False)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return Polygon(np.column_stack([cx + rx * np.cos(t), cy + ry * np.sin(t)]))


def _rectangle(xs: Sequence[float], ys: Sequence[float], what: str) -> Polygon:
    if len(xs) >= 3:
        return Polygon(_ring(list(zip(xs, ys, strict=True)), what))
    if len(xs) == 2 and xs[0] != xs[1] and ys[0] != ys[1]:
        return box(min(xs), min(ys), max(xs), max(ys))
    raise _Bad(f"{what} is a rectangle without two opposite corners")


# ImageScope numeric region types, and HALO's names for the same shapes (HALO shares the <Annotations> layout).
_REGION_TYPES = {
    "0": "0",
    "1": "1",
    "2": "2",
    "3": "3",
    "4": "4",
    "5": "5",
    "polygon": "0",
    "rectangle": "1",
    "ellipse": "2",
    "ruler": "4",
    "pin": "5",
}


def _read_imagescope(root: Any) -> tuple[list[tuple[str, list[Polygon], list[Polygon]]], list[str]]:
    """Aperio ImageScope (and Indica HALO): Annotation > Regions > Region(Type, NegativeROA) > Vertices > Vertex.

    Region types: 0 free-hand/polygon, 1 rectangle (its corner vertices), 2 ellipse (inscribed in the bounding
    box of its vertices), 3 arrow and 4 ruler (lines, skipped), 5 point (skipped); HALO names them Polygon,
    Rectangle, Ellipse, Ruler and Pin and writes vertices as ``<V X=".." Y=".."/>``. NegativeROA="1" regions are
    subtracted from their annotation.
    """
    shapes: list[tuple[str, list[Polygon], list[Polygon]]] = []
    skipped: list[str] = []
    annotations = _children(root, "Annotation")
    if not annotations:
        raise _Bad("ImageScope XML without <Annotation> elements")
    for a_k, ann in enumerate(annotations):
        ann_id = ann.get("Id") or str(a_k + 1)
        name = (ann.get("Name") or "").strip()
        if not name:
            # An Attribute's Name is ImageScope's column header, "Description" unless renamed, and its Value the
            # text typed in that column: the label is a Value, else a header other than the default one.
            attrs = [a for group in _children(ann, "Attributes") for a in _children(group, "Attribute")]
            values = [(a.get("Value") or "").strip() for a in attrs]
            headers = [(a.get("Name") or "").strip() for a in attrs]
            name = next((v for v in values if v), "") or next(
                (h for h in headers if h and h.lower() != "description"), ""
            )
        name = name or f"Annotation {ann_id}"
        positive: list[Polygon] = []
        negative: list[Polygon] = []
        for regions in _children(ann, "Regions"):
            for reg in _children(regions, "Region"):
                what = f"annotation {ann_id!r} region {reg.get('Id', '?')!r}"
                kind = _REGION_TYPES.get(
                    (reg.get("Type") or "0").strip().lower(), (reg.get("Type") or "").strip()
                )
                # ImageScope writes <Vertex>, HALO writes <V>.
                verts = [
                    v for vs in _children(reg, "Vertices") for v in vs if _local(v.tag) in ("Vertex", "V")
                ]
                xs = [_number(v.get("X"), f"{what} vertex X") for v in verts]
                ys = [_number(v.get("Y"), f"{what} vertex Y") for v in verts]
                if kind == "0":
                    poly = Polygon(_ring(list(zip(xs, ys, strict=True)), what))
                elif kind == "1":
                    poly = _rectangle(xs, ys, what)
                elif kind == "2":
                    if len(xs) < 2:
                        raise _Bad(f"{what} is an ellipse without its bounding vertices")
                    poly = _ellipse(xs, ys)
                elif kind in ("3", "4", "5"):
                    skipped.append(f"{what} (type {kind}: arrow, ruler or point)")
                    continue
                else:
                    raise _Bad(f"{what} has unknown Type={kind!r} (expected 0 to 5 or a HALO shape name)")
                negative_roa = (reg.get("NegativeROA") or "0").strip()
                if negative_roa not in ("0", "1"):
                    raise _Bad(f"{what} has NegativeROA={negative_roa!r} (expected 0 or 1)")
                (negative if negative_roa == "1" else positive).append(poly)
        shapes.append((name, positive, negative))
    return shapes, skipped


def _read_asap(root: Any) -> tuple[list[tuple[str, list[Polygon], list[Polygon]]], list[str]]:
    """ASAP: Annotations > Annotation(Name, Type, PartOfGroup) > Coordinates > Coordinate(Order, X, Y)."""
    shapes: list[tuple[str, list[Polygon], list[Polygon]]] = []
    skipped: list[str] = []
    anns = [a for block in _children(root, "Annotations") for a in _children(block, "Annotation")]
    for k, ann in enumerate(anns):
        label = ann.get("Name") or f"Annotation {k}"
        what = f"annotation {label!r}"
        group = (ann.get("PartOfGroup") or "").strip()
        name = group if group and group.lower() != "none" else (ann.get("Name") or "").strip() or "annotation"
        kind = (ann.get("Type") or "Polygon").strip()
        coords = [c for cs in _children(ann, "Coordinates") for c in _children(cs, "Coordinate")]
        pts = []
        for n, c in enumerate(coords):
            order = _number(c.get("Order", n), f"{what} coordinate Order")
            pts.append((order, _number(c.get("X"), f"{what} X"), _number(c.get("Y"), f"{what} Y")))
        pts.sort(key=lambda p: p[0])
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        if kind in ("Polygon", "Spline"):
            # ASAP draws splines through their control points; the polygon of the points is within a few px.
            poly = Polygon(_ring(list(zip(xs, ys, strict=True)), what))
        elif kind == "Rectangle":
            poly = _rectangle(xs, ys, what)
        elif kind in ("Dot", "PointSet", "Measurement"):
            skipped.append(f"{what} ({kind})")
            continue
        else:
            raise _Bad(f"{what} has unknown Type={kind!r}")
        shapes.append((name, [poly], []))
    if not anns:
        raise _Bad("ASAP XML without <Annotation> elements")
    return shapes, skipped


def _read_xml(data: bytes) -> tuple[list[tuple[str, list[Polygon], list[Polygon]]], list[str]]:
    try:
        root = SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DTDForbidden:
        raise _Bad(
            "XML with a DTD (<!DOCTYPE>) is refused; export the annotations again without one"
        ) from None
    except defusedxml.DefusedXmlException as e:
        raise _Bad(f"hostile XML refused ({type(e).__name__}); export the annotations again") from None
    except SafeET.ParseError as e:
        raise _Bad(f"malformed XML: {e}") from None
    tag = _local(root.tag)
    if tag == "Annotations":
        return _read_imagescope(root)
    if tag == "ASAP_Annotations":
        return _read_asap(root)
    raise _Bad(f"XML root <{tag}> is neither ImageScope <Annotations> nor ASAP <ASAP_Annotations>")


def read_regions(path: str | os.PathLike[str]) -> list[Region]:
    """Read the regions of one annotation file.

    Parameters
    ----------
    path : str or PathLike
        A QuPath GeoJSON file (FeatureCollection, list of Features, one Feature or one geometry), an Aperio
        ImageScope XML file or an ASAP XML file; the format is told by content. Coordinates are level-0 pixels.

    Returns
    -------
    list of Region
        One region per name, in order of first appearance; shapes of the same name are unioned. GeoJSON names
        come from ``properties.classification.name``, else ``properties.name``, else ``"annotation"``;
        ImageScope from the Annotation's ``Name``, else its first non-empty Attribute ``Value`` (the text typed in
        the layer's attribute column), else an Attribute ``Name`` other than ImageScope's default column header
        ``Description``, else ``"Annotation <Id>"``
        (NegativeROA regions are subtracted from their annotation); ASAP from ``PartOfGroup`` unless ``None``,
        else ``Name``.

    Raises
    ------
    RegionsError
        The file is missing, too large, not an annotation file, malformed or hostile (entity expansion, external
        entities, DTDs), has non-numeric or non-finite coordinates, an empty polygon, or no polygon at all.

    Notes
    -----
    Points, lines, rulers, arrows, empty geometries, and QuPath detections, cells and tiles (``objectType``,
    or its aliases ``object_type`` and ``type``, other than ``annotation``; QuPath 0.2's feature ``id`` such as
    ``PathCellObject``) are not regions: they are skipped with a logged warning. Invalid polygons
    (self-intersections) are repaired ring by ring (the outline's enclosed area, less its holes) and logged.
    Coordinates beyond ±2³² px are refused. UTF-8 and UTF-16 (with a byte-order mark) files are read.
    """
    p = Path(path)
    if not p.is_file():
        raise RegionsError("annotation file not found; check the --regions path", path=p)
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise RegionsError(
            f"annotation file is {size / 2**20:.0f} MB, above the {MAX_FILE_BYTES // 2**20} MB limit; "
            "export only the annotations (not detections) or simplify them",
            path=p,
        )
    try:
        data = p.read_bytes()
    except OSError as e:
        raise RegionsError(
            f"cannot read the annotation file ({e.strerror}); check its permissions", path=p
        ) from None
    try:
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # UTF-16 with a BOM (Windows tools): GeoJSON or XML
            text16 = data.decode("utf-16", errors="replace").lstrip("\ufeff \t\r\n")
            if text16[:1] in ("{", "["):
                data = text16.encode("utf-8")
        head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        if head in (b"{", b"["):
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise _Bad("GeoJSON is not UTF-8 text") from None
            shapes, skipped = _read_geojson(text)
            fmt = "geojson"
        elif head == b"<" or data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # UTF-16 XML starts with a BOM
            shapes, skipped = _read_xml(data)
            fmt = "xml"
        else:
            raise _Bad("not a GeoJSON or XML annotation file")
        regions = _assemble(shapes, source=str(p), fmt=fmt)
    except _Bad as e:
        raise RegionsError(
            f"{e}; fix or re-export the annotation file (QuPath GeoJSON, ImageScope or ASAP XML)", path=p
        ) from None
    except (ValueError, TypeError, shapely.errors.GEOSException) as e:
        raise RegionsError(f"unusable geometry ({e}); fix or re-export the annotation file", path=p) from None
    if skipped:
        log.warning("%s: skipped %d non-area shape(s): %s", p, len(skipped), "; ".join(skipped[:5]))
    return regions


def _assemble(
    shapes: list[tuple[str, list[Polygon], list[Polygon]]], *, source: str, fmt: str
) -> list[Region]:
    n_vertices = sum(len(q.exterior.coords) for _, pos, neg in shapes for q in (*pos, *neg))
    if n_vertices > _MAX_VERTICES:
        raise _Bad(f"{n_vertices} vertices is more than an annotation file can sensibly hold")
    repaired: list[str] = []
    by_name: dict[str, list[BaseGeometry]] = {}
    counts: dict[str, int] = {}
    for k, (name, pos, neg) in enumerate(shapes):
        if not pos:
            continue
        geom = shapely.union_all([_clean(q, f"{name!r} shape {k}", repaired) for q in pos])
        if neg:
            geom = geom.difference(
                shapely.union_all([_clean(q, f"{name!r} exclusion {k}", repaired) for q in neg])
            )
        by_name.setdefault(name, []).append(geom)
        counts[name] = counts.get(name, 0) + len(pos)
    if repaired:
        log.warning(
            "%s: repaired %d invalid polygon(s) with make_valid: %s",
            source,
            len(repaired),
            "; ".join(repaired[:5]),
        )
    if not by_name:
        raise _Bad("no polygon annotations found (only points, lines or detections)")
    regions = []
    for name, geoms in by_name.items():
        geom = polygonal(shapely.union_all(geoms))
        if geom.is_empty or geom.area <= 0:
            raise _Bad(
                f"region {name!r} has zero area (its exclusions cover it, or its polygons are degenerate)"
            )
        if len(geom.geoms) == 1:
            geom = geom.geoms[0]
        regions.append(Region(name, geom, source, {"format": fmt, "n_shapes": counts[name]}))
    return regions


def regions_for_slide(
    path_or_folder: str | os.PathLike[str], slide_path: str | os.PathLike[str]
) -> list[Region]:
    """The user regions for one slide.

    Parameters
    ----------
    path_or_folder : str or PathLike
        One annotation file (used for the slide), or a folder holding ``<slide stem>.geojson``, ``.json`` or
        ``.xml`` (for ``name.ome.tif`` the stem is ``name``), or the same after the slide's whole file name
        (``name.ome.tif.geojson``, as QuPath scripts export them); the match ignores case.
    slide_path : str or PathLike
        The slide.

    Returns
    -------
    list of Region
        Empty (and logged) when the folder holds no file for this slide.

    Raises
    ------
    RegionsError
        The path does not exist, the folder holds several files for the slide, or the file is unusable.
    """
    found = regions_file_for_slide(path_or_folder, slide_path)
    if found is None:  # a warning: rows of the annotated regions will be missing for this slide
        log.warning(
            "%s: no annotation file for slide %s (looked for %s[.ext].{geojson,json,xml})",
            path_or_folder,
            slide_path,
            slide_stem(slide_path),
        )
        return []
    return read_regions(found)


def regions_file_for_slide(
    path_or_folder: str | os.PathLike[str], slide_path: str | os.PathLike[str]
) -> Path | None:
    """The annotation file :func:`regions_for_slide` reads for a slide, or None when a folder has none for it.

    Raises
    ------
    RegionsError
        The path does not exist, or the folder holds several files for the slide.
    """
    p = Path(path_or_folder)
    if p.is_file():
        return p
    if not p.is_dir():
        raise RegionsError("regions path not found; give an annotation file or a folder of them", path=p)
    stem = slide_stem(slide_path)
    # `<stem>.geojson`, or `<file name>.geojson` as QuPath scripts name exports (getImageName() + ".geojson").
    wanted = {
        f"{base}{ext}".lower(): i
        for base in (stem, Path(slide_path).name)
        for i, ext in enumerate(REGION_FILE_EXTENSIONS)
    }
    found = sorted(
        (wanted[f.name.lower()], f) for f in p.iterdir() if f.name.lower() in wanted and f.is_file()
    )
    if len(found) > 1:
        names = ", ".join(f.name for _, f in found)
        raise RegionsError(f"several annotation files for slide {stem!r} ({names}); keep one", path=p)
    return found[0][1] if found else None


def regions_to_geojson(regions: Iterable[Region]) -> dict[str, Any]:
    """A QuPath-importable FeatureCollection: one annotation per region, classified by its name."""
    features = []
    for r in regions:
        props = {k: v for k, v in r.properties.items() if k not in ("objectType", "name", "classification")}
        props["source"] = r.source
        features.append(to_feature(r.geometry, name=r.name, classification=r.name, properties=props))
    return feature_collection(features)


def write_geojson(regions: Iterable[Region], path: str | os.PathLike[str]) -> None:
    """Write regions as QuPath GeoJSON, atomically (a crash leaves the old file or the new one)."""
    text = json.dumps(regions_to_geojson(regions), allow_nan=False, separators=(",", ":"))
    with atomic_write(path, mode="w") as f:
        f.write(text)


def merge_regions(automatic: Sequence[Region], user: Sequence[Region]) -> list[Region]:
    """Automatic regions with user regions replacing those of the same name.

    Order: ``tissue`` first (whichever list holds it), then the automatic order, then user-only regions in their
    order.
    """
    user_by_name = {r.name: r for r in user}
    auto_names = [r.name for r in automatic]
    merged = [user_by_name.get(r.name, r) for r in automatic]
    merged += [r for r in user if r.name not in auto_names]
    return sorted(merged, key=lambda r: r.name != "tissue")  # stable: only moves tissue to the front


# ---------------------------------------------------------------------------------------------------------------
# Automatic skin compartments
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompartmentParams:
    """How the epidermis, dermis and depth bands are found (the ``[compartments]`` table of a protocol).

    Parameters
    ----------
    enabled : bool
        Find skin compartments automatically (turn off for tissue that is not skin).
    mpp_um : float
        Working resolution, µm per pixel, of the low-resolution counterstain map (2 to 4 µm/px is enough).
    papillary_um : float
        Papillary dermis: depth [0, papillary_um) below the DEJ.
    superficial_um : float
        Superficial dermis: depth [papillary_um, superficial_um); the deep dermis is below. Greater than
        `papillary_um`.
    nuclear_sigma_um : float
        Gaussian sigma (µm) smoothing counterstain OD into a local nuclear density (~2.5·sigma window).
    opening_um : float
        Radius (µm) of a morphological opening of the dense tissue that cuts thin bridges to dense dermal
        infiltrates; 0 turns it off.
    threshold_od : float
        Density threshold in OD; 0 chooses it automatically (Otsu on the smoothed density of the tissue within
        ``threshold_band_um`` of the air).
    threshold_band_um : float
        Depth of the surface band (µm) whose densities set the automatic threshold.
    min_contrast : float
        The epidermis's mean density must be at least this times the median density of the rest of the tissue.
    min_epidermis_um2 : float
        Smallest epidermis piece kept (µm²).
    max_epidermis_thickness_um : float
        Largest typical thickness of an epidermis piece (twice the median distance of its pixels to the air);
        thicker dense masses are infiltrates or tumour, not epidermis.
    max_surface_gap_um : float
        The epidermis must come within this distance of the tissue surface (room for a stratum corneum).
    max_corneum_um : float
        Thin non-dense tissue between the epidermis and the air (stratum corneum, up to this thickness) is
        counted as epidermis.
    """

    enabled: bool = True  # find skin compartments automatically
    mpp_um: float = 4.0  # working resolution, µm per pixel (as accurate as 2 on the samples, 4x faster)
    papillary_um: float = 150.0  # papillary dermis: [0, papillary_um) below the DEJ
    superficial_um: float = 500.0  # superficial dermis: [papillary_um, superficial_um); deep dermis below
    nuclear_sigma_um: float = 10.0  # Gaussian sigma of the nuclear-density smoothing, µm
    opening_um: float = 10.0  # radius of the opening that detaches dermal infiltrates, µm; 0 = off
    threshold_od: float = 0.0  # density threshold (OD); 0 = automatic (Otsu)
    threshold_band_um: float = 200.0  # the automatic threshold looks at tissue this close to the air, µm
    min_contrast: float = 1.7  # epidermis density / median density of the other tissue, at least
    min_epidermis_um2: float = 20000.0  # smallest epidermis piece, µm²
    max_epidermis_thickness_um: float = (
        400.0  # largest thickness of an epidermis piece (2 x median depth), µm
    )
    max_surface_gap_um: float = 60.0  # the epidermis lies within this distance of the tissue surface, µm
    max_corneum_um: float = 60.0  # thin tissue above the epidermis counted as stratum corneum, µm

    def __post_init__(self) -> None:
        # Each rule is phrased as what is allowed, so the protocol loader can show it after "[compartments] key =
        # value:" (the `compartments.` prefix names the table when the class is built directly in Python).
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"compartments.{name} = {getattr(self, name)!r}: must be {rule}")

        if not isinstance(self.enabled, bool):
            raise ValueError(f"compartments.enabled = {self.enabled!r}: must be true or false")
        need(0.1 <= self.mpp_um <= 50.0, "mpp_um", "between 0.1 and 50 µm per pixel (2 to 4 is enough)")
        need(0.0 < self.papillary_um, "papillary_um", "a depth greater than 0 µm below the DEJ")
        need(
            self.papillary_um < self.superficial_um,
            "superficial_um",
            f"greater than papillary_um = {self.papillary_um!r} (the superficial band starts where the papillary "
            "band ends)",
        )
        need(0.0 < self.nuclear_sigma_um <= 500.0, "nuclear_sigma_um", "greater than 0 and at most 500 µm")
        need(0.0 <= self.opening_um <= 500.0, "opening_um", "between 0 (off) and 500 µm")
        need(0.0 <= self.threshold_od <= 10.0, "threshold_od", "between 0 (automatic) and 10 OD")
        need(0.0 < self.threshold_band_um, "threshold_band_um", "greater than 0 µm")
        need(
            1.0 <= self.min_contrast <= 100.0,
            "min_contrast",
            "a ratio between 1 and 100 (the epidermis is denser than the rest of the tissue)",
        )
        need(0.0 <= self.min_epidermis_um2, "min_epidermis_um2", "at least 0 µm²")
        need(0.0 < self.max_epidermis_thickness_um, "max_epidermis_thickness_um", "greater than 0 µm")
        need(0.0 <= self.max_surface_gap_um, "max_surface_gap_um", "at least 0 µm")
        need(0.0 <= self.max_corneum_um, "max_corneum_um", "at least 0 µm")


@dataclass(frozen=True)
class Compartments:
    """Skin compartments at the working resolution.

    Attributes
    ----------
    masks : dict of str to (H, W) bool ndarray
        ``epidermis``, ``dermis``, ``papillary_dermis``, ``superficial_dermis``, ``deep_dermis`` (read-only).
    mpp_um : float
        Microns per mask pixel.
    downsample : float
        Level-0 pixels per mask pixel.
    origin_px : (x, y)
        Level-0 position of the masks' top-left corner.
    warnings : tuple of str
        Why a compartment is empty (e.g. no epidermis found).
    depth_um : (H, W) float32 ndarray
        Distance below the DEJ in the dermis (NaN elsewhere and when there is no epidermis).
    """

    masks: dict[str, np.ndarray]
    mpp_um: float
    downsample: float
    origin_px: tuple[float, float] = (0.0, 0.0)
    warnings: tuple[str, ...] = ()
    depth_um: np.ndarray | None = field(default=None, repr=False)

    def to_regions(self) -> list[Region]:
        """Non-empty compartments as Regions (exact pixel outlines in level-0 px, source ``"auto"``)."""
        out = []
        for name in COMPARTMENT_NAMES:
            m = self.masks.get(name)
            if m is None or not m.any():
                continue
            geom = mask_to_polygons(m, downsample=self.downsample, origin_px=self.origin_px)
            out.append(Region(name, geom, "auto", {"mpp_um": self.mpp_um}))
        return out

    def to_geojson(self) -> dict[str, Any]:
        """The compartments as a QuPath FeatureCollection."""
        return regions_to_geojson(self.to_regions())


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def skin_compartments(
    counterstain_od: np.ndarray,
    tissue_mask: np.ndarray,
    *,
    mpp_um: float,
    downsample: float,
    origin_px: tuple[float, float] = (0.0, 0.0),
    params: CompartmentParams | None = None,
) -> Compartments:
    """Find the epidermis, the dermis and the depth bands below the dermo-epidermal junction.

    Parameters
    ----------
    counterstain_od : (H, W) float ndarray
        Counterstain optical density (hematoxylin or nuclear fast red) from a low-resolution image.
    tissue_mask : (H, W) bool ndarray
        Tissue at the same resolution.
    mpp_um : float
        Microns per pixel of both arrays.
    downsample : float
        Level-0 pixels per pixel of both arrays (for :meth:`Compartments.to_regions`).
    origin_px : (x, y)
        Level-0 position of the arrays' top-left corner.
    params : CompartmentParams, optional
        Parameters; defaults if omitted.

    Returns
    -------
    Compartments
        With a warning, and the epidermis and depth bands empty (dermis = tissue), when no epidermis is found.

    Notes
    -----
    1. Local nuclear density: counterstain OD smoothed by a Gaussian of ``nuclear_sigma_um``, normalised by the
       smoothed tissue mask so density does not fall off at the tissue surface (normalised convolution,
       Knutsson & Westin 1993).
    2. Dense tissue: density above ``threshold_od`` or, by default, Otsu's threshold (Otsu 1979) of the
       densities within ``threshold_band_um`` of the air; then an opening of radius ``opening_um``.
    3. Epidermis: dense pieces of at least ``min_epidermis_um2`` that reach within ``max_surface_gap_um`` of the
       air, whose thickness (twice the median distance to the air) is at most ``max_epidermis_thickness_um``,
       and that are at least ``min_contrast`` times denser than the rest of the tissue; small holes are filled
       and thin tissue between them and the air (stratum corneum) is added.
    4. Depth below the DEJ: Euclidean distance to the epidermis (µm, exact, from the ``edt`` package, as
       ``scipy.ndimage.distance_transform_edt`` with ``sampling=mpp_um`` gives it) measured to the junction,
       i.e. minus half a pixel, so a band [a, b) is the set of dermis pixels whose centre lies a to b µm from
       the junction.

    The method relies on the counterstain: where the target stain is strong in the whole epidermis (a keratin
    marker, heavy keratinocyte CXCL10) the counterstain there is masked and the epidermis may be missed or the
    dermis taken for it; check ``warnings`` and the QC image, and draw the epidermis in a ``--regions`` file
    (then :func:`compartments_from_epidermis` gives the bands below it).
    """
    p = params if params is not None else CompartmentParams()
    od_in = np.asarray(counterstain_od)
    tissue = np.asarray(tissue_mask).astype(bool)
    if od_in.ndim != 2 or tissue.shape != od_in.shape:
        raise ValueError(
            f"counterstain_od {od_in.shape} and tissue_mask {tissue.shape} must be the same 2-D shape"
        )
    if not mpp_um > 0 or not downsample > 0:
        raise ValueError("mpp_um and downsample must be > 0")
    warnings: list[str] = []
    epidermis = np.zeros_like(tissue)
    win = _tissue_window(tissue)
    if not p.enabled:
        warnings.append("automatic compartments are disabled in the protocol")
    elif win is None:
        warnings.append("no tissue: no compartments")
    else:
        # A fresh float32 copy that _find_epidermis consumes (no name here keeps it alive while that runs).
        epi, why = _find_epidermis(
            np.nan_to_num(
                np.array(od_in[win], dtype=np.float32), copy=False, nan=0.0, posinf=0.0, neginf=0.0
            ),
            tissue[win],
            mpp_um,
            p,
        )
        if why:
            warnings.append(why)
        epidermis[win] = epi
    return _compartments(epidermis, tissue, mpp_um, downsample, origin_px, p, warnings, with_bands=p.enabled)


def compartments_from_epidermis(
    epidermis_mask: np.ndarray,
    tissue_mask: np.ndarray,
    *,
    mpp_um: float,
    downsample: float,
    origin_px: tuple[float, float] = (0.0, 0.0),
    params: CompartmentParams | None = None,
) -> Compartments:
    """Dermis and depth bands below a given epidermis (e.g. one a user drew, rasterised at the working resolution).

    Use it when a ``--regions`` file replaces the automatic ``epidermis``, so that the dermis and the depth bands
    are measured from the user's junction rather than the automatic one.

    Parameters
    ----------
    epidermis_mask, tissue_mask : (H, W) bool ndarray
        The epidermis (clipped to the tissue) and the tissue, at the working resolution.
    mpp_um, downsample, origin_px, params
        As for :func:`skin_compartments` (only ``papillary_um`` and ``superficial_um`` of `params` are used).

    Returns
    -------
    Compartments
        Depth bands as in :func:`skin_compartments`; a warning when the epidermis does not overlap the tissue.
    """
    p = params if params is not None else CompartmentParams()
    epi = np.asarray(epidermis_mask).astype(bool)
    tissue = np.asarray(tissue_mask).astype(bool)
    if epi.ndim != 2 or epi.shape != tissue.shape:
        raise ValueError(
            f"epidermis_mask {epi.shape} and tissue_mask {tissue.shape} must be the same 2-D shape"
        )
    if not mpp_um > 0 or not downsample > 0:
        raise ValueError("mpp_um and downsample must be > 0")
    epi = epi & tissue
    warnings = [] if epi.any() else ["the given epidermis does not overlap the tissue"]
    return _compartments(epi, tissue, mpp_um, downsample, origin_px, p, warnings, with_bands=True)


def _distance_um(mask: np.ndarray, mpp_um: float) -> np.ndarray:
    """Exact Euclidean distance (µm, float32) from every True pixel to the nearest False one (0 on False).

    The ``edt`` package rather than ``scipy.ndimage.distance_transform_edt``: the same distances (to float32
    rounding), without scipy's float64 output and feature transform (33 rather than 262 MB on an 8 M-pixel
    overview, the whole-slide grid cap) and about 5x faster.
    """
    return edt.edt(
        np.ascontiguousarray(mask, dtype=bool), anisotropy=(mpp_um, mpp_um), black_border=False, parallel=1
    )


def _median_by_label(values: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Median of `values` over each label in `ids` (mean of the two middle values for an even count), as
    ``scipy.ndimage.median`` gives it, sorting only the pixels of those labels (scipy sorts the whole image:
    about 200 MB more on an 8 M-pixel overview)."""
    lookup = np.zeros(int(labels.max()) + 1, dtype=bool)
    lookup[ids] = True
    sel = lookup[labels]
    lab, val = labels[sel], values[sel].astype(np.float64)
    order = np.lexsort((val, lab))
    lab, val = lab[order], val[order]
    lo = np.searchsorted(lab, ids, side="left")
    hi = np.searchsorted(lab, ids, side="right") - 1
    return 0.5 * (val[(lo + hi) // 2] + val[(lo + hi + 1) // 2])


def _tissue_window(tissue: np.ndarray) -> tuple[slice, slice] | None:
    """The tissue's bounding box plus 2 px of air, or None without tissue.

    Outside the tissue every term of the computation is zero, so working on this window gives the identical
    result while a slide-sized map costs only its tissue.
    """
    if tissue.sum() < 4:
        return None
    rows, cols = np.flatnonzero(tissue.any(axis=1)), np.flatnonzero(tissue.any(axis=0))
    return (
        slice(max(rows[0] - 2, 0), rows[-1] + 3),
        slice(max(cols[0] - 2, 0), cols[-1] + 3),
    )


def _compartments(
    epidermis: np.ndarray,
    tissue: np.ndarray,
    mpp_um: float,
    downsample: float,
    origin_px: tuple[float, float],
    p: CompartmentParams,
    warnings: list[str],
    *,
    with_bands: bool,
) -> Compartments:
    """Dermis and depth bands (Euclidean distance below the junction) from an epidermis mask."""
    masks = {name: np.zeros_like(tissue) for name in COMPARTMENT_NAMES}
    masks["epidermis"] = epidermis
    masks["dermis"] = tissue & ~epidermis
    depth = np.full(tissue.shape, np.nan, dtype=np.float32)
    win = _tissue_window(tissue)
    if epidermis.any() and win is not None:
        epi, dermis = epidermis[win], masks["dermis"][win]
        d = _distance_um(~epi, mpp_um)
        d -= np.float32(0.5 * mpp_um)
        np.copyto(depth[win], d, where=dermis)
        masks["papillary_dermis"][win] = dermis & (d < p.papillary_um)
        masks["superficial_dermis"][win] = dermis & (d >= p.papillary_um) & (d < p.superficial_um)
        masks["deep_dermis"][win] = dermis & (d >= p.superficial_um)
    elif with_bands and win is not None:
        warnings.append("depth bands undefined without an epidermis")
    for w in warnings:
        log.warning("skin compartments: %s", w)
    return Compartments(
        masks={k: _readonly(v) for k, v in masks.items()},
        mpp_um=float(mpp_um),
        downsample=float(downsample),
        origin_px=(float(origin_px[0]), float(origin_px[1])),
        warnings=tuple(warnings),
        depth_um=_readonly(depth),
    )


def _find_epidermis(
    od: np.ndarray, tissue: np.ndarray, mpp_um: float, p: CompartmentParams
) -> tuple[np.ndarray, str]:
    """The epidermis mask, or an empty mask and the reason none was found.

    `od` is a private float32 copy that this function consumes (it is overwritten and dropped early: whole-slide
    grids reach 8 M pixels).
    """
    # Imported here: Dask workers import this module (a protocol's CompartmentParams) but never run this.
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    none = np.zeros_like(tissue)
    sigma_px = p.nuclear_sigma_um / mpp_um
    # Whole-slide grids reach 8 M pixels: temporaries are dropped as soon as they are used (del below).
    weight = ndi.gaussian_filter(tissue.astype(np.float32), sigma_px, mode="constant")
    np.maximum(weight, np.float32(1e-6), out=weight)
    od *= tissue
    density = ndi.gaussian_filter(od, sigma_px, mode="constant")
    density /= weight
    del od, weight
    # Distance of tissue pixels to the air (outside the tissue), µm.
    to_air = _distance_um(np.pad(tissue, 1), mpp_um)[1:-1, 1:-1]
    if p.threshold_od > 0:
        thr = p.threshold_od
    else:
        # Otsu near the surface, where epidermis and dermis are present in comparable amounts; over the whole
        # section the deep dermis dominates and pulls the threshold into the dense papillary infiltrate.
        band = tissue & (to_air <= p.threshold_band_um)
        values = density[band] if band.sum() >= 16 else density[tissue]
        if np.ptp(values) <= 0:
            return none, "no epidermis found (uniform counterstain)"
        thr = float(threshold_otsu(values))
    dense = tissue & (density > thr)
    radius_px = round(p.opening_um / mpp_um)
    if radius_px >= 1:
        # Cut thin bridges between the epidermis and dense dermal infiltrates at the junction (interface
        # dermatitis), so that they do not pull the DEJ down.
        dense = ndi.binary_opening(dense, structure=disk(radius_px))
    labels, n = ndi.label(dense)
    if n == 0:
        return none, "no epidermis found (no dense nuclear layer)"
    area_um2 = label_sizes(labels, n) * mpp_um**2
    near_air = np.zeros(n + 1, dtype=bool)
    near_air[labels[dense & (to_air <= p.max_surface_gap_um + mpp_um)]] = True
    keep = (area_um2 >= p.min_epidermis_um2) & near_air
    keep[0] = False
    if not keep[1:].any():
        return none, "no epidermis found (no dense layer of the minimum size at the tissue surface)"
    # Typical thickness of a piece: twice the median distance of its pixels to the air. A layer of thickness T
    # along the surface gives ~T; a dense mass reaching deep into the dermis gives its depth.
    ids = np.flatnonzero(keep)
    median_to_air = _median_by_label(to_air, labels, ids)
    for k, m in zip(ids.tolist(), median_to_air.tolist(), strict=True):
        if 2.0 * m > p.max_epidermis_thickness_um:
            keep[k] = False
    epi = keep[labels]
    del labels
    if not epi.any():
        return none, "no epidermis found (dense regions at the surface are too thick to be epidermis)"
    rest = tissue & ~epi
    ref = float(np.median(density[rest], overwrite_input=True)) if rest.any() else 0.0  # sorts its own copy
    contrast = float(np.mean(density[epi])) / ref if ref > 0 else np.inf
    del rest, density
    if contrast < p.min_contrast:
        return none, (
            f"no epidermis found (surface layer only {contrast:.2f}x denser than the dermis, "
            f"below min_contrast {p.min_contrast})"
        )
    # Fill holes up to a few density-smoothing windows (pale cell clusters), not dermal papillae cut across.
    holes = ndi.binary_fill_holes(epi) & ~epi & tissue
    hl, hn = ndi.label(holes)
    if hn:
        small = label_sizes(hl, hn) * mpp_um**2 <= (4.0 * p.nuclear_sigma_um) ** 2
        small[0] = False
        epi = epi | small[hl]
    del holes, hl
    # Stratum corneum: thin non-dense tissue pieces lying between the epidermis and the air.
    if p.max_corneum_um > 0:
        # Labelled with the distance transform's one-pixel frame, so both are contiguous and flatten as views.
        other_framed = np.pad(tissue & ~epi, 1)
        ol_framed, on_ = ndi.label(other_framed)
        if on_:
            inner = _distance_um(other_framed, mpp_um)
            thickest = np.zeros(on_ + 1, dtype=np.float32)
            np.maximum.at(
                thickest, ol_framed.ravel(), inner.ravel()
            )  # ndimage.maximum: ~14 bytes a pixel more
            del inner
            thickest = thickest[1:]
            sizes = label_sizes(ol_framed, on_)[1:]
            largest = int(np.argmax(sizes)) + 1
            other, ol = other_framed[1:-1, 1:-1], ol_framed[1:-1, 1:-1]
            touches_epi = np.zeros(on_ + 1, dtype=bool)
            touches_epi[ol[ndi.binary_dilation(epi) & other]] = True
            touches_air = np.zeros(on_ + 1, dtype=bool)
            touches_air[ol[other & (to_air <= mpp_um)]] = True
            corneum = np.zeros(on_ + 1, dtype=bool)
            corneum[1:] = (
                (2.0 * np.asarray(thickest) <= p.max_corneum_um + mpp_um) & touches_epi[1:] & touches_air[1:]
            )
            corneum[largest] = False  # the dermis itself is never corneum
            corneum[0] = False
            epi = epi | corneum[ol]
    return epi, ""
