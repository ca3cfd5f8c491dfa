"""Additive measurement totals, their merge, and the one place where ratios are made.

The engine never averages across tiles. Each tile adds *counts* (pixels per intensity bin, sums of optical
density) into a **totals raster**: a coarse grid (default 2 µm/px) whose cell ``(p, q)`` holds the totals of the
analysis pixels whose index lies in ``[q·r, (q+1)·r) × [p·r, (p+1)·r)`` (``r`` the integer raster factor). An
analysis pixel contributes to exactly one raster cell, whatever tile it was read in, so totals are identical for
any tile size, tile origin or worker count. Regions (tissue, skin compartments, user annotations, exclusions) are
masks on the same raster: a region's totals are sums over its cells, and editing a region later re-aggregates the
raster without reading the slide again. Cells are kept as a table (one row per owned cell) and assigned to regions
by the raster cell under their centroid.

Ratios (percentages, densities, means, H-scores) are computed once, in :func:`area_metrics` and
:func:`cell_metrics`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numba
import numpy as np

from cleihc.stains import StainMatrix, od_lut

if TYPE_CHECKING:  # pandas is not imported at run time: Dask workers use this module and stay small
    import pandas as pd

__all__ = [
    "BIN_NAMES",
    "MAX_RASTER_FACTOR",
    "AreaTotals",
    "RasterWindow",
    "TotalsRaster",
    "accumulate_area",
    "accumulate_area_rgb",
    "area_metrics",
    "cell_metrics",
    "map_mask",
    "row_blocks",
]

#: Largest raster factor (analysis pixels per raster cell along each axis): a cell's counts then fit 16 bits.
MAX_RASTER_FACTOR = 255

#: Intensity bins of target optical density, QuPath style: negative < t1 ≤ weak (1+) < t2 ≤ moderate (2+) < t3 ≤ strong (3+).
BIN_NAMES = ("negative", "weak", "moderate", "strong")
N_BINS = len(BIN_NAMES)


@dataclass(frozen=True)
class RasterWindow:
    """The additive area totals of one tile core, on a window of the global totals raster.

    Attributes
    ----------
    x_r, y_r : int
        Origin of the window in raster cells.
    bin_px : ndarray of uint16, shape (4, h, w)
        Analysis pixels per intensity bin (negative, weak, moderate, strong); pigment pixels are not binned.
        At most ``raster_factor² <= 65025`` per cell: 16 bits keep what a worker sends small.
    positive_od_sum : ndarray of float64, shape (h, w)
        Sum of target OD over positive pixels (weak, moderate or strong).
    pigment_px : ndarray of uint16, shape (h, w), or None
        Pixels flagged as non-DAB pigment (melanin), reported and excluded from the bins; None where pigment was
        not looked for.
    """

    x_r: int
    y_r: int
    bin_px: np.ndarray
    positive_od_sum: np.ndarray
    pigment_px: np.ndarray | None


@numba.njit(cache=True, nogil=True, inline="always")
def _add_row(vals, pig_row, has_pigment, t1, t2, t3, an, a1, a2, a3, sp, ap):
    # Per pixel column, counts of pixels reaching each threshold and the positive OD sum over the rows of one
    # raster row: contiguous, branch-free, so the compiler vectorises it. (A counter per raster cell per pixel
    # stalls on store-to-load forwarding, since neighbouring pixels share a cell: 4-8x slower.)
    w = vals.shape[0]
    one = np.int32(1)
    zero = np.int32(0)
    if has_pigment:
        for j in range(w):
            if pig_row[j]:
                ap[j] += one
                continue
            v = vals[j]
            an[j] += one
            a1[j] += one if v >= t1 else zero
            a2[j] += one if v >= t2 else zero
            a3[j] += one if v >= t3 else zero
            sp[j] += np.float64(v) if v >= t1 else 0.0
    else:
        for j in range(w):
            v = vals[j]
            an[j] += one
            a1[j] += one if v >= t1 else zero
            a2[j] += one if v >= t2 else zero
            a3[j] += one if v >= t3 else zero
            sp[j] += np.float64(v) if v >= t1 else 0.0


@numba.njit(cache=True, nogil=True, inline="always")
def _flush(x0_a, r, an, a1, a2, a3, sp, ap, b_row, s_row, p_row):
    # Column totals into raster cells (runs of r columns; the first may be cut by the tile edge), then reset.
    # OD sums are float64 sums of float32 values of similar magnitude, exact whatever their grouping, so totals
    # do not depend on how pixels were split into tiles.
    w = an.shape[0]
    rx = 0
    j = 0
    stop = min(w, (x0_a // r + 1) * r - x0_a)
    while j < w:
        n = 0
        g1 = 0
        g2 = 0
        g3 = 0
        p = 0
        s = 0.0
        for k in range(j, stop):
            n += an[k]
            g1 += a1[k]
            g2 += a2[k]
            g3 += a3[k]
            p += ap[k]
            s += sp[k]
        b_row[rx, 0] += n - g1
        b_row[rx, 1] += g1 - g2
        b_row[rx, 2] += g2 - g3
        b_row[rx, 3] += g3
        s_row[rx] += s
        p_row[rx] += p
        rx += 1
        j = stop
        stop = min(w, stop + r)
    an[:] = 0
    a1[:] = 0
    a2[:] = 0
    a3[:] = 0
    ap[:] = 0
    sp[:] = 0.0


@numba.njit(cache=True, nogil=True)
def _accumulate(
    od, rgb, lut, col, from_rgb, pigment, has_pigment, x0_a, y0_a, r, wy0, t1, t2, t3, bins, od_sum, pig
):
    # One driver for both sources of OD: rows of a target-OD image, or (from_rgb) one stain's OD made from RGB a row
    # at a time in a small buffer, with the float32 formula of cleihc.stains.concentration (so bit-identical to
    # binning that image) and never stored as an image. bins is (h, w, 4): a cell's four counters share a line.
    h = rgb.shape[0] if from_rgb else od.shape[0]
    w = rgb.shape[1] if from_rgb else od.shape[1]
    c0, c1, c2 = col[0], col[1], col[2]
    lr, lg, lb = lut[0], lut[1], lut[2]
    buf = np.empty(w, np.float32)
    an = np.zeros(w, np.int32)
    a1 = np.zeros(w, np.int32)
    a2 = np.zeros(w, np.int32)
    a3 = np.zeros(w, np.int32)
    ap = np.zeros(w, np.int32)
    sp = np.zeros(w, np.float64)
    cur = -1
    for i in range(h):
        ry = (y0_a + i) // r - wy0
        if ry != cur and cur >= 0:
            _flush(x0_a, r, an, a1, a2, a3, sp, ap, bins[cur], od_sum[cur], pig[cur])
        cur = ry
        if from_rgb:
            for j in range(w):
                buf[j] = lr[rgb[i, j, 0]] * c0 + lg[rgb[i, j, 1]] * c1 + lb[rgb[i, j, 2]] * c2
            row = buf
        else:
            row = od[i]
        pig_row = pigment[i if has_pigment else 0]
        _add_row(row, pig_row, has_pigment, t1, t2, t3, an, a1, a2, a3, sp, ap)
    if cur >= 0:
        _flush(x0_a, r, an, a1, a2, a3, sp, ap, bins[cur], od_sum[cur], pig[cur])


_NO_RGB = np.zeros((1, 1, 3), np.uint8)
_NO_OD = np.zeros((1, 1), np.float32)
_NO_LUT = np.zeros((3, 256), np.float32)
_NO_COL = np.zeros(3, np.float32)
_NO_PIGMENT = np.zeros((1, 1), np.bool_)


def _make_window(
    x_r: int, y_r: int, bins: np.ndarray, od_sum: np.ndarray, pig: np.ndarray | None
) -> RasterWindow:
    # Counts fit 16 bits (MAX_RASTER_FACTOR): a tile's window is then 16 rather than 28 bytes per cell, which is
    # what Dask workers send back (moving results cost more main-process CPU than anything else there).
    return RasterWindow(
        x_r,
        y_r,
        bins.transpose(2, 0, 1).astype(np.uint16),
        od_sum,
        None if pig is None else pig.astype(np.uint16),
    )


def _float32_thresholds(bins_od: tuple[float, float, float]) -> tuple[np.float32, ...]:
    """The smallest float32 at or above each threshold: ``float32 v >= t32`` iff ``float64(v) >= t``."""
    out = []
    for t in bins_od:
        t = float(t)
        t32 = np.float32(t)
        if float(t32) < t:
            t32 = np.nextafter(t32, np.float32(np.inf))
        out.append(t32)
    return tuple(out)


def _window(location_a: tuple[int, int], shape: tuple[int, int], raster_factor: int):
    h, w = shape
    x0, y0 = (int(v) for v in location_a)
    r = int(raster_factor)
    if not 1 <= r <= MAX_RASTER_FACTOR:
        raise ValueError(f"raster_factor must be between 1 and {MAX_RASTER_FACTOR}, got {raster_factor}")
    wx0, wy0 = x0 // r, y0 // r
    ww = (x0 + w - 1) // r - wx0 + 1 if w else 0
    wh = (y0 + h - 1) // r - wy0 + 1 if h else 0
    return (
        x0,
        y0,
        r,
        wx0,
        wy0,
        np.zeros((wh, ww, N_BINS), np.int32),
        np.zeros((wh, ww)),
        np.zeros((wh, ww), np.int32),
    )


def accumulate_area(
    target_od: np.ndarray,
    *,
    location_a: tuple[int, int],
    raster_factor: int,
    bins_od: tuple[float, float, float],
    pigment: np.ndarray | None = None,
) -> RasterWindow:
    """Bin the target OD of one tile core and add it up per raster cell.

    Parameters
    ----------
    target_od : ndarray of float32, shape (H, W)
        Target stain concentration (OD units) of the tile core.
    location_a : (int, int)
        Global analysis-pixel coordinates (x, y) of ``target_od[0, 0]``.
    raster_factor : int
        Analysis pixels per raster cell along each axis.
    bins_od : (float, float, float)
        Lower bounds of the weak, moderate and strong bins; a pixel is positive when ``od >= bins_od[0]``.
    pigment : ndarray of bool, shape (H, W), optional
        Pixels that are pigment, not stain: counted apart and never positive.

    Returns
    -------
    RasterWindow
    """
    if target_od.ndim != 2:
        raise ValueError("target_od must be 2-D")
    x0, y0, r, wx0, wy0, bins, od_sum, pig = _window(location_a, target_od.shape, raster_factor)
    has_pigment = pigment is not None
    if has_pigment and np.shape(pigment) != target_od.shape:
        raise ValueError(
            f"pigment must have the shape of target_od {target_od.shape}, got {np.shape(pigment)}"
        )
    pigment_arr = np.asarray(pigment, dtype=np.bool_) if has_pigment else _NO_PIGMENT
    t1, t2, t3 = _float32_thresholds(bins_od)
    od = np.ascontiguousarray(target_od, dtype=np.float32)
    _accumulate(
        od,
        _NO_RGB,
        _NO_LUT,
        _NO_COL,
        False,
        pigment_arr,
        has_pigment,
        x0,
        y0,
        r,
        wy0,
        t1,
        t2,
        t3,
        bins,
        od_sum,
        pig,
    )
    return _make_window(wx0, wy0, bins, od_sum, pig if has_pigment else None)


def accumulate_area_rgb(
    rgb: np.ndarray,
    stains: StainMatrix,
    *,
    stain: str,
    location_a: tuple[int, int],
    raster_factor: int,
    bins_od: tuple[float, float, float],
) -> RasterWindow:
    """:func:`accumulate_area` of one stain's concentration, computed from RGB in the same pass.

    Equal to ``accumulate_area(concentration(rgb, stains, stain=stain), ...)`` bit for bit, without the
    intermediate image: the engine's path for area protocols, where reading the slide is the only other cost.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
        The tile core.
    stains : StainMatrix
        Stain vectors and background (I0).
    stain : str
        The measured stain, e.g. ``"alcian_blue"``.
    location_a, raster_factor, bins_od
        As in :func:`accumulate_area`.

    Returns
    -------
    RasterWindow
    """
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB image, got {getattr(rgb, 'dtype', type(rgb))} "
            f"{getattr(rgb, 'shape', '')}"
        )
    x0, y0, r, wx0, wy0, bins, od_sum, pig = _window(location_a, rgb.shape[:2], raster_factor)
    lut = od_lut(stains.background_rgb)
    col = np.ascontiguousarray(stains.conc_from_od[:, stains.index(stain)], dtype=np.float32)
    t1, t2, t3 = _float32_thresholds(bins_od)
    _accumulate(
        _NO_OD, rgb, lut, col, True, _NO_PIGMENT, False, x0, y0, r, wy0, t1, t2, t3, bins, od_sum, pig
    )
    return _make_window(wx0, wy0, bins, od_sum, None)


@dataclass
class TotalsRaster:
    """Whole-slide totals raster that tile windows are added into (the only mutable accumulator).

    Parameters
    ----------
    shape_r : (int, int)
        (width, height) of the raster in cells.
    raster_factor : int
        Analysis pixels per raster cell along each axis.
    """

    shape_r: tuple[int, int]
    raster_factor: int
    bin_px: np.ndarray = field(init=False)
    positive_od_sum: np.ndarray = field(init=False)
    pigment_px: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.raster_factor <= MAX_RASTER_FACTOR:
            raise ValueError(f"raster_factor {self.raster_factor} must be between 1 and {MAX_RASTER_FACTOR}")
        w, h = self.shape_r
        # A cell counts at most raster_factor² <= 65025 pixels: 16-bit counts hold them, at 18 bytes per cell
        # rather than 28 (the raster is the largest array of the fold: 8 M cells on a big slide).
        self.bin_px = np.zeros((N_BINS, h, w), np.uint16)
        self.positive_od_sum = np.zeros((h, w), np.float64)
        self.pigment_px = np.zeros((h, w), np.uint16)

    def add(self, window: RasterWindow) -> None:
        """Add one tile's window (clipped to the raster)."""
        _, h, w = window.bin_px.shape
        ys = slice(window.y_r, window.y_r + h)
        xs = slice(window.x_r, window.x_r + w)
        self.bin_px[:, ys, xs] += window.bin_px
        self.positive_od_sum[ys, xs] += window.positive_od_sum
        if window.pigment_px is not None:
            self.pigment_px[ys, xs] += window.pigment_px

    def totals(self, mask_r: np.ndarray) -> AreaTotals:
        """Sum the raster over the cells of a region mask (bool, raster shape)."""
        m = np.asarray(mask_r, dtype=bool)
        # Summed in place (where=) rather than over a boolean-indexed copy: a region of a big slide's raster
        # would otherwise copy up to 8 M float64 sums (66 MB) and each count plane.
        return AreaTotals(
            bin_px=tuple(int(np.sum(self.bin_px[k], where=m, dtype=np.int64)) for k in range(N_BINS)),
            positive_od_sum=float(np.sum(self.positive_od_sum, where=m)),
            pigment_px=int(np.sum(self.pigment_px, where=m, dtype=np.int64)),
        )

    def positive_fraction(self) -> np.ndarray:
        """Per raster cell, the fraction of measured pixels that are positive (NaN where none): the review mask."""
        out = np.empty(self.bin_px.shape[1:], np.float32)
        # Whole-raster int64 and float64 temporaries took 275 MB at 8 M cells.
        for rows in row_blocks(out.shape):
            out[rows] = _positive_fraction(self.bin_px[:, rows])
        return out

    def positive_fraction_at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """:meth:`positive_fraction` on the grid of raster rows × columns given (e.g. a thumbnail's samples)."""
        rows, cols = np.asarray(rows), np.asarray(cols)
        # Just those cells, bin by bin: one flat gather each, each bin's plane contiguous (a fancy index over all
        # bins at once gives a bin-interleaved array, and every later pass strides through it).
        flat = (rows[:, None] * self.bin_px.shape[2] + cols[None, :]).ravel()
        shape = (len(rows), len(cols))
        return _positive_fraction(np.stack([b.ravel().take(flat).reshape(shape) for b in self.bin_px]))


