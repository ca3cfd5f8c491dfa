"""What runs per tile: the slide plan a tile needs, one tile's measurement, and its result.

This is the part of the pipeline that Dask workers execute, kept apart from planning and folding so that a
worker imports the array stack (numpy, numba kernels, the slide readers) but never pandas, pyarrow or
scikit-image: each worker process then starts 60-90 MB smaller. A tile's cells travel as plain columns
(numpy arrays); :func:`cleihc.pipeline.finalize` makes the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cleihc.cells import detect_cells_od, detect_pigment_od, residual_channel
from cleihc.measure import RasterWindow, accumulate_area, accumulate_area_rgb
from cleihc.protocol import Protocol
from cleihc.slide import AnalysisResolution, Slide, open_slide
from cleihc.stains import StainFit, StainMatrix, concentrations
from cleihc.tiling import Tile, TileGrid

if TYPE_CHECKING:
    from cleihc.regions import Region
    from cleihc.tissue import TissueMask

__all__ = ["CellColumns", "SlidePlan", "TileResult", "iter_tiles", "process_tile"]

#: A tile's cells: equal-length columns, ``x_px`` and ``y_px`` (level-0 pixels) first.
CellColumns = dict[str, np.ndarray]


@dataclass(frozen=True)
class SlidePlan:
    """Everything the tiles of one slide need; picklable (workers reopen the slide by path)."""

    slide_path: str
    mpp_override: tuple[float, float] | None
    protocol: Protocol
    stains: StainMatrix
    resolution: AnalysisResolution
    grid: TileGrid
    tiles: tuple[Tile, ...]
    raster_factor: int
    raster_shape: tuple[int, int]
    tissue: TissueMask
    regions: tuple[Region, ...]
    compartment_masks: dict[str, np.ndarray]
    compartment_downsample: float
    warnings: tuple[str, ...]
    timings_s: dict[str, float]
    roi: Any = None
    stain_fit: StainFit | None = None  # how well the stains explain the target-positive tissue (overview)

    @property
    def raster_downsample(self) -> float:
        """Level-0 pixels per totals-raster cell."""
        return self.resolution.downsample * self.raster_factor

    @property
    def pixel_area_um2(self) -> float:
        """Area of one analysis pixel."""
        return float(self.resolution.mpp_um[0] * self.resolution.mpp_um[1])


@dataclass(frozen=True)
class TileResult:
    """What one tile adds: its totals-raster window and the cells it owns (level-0 coordinates).

    ``cells`` holds equal-length columns: ``x_px``, ``y_px``, then the columns of
    :data:`cleihc.cells.TABLE_COLUMNS` other than the tile-local ``label``, ``x_a`` and ``y_a``; a tile without
    cells has only ``x_px`` and ``y_px``, empty.
    """

    index: tuple[int, int]
    window: RasterWindow
    cells: CellColumns

    @property
    def n_cells(self) -> int:
        """Number of cells the tile owns."""
        return int(self.cells["x_px"].shape[0])


def process_tile(slide: Slide, plan: SlidePlan, tile: Tile) -> TileResult:
    """Measure one tile: read it with its halo, add its core to the totals and keep the cells it owns.

    Parameters
    ----------
    slide : Slide
        The open slide (workers keep it open across tiles).
    plan : SlidePlan
    tile : Tile

    Returns
    -------
    TileResult
    """
    proto = plan.protocol
    hx, hy, hw, hh = tile.halo_a
    cx, cy, cw, ch = tile.core_a
    rgb = slide.read_analysis_rect(plan.resolution, (hx, hy), (hw, hh))
    need_cells = "cells" in proto.measure
    pigment_on = proto.cells.exclude_pigment if need_cells else False
    sy, sx = slice(cy - hy, cy - hy + ch), slice(cx - hx, cx - hx + cw)
    if not need_cells:
        # Area only: OD made and binned in one pass over the core, no image in between.
        window = accumulate_area_rgb(
            rgb[sy, sx],
            plan.stains,
            stain=proto.target,
            location_a=(cx, cy),
            raster_factor=plan.raster_factor,
            bins_od=proto.thresholds.bins_od,
        )
        return TileResult(tile.index, window, _empty_cells())
    # Only the planes the cells use, in one pass from RGB (bit-identical to deconvolve's channels): less
    # arithmetic and memory than all channels and then copies of two. The residual serves only the pigment
    # test, made once here over the halo (for the area and the cells) and then dropped.
    stains = plan.stains
    counter_od, target_od = concentrations(rgb, stains, names=(proto.counterstain, proto.target))
    residual = residual_channel(stains.names, proto.counterstain, proto.target) if pigment_on else None
    pigment = None
    if residual is not None:
        residual_od = concentrations(rgb, stains, names=(residual,))[0]
        pigment = detect_pigment_od(counter_od, target_od, residual_od, params=proto.cells)
        del residual_od
    del rgb
    window = accumulate_area(
        target_od[sy, sx],
        location_a=(cx, cy),
        raster_factor=plan.raster_factor,
        bins_od=proto.thresholds.bins_od,
        pigment=None if pigment is None else pigment[sy, sx],
    )
    det = detect_cells_od(
        counter_od,
        target_od,
        pigment=pigment,
        mpp_um=float(plan.resolution.mpp_um[0]),
        params=proto.cells,
        positive_od=proto.thresholds.positive_od,
        bins_od=proto.thresholds.bins_od,
    )
    return TileResult(tile.index, window, _owned_cells(det.table, tile, plan))


def _empty_cells() -> CellColumns:
    return {"x_px": np.zeros(0, dtype=np.float64), "y_px": np.zeros(0, dtype=np.float64)}


def _owned_cells(table: dict[str, np.ndarray], tile: Tile, plan: SlidePlan) -> CellColumns:
    """Cells whose centroid's pixel lies in the tile core, with global level-0 coordinates."""
    hx, hy = tile.halo_a[0], tile.halo_a[1]
    cx, cy, cw, ch = tile.core_a
    xa = np.asarray(table["x_a"], dtype=float) + hx
    ya = np.asarray(table["y_a"], dtype=float) + hy
    # Pixel i spans [i - 0.5, i + 0.5) in centroid coordinates: the centroid's pixel decides the owner.
    px, py = np.floor(xa + 0.5), np.floor(ya + 0.5)
    keep = (px >= cx) & (px < cx + cw) & (py >= cy) & (py < cy + ch)
    ds = plan.resolution.downsample
    out: CellColumns = {"x_px": (xa[keep] + 0.5) * ds, "y_px": (ya[keep] + 0.5) * ds}
    # The tile-local label number means nothing outside the tile.
    for name, column in table.items():
        if name not in ("x_a", "y_a", "label"):
            out[name] = np.asarray(column)[keep]
    return out


def iter_tiles(plan: SlidePlan, *, tiles: Iterable[Tile] | None = None) -> Iterator[TileResult]:
    """Yield each tile's result in order, reading the slide in this process (serial engine)."""
    with open_slide(plan.slide_path, mpp=plan.mpp_override) as slide:
        for tile in plan.tiles if tiles is None else tiles:
            yield process_tile(slide, plan, tile)
