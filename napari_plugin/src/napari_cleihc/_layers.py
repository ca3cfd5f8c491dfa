"""Pure functions from slides and cleihc results to napari ``LayerDataTuple`` s (no Qt, no viewer).

World coordinates are micrometres when the slide has a microns-per-pixel (MPP), else level-0 pixels. Vector
layers (shapes, points) hold **level-0 pixel** data (continuous coordinates: pixel ``p`` spans ``[p, p+1)``, as in
cleihc) with ``scale = µm per level-0 pixel``, so drawn shapes and added points are level-0 pixels as they are;
raster layers are translated by half a pixel so that their pixel centres land on the same world position.

Every layer made here carries ``metadata["cleihc"]``: its ``role`` (``slide``, ``tissue``, ``regions``,
``exclusions``, ``positive``, ``cells``, ``preview``), the slide's name and, for results, the results folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import shapely
from dask.base import tokenize
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from cleihc.errors import CleihcError
from cleihc.geometry import polygonal, region_color
from cleihc.slide import AnalysisResolution, Slide, open_slide, slide_stem

__all__ = [
    "CLASS_COLORS",
    "CLASS_NAMES",
    "META_KEY",
    "LayerDataTuple",
    "ResultsSlide",
    "cell_classes",
    "cells_layer",
    "class_fields",
    "exclusions_layer",
    "geometries_from_shapes",
    "is_results_folder",
    "is_run_exclusion",
    "layer_data_px",
    "mask_image",
    "new_load_id",
    "points_px",
    "positive_layer",
    "preview_layer",
    "read_mask_levels",
    "read_regions_geojson",
    "result_layers",
    "results_folder_layers",
    "results_slides",
    "run_exclusions_layer",
    "shape_parts",
    "shapes_layer",
    "slide_layer",
    "slide_levels",
    "to_level0_px",
    "visible_rect_px",
    "world_per_px",
]

log = logging.getLogger(__name__)

LayerDataTuple = tuple[Any, dict[str, Any], str]

#: The metadata key under which every layer made here describes itself.
META_KEY = "cleihc"

#: Cell classes as shown (QuPath's convention: negative, then intensity bins 1+, 2+, 3+ of positive cells).
CLASS_NAMES = ("negative", "1+", "2+", "3+")
CLASS_COLORS = {"negative": "#3a6fe0", "1+": "#ffd21f", "2+": "#ff8a1a", "3+": "#e0102f"}

#: Colour of exclusion polygons and of painted exclusions.
EXCLUSION_COLOR = "#ff00ff"

_SHAPES_FEATURE = "region"


def _positive_colormap() -> Any:
    # Transparent where nothing is positive, opaque red where all is: visible on a white brightfield slide,
    # where additive blending would not show.
    from napari.utils.colormaps import Colormap

    return Colormap([[1.0, 0.0, 0.1, 0.0], [1.0, 0.0, 0.1, 1.0]], name="cleihc positive")


def world_per_px(slide: Slide) -> tuple[float, float]:
    """World units per level-0 pixel, ``(y, x)``: the slide's µm/px, or 1 when it has no MPP."""
    if slide.has_mpp:
        mx, my = slide.mpp
        return float(my), float(mx)
    return 1.0, 1.0


