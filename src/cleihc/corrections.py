"""Manual corrections, and metrics recomputed from automatic results plus corrections.

A reviewer may redraw a region (the epidermis, say), exclude areas (folds, ink, artefacts), and add, delete or
reclassify cells. Corrections live in ``corrections/<slide>.geojson`` in the results folder, apart from the
automatic results, which are never overwritten; each save keeps the previous file in ``corrections/history/``.

The file is a GeoJSON FeatureCollection in level-0 pixels. Its ``properties`` say who saved it and when; each
feature's ``properties.kind`` says what it is:

- ``"region"`` (Polygon/MultiPolygon, ``name``): replaces the region of that name; a redrawn ``epidermis`` moves
  the dermis and its depth bands with it (unless they are redrawn too), as a ``--regions`` epidermis does;
- ``"exclude"`` (Polygon/MultiPolygon): removed from tissue and every region, and its cells dropped;
- ``"cell"`` (Point, ``action`` in add / delete / reclassify, ``positive``, ``intensity_class``): a cell edit.
  Deletions and reclassifications match the automatic cell nearest to the point within ``match_radius_um``, so
  they survive a re-run that renumbers cells.

Recomputing needs no slide: the totals raster (``totals/<slide>.npz``) holds additive per-cell totals, so a
region's new totals are sums over its new mask.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
from shapely.geometry import mapping, shape

from cleihc.errors import CleihcError, RegionsError
from cleihc.geometry import rasterize
from cleihc.io import atomic_write, sha256_file
from cleihc.measure import TotalsRaster
from cleihc.outputs import read_slide_records, rebuild_tables, write_json
from cleihc.pipeline import _label_cells, region_rows
from cleihc.protocol import Protocol
from cleihc.regions import COMPARTMENT_NAMES, CompartmentParams, compartments_from_epidermis

log = logging.getLogger(__name__)

__all__ = [
    "CellEdit",
    "Corrections",
    "SlideResults",
    "apply_corrections",
    "apply_saved_corrections",
    "corrections_path",
    "excluded_cells",
    "read_corrections",
    "review_status",
    "set_review_status",
    "write_corrections",
]

_ACTIONS = ("add", "delete", "reclassify")


@dataclass(frozen=True)
class CellEdit:
    """One manual cell edit at a level-0 position."""

    action: str
    x_px: float
    y_px: float
    positive: bool = False
    intensity_class: int = 0

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"cell edit action must be one of {_ACTIONS}, got {self.action!r}")


@dataclass(frozen=True)
class Corrections:
    """A reviewer's corrections of one slide."""

    regions: dict[str, Any] = field(default_factory=dict)  # name -> shapely geometry (level-0 px)
    exclusions: tuple[Any, ...] = ()
    cell_edits: tuple[CellEdit, ...] = ()
    author: str = ""
    saved_at: str = ""

    @property
    def is_empty(self) -> bool:
        return not (self.regions or self.exclusions or self.cell_edits)

    def to_geojson(self) -> dict[str, Any]:
        feats = []
        for name, geom in self.regions.items():
            feats.append(
                {"type": "Feature", "geometry": mapping(geom), "properties": {"kind": "region", "name": name}}
            )
        for geom in self.exclusions:
            feats.append({"type": "Feature", "geometry": mapping(geom), "properties": {"kind": "exclude"}})
        for e in self.cell_edits:
            feats.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [e.x_px, e.y_px]},
                    "properties": {
                        "kind": "cell",
                        "action": e.action,
                        "positive": bool(e.positive),
                        "intensity_class": int(e.intensity_class),
                    },
                }
            )
        return {
            "type": "FeatureCollection",
            "properties": {"author": self.author, "saved_at": self.saved_at, "coordinates": "level-0 pixels"},
            "features": feats,
        }


def corrections_path(out_dir: str | os.PathLike[str], slide: str) -> Path:
    """Where the corrections of `slide` live in a results folder."""
    return Path(out_dir) / "corrections" / f"{slide}.geojson"


