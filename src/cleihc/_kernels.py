"""Numba kernels for colour deconvolution, fused per-region stain measurement and whole-slide colour statistics.

Private: call them through :mod:`cleihc.stains` (``deconvolve``, ``concentration``, ``area_counts``,
``estimate_background``) and :mod:`cleihc.tissue`, which check shapes and dtypes. Every kernel runs on one core (``parallel=False``) because the pipeline parallelises per tile;
``nogil=True`` lets threads run tiles side by side. ``fastmath`` stays off so results are reproducible bit for bit
across machines and equal the plain float32 formula.

Arithmetic: optical density comes from a per-channel 256-entry float32 lookup table (``lut[c, value]``, see
:func:`cleihc.stains.od_lut`); concentrations are ``od @ conc_from_od`` evaluated in float32 with a fixed
summation order (red, green, blue). No temporaries are allocated per pixel or per image.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "MAX_THRESHOLDS",
    "area_counts_kernel",
    "concentration_kernel",
    "concentrations_kernel",
    "deconvolve_kernel",
    "glass_histogram_kernel",
    "median_cross_kernel",
    "recompose_kernel",
    "stain_fit_kernel",
    "tissue_colour_kernel",
]


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
def stain_fit_kernel(rgb, mask, lut, col, normal, positive_od, sin2, out):  # pragma: no cover - compiled
    """Among ``mask`` pixels, count those whose concentration (as :func:`concentration_kernel` with ``col``) is at
    least ``positive_od`` (``out[0]``) and, of them, those whose OD vector lies further from the stains' plane
    than the angle whose squared sine is ``sin2``: ``(od . normal)^2 > sin2 * |od|^2`` (``out[1]``)."""
    h, w = rgb.shape[0], rgb.shape[1]
    c0, c1, c2 = col[0], col[1], col[2]
    n0, n1, n2 = normal[0], normal[1], normal[2]
    lr, lg, lb = lut[0], lut[1], lut[2]
    n_pos = 0
    n_off = 0
    for i in range(h):
        for j in range(w):
            if not mask[i, j]:
                continue
            r = lr[rgb[i, j, 0]]
            g = lg[rgb[i, j, 1]]
            b = lb[rgb[i, j, 2]]
            if r * c0 + g * c1 + b * c2 < positive_od:
                continue
            n_pos += 1
            d = r * n0 + g * n1 + b * n2
            if d * d > sin2 * (r * r + g * g + b * b):
                n_off += 1
    out[0] = n_pos
    out[1] = n_off


@njit(cache=True, nogil=True, fastmath=False)
def concentrations_kernel(rgb, lut, cols, out):  # pragma: no cover - compiled
    """out[k, i, j] = sum_c lut[c, rgb[i, j, c]] * cols[c, k]: several stains' planes in one pass, each equal to
    :func:`concentration_kernel` with that column (same products, same order)."""
    h, w = rgb.shape[0], rgb.shape[1]
    n = cols.shape[1]
    lr, lg, lb = lut[0], lut[1], lut[2]
    for k0 in range(0, n, 2):
        if k0 == n - 1:  # an odd last plane alone
            concentration_kernel(rgb, lut, cols[:, k0], out[k0])
            break
        # Two planes a pass with their coefficients in registers: a loop over planes inside the pixel loop kept
        # the compiler from vectorising (3x slower).
        k1 = k0 + 1
        a0, a1, a2 = cols[0, k0], cols[1, k0], cols[2, k0]
        b0, b1, b2 = cols[0, k1], cols[1, k1], cols[2, k1]
        out0, out1 = out[k0], out[k1]
        for i in range(h):
            for j in range(w):
                r = lr[rgb[i, j, 0]]
                g = lg[rgb[i, j, 1]]
                b = lb[rgb[i, j, 2]]
                out0[i, j] = r * a0 + g * a1 + b * a2
                out1[i, j] = r * b0 + g * b1 + b * b2


MAX_THRESHOLDS = 4  # area_counts_kernel keeps one register counter per threshold


@njit(cache=True, nogil=True, fastmath=False)
def area_counts_kernel(
    rgb, lut, col, bits, n_regions, thresholds, counts, od_sum_pos, od_sum_all
):  # pragma: no cover
    """Accumulate, per region bit, pixel counts per intensity bin and sums of the target stain's OD.

    ``thresholds`` has exactly ``MAX_THRESHOLDS`` increasing entries (callers pad with +inf);
    ``bin = number of thresholds <= c`` (0 = negative), ``c`` as in :func:`concentration_kernel`, compared in
    float64. A pixel adds to every region whose bit is set in ``bits[i, j]``. ``counts`` (n_regions, >= number of
    finite thresholds + 1) and the sums are added to, not reset, so one accumulator can fold many tiles.

    Why row by row: incrementing ``counts[r, bin]`` per pixel stalls on store-to-load forwarding (~15 ns/pixel);
    instead each row's concentrations go to a small scratch buffer (O(width)), and each region present in the row
    is then counted with branch-free register accumulators (counts of pixels reaching each threshold).
    """
    h, w = rgb.shape[0], rgb.shape[1]
    n_bins = counts.shape[1]
    c0, c1, c2 = col[0], col[1], col[2]
    lr, lg, lb = lut[0], lut[1], lut[2]
    t0, t1, t2, t3 = thresholds[0], thresholds[1], thresholds[2], thresholds[3]
    cbuf = np.empty(w, np.float64)
    for i in range(h):
        row_or = np.uint64(0)
        for j in range(w):
            row_or |= np.uint64(bits[i, j])
            cbuf[j] = np.float64(lr[rgb[i, j, 0]] * c0 + lg[rgb[i, j, 1]] * c1 + lb[rgb[i, j, 2]] * c2)
        if row_or == 0:
            continue
        for r in range(n_regions):
            if (row_or >> np.uint64(r)) & np.uint64(1) == 0:
                continue
            # Integer counts of pixels reaching each threshold (branch-free, no float dependency chain)...
            n = 0
            g0 = 0
            g1 = 0
            g2 = 0
            g3 = 0
            for j in range(w):
                b = (np.int64(bits[i, j]) >> r) & 1
                c = cbuf[j]
                n += b
                g0 += b & np.int64(c >= t0)
                g1 += b & np.int64(c >= t1)
                g2 += b & np.int64(c >= t2)
                g3 += b & np.int64(c >= t3)
            # ... then the OD sums in two interleaved lanes (even, odd columns) to halve the add latency chain;
            # the order is fixed, so results are reproducible.
            sa0 = 0.0
            sa1 = 0.0
            sp0 = 0.0
            sp1 = 0.0
            j = 0
            while j + 1 < w:
                ca = cbuf[j]
                cb = cbuf[j + 1]
                ba = (np.int64(bits[i, j]) >> r) & 1
                bb = (np.int64(bits[i, j + 1]) >> r) & 1
                sa0 += ca if ba else 0.0
                sa1 += cb if bb else 0.0
                sp0 += ca if (ba and ca >= t0) else 0.0
                sp1 += cb if (bb and cb >= t0) else 0.0
                j += 2
            if j < w:
                ca = cbuf[j]
                ba = (np.int64(bits[i, j]) >> r) & 1
                sa0 += ca if ba else 0.0
                sp0 += ca if (ba and ca >= t0) else 0.0
            ge = (n, g0, g1, g2, g3, 0)
            for k in range(n_bins):
                counts[r, k] += ge[k] - ge[k + 1]
            od_sum_all[r] += sa0 + sa1
            od_sum_pos[r] += sp0 + sp1


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


@njit(cache=True, nogil=True, fastmath=False)
def glass_histogram_kernel(rgb, exclude, use_exclude, max_saturation, hist):  # pragma: no cover - compiled
    """hist[r + g + b, c, value of channel c] += 1 for every glass candidate: a pixel with ``max > 0`` and
    ``max - min <= max_saturation * max`` (compared in float64) that `exclude` does not mark.

    One pass and no per-pixel arrays: the grey-level percentile and the per-channel medians of
    :func:`cleihc.stains.estimate_background` are then read off the (766, 3, 256) counts exactly.
    """
    h, w = rgb.shape[0], rgb.shape[1]
    for i in range(h):
        for j in range(w):
            if use_exclude and exclude[i, j]:
                continue
            r = np.int64(rgb[i, j, 0])
            g = np.int64(rgb[i, j, 1])
            b = np.int64(rgb[i, j, 2])
            mx = max(r, max(g, b))
            mn = min(r, min(g, b))
            if mx == 0 or np.float64(mx - mn) > max_saturation * np.float64(mx):
                continue
            s = r + g + b
            hist[s, 0, r] += 1
            hist[s, 1, g] += 1
            hist[s, 2, b] += 1


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def tissue_colour_kernel(rgb, n_lut, od_lut, od, mx, sat):  # pragma: no cover - compiled
    """Per pixel, in float32 from per-channel tables: summed OD ``od_lut[0][r] + od_lut[1][g] + od_lut[2][b]``,
    the brightest channel's transmission ``mx`` and the HSV saturation ``1 - min / max`` of the transmissions
    (:func:`cleihc.tissue._colour`; the same operations, in the same order, as its numpy formula)."""
    h, w = rgb.shape[0], rgb.shape[1]
    one = np.float32(1.0)
    for i in range(h):
        for j in range(w):
            vr = rgb[i, j, 0]
            vg = rgb[i, j, 1]
            vb = rgb[i, j, 2]
            tr = n_lut[0, vr]
            tg = n_lut[1, vg]
            tb = n_lut[2, vb]
            od[i, j] = od_lut[0, vr] + od_lut[1, vg] + od_lut[2, vb]
            hi = max(max(tr, tg), tb)
            lo = min(min(tr, tg), tb)
            mx[i, j] = hi
            sat[i, j] = one - lo / hi


@njit(cache=True, nogil=True, fastmath=False)
def median_cross_kernel(src, out):  # pragma: no cover - compiled
    """Median over each pixel and its four neighbours (the radius-1 disk), border clamped: the value
    ``scipy.ndimage.median_filter(src, footprint=cross, mode="nearest")`` selects, by a five-value network.

    Why a network: the two pair minima that are not the smallest cannot be the median; dropping the smaller
    pair's minimum leaves the median as the second smallest of four, read from two sorted pairs.
    """
    h, w = src.shape
    for i in range(h):
        up = src[max(i - 1, 0)]
        row = src[i]
        down = src[min(i + 1, h - 1)]
        for j in range(w):
            a = up[j]
            b = down[j]
            c = row[j]
            d = row[max(j - 1, 0)]
            e = row[min(j + 1, w - 1)]
            if a > b:
                a, b = b, a
            if d > e:
                d, e = e, d
            if a > d:  # d is among the two smallest: drop it, keep the pair (a, b) and the pair (c, e)
                a, b, d, e = c, e, a, b
            else:  # a is among the two smallest: drop it, keep the pair (c, b) and the pair (d, e)
                a = c
            if a > b:
                a, b = b, a
            lo = a if a > d else d  # the larger of the two minima
            hi = b if b < e else e  # the smaller of the two maxima
            out[i, j] = lo if lo < hi else hi
