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

from dataclasses import dataclass, field

import numba
import numpy as np
import pandas as pd

__all__ = [
    "BIN_NAMES",
    "AreaTotals",
    "RasterWindow",
    "TotalsRaster",
    "accumulate_area",
    "area_metrics",
    "cell_metrics",
    "map_mask",
]

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
    bin_px : ndarray of int32, shape (4, h, w)
        Analysis pixels per intensity bin (negative, weak, moderate, strong); pigment pixels are not binned.
    positive_od_sum : ndarray of float64, shape (h, w)
        Sum of target OD over positive pixels (weak, moderate or strong).
    pigment_px : ndarray of int32, shape (h, w)
        Pixels flagged as non-DAB pigment (melanin), reported and excluded from the bins.
    """

    x_r: int
    y_r: int
    bin_px: np.ndarray
    positive_od_sum: np.ndarray
    pigment_px: np.ndarray


@numba.njit(cache=True, nogil=True)
def _accumulate(target_od, pigment, has_pigment, x0_a, y0_a, r, wx0, wy0, t1, t2, t3, bins, od_sum, pig):
    # bins is (h, w, 4): the four counters of a raster cell share a cache line. Branch-free binning keeps the
    # loop fast on any mix of intensities (mispredicted branches cost more than the arithmetic).
    h, w = target_od.shape
    cols = np.empty(w, np.int64)  # raster column of each pixel column: no division in the inner loop
    for j in range(w):
        cols[j] = (x0_a + j) // r - wx0
    for i in range(h):
        ry = (y0_a + i) // r - wy0
        row = target_od[i]
        b_row = bins[ry]
        s_row = od_sum[ry]
        if has_pigment:
            p_row = pig[ry]
            m_row = pigment[i]
            for j in range(w):
                rx = cols[j]
                if m_row[j]:
                    p_row[rx] += 1
                    continue
                v = row[j]
                b_row[rx, (v >= t1) + (v >= t2) + (v >= t3)] += 1
                s_row[rx] += v * (v >= t1)
        else:
            for j in range(w):
                rx = cols[j]
                v = row[j]
                b_row[rx, (v >= t1) + (v >= t2) + (v >= t3)] += 1
                s_row[rx] += v * (v >= t1)


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
    h, w = target_od.shape
    x0, y0 = (int(v) for v in location_a)
    r = int(raster_factor)
    wx0, wy0 = x0 // r, y0 // r
    ww = (x0 + w - 1) // r - wx0 + 1 if w else 0
    wh = (y0 + h - 1) // r - wy0 + 1 if h else 0
    bins = np.zeros((wh, ww, N_BINS), np.int32)
    od_sum = np.zeros((wh, ww), np.float64)
    pig = np.zeros((wh, ww), np.int32)
    has_pigment = pigment is not None
    pigment_arr = np.asarray(pigment, dtype=np.bool_) if has_pigment else np.zeros((1, 1), np.bool_)
    t1, t2, t3 = (float(t) for t in bins_od)
    _accumulate(
        np.ascontiguousarray(target_od, dtype=np.float32),
        pigment_arr,
        has_pigment,
        x0,
        y0,
        r,
        wx0,
        wy0,
        t1,
        t2,
        t3,
        bins,
        od_sum,
        pig,
    )
    return RasterWindow(wx0, wy0, np.ascontiguousarray(bins.transpose(2, 0, 1)), od_sum, pig)


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
        w, h = self.shape_r
        self.bin_px = np.zeros((N_BINS, h, w), np.int32)
        self.positive_od_sum = np.zeros((h, w), np.float64)
        self.pigment_px = np.zeros((h, w), np.int32)

    def add(self, window: RasterWindow) -> None:
        """Add one tile's window (clipped to the raster)."""
        _, h, w = window.bin_px.shape
        ys = slice(window.y_r, window.y_r + h)
        xs = slice(window.x_r, window.x_r + w)
        self.bin_px[:, ys, xs] += window.bin_px
        self.positive_od_sum[ys, xs] += window.positive_od_sum
        self.pigment_px[ys, xs] += window.pigment_px

    def totals(self, mask_r: np.ndarray) -> AreaTotals:
        """Sum the raster over the cells of a region mask (bool, raster shape)."""
        m = np.asarray(mask_r, dtype=bool)
        return AreaTotals(
            bin_px=tuple(int(self.bin_px[k][m].sum(dtype=np.int64)) for k in range(N_BINS)),
            positive_od_sum=float(self.positive_od_sum[m].sum()),
            pigment_px=int(self.pigment_px[m].sum(dtype=np.int64)),
        )

    def positive_fraction(self) -> np.ndarray:
        """Per raster cell, the fraction of measured pixels that are positive (NaN where none): the review mask."""
        total = self.bin_px.sum(axis=0, dtype=np.int64)
        pos = total - self.bin_px[0]
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
    if not len(cells):
        cells = pd.DataFrame({"positive": [], "intensity_class": [], "pigment": []})
    pigment = cells["pigment"].to_numpy(bool)
    counted = cells.loc[~pigment]
    total = len(counted)
    positive = int(counted["positive"].to_numpy(bool).sum())
    cls = counted["intensity_class"].to_numpy(np.int64)
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
    okx = (xs >= 0) & (xs < mw)
    oky = (ys >= 0) & (ys < mh)
    out = np.zeros((h, w), dtype=bool)
    sub = np.asarray(mask, dtype=bool)[np.ix_(ys[oky], xs[okx])]
    out[np.ix_(oky, okx)] = sub
    return out