def _chunks(n: int, c: int) -> tuple[int, ...]:
    return tuple([c] * (n // c) + ([n % c] if n % c else [])) or (0,)


def _level_array(slide: Slide, res: AnalysisResolution, chunk_px: int) -> da.Array:
    w, h = res.dimensions_a

    warned: list[bool] = []

    def read(block_info: dict | None = None) -> np.ndarray:
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        try:
            return slide.read_analysis_rect(res, (x0, y0), (x1 - x0, y1 - y0))
        except CleihcError as exc:
            # A damaged tile must not break napari's drawing: it is shown white, and said once per level.
            if not warned:
                warned.append(True)
                log.warning("%s: part of the image cannot be shown (%s)", slide.path, exc)
            return np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)

    name = "cleihc-slide-" + tokenize(str(slide.path), res.level, res.factor, chunk_px, slide.dimensions)
    return da.map_blocks(
        read,
        chunks=(_chunks(h, chunk_px), _chunks(w, chunk_px), (3,)),
        dtype=np.uint8,
        name=name,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
    )


def slide_levels(slide: Slide, *, chunk_px: int = 1024, smallest_px: int = 2048) -> list[da.Array]:
    """The slide as a lazy pyramid: one dask array ``(H, W, 3)`` uint8 per level, largest first.

    Each chunk is one ``read_analysis_rect`` call when napari asks for it; nothing is read here. When the
    slide's smallest level is still larger than `smallest_px`, coarser levels are added by exact integer
    binning of that level, so that a zoomed-out view of a single-level scan is drawn from small chunks.

    Parameters
    ----------
    slide : cleihc.slide.Slide
        Kept open by the returned arrays.
    chunk_px : int
        Chunk edge in level pixels (512–1024 suits napari's tiling).
    smallest_px : int
        Add binned levels until the largest side is at most this.

    Returns
    -------
    list of dask.array.Array
    """
    if chunk_px < 64:
        raise ValueError(f"chunk_px must be at least 64, got {chunk_px}")
    out: list[da.Array] = []
    last = (math.inf, math.inf)
    for level, (lw, lh) in enumerate(slide.level_dimensions):
        if not (lw < last[0] and lh < last[1]) or min(lw, lh) < 1:
            continue  # napari needs strictly shrinking levels
        ds = slide.level_downsamples[level]
        res = AnalysisResolution(level, 1, (0.0, 0.0), float(ds), (lw, lh))
        out.append(_level_array(slide, res, chunk_px))
        last = (lw, lh)
        base_level = level
    bw, bh = slide.level_dimensions[base_level]
    factor = 2
    while max(last) > smallest_px and min(bw // factor, bh // factor) >= 1:
        ds = slide.level_downsamples[base_level] * factor
        res = AnalysisResolution(base_level, factor, (0.0, 0.0), float(ds), (bw // factor, bh // factor))
        out.append(_level_array(slide, res, chunk_px))
        last = res.dimensions_a
        factor *= 2
    return out


def slide_layer(
    path: str | os.PathLike[str],
    *,
    mpp: float | tuple[float, float] | None = None,
    chunk_px: int = 1024,
    name: str | None = None,
) -> LayerDataTuple:
    """A slide as a lazy multiscale RGB image layer in µm (level-0 pixels without an MPP).

    Parameters
    ----------
    path : path
        Any slide or image cleihc reads.
    mpp : float or (float, float), optional
        Level-0 microns per pixel overriding the file's.
    chunk_px : int
        Chunk edge of the dask arrays.
    name : str, optional
        Layer name; defaults to the file name.
    """
    slide = open_slide(path, mpp=mpp)
    levels = slide_levels(slide, chunk_px=chunk_px)
    sy, sx = world_per_px(slide)
    meta = {
        "role": "slide",
        "slide": slide_stem(path),
        "slide_path": str(Path(path).resolve()),
        "dimensions": tuple(slide.dimensions),
        "world_per_px": (sy, sx),
        "mpp_um": (sx, sy) if slide.has_mpp else None,
        "mpp_override": None if mpp is None else tuple(np.broadcast_to(np.asarray(mpp, float), 2).tolist()),
    }
    kwargs = {
        "name": name or Path(path).name,
        "rgb": True,
        "multiscale": len(levels) > 1,
        "scale": (sy, sx),
        "translate": (0.5 * sy, 0.5 * sx),
        "contrast_limits": (0, 255),
        "metadata": {META_KEY: meta},
    }
    return (levels if len(levels) > 1 else levels[0], kwargs, "image")


# -- shapes ---------------------------------------------------------------------------------------------------
def _parts_rings_yx(geometry: BaseGeometry | None) -> list[list[np.ndarray]]:
    """Per polygon part, its rings (exterior first, then holes) as ``(N, 2)`` ``(y, x)`` arrays, unclosed."""
    parts = []
    for poly in polygonal(geometry).geoms:
        rings = []
        for ring in (poly.exterior, *poly.interiors):
            xy = np.asarray(ring.coords, dtype=np.float64)[:-1]
            if len(xy) >= 3:
                rings.append(np.ascontiguousarray(xy[:, ::-1]))
        if rings:
            parts.append(rings)
    return parts


def shapes_layer(
    named: Iterable[tuple[str, BaseGeometry | None]],
    *,
    world_per_px: tuple[float, float],
    name: str,
    role: str,
    meta: Mapping[str, Any] | None = None,
    edge_width_px: float = 2.0,
    colors: Mapping[str, str] | None = None,
) -> LayerDataTuple:
    """Named polygons (level-0 px) as one Shapes layer, outlined in each name's colour.

    Holes become polygons of their own with the same name; :func:`geometries_from_shapes` combines a name's
    polygons by the even-odd rule, so outlines with holes survive a round trip.

    Parameters
    ----------
    named : iterable of (name, shapely geometry)
        Level-0 pixel coordinates; only the polygonal part is used.
    world_per_px : (float, float)
        The layer's ``scale`` (y, x).
    name, role : str
        Layer name; ``metadata["cleihc"]["role"]``.
    meta : mapping, optional
        More metadata (slide, results folder).
    edge_width_px : float
        Outline width in level-0 pixels.
    colors : mapping, optional
        Colour per name; default :func:`cleihc.geometry.region_color`.
    """
    data: list[np.ndarray] = []
    labels: list[str] = []
    part_ids: list[int] = []
    names: list[str] = []
    next_part = 0
    for label, geom in named:
        names.append(label)
        for rings in _parts_rings_yx(geom):
            part = next_part
            next_part += 1
            for ring in rings:
                data.append(ring)
                labels.append(label)
                part_ids.append(part)
    cycle = {n: (colors or {}).get(n) or _hex(region_color(n)) for n in dict.fromkeys(names + labels)}
    features = pd.DataFrame(
        {_SHAPES_FEATURE: pd.Series(labels, dtype=object), "part": pd.Series(part_ids, dtype=np.int64)}
    )
    kwargs = {
        "name": name,
        "shape_type": "polygon",
        "features": features,
        # Explicit colours (Shapes take no colour mapping by feature); new shapes use current_edge_color.
        "edge_color": [cycle[label] for label in labels] if labels else "#ffff00",
        "face_color": "transparent",
        "edge_width": float(edge_width_px),
        "scale": world_per_px,
        "ndim": 2,
        "metadata": {META_KEY: {"role": role, "world_per_px": tuple(world_per_px), **(meta or {})}},
    }
    kwargs["feature_defaults"] = {_SHAPES_FEATURE: names[0] if names else "", "part": -1}
    return (data, kwargs, "shapes")


def exclusions_layer(
    geometries: Sequence[BaseGeometry],
    *,
    world_per_px: tuple[float, float],
    meta: Mapping[str, Any] | None = None,
    edge_width_px: float = 2.0,
) -> LayerDataTuple:
    """Exclusion polygons (level-0 px) as a Shapes layer, magenta, lightly filled."""
    data, kwargs, kind = shapes_layer(
        [("exclude", g) for g in geometries],
        world_per_px=world_per_px,
        name="exclusions",
        role="exclusions",
        meta=meta,
        edge_width_px=edge_width_px,
        colors={"exclude": EXCLUSION_COLOR},
    )
    kwargs["feature_defaults"] = {_SHAPES_FEATURE: "exclude", "part": -1}
    kwargs["face_color"] = "#ff00ff30"
    return data, kwargs, kind


def _ellipse_ring(corners: np.ndarray, n: int = 64) -> np.ndarray:
    # napari stores an ellipse as the 4 corners of its (possibly rotated) bounding box.
    c = corners.mean(axis=0)
    a = (corners[1] - corners[0]) / 2.0
    b = (corners[3] - corners[0]) / 2.0
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)[:, None]
    return c + np.cos(t) * a + np.sin(t) * b


def shape_parts(
    data: Sequence[np.ndarray], shape_types: Sequence[str], names: Sequence[str], parts: Sequence[int]
) -> list[tuple[str, MultiPolygon]]:
    """A Shapes layer's polygons, rectangles and ellipses as ``(name, geometry)`` parts, in level-0 px.

    Rings of one part (the same ``part`` id, as :func:`shapes_layer` writes them) are combined by the even-odd
    rule, so holes survive; a shape drawn by hand (``part`` -1) is a part of its own.

    Parameters
    ----------
    data : sequence of (N, 2) arrays
        Vertices ``(y, x)`` in level-0 pixels (the layer's data coordinates).
    shape_types : sequence of str
        napari shape types; lines and paths are ignored.
    names, parts : sequences
        Each shape's name and part id.

    Returns
    -------
    list of (str, shapely.MultiPolygon)
        Valid geometries ``(x, y)``; empty parts dropped.
    """
    grouped: dict[Any, tuple[str, BaseGeometry]] = {}
    for i, (verts, kind, label, part) in enumerate(zip(data, shape_types, names, parts, strict=True)):
        verts = np.asarray(verts, dtype=np.float64)
        if kind == "ellipse":
            verts = _ellipse_ring(verts)
        elif kind not in ("polygon", "rectangle"):
            continue
        if len(verts) < 3:
            continue
        poly = shapely.make_valid(Polygon(verts[:, ::-1]))
        key = (str(label), int(part)) if int(part) >= 0 else ("new", i)
        if key in grouped:
            grouped[key] = (grouped[key][0], grouped[key][1].symmetric_difference(poly))
        else:
            grouped[key] = (str(label), poly)
    out = [(label, polygonal(shapely.make_valid(g))) for label, g in grouped.values()]
    return [(label, g) for label, g in out if not g.is_empty]


def geometries_from_shapes(
    data: Sequence[np.ndarray], shape_types: Sequence[str], names: Sequence[str], parts: Sequence[int]
) -> dict[str, MultiPolygon]:
    """One geometry per name: the union of its :func:`shape_parts` (level-0 px)."""
    out: dict[str, list[BaseGeometry]] = {}
    for label, geom in shape_parts(data, shape_types, names, parts):
        out.setdefault(label, []).append(geom)
    return {k: polygonal(shapely.union_all(v)) for k, v in out.items()}


# -- cells ----------------------------------------------------------------------------------------------------
def cell_classes(positive: np.ndarray, intensity_class: np.ndarray) -> np.ndarray:
    """Class label per cell: ``negative`` or the intensity bin ``1+``/``2+``/``3+`` of a positive cell."""
    positive = np.asarray(positive, dtype=bool)
    k = np.clip(np.asarray(intensity_class, dtype=np.int64), 1, 3)
    return np.where(positive, np.asarray(CLASS_NAMES, dtype=object)[k], "negative").astype(object)


def class_fields(label: str) -> tuple[bool, int]:
    """``(positive, intensity_class)`` of a class label (the inverse of :func:`cell_classes`)."""
    if label not in CLASS_NAMES:
        raise ValueError(f"cell class must be one of {CLASS_NAMES}, got {label!r}")
    k = CLASS_NAMES.index(label)
    return k > 0, k


def cells_layer(
    cells: pd.DataFrame,
    *,
    world_per_px: tuple[float, float],
    meta: Mapping[str, Any] | None = None,
    size_um: float = 6.0,
    name: str = "cells",
) -> LayerDataTuple:
    """Cells as one Points layer at level-0 px, coloured by class from a feature (fluid at 10^5 cells).

    Parameters
    ----------
    cells : pandas.DataFrame
        cleihc's cell table: ``x_px``, ``y_px``, ``positive``, ``intensity_class`` (and ``cell_id``,
        ``region``, ``manual`` when present).
    world_per_px : (float, float)
        The layer's scale (y, x).
    size_um : float
        Point diameter in world units (µm with an MPP).
    """
    n = len(cells)
    if n:
        yx = np.column_stack([cells["y_px"].to_numpy(np.float64), cells["x_px"].to_numpy(np.float64)])
        ids = cells["cell_id"].to_numpy(np.float64) if "cell_id" in cells else np.arange(n, dtype=np.float64)
        features = pd.DataFrame(
            {
                "cell_id": np.where(np.isfinite(ids), ids, -1).astype(np.int64),
                "class": pd.Categorical(
                    cell_classes(cells["positive"].to_numpy(bool), cells["intensity_class"].to_numpy()),
                    categories=CLASS_NAMES,
                ),
                "region": (
                    cells["region"].astype(str) if "region" in cells else pd.Series([""] * n)
                ).to_numpy(dtype=object),
                "manual": (
                    cells["manual"].fillna(False).astype(bool) if "manual" in cells else np.zeros(n, bool)
                ),
            }
        )
    else:
        yx = np.zeros((0, 2), dtype=np.float64)
        features = pd.DataFrame(
            {
                "cell_id": pd.Series([], dtype=np.int64),
                "class": pd.Categorical([], categories=CLASS_NAMES),
                "region": pd.Series([], dtype=object),
                "manual": pd.Series([], dtype=bool),
            }
        )
    size_px = size_um / float(np.mean(world_per_px))
    kwargs = {
        "name": name,
        "features": features,
        "face_color": "class",
        "face_color_cycle": dict(CLASS_COLORS),
        "border_width": 0.0,
        "size": size_px,
        "symbol": "disc",
        "scale": world_per_px,
        "ndim": 2,
        "feature_defaults": {"cell_id": -1, "class": "1+", "region": "", "manual": True},
        "metadata": {META_KEY: {"role": "cells", "world_per_px": tuple(world_per_px), **(meta or {})}},
    }
    return (yx, kwargs, "points")


# -- rasters --------------------------------------------------------------------------------------------------
def mask_image(fraction: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Positive fraction (0–1, NaN where unmeasured) as uint8 0–255, zero off tissue: what ``masks/`` holds."""
    frac = np.asarray(fraction, dtype=np.float64)
    return np.where(
        np.isfinite(frac) & np.asarray(tissue, bool), np.round(np.nan_to_num(frac) * 255), 0
    ).astype(np.uint8)


def positive_layer(
    levels: Sequence[np.ndarray] | np.ndarray,
    *,
    world_per_px: tuple[float, float],
    raster_downsample: float,
    meta: Mapping[str, Any] | None = None,
    name: str = "positive",
) -> LayerDataTuple:
    """The positive-fraction raster (uint8 0–255) as a translucent red overlay aligned with the slide.

    Raster cell ``(i, j)`` covers level-0 pixels ``[j·R, (j+1)·R) × [i·R, (i+1)·R)``, ``R = raster_downsample``.
    """
    levels = [np.asarray(levels)] if isinstance(levels, np.ndarray) else [np.asarray(a) for a in levels]
    sy, sx = world_per_px[0] * raster_downsample, world_per_px[1] * raster_downsample
    kwargs = {
        "name": name,
        "multiscale": len(levels) > 1,
        "scale": (sy, sx),
        "translate": (0.5 * sy, 0.5 * sx),
        "colormap": _positive_colormap(),
        "contrast_limits": (0, 255),
        "blending": "translucent",
        "opacity": 0.6,
        "metadata": {
            META_KEY: {
                "role": "positive",
                "world_per_px": tuple(world_per_px),
                "raster_downsample": float(raster_downsample),
                **(meta or {}),
            }
        },
    }
    return (levels if len(levels) > 1 else levels[0], kwargs, "image")


def preview_layer(
    positive: np.ndarray,
    *,
    rect_px: tuple[int, int, int, int],
    world_per_px: tuple[float, float],
    name: str = "threshold preview",
) -> LayerDataTuple:
    """A boolean positive map of a level-0 rectangle ``(x, y, w, h)`` (any resolution) as a red overlay."""
    h, w = positive.shape
    x, y, rw, rh = rect_px
    dy, dx = rh / h, rw / w  # level-0 px per preview pixel
    sy, sx = world_per_px[0] * dy, world_per_px[1] * dx
    kwargs = {
        "name": name,
        "scale": (sy, sx),
        "translate": ((y + 0.5 * dy) * world_per_px[0], (x + 0.5 * dx) * world_per_px[1]),
        "colormap": _positive_colormap(),
        "contrast_limits": (0, 1),
        "blending": "translucent",
        "opacity": 0.7,
        "metadata": {
            META_KEY: {"role": "preview", "rect_px": tuple(rect_px), "world_per_px": tuple(world_per_px)}
        },
    }
    return (positive.astype(np.uint8), kwargs, "image")


def visible_rect_px(
    center_world_yx: Sequence[float],
    zoom: float,
    canvas_hw: Sequence[int],
    *,
    world_per_px: tuple[float, float],
    dimensions: tuple[int, int],
) -> tuple[int, int, int, int] | None:
    """The level-0 rectangle ``(x, y, w, h)`` the canvas shows, clipped to the slide (None when off it).

    Parameters
    ----------
    center_world_yx : (y, x)
        the camera's ``center`` (its last two values).
    zoom : float
        the camera's ``zoom``: screen pixels per world unit.
    canvas_hw : (height, width)
        ``viewer.canvas.size``.
    world_per_px : (y, x)
        World units per level-0 pixel.
    dimensions : (width, height)
        The slide's level-0 size.
    """
    cy, cx = (float(v) for v in center_world_yx[-2:])
    hh, hw = canvas_hw[0] / (2.0 * zoom), canvas_hw[1] / (2.0 * zoom)
    x0 = max(0, math.floor((cx - hw) / world_per_px[1]))
    y0 = max(0, math.floor((cy - hh) / world_per_px[0]))
    x1 = min(dimensions[0], math.ceil((cx + hw) / world_per_px[1]))
    y1 = min(dimensions[1], math.ceil((cy + hh) / world_per_px[0]))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def to_level0_px(
    coords: np.ndarray, *, scale: Sequence[float], translate: Sequence[float], world_per_px: Sequence[float]
) -> np.ndarray:
    """Layer data coordinates ``(..., y, x)`` to level-0 pixels ``(y, x)`` (rotation and shear are not used)."""
    coords = np.asarray(coords, dtype=np.float64)[..., -2:]
    scale = np.asarray(scale, dtype=np.float64)[-2:]
    translate = np.asarray(translate, dtype=np.float64)[-2:]
    return (coords * scale + translate) / np.asarray(world_per_px, dtype=np.float64)


def layer_data_px(layer: Any, *, world_per_px: Sequence[float] | None = None) -> list[np.ndarray]:
    """A Shapes layer's vertices in level-0 px ``(y, x)``, whatever its scale (default: its cleihc metadata)."""
    wpp = world_per_px or layer.metadata[META_KEY]["world_per_px"]
    return [
        to_level0_px(d, scale=layer.scale, translate=layer.translate, world_per_px=wpp) for d in layer.data
    ]


def points_px(layer: Any, *, world_per_px: Sequence[float] | None = None) -> np.ndarray:
    """A Points layer's positions in level-0 px ``(y, x)``, shape (N, 2)."""
    wpp = world_per_px or layer.metadata[META_KEY]["world_per_px"]
    data = np.asarray(layer.data, dtype=np.float64).reshape(-1, layer.ndim)
    return to_level0_px(data, scale=layer.scale, translate=layer.translate, world_per_px=wpp).reshape(-1, 2)


# -- results --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResultsSlide:
    """Where one slide's results sit in a results folder, and how they map to world coordinates."""

    out_dir: Path
    slide: str
    record: dict[str, Any]

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str], slide: str) -> ResultsSlide:
        path = Path(out_dir) / "slides" / f"{slide}.json"
        with open(path, encoding="utf-8") as f:
            return cls(Path(out_dir), slide, json.load(f))

    @property
    def _analysis(self) -> dict[str, Any]:
        return self.record["provenance"]["analysis"]

    @property
    def mpp_um(self) -> tuple[float, float]:
        """Level-0 µm per pixel (x, y) used by the run."""
        a = self._analysis
        return a["mpp_um"][0] / a["downsample"], a["mpp_um"][1] / a["downsample"]

    @property
    def world_per_px(self) -> tuple[float, float]:
        return self.mpp_um[1], self.mpp_um[0]

    @property
    def raster_downsample(self) -> float:
        """Level-0 pixels per totals-raster cell."""
        return float(self._analysis["downsample"]) * int(self._analysis["raster_factor"])

    @property
    def slide_path(self) -> Path:
        """The slide's file: the absolute path the run recorded, else its path as the run was given it.

        A relative path names a file of the folder the run started in; read from another folder it may name a
        different slide, so it is taken only when it has the recorded size.
        """
        given = Path(self.record["path"])
        prov = (self.record.get("provenance") or {}).get("slide", {})
        recorded = prov.get("absolute_path")
        if recorded and Path(recorded).is_file():
            return Path(recorded)
        if given.is_absolute() or not given.is_file():
            return given
        size = prov.get("size_bytes")
        return given if size is None or given.stat().st_size == size else Path(recorded or given)

    @property
    def slide_found(self) -> bool:
        """Whether :attr:`slide_path` is there (results open without their image when it is not)."""
        return self.slide_path.is_file()

    @property
    def mpp_override(self) -> tuple[float, float] | None:
        m = self.record["provenance"].get("mpp_override")
        return None if m is None else (float(m[0]), float(m[1]))

    @property
    def meta(self) -> dict[str, Any]:
        return {
            "slide": self.slide,
            "out_dir": str(self.out_dir),
            "slide_path": str(self.slide_path),
            "raster_downsample": self.raster_downsample,
        }


def results_slides(out_dir: str | os.PathLike[str]) -> list[str]:
    """The slides with a record in a results folder, sorted."""
    return sorted(p.stem for p in (Path(out_dir) / "slides").glob("*.json"))


def is_results_folder(path: str | os.PathLike[str]) -> bool:
    """A folder holding ``slides/<slide>.json`` records, or one such record."""
    p = Path(path)
    if p.is_dir():
        return bool(results_slides(p))
    return p.is_file() and p.suffix == ".json" and p.parent.name == "slides"


def read_mask_levels(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """The pyramid levels of a ``masks/<slide>.ome.tif`` (uint8 positive fraction on the totals raster)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return [lev.asarray() for lev in tif.series[0].levels]


def read_regions_geojson(path: str | os.PathLike[str]) -> list[tuple[str, BaseGeometry]]:
    """``(name, geometry)`` of each feature of a ``regions/<slide>.geojson`` (level-0 px)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    out = []
    for feat in data.get("features", []):
        props = feat.get("properties") or {}
        out.append((str(props.get("name", "")), shapely.geometry.shape(feat["geometry"])))
    return out


def result_layers(result: Any, *, meta: Mapping[str, Any] | None = None) -> list[LayerDataTuple]:
    """Layers of an in-memory :class:`cleihc.pipeline.Result`: positive overlay, tissue, regions, cells."""
    plan = result.plan
    res = plan.resolution
    wpp = (res.mpp_um[1] / res.downsample, res.mpp_um[0] / res.downsample)
    meta = {"slide": result.slide, "slide_path": str(result.path), "load_id": new_load_id(), **(meta or {})}
    edge = _edge_px(result.region_masks["tissue"].shape, plan.raster_downsample)
    layers = [
        positive_layer(
            mask_image(result.raster.positive_fraction(), result.region_masks["tissue"]),
            world_per_px=wpp,
            raster_downsample=plan.raster_downsample,
            meta=meta,
        ),
        shapes_layer(
            [("tissue", plan.tissue.polygons)],
            world_per_px=wpp,
            name="tissue",
            role="tissue",
            meta=meta,
            edge_width_px=edge,
        ),
        shapes_layer(
            [
                (r.name, r.geometry)
                for r in plan.regions
                if r.name != "tissue" and not is_run_exclusion(r.name)
            ],
            world_per_px=wpp,
            name="regions",
            role="regions",
            meta=meta,
            edge_width_px=edge,
        ),
    ]
    run_excluded = [r.geometry for r in plan.regions if is_run_exclusion(r.name)]
    if run_excluded:
        layers.append(run_exclusions_layer(run_excluded, world_per_px=wpp, meta=meta, edge_width_px=edge))
    if "cells" in plan.protocol.measure:
        layers.append(cells_layer(result.cells, world_per_px=wpp, meta=meta))
    return layers


def _edge_px(raster_shape: tuple[int, int], raster_downsample: float) -> float:
    # Outlines about 1/600 of the slide's larger side: visible when zoomed out, thin when zoomed in.
    return max(2.0, max(raster_shape) * raster_downsample / 600.0)


def is_run_exclusion(name: str) -> bool:
    """Whether a region of a run's ``regions/<slide>.geojson`` is an area the run excluded (``--regions``
    ``exclude``, ``artefact``...): not a region to measure, and not a reviewer's exclusion either."""
    from cleihc.pipeline import EXCLUDE_NAMES

    return name.lower() in EXCLUDE_NAMES


def run_exclusions_layer(
    geometries: Sequence[BaseGeometry],
    *,
    world_per_px: tuple[float, float],
    meta: Mapping[str, Any] | None = None,
    edge_width_px: float = 2.0,
) -> LayerDataTuple:
    """Areas the run itself excluded (the ``--regions`` file's): shown, locked; they change with that file."""
    data, kwargs, kind = exclusions_layer(
        geometries, world_per_px=world_per_px, meta=meta, edge_width_px=edge_width_px
    )
    kwargs["name"] = "excluded by the run"
    kwargs["metadata"][META_KEY]["role"] = "run exclusions"
    kwargs["face_color"] = "#80008030"
    return data, kwargs, kind


def new_load_id() -> str:
    """A token for one loading of a slide's results: a dock bound to older layers of the same slide rebinds."""
    import uuid

    return uuid.uuid4().hex


def results_folder_layers(
    out_dir: str | os.PathLike[str], slide: str, *, include_slide: bool = True
) -> list[LayerDataTuple]:
    """Layers of one slide of a results folder, with its saved corrections applied.

    Slide image (when its file is still there), positive overlay (``masks/``), tissue and regions
    (``regions/``, corrected regions replacing automatic ones by name), the areas the run excluded (locked),
    the reviewer's exclusions, and cells (``cells/``, with the cell edits applied) coloured by class. The cells
    layer's metadata lists the automatic cells it leaves out because a saved exclusion covers them
    (``hidden_cell_ids``): they were never shown, so their absence is not a deletion.
    """
    from cleihc.corrections import SlideResults, corrections_path, excluded_cells, read_corrections

    rs = ResultsSlide.load(out_dir, slide)
    out = Path(out_dir)
    wpp = rs.world_per_px
    meta = {**rs.meta, "load_id": new_load_id()}
    corrections = read_corrections(corrections_path(out, slide))
    layers: list[LayerDataTuple] = []
    if include_slide and rs.slide_found:
        data, kwargs, kind = slide_layer(rs.slide_path, mpp=rs.mpp_override)
        kwargs["metadata"][META_KEY].update(meta)
        layers.append((data, kwargs, kind))
    mask_path = out / "masks" / f"{slide}.ome.tif"
    edge = 2.0
    if mask_path.is_file():
        levels = read_mask_levels(mask_path)
        edge = _edge_px(levels[0].shape, rs.raster_downsample)
        layers.append(
            positive_layer(levels, world_per_px=wpp, raster_downsample=rs.raster_downsample, meta=meta)
        )
    regions_path = out / "regions" / f"{slide}.geojson"
    named = read_regions_geojson(regions_path) if regions_path.is_file() else []
    run_excluded = [g for n, g in named if is_run_exclusion(n)]
    named = [(n, corrections.regions.get(n, g)) for n, g in named if not is_run_exclusion(n)]
    known = {n for n, _ in named}
    named += [(n, g) for n, g in corrections.regions.items() if n not in known]
    layers.append(
        shapes_layer(
            [(n, g) for n, g in named if n == "tissue"],
            world_per_px=wpp,
            name="tissue",
            role="tissue",
            meta=meta,
            edge_width_px=edge,
        )
    )
    layers.append(
        shapes_layer(
            [(n, g) for n, g in named if n != "tissue"],
            world_per_px=wpp,
            name="regions",
            role="regions",
            meta=meta,
            edge_width_px=edge,
        )
    )
    if run_excluded:
        layers.append(run_exclusions_layer(run_excluded, world_per_px=wpp, meta=meta, edge_width_px=edge))
    layers.append(
        exclusions_layer(list(corrections.exclusions), world_per_px=wpp, meta=meta, edge_width_px=edge)
    )
    if (out / "cells" / f"{slide}.parquet").is_file():
        automatic = pd.read_parquet(out / "cells" / f"{slide}.parquet")
        hidden: list[int] = []
        if corrections.is_empty:
            cells = automatic
        else:
            results = SlideResults.load(out, slide)
            _, cells = results.recompute(corrections)
            if corrections.exclusions and len(automatic) and "cell_id" in automatic:
                gone = excluded_cells(
                    automatic["x_px"].to_numpy(float),
                    automatic["y_px"].to_numpy(float),
                    corrections.exclusions,
                    raster_shape=results.masks["tissue"].shape,
                    raster_downsample=results.raster_downsample,
                )
                hidden = [int(i) for i in automatic["cell_id"].to_numpy()[gone]]
        data, kwargs, kind = cells_layer(cells, world_per_px=wpp, meta=meta)
        kwargs["metadata"][META_KEY]["hidden_cell_ids"] = hidden
        layers.append((data, kwargs, kind))
    return layers


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb[:3]))
