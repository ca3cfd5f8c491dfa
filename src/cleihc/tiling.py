"""A tile grid in analysis pixels: cores that partition the image, halos that overlap.

The grid lives at the protocol's analysis resolution (see ``docs/ARCHITECTURE.md``, "Exactness across tiles").
Grid lines sit at ``origin + k * tile_size`` for every integer ``k``; the cores are the cells of that lattice
clipped to the image, so they partition it exactly whatever the origin. Each core is widened by the halo (and
clipped again) to give the rectangle a worker reads, so that a filter or a cell detector near the core's edge sees
the same neighbourhood it would see in one piece. An object belongs to the tile whose core contains its centroid
(:meth:`TileGrid.owner_of`), which makes every object counted exactly once.

Rectangles are ``(x, y, width, height)``. ``*_a`` rectangles are integer analysis pixels; ``*_px`` rectangles are
level-0 pixels, given as exact floats (``analysis * downsample``) and never rounded, because the downsample of a
pyramid level is rarely an integer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:  # only for hints: tiling must not depend on tissue detection at run time
    from cleihc.tissue import TissueMask

__all__ = ["Tile", "TileGrid"]


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`.

    Attributes
    ----------
    index : tuple of int
        ``(col, row)`` in the grid.
    core_a : tuple of int
        ``(x, y, width, height)`` of the core in analysis pixels: the pixels this tile owns.
    halo_a : tuple of int
        ``(x, y, width, height)`` of the core widened by the halo and clipped to the image, in analysis pixels:
        the pixels a worker reads.
    core_px : tuple of float
        The core in level-0 pixels, ``core_a * downsample`` (exact floats, not rounded).
    halo_px : tuple of float
        The halo rectangle in level-0 pixels, ``halo_a * downsample`` (exact floats, not rounded).
    """

    index: tuple[int, int]
    core_a: tuple[int, int, int, int]
    halo_a: tuple[int, int, int, int]
    core_px: tuple[float, float, float, float]
    halo_px: tuple[float, float, float, float]

    @property
    def core_in_halo(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices that cut the core out of an array holding the halo rectangle."""
        cx, cy, cw, ch = self.core_a
        hx, hy = self.halo_a[0], self.halo_a[1]
        return slice(cy - hy, cy - hy + ch), slice(cx - hx, cx - hx + cw)

    def contains_a(self, x_a: ArrayLike, y_a: ArrayLike) -> NDArray[np.bool_]:
        """Whether analysis-pixel coordinates lie in the half-open core ``x0 <= x < x0 + width``.

        Parameters
        ----------
        x_a, y_a : array_like of float
            Coordinates in analysis pixels (the centroid of an object, for ownership).

        Returns
        -------
        ndarray of bool
            Same shape as the broadcast inputs (0-d for scalars).
        """
        x = np.asarray(x_a, dtype=np.float64)
        y = np.asarray(y_a, dtype=np.float64)
        cx, cy, cw, ch = self.core_a
        return (x >= cx) & (x < cx + cw) & (y >= cy) & (y < cy + ch)


def _edges(length: int, tile: int, origin: int) -> NDArray[np.int64]:
    """Core boundaries along one axis: 0, every ``origin + k * tile`` strictly inside, and ``length``."""
    offset = origin % tile
    first = offset if offset > 0 else tile
    inner = np.arange(first, length, tile, dtype=np.int64)
    return np.concatenate([[0], inner, [length]]).astype(np.int64)


def _as_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class TileGrid:
    """A grid of tiles over an image in analysis pixels.

    Parameters
    ----------
    shape_a : tuple of int
        ``(width, height)`` of the image in analysis pixels (``AnalysisResolution.dimensions_a``).
    tile_size_px : int
        Side of a core in analysis pixels.
    halo_px : int
        Overlap added on every side of a core, in analysis pixels.
    origin_px : tuple of int
        ``(x, y)`` of one grid corner in analysis pixels; the grid lines are ``origin + k * tile_size_px`` for
        every integer ``k``. Shifting it moves where tiles cut the image, never a result.
    downsample : float
        Level-0 pixels per analysis pixel (``AnalysisResolution.downsample``), used for the level-0 rectangles.

    Notes
    -----
    Cores partition the image: every pixel (and every real-valued point ``0 <= x < width``) lies in exactly one
    core. Edge tiles may be narrower than ``tile_size_px``.
    """

    def __init__(
        self,
        shape_a: Sequence[int],
        *,
        tile_size_px: int,
        halo_px: int,
        origin_px: Sequence[int] = (0, 0),
        downsample: float = 1.0,
    ) -> None:
        if len(shape_a) != 2:
            raise ValueError(f"shape_a must be (width, height), got {shape_a!r}")
        if len(origin_px) != 2:
            raise ValueError(f"origin_px must be (x, y), got {origin_px!r}")
        self.width = _as_int(shape_a[0], "shape_a width", minimum=1)
        self.height = _as_int(shape_a[1], "shape_a height", minimum=1)
        self.tile_size_px = _as_int(tile_size_px, "tile_size_px", minimum=1)
        self.halo_px = _as_int(halo_px, "halo_px", minimum=0)
        self.origin_px = (
            _as_int(origin_px[0], "origin_px x", minimum=-(2**62)),
            _as_int(origin_px[1], "origin_px y", minimum=-(2**62)),
        )
        downsample = float(downsample)
        if not math.isfinite(downsample) or downsample <= 0:
            raise ValueError(f"downsample must be a positive finite number, got {downsample}")
        self.downsample = downsample
        self._x_edges = _edges(self.width, self.tile_size_px, self.origin_px[0])
        self._y_edges = _edges(self.height, self.tile_size_px, self.origin_px[1])
        # 1 when the lattice cuts a partial first core off at the image's left/top edge.
        self._x_shift = 1 if self.origin_px[0] % self.tile_size_px else 0
        self._y_shift = 1 if self.origin_px[1] % self.tile_size_px else 0

    @classmethod
    def from_resolution(
        cls, resolution: Any, *, tile_size_px: int, halo_px: int, origin_px: Sequence[int] = (0, 0)
    ) -> TileGrid:
        """A grid over a slide at an analysis resolution.

        Parameters
        ----------
        resolution : AnalysisResolution
            From ``Slide.analysis_resolution``; its ``dimensions_a`` and ``downsample`` are used.
        tile_size_px, halo_px, origin_px
            As for :class:`TileGrid`, in analysis pixels.
        """
        return cls(
            tuple(resolution.dimensions_a),
            tile_size_px=tile_size_px,
            halo_px=halo_px,
            origin_px=origin_px,
            downsample=float(resolution.downsample),
        )

    @property
    def shape_a(self) -> tuple[int, int]:
        """``(width, height)`` of the image in analysis pixels."""
        return self.width, self.height

    @property
    def n_cols(self) -> int:
        """Number of tile columns."""
        return len(self._x_edges) - 1

    @property
    def n_rows(self) -> int:
        """Number of tile rows."""
        return len(self._y_edges) - 1

    def __len__(self) -> int:
        return self.n_cols * self.n_rows

    def __repr__(self) -> str:
        return (
            f"TileGrid(shape_a={self.shape_a}, tile_size_px={self.tile_size_px}, halo_px={self.halo_px}, "
            f"origin_px={self.origin_px}, downsample={self.downsample}) with {self.n_cols}x{self.n_rows} tiles"
        )

    def tile(self, col: int, row: int) -> Tile:
        """The tile at ``(col, row)``.

        Raises
        ------
        IndexError
            If the index is outside the grid.
        """
        if not (0 <= col < self.n_cols and 0 <= row < self.n_rows):
            raise IndexError(f"tile ({col}, {row}) outside a {self.n_cols}x{self.n_rows} grid")
        x0, x1 = int(self._x_edges[col]), int(self._x_edges[col + 1])
        y0, y1 = int(self._y_edges[row]), int(self._y_edges[row + 1])
        h = self.halo_px
        hx0, hy0 = max(0, x0 - h), max(0, y0 - h)
        hx1, hy1 = min(self.width, x1 + h), min(self.height, y1 + h)
        core_a = (x0, y0, x1 - x0, y1 - y0)
        halo_a = (hx0, hy0, hx1 - hx0, hy1 - hy0)
        ds = self.downsample
        return Tile(
            index=(int(col), int(row)),
            core_a=core_a,
            halo_a=halo_a,
            core_px=tuple(float(v * ds) for v in core_a),  # type: ignore[arg-type]
            halo_px=tuple(float(v * ds) for v in halo_a),  # type: ignore[arg-type]
        )

    def tiles(self, tissue: TissueMask | None = None) -> list[Tile]:
        """All tiles in row-major order, optionally only those whose core touches tissue.

        Parameters
        ----------
        tissue : TissueMask, optional
            A low-resolution tissue mask (``mask`` and ``downsample`` in level-0 pixels per mask pixel). A tile is
            kept when any tissue pixel of the mask overlaps its core rectangle in level-0 coordinates. This is a
            superset of the tiles holding an analysis pixel that ``TissueMask.mask_for_rect`` calls tissue, so
            the restriction never loses tissue.

        Returns
        -------
        list of Tile
            Ordered by row, then column.
        """
        if tissue is None:
            return [self.tile(c, r) for r in range(self.n_rows) for c in range(self.n_cols)]
        keep = self._tissue_tiles(np.asarray(tissue.mask, dtype=bool), float(tissue.downsample))
        rows, cols = np.nonzero(keep)  # row-major order
        return [self.tile(int(c), int(r)) for r, c in zip(rows, cols, strict=True)]

    def _tissue_tiles(self, mask: NDArray[np.bool_], mask_downsample: float) -> NDArray[np.bool_]:
        """``(n_rows, n_cols)`` booleans: does any mask pixel overlap the core (half-open, in level-0 px)?"""
        if mask.ndim != 2:
            raise ValueError(f"tissue mask must be 2-D, got shape {mask.shape}")
        if not (math.isfinite(mask_downsample) and mask_downsample > 0):
            raise ValueError(f"tissue mask downsample must be positive, got {mask_downsample}")
        # Summed-area table: any-true in a rectangle in O(1) per tile.
        # Summed in place, in 32 bits when the mask's size allows (a large slide's mask has millions of pixels).
        dtype = np.int32 if mask.size < 2**31 else np.int64
        sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=dtype)
        sat[1:, 1:] = mask
        np.cumsum(sat, axis=0, out=sat)
        np.cumsum(sat, axis=1, out=sat)
        ratio = self.downsample / mask_downsample

        def spans(edges: NDArray[np.int64], n_mask: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
            # Mask pixel m covers [m, m + 1) in mask units; the core covers [e0 * r, e1 * r).
            lo = np.floor(edges[:-1] * ratio).astype(np.int64)
            hi = np.ceil(edges[1:] * ratio).astype(np.int64)  # exclusive
            return np.clip(lo, 0, n_mask), np.clip(hi, 0, n_mask)

        x0, x1 = spans(self._x_edges, mask.shape[1])
        y0, y1 = spans(self._y_edges, mask.shape[0])
        Y0, X0 = np.meshgrid(y0, x0, indexing="ij")
        Y1, X1 = np.meshgrid(y1, x1, indexing="ij")
        count = sat[Y1, X1] - sat[Y0, X1] - sat[Y1, X0] + sat[Y0, X0]
        return count > 0

    def owner_of(self, x_a: ArrayLike, y_a: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """The ``(col, row)`` of the tile whose core contains each point.

        Parameters
        ----------
        x_a, y_a : array_like of float
            Coordinates in analysis pixels (object centroids; pixel ``i`` spans ``[i, i + 1)``).

        Returns
        -------
        col, row : ndarray of int64
            Same shape as the broadcast inputs. Points outside the image (or not finite) get ``-1`` in both.
        """
        x = np.asarray(x_a, dtype=np.float64)
        y = np.asarray(y_a, dtype=np.float64)
        x, y = np.broadcast_arrays(x, y)
        t = self.tile_size_px
        inside = (x >= 0) & (x < self.width) & (y >= 0) & (y < self.height)
        with np.errstate(invalid="ignore"):
            xs = np.where(inside, x, 0.0)
            ys = np.where(inside, y, 0.0)
            col = np.floor((xs - self.origin_px[0] % t) / t).astype(np.int64) + self._x_shift
            row = np.floor((ys - self.origin_px[1] % t) / t).astype(np.int64) + self._y_shift
        # Guard the float division at the lattice lines: the edges are the definition.
        col = np.clip(col, 0, self.n_cols - 1)
        row = np.clip(row, 0, self.n_rows - 1)
        col = col - (xs < self._x_edges[col]) + (xs >= self._x_edges[col + 1])
        row = row - (ys < self._y_edges[row]) + (ys >= self._y_edges[row + 1])
        col = np.where(inside, col, -1)
        row = np.where(inside, row, -1)
        return col.astype(np.int64), row.astype(np.int64)
