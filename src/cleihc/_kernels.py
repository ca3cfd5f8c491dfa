"""Numba kernels for colour deconvolution and fused per-region stain measurement.

Private: call them through :mod:`cleihc.stains` (``deconvolve``, ``concentration``, ``area_counts``), which check
shapes and dtypes. Every kernel runs on one core (``parallel=False``) because the pipeline parallelises per tile;
``nogil=True`` lets threads run tiles side by side. ``fastmath`` stays off so results are reproducible bit for bit
across machines and equal the plain float32 formula.

Arithmetic: optical density comes from a per-channel 256-entry float32 lookup table (``lut[c, value]``, see
:func:`cleihc.stains.od_lut`); concentrations are ``od @ conc_from_od`` evaluated in float32 with a fixed
summation order (red, green, blue). No temporaries are allocated per pixel or per image.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["area_counts_kernel", "concentration_kernel", "deconvolve_kernel", "recompose_kernel"]


@njit(cache=True, nogil=True, fastmath=False)
def deconvolve_kernel(rgb, lut, m, out):  # pragma: no cover - compiled
    """out[i, j, k] = sum_c lut[c, rgb[i, j, c]] * m[c, k] in float32 (m is conc_from_od as float32)."""
    h, w = rgb.shape[0], rgb.shape[1]
    m00, m01, m02 = m[0, 0], m[0, 1], m[0, 2]
    m10, m11, m12 = m[1, 0], m[1, 1], m[1, 2]
    m20, m21, m22 = m[2, 0], m[2, 1], m[2, 2]
    lr, lg, lb = lut[0], lut[1], lut[2]
    for i in range(h):
        for j in range(w):
            r = lr[rgb[i, j, 0]]
            g = lg[rgb[i, j, 1]]
            b = lb[rgb[i, j, 2]]
            out[i, j, 0] = r * m00 + g * m10 + b * m20
            out[i, j, 1] = r * m01 + g * m11 + b * m21
            out[i, j, 2] = r * m02 + g * m12 + b * m22


@njit(cache=True, nogil=True, fastmath=False)
def concentration_kernel(rgb, lut, col, out):  # pragma: no cover - compiled
    """out[i, j] = sum_c lut[c, rgb[i, j, c]] * col[c]: one stain's concentration (col = a column of conc_from_od)."""
    h, w = rgb.shape[0], rgb.shape[1]
    c0, c1, c2 = col[0], col[1], col[2]
    lr, lg, lb = lut[0], lut[1], lut[2]
    for i in range(h):
        for j in range(w):
            out[i, j] = lr[rgb[i, j, 0]] * c0 + lg[rgb[i, j, 1]] * c1 + lb[rgb[i, j, 2]] * c2


@njit(cache=True, nogil=True, fastmath=False)
def area_counts_kernel(
    rgb, lut, col, bits, n_regions, thresholds, counts, od_sum_pos, od_sum_all
):  # pragma: no cover
    """Accumulate, per region bit, pixel counts per intensity bin and sums of the target stain's OD.

    ``bin = number of thresholds <= c`` (0 = negative), ``c`` as in :func:`concentration_kernel`. A pixel adds to
    every region whose bit is set in ``bits[i, j]``; ``counts``/``od_sum_*`` are added to (not reset), so one
    accumulator can fold many tiles.
    """
    h, w = rgb.shape[0], rgb.shape[1]
    c0, c1, c2 = col[0], col[1], col[2]
    lr, lg, lb = lut[0], lut[1], lut[2]
    n_thr = thresholds.shape[0]
    t_pos = thresholds[0]
    for i in range(h):
        for j in range(w):
            m = np.uint64(bits[i, j])
            if m == 0:
                continue
            c = lr[rgb[i, j, 0]] * c0 + lg[rgb[i, j, 1]] * c1 + lb[rgb[i, j, 2]] * c2
            cd = np.float64(c)
            k = 0
            while k < n_thr and cd >= thresholds[k]:
                k += 1
            positive = cd >= t_pos
            r = 0
            while m != 0 and r < n_regions:
                if m & np.uint64(1):
                    counts[r, k] += 1
                    od_sum_all[r] += cd
                    if positive:
                        od_sum_pos[r] += cd
                m >>= np.uint64(1)
                r += 1


@njit(cache=True, nogil=True, fastmath=False)
def recompose_kernel(conc, rgb_from_conc, background, out):  # pragma: no cover - compiled
    """out = clip(round(I0 * 10 ** -(conc @ od_vectors)), 0, 255) as uint8, in float64."""
    h, w = conc.shape[0], conc.shape[1]
    n = conc.shape[2]
    for i in range(h):
        for j in range(w):
            for c in range(3):
                od = 0.0
                for k in range(n):
                    od += np.float64(conc[i, j, k]) * rgb_from_conc[k, c]
                v = background[c] * 10.0 ** (-od)
                v = np.floor(v + 0.5)
                if v < 0.0:
                    v = 0.0
                elif v > 255.0:
                    v = 255.0
                out[i, j, c] = np.uint8(v)