def read_corrections(path: str | os.PathLike[str]) -> Corrections:
    """Read a corrections file (missing file: no corrections). Malformed files raise RegionsError."""
    path = Path(path)
    if not path.exists():
        return Corrections()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        feats = data["features"]
        props = data.get("properties") or {}
        regions: dict[str, Any] = {}
        exclusions = []
        edits = []
        for f in feats:
            p = f.get("properties") or {}
            kind = p.get("kind")
            geom = shape(f["geometry"])
            if kind == "region":
                name = str(p["name"])
                geom = shapely.make_valid(geom)
                regions[name] = regions[name].union(geom) if name in regions else geom
            elif kind == "exclude":
                exclusions.append(shapely.make_valid(geom))
            elif kind == "cell":
                edits.append(
                    CellEdit(
                        action=str(p["action"]),
                        x_px=float(geom.x),
                        y_px=float(geom.y),
                        positive=bool(p.get("positive", False)),
                        intensity_class=int(p.get("intensity_class", 0)),
                    )
                )
            else:
                raise ValueError(f"unknown feature kind {kind!r} (expected region, exclude or cell)")
    except (
        json.JSONDecodeError,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        shapely.errors.GEOSException,
    ) as exc:
        raise RegionsError(
            f"malformed corrections file ({' '.join(str(exc).split())}); fix it or move it aside", path=path
        ) from None
    return Corrections(
        regions, tuple(exclusions), tuple(edits), str(props.get("author", "")), str(props.get("saved_at", ""))
    )


