"""Numba kernels for per-cell measurement.

Private: call them through :func:`cleihc.cells.detect_cells`, which checks shapes and dtypes. One pass over the
image accumulates every per-label sum, count and maximum the cell table needs, so measuring costs the same
whatever the number of cells (no Python loop over cells, no temporary per statistic). Single core, ``nogil``,
no ``fastmath``: the pipeline parallelises per tile and results must be reproducible bit for bit. Pixels are
visited in row-major order, so a cell's sums are accumulated in the same order whatever tile it is read in.
"""

from __future__ import annotations

import heapq

import numpy as np
from numba import njit

__all__ = [
    "bbox_size_kernel",
    "chamfer_distance_kernel",
    "expand_labels_kernel",
    "extreme_filter_kernel",
    "label_max_kernel",
    "measure_kernel",
    "watershed_kernel",
]


@njit(cache=True, nogil=True, fastmath=False)
def measure_kernel(
    nuc, cell, target, counter, residual, pig_min_od, pig_max_od, pig_ratio, ints, sums, maxs
):  # pragma: no cover
    """Accumulate per-label statistics of nuclei (``nuc``) and of rings (``cell`` pixels outside any nucleus).

    ``ints`` (int64, shape (6, n + 1)): 0 nucleus area, 1 sum of x, 2 sum of y, 3 nucleus pigment pixels,
    4 ring area, 5 ring pigment pixels. ``sums`` (float64, shape (3, n + 1)): 0 target in nucleus,
    1 counterstain in nucleus, 2 target in ring. ``maxs`` (float64, shape (2, n + 1)): 0 target max in nucleus,
    1 target max in ring (initialised by the caller to -inf). A pixel is pigment when ``pig_min_od > 0`` and, in
    float32, ``pig_min_od <= counter + target <= pig_max_od`` and ``|residual| >= pig_ratio * (counter + target)``
    (the formula of :func:`cleihc.cells.detect_pigment`).
    """
    h, w = nuc.shape
    use_pig = pig_min_od > 0
    for i in range(h):
        for j in range(w):
            a = nuc[i, j]
            b = cell[i, j]
            if a == 0 and b == 0:
                continue
            tf = target[i, j]
            t = np.float64(tf)
            pig = False
            if use_pig:
                tot = counter[i, j] + tf
                pig = tot >= pig_min_od and tot <= pig_max_od and abs(residual[i, j]) >= pig_ratio * tot
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
def chamfer_distance_kernel(mask, out):  # pragma: no cover - compiled
    """Two-pass 8-neighbour chamfer distance (weights 1 and sqrt 2) from each True pixel to the nearest False one.

    Pixels outside the array count as True (foreground), as in :func:`scipy.ndimage.distance_transform_edt`, so
    the distance inside an object never depends on how the array is cropped around it. ``out`` is float32.
    """
    h, w = mask.shape
    big = np.float32(1e30)
    d1 = np.float32(1.0)
    d2 = np.float32(_SQRT2)
    for i in range(h):
        for j in range(w):
            if not mask[i, j]:
                out[i, j] = 0.0
                continue
            v = big
            if i > 0:
                if out[i - 1, j] + d1 < v:
                    v = out[i - 1, j] + d1
                if j > 0 and out[i - 1, j - 1] + d2 < v:
                    v = out[i - 1, j - 1] + d2
                if j + 1 < w and out[i - 1, j + 1] + d2 < v:
                    v = out[i - 1, j + 1] + d2
            if j > 0 and out[i, j - 1] + d1 < v:
                v = out[i, j - 1] + d1
            out[i, j] = v
    for i in range(h - 1, -1, -1):
        for j in range(w - 1, -1, -1):
            v = out[i, j]
            if v == 0.0:
                continue
            if i + 1 < h:
                if out[i + 1, j] + d1 < v:
                    v = out[i + 1, j] + d1
                if j + 1 < w and out[i + 1, j + 1] + d2 < v:
                    v = out[i + 1, j + 1] + d2
                if j > 0 and out[i + 1, j - 1] + d2 < v:
                    v = out[i + 1, j - 1] + d2
            if j + 1 < w and out[i, j + 1] + d1 < v:
                v = out[i, j + 1] + d1
            out[i, j] = v


