"""From what a reviewer did to the layers to a :class:`cleihc.corrections.Corrections` (pure functions, no Qt).

The layers show the automatic results with any saved corrections applied; corrections are always worked out
against the automatic results on disk, so saving twice, or reloading and saving, gives the same file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from shapely.geometry import MultiPolygon
from shapely.geometry.base import BaseGeometry

from cleihc.corrections import CellEdit, Corrections, excluded_cells
from cleihc.geometry import mask_to_polygons, polygonal
from napari_cleihc._layers import cell_classes, class_fields

__all__ = [
    "AutomaticResults",
    "build_corrections",
    "cell_edits",
    "corrections_equal",
    "painted_exclusions",
    "region_corrections",
]


@dataclass(frozen=True)
class AutomaticResults:
    """The automatic regions and cells of one slide, as the pipeline wrote them (the baseline of every edit)."""

    regions: dict[str, BaseGeometry]
    cells: pd.DataFrame
    raster_downsample: float
    raster_shape: tuple[int, int]  # (height, width) of the totals raster

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str], slide: str) -> AutomaticResults:
        from napari_cleihc._layers import ResultsSlide, is_run_exclusion, read_regions_geojson

        out = Path(out_dir)
        regions: dict[str, BaseGeometry] = {}
        path = out / "regions" / f"{slide}.geojson"
        for name, geom in read_regions_geojson(path) if path.is_file() else []:
            if is_run_exclusion(name):  # the run's own exclusions are not regions (and not the reviewer's)
                continue
            regions[name] = regions[name].union(geom) if name in regions else geom
        cells_path = out / "cells" / f"{slide}.parquet"
        cells = pd.read_parquet(cells_path) if cells_path.is_file() else pd.DataFrame()
        return cls(regions, cells, ResultsSlide.load(out, slide).raster_downsample, _raster_shape(out, slide))


def _raster_shape(out: Path, slide: str) -> tuple[int, int]:
    """(height, width) of a slide's totals raster: from the positive mask's header, without reading pixels."""
    import tifffile

    mask = out / "masks" / f"{slide}.ome.tif"
    if mask.is_file():
        with tifffile.TiffFile(mask) as tif:
            h, w = tif.series[0].shape[-2:]
            return int(h), int(w)
    with np.load(out / "totals" / f"{slide}.npz", allow_pickle=False) as z:
        h, w = z["bin_px"].shape[1:]
        return int(h), int(w)


def _same(a: BaseGeometry, b: BaseGeometry, *, tolerance_px2: float) -> bool:
    a, b = polygonal(a), polygonal(b)
    if a.is_empty and b.is_empty:
        return True
    return float(shapely.area(shapely.symmetric_difference(a, b))) <= tolerance_px2


def region_corrections(
    automatic: Mapping[str, BaseGeometry],
    current: Mapping[str, BaseGeometry],
    *,
    tolerance_px2: float = 1e-6,
) -> dict[str, BaseGeometry]:
    """The regions whose current outline differs from the automatic one (a deleted region becomes empty).

    Parameters
    ----------
    automatic, current : mapping of name to shapely geometry
        Level-0 pixels.
    tolerance_px2 : float
        Largest area of the symmetric difference still counted as unchanged (float round-off).
    """
    out: dict[str, BaseGeometry] = {}
    for name in dict.fromkeys([*automatic, *current]):
        new = current.get(name, MultiPolygon())
        if not _same(automatic.get(name, MultiPolygon()), new, tolerance_px2=tolerance_px2):
            out[name] = polygonal(new)
    return out


def cell_edits(
    automatic: pd.DataFrame,
    points_yx: np.ndarray,
    features: pd.DataFrame,
    *,
    excluded: np.ndarray | None = None,
    move_tolerance_px: float = 0.5,
) -> tuple[CellEdit, ...]:
    """Cell edits turning the automatic cells into the current points.

    Parameters
    ----------
    automatic : pandas.DataFrame
        The pipeline's cells (``cell_id``, ``x_px``, ``y_px``, ``positive``, ``intensity_class``).
    points_yx : (N, 2) array
        The Points layer's data: ``(y, x)`` level-0 pixels.
    features : pandas.DataFrame
        Its features: ``cell_id`` (-1 for a cell added by hand) and ``class``.
    excluded : ndarray of bool, optional
        One per row of `automatic`: cells an exclusion removes (:func:`cleihc.corrections.excluded_cells`, the
        rule the recomputation applies) or that the layer never showed; missing, they are not deletions.
    move_tolerance_px : float
        A point moved further than this from its automatic position counts as deleted there and added here.

    Returns
    -------
    tuple of CellEdit
        Deletions and reclassifications (by ``cell_id``) at the automatic positions, then additions in layer
        order.
    """
    points_yx = np.asarray(points_yx, dtype=np.float64).reshape(-1, 2)
    ids = features["cell_id"].to_numpy(np.int64) if len(features) else np.zeros(0, np.int64)
    labels = features["class"].astype(str).to_numpy() if len(features) else np.zeros(0, object)
    deletes: list[CellEdit] = []
    reclass: list[CellEdit] = []
    adds: list[CellEdit] = []
    if len(automatic):
        order = np.argsort(automatic["cell_id"].to_numpy(np.int64), kind="stable")
        auto = automatic.set_index("cell_id", drop=False).iloc[order]
        auto_xy = auto[["x_px", "y_px"]].to_numpy(np.float64)
        auto_cls = cell_classes(auto["positive"].to_numpy(bool), auto["intensity_class"].to_numpy())
        kept = ids >= 0
        pos = auto.index.get_indexer(ids[kept])
        if (pos < 0).any():
            raise ValueError("the cells layer holds cell ids that are not in the automatic results")
        present = np.zeros(len(auto), dtype=bool)
        present[pos] = True
        moved = (
            np.hypot(points_yx[kept, 1] - auto_xy[pos, 0], points_yx[kept, 0] - auto_xy[pos, 1])
            > move_tolerance_px
        )
        present[pos[moved]] = False  # deleted where it was, added where it is now
        missing = np.flatnonzero(~present)
        if excluded is not None and missing.size:
            inside = np.asarray(excluded, dtype=bool)[order][missing]
            dropped_by_move = np.isin(missing, pos[moved])
            missing = missing[~inside | dropped_by_move]
        for k in missing:
            deletes.append(CellEdit("delete", float(auto_xy[k, 0]), float(auto_xy[k, 1])))
        changed = (labels[kept] != auto_cls[pos]) & ~moved
        order = np.argsort(pos[changed], kind="stable")
        for k, label in zip(pos[changed][order], labels[kept][changed][order], strict=True):
            positive, intensity = class_fields(str(label))
            reclass.append(
                CellEdit("reclassify", float(auto_xy[k, 0]), float(auto_xy[k, 1]), positive, intensity)
            )
        new = np.flatnonzero(~kept)
        new_moved = np.flatnonzero(kept)[moved]
        for i in np.sort(np.concatenate([new, new_moved])):
            positive, intensity = class_fields(str(labels[i]))
            adds.append(CellEdit("add", float(points_yx[i, 1]), float(points_yx[i, 0]), positive, intensity))
    else:
        for i in range(len(points_yx)):
            positive, intensity = class_fields(str(labels[i]))
            adds.append(CellEdit("add", float(points_yx[i, 1]), float(points_yx[i, 0]), positive, intensity))
    return (*deletes, *reclass, *adds)


def painted_exclusions(labels: np.ndarray, *, raster_downsample: float) -> list[MultiPolygon]:
    """Painted exclusion pixels (any non-zero label on the totals raster) as exact polygons, one per component."""
    mask = np.asarray(labels) > 0
    if not mask.any():
        return []
    return [MultiPolygon([p]) for p in mask_to_polygons(mask, downsample=raster_downsample).geoms]


def build_corrections(
    automatic: AutomaticResults,
    *,
    regions: Mapping[str, BaseGeometry],
    exclusions: Sequence[BaseGeometry],
    points_yx: np.ndarray | None,
    point_features: pd.DataFrame | None,
    hidden_cell_ids: Sequence[int] = (),
    author: str = "",
) -> Corrections:
    """Corrections from the current regions, exclusions and cell points (see the functions above).

    An automatic cell missing under an exclusion is excluded, not deleted, by the rule the recomputation
    applies (its totals-raster cell). ``hidden_cell_ids`` are the automatic cells the cells layer was built
    without (a saved exclusion covered them): if that exclusion is gone, they come back.
    """
    excl = tuple(polygonal(g) for g in exclusions if not polygonal(g).is_empty)
    edits: tuple[CellEdit, ...] = ()
    if points_yx is not None and point_features is not None:
        excluded = None
        cells = automatic.cells
        if len(cells):
            excluded = excluded_cells(
                cells["x_px"].to_numpy(float),
                cells["y_px"].to_numpy(float),
                excl,
                raster_shape=automatic.raster_shape,
                raster_downsample=automatic.raster_downsample,
            ) | np.isin(cells["cell_id"].to_numpy(np.int64), np.asarray(hidden_cell_ids, dtype=np.int64))
        edits = cell_edits(cells, points_yx, point_features, excluded=excluded)
    return Corrections(
        regions=region_corrections(automatic.regions, regions),
        exclusions=excl,
        cell_edits=edits,
        author=author,
    )


def corrections_equal(a: Corrections, b: Corrections) -> bool:
    """Same regions, exclusions (as geometries) and cell edits; who and when are ignored."""
    if set(a.regions) != set(b.regions) or len(a.exclusions) != len(b.exclusions):
        return False
    if any(not _same(a.regions[k], b.regions[k], tolerance_px2=1e-9) for k in a.regions):
        return False
    if any(not _same(x, y, tolerance_px2=1e-9) for x, y in zip(a.exclusions, b.exclusions, strict=True)):
        return False
    return a.cell_edits == b.cell_edits
