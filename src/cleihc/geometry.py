"""Exact conversions between boolean masks and polygons, and QuPath-style GeoJSON helpers.

Two conventions make every conversion exact and tile-independent:

* A mask pixel ``(i, j)`` at ``downsample`` ``ds`` and ``origin_px`` ``(ox, oy)`` covers the level-0 square
  ``[ox + j·ds, ox + (j+1)·ds) × [oy + i·ds, oy + (i+1)·ds)``. :func:`mask_to_polygons` traces these squares'
  outer edges, so the polygon area is exactly ``mask.sum() · ds²``.
* :func:`rasterize` puts a pixel inside a geometry iff its centre ``(ox + (j+0.5)·ds, oy + (i+0.5)·ds)`` is
  inside. The decision depends on the pixel's global centre only, so rasterising a window equals the same window
  of a whole-slide rasterisation (exactly, when origins and downsample are dyadic numbers such as integers).
  ``rasterize(mask_to_polygons(m, ...), ...)`` gives back ``m``.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import shapely
from numba import njit
from scipy import ndimage as ndi
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

__all__ = [
    "feature_collection",
    "label_sizes",
    "mask_to_polygons",
    "polygonal",
    "rasterize",
    "region_color",
    "to_feature",
]

log = logging.getLogger(__name__)

# Pixels per bincount call in label_sizes: bincount copies its input to 64-bit integers.
_LABEL_CHUNK_PX = 1 << 20


def label_sizes(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Pixels per label: ``np.bincount(labels.ravel(), minlength=n_labels + 1)``, counted a million pixels at a
    time.

    Parameters
    ----------
    labels : ndarray of int
        A label image (0 = background), as ``scipy.ndimage.label`` returns it.
    n_labels : int
        The largest label.

    Returns
    -------
    ndarray of int64, shape (n_labels + 1,)
        Entry ``k`` is the number of pixels labelled ``k``.

    Notes
    -----
    ``np.bincount`` first converts a whole int32 label image to 64 bits: 66 MB for an 8 M-pixel whole-slide grid.
    """
    flat = np.ravel(labels)
    sizes = np.zeros(int(n_labels) + 1, dtype=np.int64)
    for start in range(0, flat.size, _LABEL_CHUNK_PX):
        sizes += np.bincount(flat[start : start + _LABEL_CHUNK_PX], minlength=sizes.size)
    return sizes


# Edge directions while walking pixel outlines, clockwise on screen (y grows downwards): east, south, west, north.
_DX = np.array([1, 0, -1, 0], dtype=np.int64)
_DY = np.array([0, 1, 0, -1], dtype=np.int64)