@njit(cache=True, nogil=True, fastmath=False)
def expand_labels_kernel(labels, max_dist, dist, out):  # pragma: no cover - compiled
    """Grow labels into background by at most ``max_dist`` px: each pixel takes its chamfer-nearest label.

    Two raster passes (forward, backward) propagate (distance, label) pairs with weights 1 and sqrt 2; on a tie
    the label found first is kept. Labels never overwrite one another, so cells do not overlap (a Voronoi-like
    partition limited by ``max_dist``, as :func:`skimage.segmentation.expand_labels` but in linear time).
    ``dist`` (float32) is scratch; ``out`` (int32) receives the result.
    """
    h, w = labels.shape
    big = np.float32(1e30)
    d1 = np.float32(1.0)
    d2 = np.float32(_SQRT2)
    for i in range(h):
        for j in range(w):
            lab = labels[i, j]
            out[i, j] = lab
            dist[i, j] = 0.0 if lab > 0 else big
    for i in range(h):
        for j in range(w):
            v = dist[i, j]
            if v == 0.0:
                continue
            lab = out[i, j]
            if i > 0:
                if dist[i - 1, j] + d1 < v:
                    v = dist[i - 1, j] + d1
                    lab = out[i - 1, j]
                if j > 0 and dist[i - 1, j - 1] + d2 < v:
                    v = dist[i - 1, j - 1] + d2
                    lab = out[i - 1, j - 1]
                if j + 1 < w and dist[i - 1, j + 1] + d2 < v:
                    v = dist[i - 1, j + 1] + d2
                    lab = out[i - 1, j + 1]
            if j > 0 and dist[i, j - 1] + d1 < v:
                v = dist[i, j - 1] + d1
                lab = out[i, j - 1]
            dist[i, j] = v
            out[i, j] = lab
    for i in range(h - 1, -1, -1):
        for j in range(w - 1, -1, -1):
            v = dist[i, j]
            if v == 0.0:
                continue
            lab = out[i, j]
            if i + 1 < h:
                if dist[i + 1, j] + d1 < v:
                    v = dist[i + 1, j] + d1
                    lab = out[i + 1, j]
                if j + 1 < w and dist[i + 1, j + 1] + d2 < v:
                    v = dist[i + 1, j + 1] + d2
                    lab = out[i + 1, j + 1]
                if j > 0 and dist[i + 1, j - 1] + d2 < v:
                    v = dist[i + 1, j - 1] + d2
                    lab = out[i + 1, j - 1]
            if j + 1 < w and dist[i, j + 1] + d1 < v:
                v = dist[i, j + 1] + d1
                lab = out[i, j + 1]
            dist[i, j] = v
            out[i, j] = lab
    for i in range(h):
        for j in range(w):
            if dist[i, j] > max_dist:
                out[i, j] = 0


@njit(cache=True, nogil=True, fastmath=False)
def extreme_filter_kernel(src, radius, axis, is_max, out):  # pragma: no cover - compiled
    """Running maximum (or minimum) over a window of ``2 radius + 1`` pixels along one axis, clamped at the border.

    Van Herk / Gil-Werman: per-block prefix and suffix maxima, then one comparison per pixel, so the cost does
    not depend on the radius. Clamping the window equals scipy's ``mode="nearest"`` for a maximum or minimum.
    A minimum is the negated maximum of the negated values (exact in floating point). A square filter is this
    kernel along axis 1, then along axis 0. ``out`` must not be ``src``.
    """
    h, w = src.shape
    k = 2 * radius + 1
    sign = src.dtype.type(1) if is_max else src.dtype.type(-1)
    if axis == 1:
        x = np.empty(w, src.dtype)
        g = np.empty(w, src.dtype)
        s = np.empty(w, src.dtype)
        last_block = (w - 1) // k
        for i in range(h):
            for j in range(w):
                x[j] = sign * src[i, j]
            for b0 in range(0, w, k):
                b1 = min(b0 + k, w)
                g[b0] = x[b0]
                for j in range(b0 + 1, b1):
                    g[j] = g[j - 1] if g[j - 1] >= x[j] else x[j]
                s[b1 - 1] = x[b1 - 1]
                for j in range(b1 - 2, b0 - 1, -1):
                    s[j] = s[j + 1] if s[j + 1] >= x[j] else x[j]
            for j in range(w):
                lo = j - radius
                hi = j + radius
                if lo <= 0:
                    v = g[min(hi, w - 1)]
                elif hi >= w - 1:
                    a = s[lo]
                    b = g[w - 1]
                    v = a if lo // k == last_block or a >= b else b
                else:
                    a = s[lo]
                    b = g[hi]
                    v = a if a >= b else b
                out[i, j] = sign * v
    else:
        g = np.empty((h, w), src.dtype)
        s = np.empty((h, w), src.dtype)
        last_block = (h - 1) // k
        for i in range(h):
            if i % k == 0:
                for j in range(w):
                    g[i, j] = sign * src[i, j]
            else:
                for j in range(w):
                    v = sign * src[i, j]
                    g[i, j] = g[i - 1, j] if g[i - 1, j] >= v else v
        for i in range(h - 1, -1, -1):
            if i % k == k - 1 or i == h - 1:
                for j in range(w):
                    s[i, j] = sign * src[i, j]
            else:
                for j in range(w):
                    v = sign * src[i, j]
                    s[i, j] = s[i + 1, j] if s[i + 1, j] >= v else v
        for i in range(h):
            lo = i - radius
            hi = i + radius
            if lo <= 0:
                r = min(hi, h - 1)
                for j in range(w):
                    out[i, j] = sign * g[r, j]
            elif hi >= h - 1 and lo // k == last_block:
                for j in range(w):
                    out[i, j] = sign * s[lo, j]
            else:
                r = min(hi, h - 1)
                for j in range(w):
                    a = s[lo, j]
                    b = g[r, j]
                    out[i, j] = sign * (a if a >= b else b)


