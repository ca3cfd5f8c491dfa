"""Numba kernels of cell detection: filters, run-length labelling, threshold cascade, split, expansion, measures.

Private: call them through :func:`cleihc.cells.detect_cells`, which checks shapes and dtypes. Full-array work
(Gaussian, top-hat, expansion, measurement) is written as vectorisable row passes; everything about objects
(labelling, hole filling, the threshold cascade, the split) works on run lengths of the foreground and on the
boxes of single clumps, so its cost follows the foreground, not the array. Each kernel gives bit for bit what its
array form (scipy.ndimage filters and labels, a whole-array priority flood) gives; the tests check this. Single
core, ``nogil``, no ``fastmath``: the pipeline parallelises per tile and results must be reproducible bit for bit.
Pixels are visited in row-major order, so a cell's sums are accumulated in the same order whatever tile it is
read in.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "cascade_kernel",
    "component_stats_kernel",
    "expand_labels_kernel",
    "extreme_filter_kernel",
    "gaussian_kernel",
    "hole_runs_kernel",
    "label_runs_kernel",
    "measure_kernel",
    "merge_runs_kernel",
    "near_runs_kernel",
    "paint_runs_kernel",
    "runs_of_u8_kernel",
    "split_kernel",
]


@njit(cache=True, nogil=True, fastmath=False)
def measure_kernel(
    nuc, cell, target, counter, pigment, ptr, start, stop, ints, sums, maxs
):  # pragma: no cover - compiled
    """Accumulate per-label statistics of nuclei (``nuc``) and of rings (``cell`` pixels outside any nucleus).

    ``ints`` (int64, shape (6, n + 1)): 0 nucleus area, 1 sum of x, 2 sum of y, 3 nucleus pigment pixels,
    4 ring area, 5 ring pigment pixels. ``sums`` (float64, shape (3, n + 1)): 0 target in nucleus,
    1 counterstain in nucleus, 2 target in ring. ``maxs`` (float64, shape (2, n + 1)): 0 target max in nucleus,
    1 target max in ring (initialised by the caller to -inf). A pixel is pigment where ``pigment`` (uint8,
    :func:`cleihc.cells.detect_pigment_od`) is non-zero; a ``pigment`` not of ``nuc``'s shape (e.g. (0, 0)) means
    no pigment test, as ``plus`` does for :func:`gaussian_kernel`.
    Only the row intervals ``(ptr, start, stop)`` are read (:func:`near_runs_kernel`: they hold every cell), in
    row-major order as a whole-array loop would.
    """
    h, w = nuc.shape
    use_pig = pigment.shape[0] == h and pigment.shape[1] == w
    for i in range(h):
        for q in range(ptr[i], ptr[i + 1]):
            for j in range(start[q], stop[q]):
                a = nuc[i, j]
                b = cell[i, j]
                if a == 0 and b == 0:
                    continue
                tf = target[i, j]
                t = np.float64(tf)
                pig = use_pig and pigment[i, j] != 0
                if a > 0:
                    ints[0, a] += 1
                    ints[1, a] += j
                    ints[2, a] += i
                    if pig:
                        ints[3, a] += 1
                    sums[0, a] += t
                    sums[1, a] += np.float64(counter[i, j])
                    if t > maxs[0, a]:
                        maxs[0, a] = t
                else:
                    ints[4, b] += 1
                    if pig:
                        ints[5, b] += 1
                    sums[2, b] += t
                    if t > maxs[1, b]:
                        maxs[1, b] = t


_SQRT2 = np.sqrt(2.0)


@njit(cache=True, nogil=True, fastmath=False)
def near_runs_kernel(row, c0, c1, n, h, w, reach):  # pragma: no cover - compiled
    """Per row, column intervals that hold every pixel within ``reach`` (Chebyshev) of the runs
    ``(row, c0, c1)[:n]``, rounded out to blocks of 8 columns.

    Returns ``(ptr, start, stop)``: row ``i``'s intervals are ``start[ptr[i]:ptr[i + 1]]`` to
    ``stop[...]`` (exclusive), sorted and disjoint. A block map (each run's row, widened by ``reach``) dilated
    over ``2 reach + 1`` rows: its cost follows the runs and a map 8 times smaller than the array.
    """
    bs = 8
    nb = (w + bs - 1) // bs
    blocks = np.zeros((h, nb), np.uint8)
    for t in range(n):
        b0 = max(c0[t] - reach, 0) // bs
        b1 = min(c1[t] - 1 + reach, w - 1) // bs
        blocks[row[t], b0 : b1 + 1] = 1
    near = np.empty_like(blocks)
    extreme_filter_kernel(blocks, reach, 0, True, near)
    ptr = np.zeros(h + 1, np.int64)
    start = np.empty(h * ((nb + 1) // 2), np.int64)
    stop = np.empty(h * ((nb + 1) // 2), np.int64)
    k = 0
    for i in range(h):
        r = near[i]
        j = 0
        while j < nb:
            if r[j]:
                j0 = j
                while j < nb and r[j]:
                    j += 1
                start[k] = j0 * bs
                stop[k] = min(j * bs, w)
                k += 1
            else:
                j += 1
        ptr[i + 1] = k
    return ptr, start[:k], stop[:k]


@njit(cache=True, nogil=True, fastmath=False)
def expand_labels_kernel(labels, max_dist, ptr, start, stop, dist, out):  # pragma: no cover - compiled
    """Grow labels into background by at most ``max_dist`` px: each pixel takes its chamfer-nearest label.

    Two raster passes (forward, backward) propagate (distance, label) pairs with weights 1 and sqrt 2; on a tie
    the label found first is kept. Labels never overwrite one another, so cells do not overlap (a Voronoi-like
    partition limited by ``max_dist``, as :func:`skimage.segmentation.expand_labels` but in linear time).
    ``dist`` (float32) is scratch; ``out`` (int32) receives the result.

    Per pixel the candidates are compared in a fixed order (itself, then the previous row: straight, left
    diagonal, right diagonal; then the previous pixel of the row). The previous-row part of a whole row is
    computed first (vectorised), then the within-row part in one sequential sweep: the same comparisons in the
    same order. A pixel farther than ``max_dist`` is cleared as soon as its distance is final: a neighbour that
    would read its label then gets a distance beyond ``max_dist`` too and is cleared as well.

    Only the intervals ``(ptr, start, stop)`` (:func:`near_runs_kernel`) are visited; every other pixel is 0.
    They must hold every pixel within ``floor(max_dist)`` (Chebyshev) of a label: any (distance, label) pair at
    most ``max_dist`` comes along a chain of such pixels from its label, and reading the others as infinitely
    far only raises values beyond ``max_dist``, which are cleared anyway, so the result is that of the passes
    over the whole array (intervals ``[0, w)`` on every row; the tests check both). Nuclei are about a tenth of
    a tile's pixels with their reach: the passes then cost a tenth.
    """
    h, w = labels.shape
    big = np.float32(1e30)
    d1 = np.float32(1.0)
    d2 = np.float32(_SQRT2)
    tv = np.empty(w, np.float32)
    tl = np.empty(w, np.int32)
    mask = np.empty(w, np.int32)
    keep_all = np.float32(np.inf)  # the forward pass clears nothing: its distances are not final
    dist[:] = big  # read as "no label near" where no interval reaches
    out[:] = 0
    for i in range(h):
        lrow = labels[i]
        drow = dist[i]
        orow = out[i]
        for q in range(ptr[i], ptr[i + 1]):
            a = start[q]
            b = stop[q]
            for j in range(a, b):
                lab = lrow[j]
                tl[j] = lab
                tv[j] = 0.0 if lab > 0 else big
            if i > 0:
                _from_row(dist[i - 1], out[i - 1], tv, tl, d1, d2, mask, a, b, w, False)
            _sweep(tv, tl, drow, orow, a, b, 1, d1, keep_all)
    for i in range(h - 1, -1, -1):
        drow = dist[i]
        orow = out[i]
        for q in range(ptr[i], ptr[i + 1]):
            a = start[q]
            b = stop[q]
            for j in range(a, b):
                tv[j] = drow[j]
                tl[j] = orow[j]
            if i + 1 < h:
                _from_row(dist[i + 1], out[i + 1], tv, tl, d1, d2, mask, a, b, w, True)
            _sweep(tv, tl, drow, orow, b - 1, a - 1, -1, d1, max_dist)


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _sweep(tv, tl, drow, orow, first, stop, step, d1, max_dist):  # pragma: no cover - compiled
    """The within-row part of a pass, from ``first`` towards ``stop`` (exclusive) by ``step`` (1 or -1): each
    pixel against the one before it in the sweep, after its candidates from the neighbouring row (``tv``, ``tl``).
    Distances go to ``drow``, labels to ``orow``, 0 beyond ``max_dist``."""
    v = tv[first]
    lab = tl[first]
    drow[first] = v
    orow[first] = lab if v <= max_dist else 0
    for j in range(first + step, stop, step):
        v2 = tv[j]
        lab2 = tl[j]
        c = v + d1
        if c < v2:
            v2 = c
            lab2 = lab
        v = v2
        lab = lab2
        drow[j] = v
        orow[j] = lab if v <= max_dist else 0


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _take_smaller(tv, tl, dn, ln, step, a, b, m, mask):  # pragma: no cover - compiled
    """For ``j < m``: ``(tv, tl)[a + j] = (dn[b + j] + step, ln[b + j])`` where that sum is strictly smaller (on
    a tie the earlier candidate stays). Two loops, the label chosen with an integer bit mask: this form
    vectorises (a float compare selecting an integer does not). ``min`` equals the strict select here: the
    values are non-negative and never NaN."""
    t = tv[a : a + m]
    u = tl[a : a + m]
    d = dn[b : b + m]
    e = ln[b : b + m]
    k = mask[:m]
    for j in range(m):
        v = t[j]
        c = d[j] + step
        k[j] = np.int32(-1) if c < v else np.int32(0)
        t[j] = min(c, v)
    for j in range(m):
        km = k[j]
        u[j] = (e[j] & km) | (u[j] & ~km)


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _from_row(dn, ln, tv, tl, d1, d2, mask, a, b, w, backward):  # pragma: no cover - compiled
    """Candidates for pixels ``a..b-1`` from the neighbouring row: straight, then the two diagonals (forward:
    left then right; backward: right then left), first minimum kept. One sweep per candidate over the
    interval: each pixel still compares them in this order."""
    _take_smaller(tv, tl, dn, ln, d1, a, a, b - a, mask)
    lo = max(a, 1)  # pixels that have a left neighbour, which they read at j - 1
    hi = min(b, w - 1)  # pixels that have a right neighbour, read at j + 1
    if backward:
        _take_smaller(tv, tl, dn, ln, d2, a, a + 1, hi - a, mask)
        _take_smaller(tv, tl, dn, ln, d2, lo, lo - 1, b - lo, mask)
    else:
        _take_smaller(tv, tl, dn, ln, d2, lo, lo - 1, b - lo, mask)
        _take_smaller(tv, tl, dn, ln, d2, a, a + 1, hi - a, mask)


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _shift_max(src, dst, span, m):  # pragma: no cover - compiled
    """``dst[j] = max(src[j], src[j + span])`` for ``j < m``; slices (not ``src[j + span]``) so that it
    vectorises, and ``src`` is not ``dst`` (an overlap would make LLVM fall back to scalar code)."""
    lo = src[:m]
    hi = src[span : span + m]
    out = dst[:m]
    for j in range(m):
        x = lo[j]
        y = hi[j]
        out[j] = x if x >= y else y


@njit(cache=True, nogil=True, fastmath=False)
def extreme_filter_kernel(src, radius, axis, is_max, out):  # pragma: no cover - compiled
    """Running maximum (or minimum) over a window of ``2 radius + 1`` pixels along one axis, clamped at the border.

    Doubling: after level ``l`` a buffer holds the maximum of ``2**l`` consecutive values, and the window is the
    maximum of two overlapping power-of-two spans; each level is one vectorised pass, so the cost grows with
    log(radius). Along axis 1 a row is padded (clamped) in a buffer; along axis 0 bands of rows are processed in
    column strips that stay in cache. Clamping equals scipy's ``mode="nearest"`` for a maximum or minimum. A
    minimum is the negated maximum of the negated values (exact in floating point). A square filter is this
    kernel along axis 1, then along axis 0. Along axis 1 ``out`` may be ``src`` (each row is copied first); along
    axis 0 it must not be (a band reads rows the previous band wrote).
    """
    h, w = src.shape
    k = 2 * radius + 1
    sign = src.dtype.type(1) if is_max else src.dtype.type(-1)
    nlev = 0
    span = 1
    while 2 * span <= k:
        span *= 2
        nlev += 1
    if axis == 1:
        n = w + 2 * radius
        a = np.empty(n, src.dtype)
        b = np.empty(n, src.dtype)
        for i in range(h):
            row = src[i]
            for j in range(w):
                a[j + radius] = sign * row[j]
            for j in range(radius):
                a[j] = a[radius]
                a[w + radius + j] = a[w + radius - 1]
            sp = 1
            for lev in range(nlev):
                if lev % 2 == 0:
                    _shift_max(a, b, sp, n - sp)
                else:
                    _shift_max(b, a, sp, n - sp)
                sp *= 2
            fin = b if nlev % 2 == 1 else a
            lo = fin[:w]
            hi = fin[k - span : k - span + w]
            dst = out[i]
            for j in range(w):
                x = lo[j]
                y = hi[j]
                dst[j] = sign * (x if x >= y else y)
        return
    band = 64
    strip = 512
    rows = band + 2 * radius
    a2 = np.empty((rows, strip), src.dtype)
    b2 = np.empty((rows, strip), src.dtype)
    for b0 in range(0, h, band):
        nb = min(band, h - b0)
        nr = nb + 2 * radius
        for s0 in range(0, w, strip):
            m = min(strip, w - s0)
            for p in range(nr):
                srow = src[min(max(b0 - radius + p, 0), h - 1), s0 : s0 + m]
                arow = a2[p]
                for j in range(m):
                    arow[j] = sign * srow[j]
            sp = 1
            for lev in range(nlev):
                for p in range(nr - sp):
                    if lev % 2 == 0:
                        lo2 = a2[p, :m]
                        hi2 = a2[p + sp, :m]
                        dd = b2[p, :m]
                    else:
                        lo2 = b2[p, :m]
                        hi2 = b2[p + sp, :m]
                        dd = a2[p, :m]
                    for j in range(m):
                        x = lo2[j]
                        y = hi2[j]
                        dd[j] = x if x >= y else y
                sp *= 2
            fin2 = b2 if nlev % 2 == 1 else a2
            for i in range(nb):
                lo2 = fin2[i, :m]
                hi2 = fin2[i + k - span, :m]
                dst = out[b0 + i, s0 : s0 + m]
                for j in range(m):
                    x = lo2[j]
                    y = hi2[j]
                    dst[j] = sign * (x if x >= y else y)


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _scale(acc, mid, w0):  # pragma: no cover - compiled
    for j in range(acc.shape[0]):
        acc[j] = mid[j] * w0


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _add_pair(acc, lo, hi, wk):  # pragma: no cover - compiled
    # (x[-k] + x[+k]) * w[k], in scipy's order: the symmetric Gaussian's two taps at once
    for j in range(acc.shape[0]):
        acc[j] += (lo[j] + hi[j]) * wk


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _store(acc, dst):  # pragma: no cover - compiled
    for j in range(acc.shape[0]):
        dst[j] = acc[j]


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _correlate_row(dst, base, offs, weights, acc):  # pragma: no cover - compiled
    """``dst[j] = x[r][j] * w[0] + sum over k = r..1 of (x[r - k][j] + x[r + k][j]) * w[k]`` in float64 (scipy's
    order), where ``x[m]`` is ``base[offs[m]:]``: ring rows for axis 0, shifted slices of a padded row for axis 1.

    Radii 4 and 8 (a 1 or 2 px sigma: the protocols' smoothing at 0.5 µm/px) keep every tap of a pixel in a
    register (2x faster than adding each tap pair into the ``acc`` row, which other radii do).
    """
    r = weights.shape[0] - 1
    n = dst.shape[0]
    if r == 4:
        c = base[offs[4] : offs[4] + n]
        a4, b4 = base[offs[0] : offs[0] + n], base[offs[8] : offs[8] + n]
        a3, b3 = base[offs[1] : offs[1] + n], base[offs[7] : offs[7] + n]
        a2, b2 = base[offs[2] : offs[2] + n], base[offs[6] : offs[6] + n]
        a1, b1 = base[offs[3] : offs[3] + n], base[offs[5] : offs[5] + n]
        w0, w1, w2, w3, w4 = weights[0], weights[1], weights[2], weights[3], weights[4]
        for j in range(n):
            s = c[j] * w0
            s += (a4[j] + b4[j]) * w4
            s += (a3[j] + b3[j]) * w3
            s += (a2[j] + b2[j]) * w2
            s += (a1[j] + b1[j]) * w1
            dst[j] = s
    elif r == 8:
        c = base[offs[8] : offs[8] + n]
        a8, b8 = base[offs[0] : offs[0] + n], base[offs[16] : offs[16] + n]
        a7, b7 = base[offs[1] : offs[1] + n], base[offs[15] : offs[15] + n]
        a6, b6 = base[offs[2] : offs[2] + n], base[offs[14] : offs[14] + n]
        a5, b5 = base[offs[3] : offs[3] + n], base[offs[13] : offs[13] + n]
        a4, b4 = base[offs[4] : offs[4] + n], base[offs[12] : offs[12] + n]
        a3, b3 = base[offs[5] : offs[5] + n], base[offs[11] : offs[11] + n]
        a2, b2 = base[offs[6] : offs[6] + n], base[offs[10] : offs[10] + n]
        a1, b1 = base[offs[7] : offs[7] + n], base[offs[9] : offs[9] + n]
        w0, w1, w2, w3, w4 = weights[0], weights[1], weights[2], weights[3], weights[4]
        w5, w6, w7, w8 = weights[5], weights[6], weights[7], weights[8]
        for j in range(n):
            s = c[j] * w0
            s += (a8[j] + b8[j]) * w8
            s += (a7[j] + b7[j]) * w7
            s += (a6[j] + b6[j]) * w6
            s += (a5[j] + b5[j]) * w5
            s += (a4[j] + b4[j]) * w4
            s += (a3[j] + b3[j]) * w3
            s += (a2[j] + b2[j]) * w2
            s += (a1[j] + b1[j]) * w1
            dst[j] = s
    else:
        _scale(acc, base[offs[r] : offs[r] + n], weights[0])
        for k in range(r, 0, -1):
            _add_pair(
                acc, base[offs[r - k] : offs[r - k] + n], base[offs[r + k] : offs[r + k] + n], weights[k]
            )
        _store(acc, dst)


@njit(cache=True, nogil=True, fastmath=False)
def gaussian_kernel(src, plus, plus_weight, weights, out):  # pragma: no cover - compiled
    """Separable Gaussian, border clamped, bit-identical to scipy's ``gaussian_filter(..., mode="nearest",
    output=np.float32)``: along axis 0, rounded to float32, then along axis 1, row by row in one sweep.

    The image smoothed is ``src`` or, when ``plus`` has its shape, ``float32(plus * plus_weight) + src`` (the
    detection image of :func:`cleihc.cells.detect_cells_od`, made as its rows are read rather than as a plane
    of its own). ``weights[k]`` is the weight at offset ``±k``. Like scipy, each output of a pass is accumulated
    in float64 as ``x[0] * w[0] + sum over k = r..1 of (x[-k] + x[+k]) * w[k]`` (:func:`_correlate_row`) and
    rounded once to float32. Along axis 0, whole rows are computed at a time so that the loop vectorises, from a
    ring of the last ``2 r + 1`` input rows converted to float64 once each; the row is then correlated along
    axis 1 at once, so the intermediate plane never goes through memory. ``out`` may be ``src`` (or ``plus``):
    input row ``i + r`` is in the ring before output row ``i`` is written.
    """
    h, w = src.shape
    r = weights.shape[0] - 1
    nb = 2 * r + 1
    has_plus = plus.shape[0] == h and plus.shape[1] == w
    ring = np.empty((nb, w), np.float64)  # (clamped) input row p lives in slot p mod nb
    flat = ring.reshape(nb * w)
    offs = np.empty(nb, np.int64)
    acc = np.empty(w, np.float64)
    mid = np.empty(w, np.float32)  # one row of the axis-0 pass, rounded as scipy's float32 intermediate
    buf = np.empty(w + 2 * r, np.float64)
    # Tap m of output j along axis 1 is buf[j + m]: slices, not buf[j - k], which numba cannot prove
    # non-negative (that stops vectorisation).
    offs1 = np.arange(nb)
    for p in range(-r, r):
        _load_row(src, plus, plus_weight, has_plus, min(max(p, 0), h - 1), ring[(p + nb) % nb])
    for i in range(h):
        p = i + r
        _load_row(src, plus, plus_weight, has_plus, min(p, h - 1), ring[p % nb])
        for m in range(nb):  # tap m is input row i + m - r
            offs[m] = ((i + m - r + nb) % nb) * w
        _correlate_row(mid, flat, offs, weights, acc)
        for j in range(w):
            buf[j + r] = mid[j]
        for j in range(r):
            buf[j] = buf[r]
            buf[w + r + j] = buf[w + r - 1]
        _correlate_row(out[i], buf, offs1, weights, acc)


@njit(cache=True, nogil=True, fastmath=False, inline="always")
def _load_row(src, plus, plus_weight, has_plus, q, d):  # pragma: no cover - compiled
    s = src[q]
    if has_plus:
        t = plus[q]
        for j in range(s.shape[0]):
            d[j] = np.float32(t[j] * plus_weight) + s[j]
    else:
        for j in range(s.shape[0]):
            d[j] = s[j]


# ------------------------------------------------------------------------------------------------ run lengths
# Binary masks are handled as runs: (row, start, stop) with stop exclusive, sorted by row then start, maximal
# (two runs of a row are at least one pixel apart). Labelling, hole filling and the threshold cascade then cost in
# proportion to the foreground, not to the array, and give exactly what scipy.ndimage.label /
# binary_fill_holes give on the painted mask (components numbered in raster order of their first pixel).


@njit(cache=True, nogil=True, fastmath=False)
def _find(parent, x):  # pragma: no cover - compiled
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:
        nxt = parent[x]
        parent[x] = root
        x = nxt
    return root


@njit(cache=True, nogil=True, fastmath=False)
def label_runs_kernel(row, c0, c1, n, conn8, out):  # pragma: no cover - compiled
    """Connected components of runs: ``out[r]`` = component 1..k of run ``r``, numbered in raster order of the
    components' first pixels (as :func:`scipy.ndimage.label`); returns k. 8- or 4-connectivity."""
    parent = np.arange(n)
    gap = 1 if conn8 else 0
    prev_start = 0
    prev_end = 0
    s = 0
    while s < n:
        r = row[s]
        e = s
        while e < n and row[e] == r:
            e += 1
        if prev_end > prev_start and row[prev_start] == r - 1:
            p = prev_start
            q = s
            while p < prev_end and q < e:
                if c0[p] < c1[q] + gap and c0[q] < c1[p] + gap:
                    ra = _find(parent, p)
                    rb = _find(parent, q)
                    # the smaller index is the root: the root is the component's first run
                    if ra < rb:
                        parent[rb] = ra
                    elif rb < ra:
                        parent[ra] = rb
                if c1[p] < c1[q]:
                    p += 1
                else:
                    q += 1
        prev_start = s
        prev_end = e
        s = e
    k = 0
    for x in range(n):
        rt = _find(parent, x)
        if rt == x:
            k += 1
            out[x] = k
        else:
            out[x] = out[rt]
    return k


@njit(cache=True, nogil=True, fastmath=False)
def runs_of_u8_kernel(mask):  # pragma: no cover - compiled
    """Runs of the nonzero pixels of a uint8 image: (row, start, stop) arrays (int32) and their number."""
    h, w = mask.shape
    cap = h * ((w + 1) // 2)  # upper bound; pages never written are never committed
    row = np.empty(cap, np.int32)
    c0 = np.empty(cap, np.int32)
    c1 = np.empty(cap, np.int32)
    n = 0
    for i in range(h):
        m = mask[i]
        j = 0
        while j < w:
            if m[j] == 0:
                j += 1
                continue
            s = j
            while j < w and m[j] != 0:
                j += 1
            row[n] = i
            c0[n] = s
            c1[n] = j
            n += 1
    return row, c0, c1, n


@njit(cache=True, nogil=True, fastmath=False)
def hole_runs_kernel(row, c0, c1, n, h, w):  # pragma: no cover - compiled
    """Runs of the holes of a mask given as runs: background components (4-connected) not touching the border,
    as :func:`scipy.ndimage.binary_fill_holes`. A hole run is always a gap between two runs of one row."""
    # Background runs: per row, the gaps between runs and the stretches before the first and after the last.
    cap = n + h + 1
    brow = np.empty(cap, np.int32)
    b0 = np.empty(cap, np.int32)
    b1 = np.empty(cap, np.int32)
    nb = 0
    r = 0
    s = 0
    for i in range(h):
        start = 0
        while s < n and row[s] == i:
            if c0[s] > start:
                brow[nb] = i
                b0[nb] = start
                b1[nb] = c0[s]
                nb += 1
            start = c1[s]
            s += 1
        if start < w:
            brow[nb] = i
            b0[nb] = start
            b1[nb] = w
            nb += 1
    lab = np.empty(nb, np.int32)
    k = label_runs_kernel(brow, b0, b1, nb, False, lab)
    outside = np.zeros(k + 1, np.bool_)
    for x in range(nb):
        if brow[x] == 0 or brow[x] == h - 1 or b0[x] == 0 or b1[x] == w:
            outside[lab[x]] = True
    nh = 0
    for x in range(nb):
        if not outside[lab[x]]:
            brow[nh] = brow[x]
            b0[nh] = b0[x]
            b1[nh] = b1[x]
            nh += 1
    r = nh
    return brow[:r].copy(), b0[:r].copy(), b1[:r].copy(), r


@njit(cache=True, nogil=True, fastmath=False)
def merge_runs_kernel(arow, a0, a1, na, brow, b0, b1, nb):  # pragma: no cover - compiled
    """Union of two disjoint run lists, touching runs joined into one (the runs of the union mask)."""
    cap = na + nb + 1
    row = np.empty(cap, np.int32)
    c0 = np.empty(cap, np.int32)
    c1 = np.empty(cap, np.int32)
    n = 0
    p = 0
    q = 0
    while p < na or q < nb:
        if q >= nb or (p < na and (arow[p] < brow[q] or (arow[p] == brow[q] and a0[p] < b0[q]))):
            i, s, e = arow[p], a0[p], a1[p]
            p += 1
        else:
            i, s, e = brow[q], b0[q], b1[q]
            q += 1
        if n > 0 and row[n - 1] == i and c1[n - 1] == s:
            c1[n - 1] = e
        else:
            row[n] = i
            c0[n] = s
            c1[n] = e
            n += 1
    return row, c0, c1, n


@njit(cache=True, nogil=True, fastmath=False)
def component_stats_kernel(row, c0, c1, n, lab, k, out):  # pragma: no cover - compiled
    """Per component 1..k: ``out[c] = (area, height, width)`` (int64, shape (k + 1, 3)) of its runs."""
    lo_i = np.full(k + 1, 2**31, np.int64)
    hi_i = np.full(k + 1, -1, np.int64)
    lo_j = np.full(k + 1, 2**31, np.int64)
    hi_j = np.full(k + 1, -1, np.int64)
    for x in range(n):
        c = lab[x]
        out[c, 0] += c1[x] - c0[x]
        if row[x] < lo_i[c]:
            lo_i[c] = row[x]
        if row[x] > hi_i[c]:
            hi_i[c] = row[x]
        if c0[x] < lo_j[c]:
            lo_j[c] = c0[x]
        if c1[x] - 1 > hi_j[c]:
            hi_j[c] = c1[x] - 1
    for c in range(1, k + 1):
        out[c, 1] = hi_i[c] - lo_i[c] + 1
        out[c, 2] = hi_j[c] - lo_j[c] + 1


@njit(cache=True, nogil=True, fastmath=False)
def paint_runs_kernel(row, c0, c1, n, value, out):  # pragma: no cover - compiled
    """``out[row, c0:c1] = value`` for every run."""
    for x in range(n):
        o = out[row[x]]
        for j in range(c0[x], c1[x]):
            o[j] = value


@njit(cache=True, nogil=True, fastmath=False)
def cascade_kernel(
    det, ring_holes, use_ring, thresholds, max_len_px, max_area_px, edge_fraction, result
):  # pragma: no cover - compiled
    """Threshold cascade of :func:`cleihc.cells._nucleus_mask` on runs; accepted, trimmed pixels set in ``result``.

    Level 0 thresholds the whole array (plus ``ring_holes`` when ``use_ring``); each later level thresholds only
    the runs of the components rejected at the level before (thresholds are nested, so a component at level k lies
    inside one component of level k - 1, and the components inside an accepted one vanish with it). A component is
    accepted when its box is at most ``max_len_px`` in both directions and its area at most ``max_area_px``; its
    pixels at or above ``edge_fraction`` times its peak (float32, as the array code did) are kept.
    """
    h, w = det.shape
    cap = h * ((w + 1) // 2)  # upper bound; pages never written are never committed
    row = np.empty(cap, np.int32)
    c0 = np.empty(cap, np.int32)
    c1 = np.empty(cap, np.int32)
    n = 0
    t = thresholds[0]
    on = np.empty(w + 1, np.uint8)
    on[w] = 0  # sentinel: every run ends
    for i in range(h):
        d = det[i]
        # the row's mask first (vectorised), then its runs
        if use_ring:
            rh = ring_holes[i]
            for j in range(w):
                on[j] = (d[j] >= t) | (rh[j] != 0)
        else:
            for j in range(w):
                on[j] = d[j] >= t
        j = 0
        while j < w:
            if on[j] == 0:
                j += 1
                continue
            s = j
            while on[j] != 0:
                j += 1
            row[n] = i
            c0[n] = s
            c1[n] = j
            n += 1
    frac = np.float32(edge_fraction)
    levels = thresholds.shape[0]
    for level in range(levels):
        if n == 0:
            break
        lab = np.empty(n, np.int32)
        k = label_runs_kernel(row, c0, c1, n, True, lab)
        stats = np.zeros((k + 1, 3), np.int64)
        component_stats_kernel(row, c0, c1, n, lab, k, stats)
        keep = np.zeros(k + 1, np.bool_)
        any_rejected = False
        for c in range(1, k + 1):
            keep[c] = stats[c, 1] <= max_len_px and stats[c, 2] <= max_len_px and stats[c, 0] <= max_area_px
            if not keep[c]:
                any_rejected = True
        ring_level = use_ring and level == 0
        if edge_fraction > 0:
            peak = np.full(k + 1, -np.inf, np.float32)
            for x in range(n):
                c = lab[x]
                if keep[c]:
                    d = det[row[x]]
                    for j in range(c0[x], c1[x]):
                        if d[j] > peak[c]:
                            peak[c] = d[j]
            for x in range(n):
                c = lab[x]
                if keep[c]:
                    i = row[x]
                    d = det[i]
                    rh = ring_holes[i]
                    o = result[i]
                    cut = frac * peak[c]
                    for j in range(c0[x], c1[x]):
                        if d[j] >= cut or (ring_level and rh[j] != 0):
                            o[j] = 1
        else:
            for x in range(n):
                if keep[lab[x]]:
                    o = result[row[x]]
                    for j in range(c0[x], c1[x]):
                        o[j] = 1
        if not any_rejected or level + 1 >= levels:
            break
        # Next level: the pixels of rejected components at or above the next threshold.
        t = thresholds[level + 1]
        cap = 0
        for x in range(n):
            if not keep[lab[x]]:
                cap += (c1[x] - c0[x] + 1) // 2
        nrow = np.empty(cap, np.int32)
        n0 = np.empty(cap, np.int32)
        n1 = np.empty(cap, np.int32)
        m = 0
        for x in range(n):
            if keep[lab[x]]:
                continue
            i = row[x]
            d = det[i]
            j = c0[x]
            e = c1[x]
            while j < e:
                if not d[j] >= t:
                    j += 1
                    continue
                s = j
                while j < e and d[j] >= t:
                    j += 1
                nrow[m] = i
                n0[m] = s
                n1[m] = j
                m += 1
        row, c0, c1, n = nrow, n0, n1, m


@njit(cache=True, nogil=True, fastmath=False)
def _heap_push(keys, size, key):  # pragma: no cover - compiled
    i = size
    keys[i] = key
    while i > 0:
        p = (i - 1) >> 1
        if keys[p] <= key:
            break
        keys[i] = keys[p]
        i = p
    keys[i] = key
    return size + 1


@njit(cache=True, nogil=True, fastmath=False)
def _heap_pop(keys, size):  # pragma: no cover - compiled
    top = keys[0]
    size -= 1
    last = keys[size]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= size:
            break
        if c + 1 < size and keys[c + 1] < keys[c]:
            c += 1
        if keys[c] >= last:
            break
        keys[i] = keys[c]
        i = c
    if size > 0:
        keys[i] = last
    return top, size


@njit(cache=True, nogil=True, fastmath=False)
def _watershed_crop(dbits, markers, mask, out, keys, pos_of_age, lab_of_age, queued):  # pragma: no cover
    """:func:`watershed_kernel` on ``-dist`` (given as the float32 bits of ``dist > 0``) in one clump's box.

    The priority (value, time of queueing) is packed in one int64 key; ``dist`` descending is its bits
    descending. Within one clump this pops pixels in the same order as the whole-array flood.
    """
    h, w = mask.shape
    size = 0
    age = 0
    top_bits = np.int64(0x7F800000)
    for i in range(h):
        for j in range(w):
            out[i, j] = markers[i, j] if mask[i, j] else 0
    for i in range(h):
        for j in range(w):
            lab = out[i, j]
            if lab == 0:
                continue
            for di in range(-1, 2):
                for dj in range(-1, 2):
                    ni = i + di
                    nj = j + dj
                    if (
                        0 <= ni < h
                        and 0 <= nj < w
                        and mask[ni, nj]
                        and out[ni, nj] == 0
                        and not queued[ni, nj]
                    ):
                        queued[ni, nj] = True
                        pos_of_age[age] = ni * w + nj
                        lab_of_age[age] = lab
                        size = _heap_push(keys, size, ((top_bits - dbits[ni, nj]) << 32) | age)
                        age += 1
    while size > 0:
        key, size = _heap_pop(keys, size)
        a = key & 0xFFFFFFFF
        idx = pos_of_age[a]
        lab = lab_of_age[a]
        i = idx // w
        j = idx - i * w
        out[i, j] = lab
        for di in range(-1, 2):
            for dj in range(-1, 2):
                ni = i + di
                nj = j + dj
                if 0 <= ni < h and 0 <= nj < w and mask[ni, nj] and out[ni, nj] == 0 and not queued[ni, nj]:
                    queued[ni, nj] = True
                    pos_of_age[age] = ni * w + nj
                    lab_of_age[age] = lab
                    size = _heap_push(keys, size, ((top_bits - dbits[ni, nj]) << 32) | age)
                    age += 1


@njit(cache=True, nogil=True, fastmath=False)
def split_kernel(row, c0, c1, n, split, md, min_area_px, out):  # pragma: no cover - compiled
    """Nucleus labels from clump runs: :func:`cleihc.cells._split` and the small-piece relabelling, on runs.

    Clumps (8-connected, raster order) are split by a marker watershed on their chamfer distance transform when
    they hold two or more markers (maxima of the distance within a ``2 md + 1`` square, grown by ``md // 2``
    within the clump and labelled 8-connected, raster order); pieces below ``min_area_px`` are dropped. Labels
    1..k follow the order of the array code: whole clumps by clump number, then pieces by marker number.
    ``out`` (int32, zeros) receives the labels; returns k. Everything is computed on the clumps' pixels and
    their boxes only.
    """
    h, w = out.shape
    lab = np.empty(n, np.int32)
    k = label_runs_kernel(row, c0, c1, n, True, lab)
    area = np.zeros(k + 1, np.int64)
    for x in range(n):
        area[lab[x]] += c1[x] - c0[x]
    if k == 0 or not split:
        lut = np.zeros(k + 1, np.int32)
        m = 0
        for c in range(1, k + 1):
            if area[c] >= min_area_px:
                m += 1
                lut[c] = m
        for x in range(n):
            o = out[row[x]]
            v = lut[lab[x]]
            for j in range(c0[x], c1[x]):
                o[j] = v
        return m
    # Chamfer distance (weights 1, sqrt 2), two raster passes over the clump pixels only: background is 0.
    dist = np.zeros((h, w), np.float32)
    big = np.float32(1e30)
    d1 = np.float32(1.0)
    d2 = np.float32(_SQRT2)
    for x in range(n):
        i = row[x]
        for j in range(c0[x], c1[x]):
            v = big
            if i > 0:
                if dist[i - 1, j] + d1 < v:
                    v = dist[i - 1, j] + d1
                if j > 0 and dist[i - 1, j - 1] + d2 < v:
                    v = dist[i - 1, j - 1] + d2
                if j + 1 < w and dist[i - 1, j + 1] + d2 < v:
                    v = dist[i - 1, j + 1] + d2
            if j > 0 and dist[i, j - 1] + d1 < v:
                v = dist[i, j - 1] + d1
            dist[i, j] = v
    for x in range(n - 1, -1, -1):
        i = row[x]
        for j in range(c1[x] - 1, c0[x] - 1, -1):
            v = dist[i, j]
            if i + 1 < h:
                if dist[i + 1, j] + d1 < v:
                    v = dist[i + 1, j] + d1
                if j + 1 < w and dist[i + 1, j + 1] + d2 < v:
                    v = dist[i + 1, j + 1] + d2
                if j > 0 and dist[i + 1, j - 1] + d2 < v:
                    v = dist[i + 1, j - 1] + d2
            if j + 1 < w and dist[i, j + 1] + d1 < v:
                v = dist[i, j + 1] + d1
            dist[i, j] = v
    # Peaks: dist equal to the maximum of its (2 md + 1)² window (clipped at the border, as mode="nearest");
    # only 3x3 maxima can be, so the large window is looked at for those alone. Markers: peaks grown by md // 2.
    near = np.zeros((h, w), np.uint8)
    r2 = md // 2
    for x in range(n):
        i = row[x]
        for j in range(c0[x], c1[x]):
            v = dist[i, j]
            # 4-neighbours first: most pixels have a larger one, and leave here
            if (
                (j + 1 < w and dist[i, j + 1] > v)
                or (j > 0 and dist[i, j - 1] > v)
                or (i + 1 < h and dist[i + 1, j] > v)
                or (i > 0 and dist[i - 1, j] > v)
            ):
                continue
            is_peak = True
            for ii in range(max(i - md, 0), min(i + md + 1, h)):
                for jj in range(max(j - md, 0), min(j + md + 1, w)):
                    if dist[ii, jj] > v:
                        is_peak = False
                        break
                if not is_peak:
                    break
            if not is_peak:
                continue
            for ii in range(max(i - r2, 0), min(i + r2 + 1, h)):
                for jj in range(max(j - r2, 0), min(j + r2 + 1, w)):
                    if dist[ii, jj] > 0:
                        near[ii, jj] = 1
    # Marker runs (inside clump runs, so in raster order), their clump, and their 8-connected labels.
    cap = 0
    for x in range(n):
        cap += (c1[x] - c0[x] + 1) // 2
    mrow = np.empty(cap, np.int32)
    m0 = np.empty(cap, np.int32)
    m1 = np.empty(cap, np.int32)
    mclump = np.empty(cap, np.int32)
    nm = 0
    for x in range(n):
        i = row[x]
        j = c0[x]
        e = c1[x]
        while j < e:
            if near[i, j] == 0:
                j += 1
                continue
            s = j
            while j < e and near[i, j] != 0:
                j += 1
            mrow[nm] = i
            m0[nm] = s
            m1[nm] = j
            mclump[nm] = lab[x]
            nm += 1
    mlab = np.empty(nm, np.int32)
    n_markers = label_runs_kernel(mrow, m0, m1, nm, True, mlab)
    clump_of_marker = np.zeros(n_markers + 1, np.int32)
    for y in range(nm):
        clump_of_marker[mlab[y]] = mclump[y]
    count = np.zeros(k + 1, np.int32)
    for mk in range(1, n_markers + 1):
        count[clump_of_marker[mk]] += 1
    # Boxes of the clumps, and their runs and marker runs grouped by clump (stable: raster order kept).
    lo_i = np.full(k + 1, h, np.int64)
    hi_i = np.full(k + 1, -1, np.int64)
    lo_j = np.full(k + 1, w, np.int64)
    hi_j = np.full(k + 1, -1, np.int64)
    for x in range(n):
        c = lab[x]
        lo_i[c] = min(lo_i[c], row[x])
        hi_i[c] = max(hi_i[c], row[x])
        lo_j[c] = min(lo_j[c], c0[x])
        hi_j[c] = max(hi_j[c], c1[x] - 1)
    first = np.zeros(k + 2, np.int64)
    for x in range(n):
        first[lab[x] + 1] += 1
    for c in range(k + 1):  # through first[k + 1]: the last clump's runs end there
        first[c + 1] += first[c]
    order = np.empty(n, np.int64)
    fill = first.copy()
    for x in range(n):
        order[fill[lab[x]]] = x
        fill[lab[x]] += 1
    mfirst = np.zeros(k + 2, np.int64)
    for y in range(nm):
        mfirst[mclump[y] + 1] += 1
    for c in range(k + 1):
        mfirst[c + 1] += mfirst[c]
    morder = np.empty(nm, np.int64)
    mfill = mfirst.copy()
    for y in range(nm):
        morder[mfill[mclump[y]]] = y
        mfill[mclump[y]] += 1
    # Watershed of each clump with two or more markers, in its box; piece = marker number (stored as k + marker).
    dbits = dist.view(np.int32)
    piece_area = np.zeros(n_markers + 1, np.int64)
    # Scratch for the largest box, reused (views of the first bh * bw elements) for every clump.
    cap = 1
    for c in range(1, k + 1):
        if count[c] >= 2:
            cap = max(cap, (hi_i[c] - lo_i[c] + 1) * (hi_j[c] - lo_j[c] + 1))
    keys = np.empty(cap, np.int64)
    pos_of_age = np.empty(cap, np.int64)
    lab_of_age = np.empty(cap, np.int32)
    queued_buf = np.empty(cap, np.bool_)
    mask_buf = np.empty(cap, np.bool_)
    mark_buf = np.empty(cap, np.int32)
    out_buf = np.empty(cap, np.int32)
    for c in range(1, k + 1):
        if count[c] < 2:
            continue
        y0 = lo_i[c]
        x0 = lo_j[c]
        bh = hi_i[c] - y0 + 1
        bw = hi_j[c] - x0 + 1
        a = bh * bw
        queued_buf[:a] = False
        mask_buf[:a] = False
        mark_buf[:a] = 0
        cmask = mask_buf[:a].reshape((bh, bw))
        for t in range(first[c], first[c + 1]):
            x = order[t]
            for j in range(c0[x], c1[x]):
                cmask[row[x] - y0, j - x0] = True
        cmark = mark_buf[:a].reshape((bh, bw))
        for t in range(mfirst[c], mfirst[c + 1]):
            y = morder[t]
            for j in range(m0[y], m1[y]):
                cmark[mrow[y] - y0, j - x0] = mlab[y]
        cout = out_buf[:a].reshape((bh, bw))
        _watershed_crop(
            dbits[y0 : y0 + bh, x0 : x0 + bw],
            cmark,
            cmask,
            cout,
            keys,
            pos_of_age,
            lab_of_age,
            queued_buf[:a].reshape((bh, bw)),
        )
        for ii in range(bh):
            for jj in range(bw):
                if cmask[ii, jj]:
                    piece_area[cout[ii, jj]] += 1
                    out[y0 + ii, x0 + jj] = k + cout[ii, jj]
    # Final numbering: whole clumps in clump order, then pieces in marker order; small pieces dropped.
    lut = np.zeros(k + n_markers + 1, np.int32)
    m = 0
    for c in range(1, k + 1):
        if count[c] < 2 and area[c] >= min_area_px:
            m += 1
            lut[c] = m
    for mk in range(1, n_markers + 1):
        if count[clump_of_marker[mk]] >= 2 and piece_area[mk] >= min_area_px:
            m += 1
            lut[k + mk] = m
    for x in range(n):
        o = out[row[x]]
        if count[lab[x]] < 2:
            v = lut[lab[x]]
            for j in range(c0[x], c1[x]):
                o[j] = v
        else:
            for j in range(c0[x], c1[x]):
                o[j] = lut[o[j]]
    return m