def _trace_edges(mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """Directed outline edges of the pixel squares: start vertex (x, y), direction, and the pixel on their right.

    Walking an edge, the inside pixel is on the right on screen (y down), so outer rings run clockwise on
    screen and have a positive shoelace sum; holes run the other way.
    """
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    inner = padded[1:-1, 1:-1]
    xs, ys, ds, pi, pj = [], [], [], [], []
    # (neighbour offset, start-vertex offset (dx, dy) from pixel (j, i), direction)
    for (di, dj), (sx, sy), d in (
        ((-1, 0), (0, 0), 0),  # top edge, walked east
        ((0, 1), (1, 0), 1),  # right edge, walked south
        ((1, 0), (1, 1), 2),  # bottom edge, walked west
        ((0, -1), (0, 1), 3),  # left edge, walked north
    ):
        neighbour = padded[1 + di : h + 1 + di, 1 + dj : w + 1 + dj]
        ii, jj = np.nonzero(inner & ~neighbour)
        ii = ii.astype(np.int64)
        jj = jj.astype(np.int64)
        xs.append(jj + sx)
        ys.append(ii + sy)
        ds.append(np.full(ii.size, d, dtype=np.int64))
        pi.append(ii)
        pj.append(jj)
    return (*(np.concatenate(a) for a in (xs, ys, ds, pi, pj)), w + 1)


def _link(x: np.ndarray, y: np.ndarray, d: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Successor of every edge, and whether it starts at a saddle vertex (two diagonal pixels inside).

    At a saddle the walk turns right, keeping diagonal pixels apart (4-connectivity of the inside).
    """
    start = y * stride + x
    end = (y + _DY[d]) * stride + (x + _DX[d])
    order = np.argsort(start, kind="stable")
    sorted_start = start[order]
    first = np.searchsorted(sorted_start, end, side="left")
    count = np.searchsorted(sorted_start, end, side="right") - first
    nxt = order[first]
    saddle_in = count == 2
    if np.any(saddle_in):
        a = order[first[saddle_in]]
        b = order[first[saddle_in] + 1]
        want = (d[saddle_in] + 1) % 4
        nxt[saddle_in] = np.where(d[a] == want, a, b)
    n_out = np.searchsorted(sorted_start, start, side="right") - np.searchsorted(
        sorted_start, start, side="left"
    )
    return nxt, n_out == 2


@njit(cache=True, nogil=True)
def _walk_loops(nxt, skey, nkeys):  # pragma: no cover - compiled
    """Cycles of the successor permutation, split into simple loops wherever a cycle meets a saddle twice.

    Returns the edges in loop order and the end offset of every loop.
    """
    n = nxt.size
    visited = np.zeros(n, np.bool_)
    out = np.empty(n, np.int64)
    ends = np.empty(n + 1, np.int64)
    stack = np.empty(n, np.int64)
    seen = np.full(max(nkeys, 1), -1, np.int64)
    n_out = 0
    n_loops = 0
    for s in range(n):
        if visited[s]:
            continue
        sp = 0
        e = s
        while not visited[e]:
            visited[e] = True
            k = skey[e]
            if k >= 0 and seen[k] >= 0:
                pos = seen[k]
                for t in range(pos, sp):
                    f = stack[t]
                    out[n_out] = f
                    n_out += 1
                    if skey[f] >= 0:
                        seen[skey[f]] = -1
                ends[n_loops] = n_out
                n_loops += 1
                sp = pos
            if k >= 0:
                seen[k] = sp
            stack[sp] = e
            sp += 1
            e = nxt[e]
        for t in range(sp):
            f = stack[t]
            out[n_out] = f
            n_out += 1
            if skey[f] >= 0:
                seen[skey[f]] = -1
        ends[n_loops] = n_out
        n_loops += 1
    return out, ends[:n_loops]


def mask_to_polygons(
    mask: np.ndarray,
    *,
    downsample: float = 1.0,
    origin_px: tuple[float, float] = (0.0, 0.0),
    simplify_px: float = 0.0,
) -> MultiPolygon:
    """Exact polygon outlines of a boolean mask, in level-0 pixels.

    Parameters
    ----------
    mask : (H, W) array of bool
        The mask; pixel ``(i, j)`` covers ``[ox + j·ds, ox + (j+1)·ds) × [oy + i·ds, oy + (i+1)·ds)``.
    downsample : float
        Level-0 pixels per mask pixel (``ds``).
    origin_px : (x, y)
        Level-0 position of the mask's top-left corner.
    simplify_px : float
        If > 0, simplify outlines with this tolerance in level-0 pixels (topology preserved); the area is then
        no longer exact.

    Returns
    -------
    shapely.MultiPolygon
        Valid; holes preserved; one polygon per 4-connected component (pixels touching only at a corner belong
        to different polygons, which may touch at that point). Empty when the mask is empty. With
        ``simplify_px == 0`` its area equals ``mask.sum() · downsample²`` (exactly for dyadic ``downsample``).

    Notes
    -----
    Pixel-edge contour following: every edge between an inside and an outside pixel is a directed segment; the
    segments form closed loops (outer boundaries clockwise on screen, holes counter-clockwise), which are split
    at saddle vertices into simple rings and merged into collinear runs. Holes are attached to the 4-connected
    component of the pixels along them. Linear in the number of boundary edges.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if not downsample > 0:
        raise ValueError(f"downsample must be > 0, got {downsample}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        return MultiPolygon()
    # Traced within the mask's bounding box: a biopsy's outline is a small part of a whole-slide grid.
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    r0, c0 = int(rows[0]), int(cols[0])
    mask = mask[r0 : int(rows[-1]) + 1, c0 : int(cols[-1]) + 1]
    x, y, d, pi, pj, stride = _trace_edges(mask)
    nxt, saddle = _link(x, y, d, stride)
    prev = np.empty_like(nxt)
    prev[nxt] = np.arange(nxt.size)
    # Keep only corners (direction changes); saddles always turn.
    corner = (d != d[prev]) | saddle
    skey = np.full(nxt.size, -1, dtype=np.int64)
    _, skey[saddle] = np.unique(y[saddle] * stride + x[saddle], return_inverse=True)
    nkeys = int(skey.max()) + 1 if saddle.any() else 0
    order, ends = _walk_loops(nxt, skey, nkeys)
    loop_of = np.repeat(np.arange(ends.size), np.diff(ends, prepend=0))
    first_edge = order[np.concatenate([[0], ends[:-1]])]
    keep = corner[order]
    order, loop_of = order[keep], loop_of[keep]
    vx, vy = x[order], y[order]
    # Shoelace per loop in integer arithmetic (exact): positive = outer ring, negative = hole.
    starts = np.searchsorted(loop_of, np.arange(ends.size))
    nxt_v = np.arange(order.size) + 1
    last = np.append(starts[1:], order.size) - 1
    nxt_v[last] = starts
    cross = vx * vy[nxt_v] - vx[nxt_v] * vy
    twice_area = np.add.reduceat(cross, starts)
    is_shell = twice_area > 0

    # Every loop borders pixels of exactly one 4-connected component: the pixel on the right of its edges.
    labels, _ = ndi.label(mask)
    comp = labels[pi[first_edge], pj[first_edge]]
    shell_ids = np.flatnonzero(is_shell)
    poly_of_comp = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    poly_of_comp[comp[shell_ids]] = np.arange(shell_ids.size)
    if np.unique(comp[shell_ids]).size != shell_ids.size:  # pragma: no cover - impossible by construction
        raise RuntimeError("mask_to_polygons: a 4-connected component has several outer rings")
    poly_of_loop = poly_of_comp[comp]
    # Rings of one polygon consecutive, its shell first.
    loop_order = np.lexsort((~is_shell, poly_of_loop))
    rank = np.empty_like(loop_order)
    rank[loop_order] = np.arange(loop_order.size)
    vert_order = np.lexsort((np.arange(order.size), rank[loop_of]))

    ox, oy, ds = float(origin_px[0]), float(origin_px[1]), float(downsample)
    coords = np.column_stack([ox + (vx[vert_order] + c0) * ds, oy + (vy[vert_order] + r0) * ds])
    rings = shapely.linearrings(coords, indices=rank[loop_of][vert_order])
    polys = shapely.polygons(rings, indices=poly_of_loop[loop_order])
    result = MultiPolygon(list(polys))
    if simplify_px > 0:
        result = polygonal(shapely.simplify(result, simplify_px, preserve_topology=True))
    return result


def polygonal(geometry: BaseGeometry | None) -> MultiPolygon:
    """The polygonal part of any geometry as a MultiPolygon (points and lines dropped; empty for None)."""
    if geometry is None or geometry.is_empty:
        return MultiPolygon()
    parts = shapely.get_parts(geometry)
    polys: list[Polygon] = []
    for p in parts:
        if isinstance(p, Polygon):
            if not p.is_empty:
                polys.append(p)
        elif isinstance(p, MultiPolygon):
            polys.extend(q for q in p.geoms if not q.is_empty)
        elif p.geom_type == "GeometryCollection":
            polys.extend(polygonal(p).geoms)
    return MultiPolygon(polys)


def _segments(geometry: BaseGeometry) -> np.ndarray:
    """All ring segments (x0, y0, x1, y1) of the polygonal part of a geometry."""
    poly = polygonal(geometry)
    if poly.is_empty:
        return np.empty((0, 4))
    rings = shapely.get_rings(np.asarray(poly.geoms, dtype=object))
    coords, index = shapely.get_coordinates(rings, return_index=True)
    same = index[:-1] == index[1:]
    return np.column_stack([coords[:-1][same], coords[1:][same]])


def rasterize(
    geometry: BaseGeometry | None,
    *,
    shape: tuple[int, int],
    downsample: float = 1.0,
    origin_px: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Pixels whose centre lies inside a geometry.

    Parameters
    ----------
    geometry : shapely geometry or None
        Level-0 pixel coordinates; only its polygonal part counts (holes excluded). Parts of a valid
        MultiPolygon do not overlap; overlapping parts of an invalid geometry are combined by the even-odd rule.
    shape : (width, height)
        Size of the output in mask pixels.
    downsample : float
        Level-0 pixels per output pixel.
    origin_px : (x, y)
        Level-0 position of the output's top-left corner.

    Returns
    -------
    (height, width) array of bool
        ``out[i, j]`` is True iff the point ``(ox + (j+0.5)·ds, oy + (i+0.5)·ds)`` is inside. A centre exactly on
        an edge follows a half-open rule (inside on a left or top edge, outside on a right or bottom edge), so
        that two polygons sharing an edge never both claim a pixel.

    Notes
    -----
    Even-odd scan-line fill: for each pixel row the crossings of its centre line with the polygon rings are
    found exactly (half-open in y so that vertices count once), then toggled along the row with a cumulative
    sum. Cost is proportional to pixels plus crossings, not pixels times vertices.
    """
    width, height = int(shape[0]), int(shape[1])
    if width < 0 or height < 0:
        raise ValueError(f"shape must be (width, height) >= 0, got {shape}")
    if not downsample > 0:
        raise ValueError(f"downsample must be > 0, got {downsample}")
    out = np.zeros((height, width), dtype=bool)
    if geometry is None or width == 0 or height == 0:
        return out
    seg = _segments(geometry)
    if seg.size == 0:
        return out
    ox, oy, ds = float(origin_px[0]), float(origin_px[1]), float(downsample)
    x0, y0, x1, y1 = seg.T
    keep = y0 != y1  # horizontal edges never cross a centre line
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    ymin, ymax = np.minimum(y0, y1), np.maximum(y0, y1)
    # Candidate rows (one row of margin against rounding), then the exact half-open test on true centres.
    lo = np.clip(np.ceil((ymin - oy) / ds - 0.5) - 1, 0, height).astype(np.int64)
    hi = np.clip(np.floor((ymax - oy) / ds - 0.5) + 2, 0, height).astype(np.int64)
    n = np.maximum(hi - lo, 0)
    if n.sum() == 0:
        return out
    edge = np.repeat(np.arange(n.size), n)
    row = np.arange(edge.size) - np.repeat(np.cumsum(n) - n, n) + lo[edge]
    yc = oy + (row + 0.5) * ds
    hit = (ymin[edge] <= yc) & (yc < ymax[edge])
    edge, row, yc = edge[hit], row[hit], yc[hit]
    ex0, ey0, ex1, ey1 = x0[edge], y0[edge], x1[edge], y1[edge]
    xc = ex0 + (yc - ey0) * (ex1 - ex0) / (ey1 - ey0)
    # First column whose centre is >= the crossing: a centre on the edge toggles there (inside on a left edge).
    col = np.ceil((xc - ox) / ds - 0.5).astype(np.float64)
    col = np.where(ox + (col + 0.5) * ds < xc, col + 1, col)
    col = np.where(ox + (col - 0.5) * ds >= xc, col - 1, col)
    col = np.clip(col, 0, width).astype(np.int64)  # crossings right of the window toggle nothing inside it
    # Toggle parity at each crossing, then a running XOR along the rows: one byte per pixel, no counts.
    toggles = np.zeros((height, width + 1), dtype=np.uint8)
    np.bitwise_xor.at(toggles, (row, col), np.uint8(1))
    out[:] = np.bitwise_xor.accumulate(toggles[:, :width], axis=1).view(bool)
    return out


# QuPath-like default colours for the compartments cleihc creates; other names get a stable hashed colour.
_COLORS: dict[str, tuple[int, int, int]] = {
    "tissue": (0, 160, 0),
    "epidermis": (200, 0, 200),
    "dermis": (255, 140, 0),
    "papillary_dermis": (255, 200, 0),
    "superficial_dermis": (230, 110, 50),
    "deep_dermis": (150, 60, 20),
}


def region_color(name: str) -> tuple[int, int, int]:
    """A stable RGB colour for a region name (fixed for cleihc's compartments, hashed otherwise)."""
    if name in _COLORS:
        return _COLORS[name]
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:2], "big") / 65535.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.9)
    return (round(r * 255), round(g * 255), round(b * 255))


def to_feature(
    geometry: BaseGeometry,
    *,
    name: str,
    classification: str | None = None,
    properties: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A QuPath-style GeoJSON annotation Feature.

    Parameters
    ----------
    geometry : shapely geometry
        Level-0 pixel coordinates (QuPath's image coordinates).
    name : str
        The annotation's name.
    classification : str, optional
        The class name; QuPath shows it and cleihc reads regions by it. Its colour is :func:`region_color`.
    properties : mapping, optional
        Extra JSON-serialisable properties (they do not override ``objectType``, ``name``, ``classification``).

    Returns
    -------
    dict
        ``{"type": "Feature", "geometry": ..., "properties": {"objectType": "annotation", "name": ...,
        "classification": {"name": ..., "color": [r, g, b]}}}``.
    """
    props: dict[str, Any] = dict(properties or {})
    props["objectType"] = "annotation"
    props["name"] = str(name)
    if classification is not None:
        props["classification"] = {"name": str(classification), "color": list(region_color(classification))}
    return {
        "type": "Feature",
        "geometry": json.loads(shapely.to_geojson(geometry)),
        "properties": props,
    }


def feature_collection(features: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the given features."""
    return {"type": "FeatureCollection", "features": [dict(f) for f in features]}