def row_blocks(shape_hw: tuple[int, ...], *, cells: int = 1 << 20) -> Iterator[slice]:
    """Slices of whole rows of an (H, W) grid holding about `cells` cells each: bounded temporaries over a raster."""
    h, w = int(shape_hw[0]), int(shape_hw[1])
    step = max(1, cells // max(w, 1))
    for y0 in range(0, h, step):
        yield slice(y0, min(y0 + step, h))


def _positive_fraction(bins: np.ndarray) -> np.ndarray:
    """Positive fraction (float32, NaN without measured pixels) of bin counts shaped (N_BINS, ...)."""
    total = bins.sum(axis=0, dtype=np.int64)
    pos = total - bins[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, pos / np.maximum(total, 1), np.nan).astype(np.float32)


@dataclass(frozen=True)
class AreaTotals:
    """Additive totals of one region: pixel counts per bin, positive OD sum, pigment pixels."""

    bin_px: tuple[int, int, int, int]
    positive_od_sum: float
    pigment_px: int

    @property
    def pixels(self) -> int:
        """All measured pixels of the region, pigment included (the region's area in pixels)."""
        return sum(self.bin_px) + self.pigment_px

    def __add__(self, other: AreaTotals) -> AreaTotals:
        return AreaTotals(
            tuple(a + b for a, b in zip(self.bin_px, other.bin_px, strict=True)),
            self.positive_od_sum + other.positive_od_sum,
            self.pigment_px + other.pigment_px,
        )


def area_metrics(totals: AreaTotals, *, pixel_area_um2: float) -> dict[str, float]:
    """Area metrics of one region from its totals (ratios are made here, once).

    Percentages are of the region's area (pigment pixels included in the denominator, never positive).
    ``h_score`` is the area H-score, ``1·weak% + 2·moderate% + 3·strong%`` (0–300). The ``ppc_*`` columns follow
    the Aperio Positive Pixel Count's vocabulary: ``Nwp`` weak, ``Np`` (moderate) positive, ``Nsp`` strong
    positive, ``Nn`` negative pixel counts, and ``positivity = (Nwp + Np + Nsp) / (Nwp + Np + Nsp + Nn)``;
    here pixels are classified by deconvolved target OD against the protocol's bins rather than by hue and
    intensity (see docs/measurements.md).
    """
    neg, weak, mod, strong = totals.bin_px
    n = totals.pixels
    pos = weak + mod + strong
    mm2 = pixel_area_um2 / 1e6

    def pct(k: int) -> float:
        return 100.0 * k / n if n else float("nan")

    classified = pos + neg
    return {
        "region_area_mm2": n * mm2,
        "positive_area_mm2": pos * mm2,
        "positive_area_percent": pct(pos),
        "weak_area_percent": pct(weak),
        "moderate_area_percent": pct(mod),
        "strong_area_percent": pct(strong),
        "positive_mean_od": totals.positive_od_sum / pos if pos else float("nan"),
        "h_score": (pct(weak) + 2 * pct(mod) + 3 * pct(strong)) if n else float("nan"),
        "pigment_area_mm2": totals.pigment_px * mm2,
        "ppc_nwp": float(weak),
        "ppc_np": float(mod),
        "ppc_nsp": float(strong),
        "ppc_nn": float(neg),
        "ppc_positivity": pos / classified if classified else float("nan"),
    }


def cell_metrics(cells: pd.DataFrame, *, region_area_mm2: float) -> dict[str, float]:
    """Cell metrics of one region from the cells inside it (pigmented cells reported, never counted).

    ``cells`` needs the columns ``positive`` (bool), ``intensity_class`` (0–3) and ``pigment`` (bool).
    ``cells_h_score`` is QuPath's cell H-score ``1·%1+ + 2·%2+ + 3·%3+`` over counted cells.
    """
    if len(cells):
        pigment = np.asarray(cells["pigment"], dtype=bool)
        positives = np.asarray(cells["positive"], dtype=bool)[~pigment]
        cls = np.asarray(cells["intensity_class"], dtype=np.int64)[~pigment]
    else:
        pigment, positives, cls = (
            np.zeros(0, dtype=bool),
            np.zeros(0, dtype=bool),
            np.zeros(0, dtype=np.int64),
        )
    total = int(positives.size)
    positive = int(positives.sum())
    n1, n2, n3 = (int((cls == k).sum()) for k in (1, 2, 3))

    def pct(k: int) -> float:
        return 100.0 * k / total if total else float("nan")

    return {
        "cells_total": float(total),
        "cells_positive": float(positive),
        "cells_negative": float(total - positive),
        "positive_cells_per_mm2": positive / region_area_mm2 if region_area_mm2 > 0 else float("nan"),
        "cells_per_mm2": total / region_area_mm2 if region_area_mm2 > 0 else float("nan"),
        "positive_percent": pct(positive),
        "cells_1plus": float(n1),
        "cells_2plus": float(n2),
        "cells_3plus": float(n3),
        "cells_h_score": (pct(n1) + 2 * pct(n2) + 3 * pct(n3)) if total else float("nan"),
        "pigment_cells": float(int(pigment.sum())),
    }


def map_mask(
    mask: np.ndarray,
    *,
    mask_downsample: float,
    shape: tuple[int, int],
    downsample: float,
    origin_px: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Sample a low-resolution mask onto another grid by pixel centres.

    Pixel ``(i, j)`` of the output grid (level-0 size ``downsample``, origin ``origin_px``) takes the value of the
    mask pixel (level-0 size ``mask_downsample``, origin 0) that contains its centre; centres outside the mask are
    False. Being a pure function of global coordinates, it gives the same value for a pixel whatever window
    it is computed in.

    Parameters
    ----------
    mask : ndarray of bool, shape (h, w)
    mask_downsample : float
        Level-0 pixels per mask pixel.
    shape : (int, int)
        (width, height) of the output grid.
    downsample : float
        Level-0 pixels per output pixel.
    origin_px : (float, float)
        Level-0 position (x, y) of the output grid's corner.

    Returns
    -------
    ndarray of bool, shape (height, width)
    """
    w, h = shape
    xs = np.floor((origin_px[0] + (np.arange(w) + 0.5) * downsample) / mask_downsample).astype(np.int64)
    ys = np.floor((origin_px[1] + (np.arange(h) + 0.5) * downsample) / mask_downsample).astype(np.int64)
    mh, mw = mask.shape
    out = np.zeros((h, w), dtype=bool)
    # xs and ys increase, so the output pixels whose centre falls on the mask form one rectangle; two takes
    # along the axes gather it about 10x faster than an outer-product (np.ix_) index.
    jx = np.flatnonzero((xs >= 0) & (xs < mw))
    iy = np.flatnonzero((ys >= 0) & (ys < mh))
    if jx.size and iy.size:
        rows = np.take(np.asarray(mask, dtype=bool), ys[iy], axis=0)
        out[iy[0] : iy[-1] + 1, jx[0] : jx[-1] + 1] = np.take(rows, xs[jx], axis=1)
    return out