@njit(cache=True, nogil=True, fastmath=False)
def bbox_size_kernel(labels, n, out):  # pragma: no cover - compiled
    """``out[k] = (height, width)`` of label ``k``'s bounding box (int64, shape (n + 1, 2)); zero if absent."""
    h, w = labels.shape
    lo_i = np.full(n + 1, h, np.int64)
    hi_i = np.full(n + 1, -1, np.int64)
    lo_j = np.full(n + 1, w, np.int64)
    hi_j = np.full(n + 1, -1, np.int64)
    for i in range(h):
        for j in range(w):
            a = labels[i, j]
            if a > 0:
                if i < lo_i[a]:
                    lo_i[a] = i
                if i > hi_i[a]:
                    hi_i[a] = i
                if j < lo_j[a]:
                    lo_j[a] = j
                if j > hi_j[a]:
                    hi_j[a] = j
    for a in range(1, n + 1):
        if hi_i[a] >= 0:
            out[a, 0] = hi_i[a] - lo_i[a] + 1
            out[a, 1] = hi_j[a] - lo_j[a] + 1


@njit(cache=True, nogil=True, fastmath=False)
def label_max_kernel(labels, image, out):  # pragma: no cover - compiled
    """``out[k]`` = maximum of ``image`` over label ``k`` (``out`` initialised by the caller, e.g. to -inf)."""
    h, w = labels.shape
    for i in range(h):
        for j in range(w):
            a = labels[i, j]
            if a > 0 and image[i, j] > out[a]:
                out[a] = image[i, j]


@njit(cache=True, nogil=True, fastmath=False)
def watershed_kernel(image, markers, mask, out):  # pragma: no cover - compiled
    """Marker watershed (Meyer's priority flood) of ``image`` inside ``mask``, 8-connected.

    ``out`` starts as ``markers`` inside the mask. Each unlabelled mask pixel is queued once, by the first
    labelled neighbour to reach it, with that neighbour's label; pixels leave the queue in order of (image value,
    time of queueing) and pass their label on. Ties are broken by queueing order, so the result is deterministic
    and, within one connected component of the mask, independent of anything outside it.
    """
    h, w = image.shape
    heap = [(np.float32(0.0), np.int64(0), np.int64(0), np.int32(0))]
    heap.pop()
    age = np.int64(0)
    queued = np.zeros((h, w), np.bool_)
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
                        heapq.heappush(heap, (image[ni, nj], age, np.int64(ni * w + nj), lab))
                        age += 1
    while len(heap) > 0:
        _, _, idx, lab = heapq.heappop(heap)
        i = idx // w
        j = idx - i * w
        out[i, j] = lab
        for di in range(-1, 2):
            for dj in range(-1, 2):
                ni = i + di
                nj = j + dj
                if 0 <= ni < h and 0 <= nj < w and mask[ni, nj] and out[ni, nj] == 0 and not queued[ni, nj]:
                    queued[ni, nj] = True
                    heapq.heappush(heap, (image[ni, nj], age, np.int64(ni * w + nj), lab))
                    age += 1