def write_corrections(
    out_dir: str | os.PathLike[str], slide: str, corrections: Corrections, *, author: str | None = None
) -> Path:
    """Save corrections with who and when; the previous file is kept in ``corrections/history/``."""
    path = corrections_path(out_dir, slide)
    if path.exists():
        hist = path.parent / "history"
        hist.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.fromtimestamp(path.stat().st_mtime, tz=_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        shutil.copy2(path, hist / f"{slide}.{stamp}.geojson")
    stamped = Corrections(
        corrections.regions,
        corrections.exclusions,
        corrections.cell_edits,
        author=author if author is not None else (corrections.author or _user()),
        saved_at=_dt.datetime.now(tz=_dt.UTC).isoformat(timespec="seconds"),
    )
    with atomic_write(path, mode="w") as f:
        json.dump(stamped.to_geojson(), f, indent=1)
        f.write("\n")
    return path


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def excluded_cells(
    x_px: np.ndarray,
    y_px: np.ndarray,
    exclusions: Iterable[Any],
    *,
    raster_shape: tuple[int, int],
    raster_downsample: float,
) -> np.ndarray:
    """Which cells the exclusions remove: those whose centroid's totals-raster cell is excluded.

    The rule :func:`apply_corrections` applies (a cell goes with the raster cell it sits on, as the area does),
    for a caller that must tell an excluded cell from a deleted one.

    Parameters
    ----------
    x_px, y_px : array of float
        Cell centroids, level-0 pixels.
    exclusions : iterable of shapely geometry
        Level-0 pixels.
    raster_shape : (height, width)
        Shape of the totals raster.
    raster_downsample : float
        Level-0 px per raster cell.

    Returns
    -------
    ndarray of bool
    """
    mask = _exclusion_mask(exclusions, raster_shape=raster_shape, raster_downsample=raster_downsample)
    return _on_raster(np.asarray(x_px, float), np.asarray(y_px, float), mask, raster_downsample)


def _exclusion_mask(
    exclusions: Iterable[Any], *, raster_shape: tuple[int, int], raster_downsample: float
) -> np.ndarray:
    h, w = raster_shape
    mask = np.zeros((h, w), dtype=bool)
    for geom in exclusions:
        mask |= rasterize(geom, shape=(w, h), downsample=raster_downsample)
    return mask


def _on_raster(x_px: np.ndarray, y_px: np.ndarray, mask: np.ndarray, raster_downsample: float) -> np.ndarray:
    h, w = mask.shape
    ix = np.clip((x_px / raster_downsample).astype(np.int64), 0, w - 1)
    iy = np.clip((y_px / raster_downsample).astype(np.int64), 0, h - 1)
    return mask[iy, ix] if len(x_px) else np.zeros(0, dtype=bool)


def apply_corrections(
    masks: dict[str, np.ndarray],
    cells: pd.DataFrame,
    corrections: Corrections,
    *,
    raster_downsample: float,
    mpp_um: float,
    match_radius_um: float = 4.0,
    compartments: CompartmentParams | None = None,
) -> tuple[dict[str, np.ndarray], pd.DataFrame, dict[str, bool]]:
    """Automatic region masks and cells, corrected.

    Parameters
    ----------
    masks : dict of str to ndarray
        Region masks on the totals raster (``tissue`` first), as the pipeline made them.
    cells : pandas.DataFrame
        The automatic cells (``x_px``, ``y_px``, ``positive``, ``intensity_class``, ``pigment``, ...).
    corrections : Corrections
    raster_downsample : float
        Level-0 px per raster cell.
    mpp_um : float
        Level-0 microns per pixel (for the match radius).
    match_radius_um : float
        How far a deletion or reclassification may be from the cell it edits.
    compartments : CompartmentParams, optional
        The protocol's automatic skin compartments. When they are enabled, a redrawn ``epidermis`` moves the
        dermis and the depth bands below it (those not redrawn themselves), as a ``--regions`` epidermis does
        in :func:`cleihc.pipeline.plan_slide`; here they are found on the totals raster.

    Returns
    -------
    masks, cells, corrected
        The corrected masks and cells, and per region whether a correction touched it.
    """
    shape_r = (masks["tissue"].shape[1], masks["tissue"].shape[0])
    out = {k: v.copy() for k, v in masks.items()}
    before = {k: v.copy() for k, v in masks.items()}
    tissue = out["tissue"]
    for name, geom in corrections.regions.items():
        m = rasterize(geom, shape=shape_r, downsample=raster_downsample)
        if name == "tissue":
            tissue &= m
        else:
            out[name] = m
    exclude = _exclusion_mask(
        corrections.exclusions, raster_shape=tissue.shape, raster_downsample=raster_downsample
    )
    tissue &= ~exclude
    if compartments is not None and compartments.enabled and "epidermis" in corrections.regions:
        moved = compartments_from_epidermis(
            out["epidermis"] & tissue,
            tissue,
            mpp_um=mpp_um * raster_downsample,
            downsample=raster_downsample,
            params=compartments,
        )
        for name in COMPARTMENT_NAMES:
            if name != "epidermis" and name not in corrections.regions and name in moved.masks:
                out[name] = np.asarray(moved.masks[name], dtype=bool).copy()
    for name in out:
        if name != "tissue":
            out[name] = out[name] & tissue
    out["tissue"] = tissue
    corrected = {name: not np.array_equal(out[name], before.get(name, np.zeros_like(tissue))) for name in out}

    cells = cells.copy()
    if "manual" not in cells.columns:
        cells["manual"] = False
    if len(cells) and corrections.exclusions:
        gone = _on_raster(
            cells["x_px"].to_numpy(float), cells["y_px"].to_numpy(float), exclude, raster_downsample
        )
        cells = cells.loc[~gone].reset_index(drop=True)
    radius_px = match_radius_um / mpp_um
    added = []
    touched_xy = []
    for e in corrections.cell_edits:
        touched_xy.append((e.x_px, e.y_px))
        if e.action == "add":
            added.append(
                {
                    "x_px": e.x_px,
                    "y_px": e.y_px,
                    "positive": bool(e.positive),
                    "intensity_class": int(e.intensity_class),
                    "pigment": False,
                    "manual": True,
                }
            )
            continue
        if not len(cells):
            continue
        d2 = (cells["x_px"].to_numpy(float) - e.x_px) ** 2 + (cells["y_px"].to_numpy(float) - e.y_px) ** 2
        k = int(np.argmin(d2))
        if d2[k] > radius_px**2:
            continue  # the cell it referred to is gone (for example after a protocol change)
        if e.action == "delete":
            cells = cells.drop(index=cells.index[k]).reset_index(drop=True)
        else:
            cells.loc[cells.index[k], ["positive", "intensity_class", "manual"]] = [
                bool(e.positive),
                int(e.intensity_class),
                True,
            ]
    if added:
        cells = pd.concat([cells, pd.DataFrame(added)], ignore_index=True)
    if len(touched_xy):
        xy = np.asarray(touched_xy)
        ix = np.clip((xy[:, 0] / raster_downsample).astype(np.int64), 0, shape_r[0] - 1)
        iy = np.clip((xy[:, 1] / raster_downsample).astype(np.int64), 0, shape_r[1] - 1)
        for name, m in out.items():
            corrected[name] = corrected[name] or bool(m[iy, ix].any())
    if len(cells):
        cells = _label_cells(cells.drop(columns=["region"], errors="ignore"), out, raster_downsample)
    return out, cells, corrected


@dataclass
class SlideResults:
    """One slide's results loaded from a results folder, ready to recompute with corrections."""

    out_dir: Path
    slide: str
    record: dict[str, Any]
    raster: TotalsRaster
    masks: dict[str, np.ndarray]
    cells: pd.DataFrame
    raster_downsample: float
    pixel_area_um2: float

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str], slide: str) -> SlideResults:
        out = Path(out_dir)
        recs = {r["slide"]: r for r in read_slide_records(out)}
        if slide not in recs:
            raise RegionsError(
                f"no results for slide {slide!r} in this folder; run `cleihc quantify` first", path=out
            )
        with np.load(out / "totals" / f"{slide}.npz", allow_pickle=False) as z:
            bin_px = z["bin_px"]
            raster = TotalsRaster((bin_px.shape[2], bin_px.shape[1]), int(z["raster_factor"]))
            raster.bin_px[...] = bin_px
            raster.positive_od_sum[...] = z["positive_od_sum"]
            raster.pigment_px[...] = z["pigment_px"]
            masks = {
                str(n): m.astype(bool) for n, m in zip(z["region_names"], z["region_masks"], strict=True)
            }
            ds = float(z["raster_downsample"])
            area = float(z["pixel_area_um2"])
        cells_file = out / "cells" / f"{slide}.parquet"
        cells = pd.read_parquet(cells_file) if cells_file.exists() else pd.DataFrame()
        return cls(out, slide, recs[slide], raster, masks, cells, ds, area)

    @property
    def measure(self) -> tuple[str, ...]:
        return tuple(self.record["provenance"]["protocol"]["protocol"]["measure"])

    def recompute(self, corrections: Corrections | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Region table and cells with corrections applied (default: those saved in the folder)."""
        if corrections is None:
            corrections = read_corrections(corrections_path(self.out_dir, self.slide))
        auto_rows = pd.DataFrame(self.record["rows"])
        ids_cols = [c for c in ("slide", "path", "stain", "protocol", "protocol_sha256") if c in auto_rows]
        # Study metadata by name (the record says which), never by dtype: text columns are not of dtype object
        # under pandas 3, and a subject "101" may read as a number.
        if "metadata" in self.record:
            meta_cols = [c for c in (self.record["metadata"] or {}) if c in auto_rows]
        else:  # a record from before the metadata field: the columns that lead "slide"
            cols = list(auto_rows.columns)
            meta_cols = cols[: cols.index("slide")] if "slide" in cols else []
        ids = {c: auto_rows[c].iloc[0] for c in meta_cols + ids_cols} if len(auto_rows) else {}
        protocol = self.record["provenance"]["protocol"]
        mpp_um = (
            self.record["provenance"]["analysis"]["mpp_um"][0]
            / self.record["provenance"]["analysis"]["downsample"]
        )
        masks, cells, corrected = apply_corrections(
            self.masks,
            self.cells,
            corrections,
            raster_downsample=self.raster_downsample,
            mpp_um=mpp_um,
            compartments=_compartments_of(protocol, self.slide),
        )
        metrics = protocol.get("metrics") or {}
        rows = region_rows(
            self.raster,
            masks,
            cells,
            ids=ids,
            measure=self.measure,
            pixel_area_um2=self.pixel_area_um2,
            raster_downsample=self.raster_downsample,
            h_score=bool(metrics.get("h_score", True)),
            positive_pixel_count=bool(metrics.get("positive_pixel_count", False)),
        )
        rows = rows[
            [c for c in auto_rows.columns if c in rows.columns]
            + [c for c in rows.columns if c not in auto_rows.columns]
        ]
        rows["corrected"] = rows["region"].map(lambda n: bool(corrected.get(n, False)))
        return rows, cells


def _compartments_of(protocol: dict[str, Any], slide: str) -> CompartmentParams | None:
    """The compartment parameters a slide was measured with (None when its recorded protocol no longer loads,
    e.g. written by an older cleihc: the dermis then stays where it was)."""
    try:
        return Protocol.from_dict(protocol).compartments
    except (CleihcError, ValueError, TypeError, KeyError) as exc:
        log.warning(
            "%s: its recorded protocol does not load (%s); a redrawn epidermis moves no band", slide, exc
        )
        return None


def apply_saved_corrections(
    out_dir: str | os.PathLike[str], slide: str, *, lead_columns: tuple[str, ...] = ()
) -> pd.DataFrame:
    """Recompute a slide's rows with its saved corrections, update its record and the combined tables.

    The record keeps the automatic rows (``automatic_rows``) beside the corrected ones (``rows``) and the
    corrections' sha256, so a later run knows whether the corrections changed. Returns the corrected rows.
    """
    out = Path(out_dir)
    results = SlideResults.load(out, slide)
    path = corrections_path(out, slide)
    record = dict(results.record)
    record.setdefault("automatic_rows", record["rows"])
    if path.exists():
        rows, _ = results.recompute(read_corrections(path))
        record["corrections_sha256"] = sha256_file(path)
    else:
        rows = pd.DataFrame(record["automatic_rows"])
        rows["corrected"] = False
        record["corrections_sha256"] = None
    record["rows"] = rows.to_dict(orient="records")
    write_json(out / "slides" / f"{slide}.json", record)
    rebuild_tables(out, lead_columns=lead_columns)
    return rows


#: Review states a slide can be in.
REVIEW_STATES = ("unreviewed", "reviewed", "flagged")


def review_status(
    out_dir: str | os.PathLike[str], *, slides: Iterable[str] | None = None
) -> dict[str, dict[str, str]]:
    """Per slide of a results folder: ``{"status", "author", "time", "note"}`` (unreviewed when never set).

    `slides` (default: every slide record of the folder) spares reading the records again when the caller has.
    """
    out = Path(out_dir)
    path = out / "review" / "status.json"
    saved: dict[str, dict[str, str]] = {}
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise RegionsError("malformed review status file; fix it or move it aside", path=path) from None
    if slides is None:
        slides = [r["slide"] for r in read_slide_records(out)]
    return {s: saved.get(s, {"status": "unreviewed", "author": "", "time": "", "note": ""}) for s in slides}


def set_review_status(
    out_dir: str | os.PathLike[str], slide: str, status: str, *, note: str = "", author: str | None = None
) -> None:
    """Record a slide's review state with who and when (atomically)."""
    if status not in REVIEW_STATES:
        raise ValueError(f"status must be one of {REVIEW_STATES}, got {status!r}")
    out = Path(out_dir)
    current = review_status(out)
    current[slide] = {
        "status": status,
        "author": author if author is not None else _user(),
        "time": _dt.datetime.now(tz=_dt.UTC).isoformat(timespec="seconds"),
        "note": note,
    }
    with atomic_write(out / "review" / "status.json", mode="w") as f:
        json.dump(current, f, indent=1)
        f.write("\n")
