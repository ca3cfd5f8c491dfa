"""Tile grid: cores partition the image, halos contain cores, ownership is unique, tissue restriction is safe."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cleihc.tiling import Tile, TileGrid

grids = st.builds(
    lambda w, h, t, halo, ox, oy: TileGrid((w, h), tile_size_px=t, halo_px=halo, origin_px=(ox, oy)),
    st.integers(1, 120),
    st.integers(1, 120),
    st.integers(3, 70),
    st.integers(0, 20),
    st.integers(-300, 300),
    st.integers(-300, 300),
)


def coverage(grid: TileGrid) -> np.ndarray:
    """How many cores cover each pixel, as an (H, W) count image."""
    count = np.zeros((grid.height, grid.width), dtype=np.int32)
    for tile in grid.tiles():
        x, y, w, h = tile.core_a
        count[y : y + h, x : x + w] += 1
    return count


def test_simple_grid_layout():
    grid = TileGrid((10, 7), tile_size_px=4, halo_px=1, downsample=2.5)
    assert (grid.n_cols, grid.n_rows, len(grid)) == (3, 2, 6)
    tiles = grid.tiles()
    assert [t.index for t in tiles] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    t = grid.tile(1, 1)
    assert t.core_a == (4, 4, 4, 3)
    assert t.halo_a == (3, 3, 6, 4)  # widened by 1, clipped at the bottom edge (height 7)
    assert t.core_px == (10.0, 10.0, 10.0, 7.5)
    assert t.halo_px == (7.5, 7.5, 15.0, 10.0)
    rows, cols = t.core_in_halo
    assert (rows, cols) == (slice(1, 4), slice(1, 5))
    assert tiles[-1].core_a == (8, 4, 2, 3)
    with pytest.raises(IndexError):
        grid.tile(3, 0)


def test_origin_shifts_grid_lines():
    grid = TileGrid((10, 5), tile_size_px=4, halo_px=0, origin_px=(1, -2))
    xs = [t.core_a[0] for t in grid.tiles() if t.index[1] == 0]
    widths = [t.core_a[2] for t in grid.tiles() if t.index[1] == 0]
    assert xs == [0, 1, 5, 9] and widths == [1, 4, 4, 1]
    ys = sorted({t.core_a[1] for t in grid.tiles()})
    assert ys == [0, 2]  # lines at -2 + 4k -> 2, 6 (6 beyond the image)
    # An origin shifted by whole tiles is the same grid.
    same = TileGrid((10, 5), tile_size_px=4, halo_px=0, origin_px=(1 + 8, -2 - 12))
    assert [t.core_a for t in same.tiles()] == [t.core_a for t in grid.tiles()]


def test_core_in_halo_cuts_the_core():
    image = np.arange(23 * 17).reshape(17, 23)
    grid = TileGrid((23, 17), tile_size_px=6, halo_px=3, origin_px=(2, 5))
    for tile in grid.tiles():
        hx, hy, hw, hh = tile.halo_a
        cx, cy, cw, ch = tile.core_a
        halo = image[hy : hy + hh, hx : hx + hw]
        np.testing.assert_array_equal(halo[tile.core_in_halo], image[cy : cy + ch, cx : cx + cw])


@settings(max_examples=60, deadline=None)
@given(grids)
def test_cores_partition_and_halos_contain(grid: TileGrid):
    np.testing.assert_array_equal(coverage(grid), 1)
    for tile in grid.tiles():
        cx, cy, cw, ch = tile.core_a
        hx, hy, hw, hh = tile.halo_a
        assert cw >= 1 and ch >= 1
        assert cw <= grid.tile_size_px and ch <= grid.tile_size_px
        assert hx <= cx and hy <= cy and hx + hw >= cx + cw and hy + hh >= cy + ch
        assert hx == max(0, cx - grid.halo_px) and hy == max(0, cy - grid.halo_px)
        assert hx + hw == min(grid.width, cx + cw + grid.halo_px)
        assert hy + hh == min(grid.height, cy + ch + grid.halo_px)
    assert len(grid.tiles()) == len(grid)


@settings(max_examples=60, deadline=None)
@given(grids, st.integers(0, 2**31 - 1))
def test_owner_of_agrees_with_contains(grid: TileGrid, seed: int):
    rng = np.random.default_rng(seed)
    # Random real points plus every lattice corner (the boundary cases).
    x = np.concatenate([rng.uniform(0, grid.width, 200), np.arange(grid.width, dtype=float)])
    y = np.concatenate(
        [rng.uniform(0, grid.height, 200), rng.integers(0, grid.height, grid.width).astype(float)]
    )
    col, row = grid.owner_of(x, y)
    assert col.dtype == np.int64 and col.shape == x.shape
    tiles = {t.index: t for t in grid.tiles()}
    hits = np.zeros(x.shape, dtype=np.int32)
    for index, tile in tiles.items():
        inside = tile.contains_a(x, y)
        hits += inside
        owned = (col == index[0]) & (row == index[1])
        np.testing.assert_array_equal(inside, owned)
    np.testing.assert_array_equal(hits, 1)  # every point in exactly one core


def test_owner_of_outside_and_shapes():
    grid = TileGrid((10, 10), tile_size_px=4, halo_px=2)
    col, row = grid.owner_of(np.array([-0.1, 10.0, 3.999, np.nan]), np.array([1.0, 1.0, 4.0, 1.0]))
    np.testing.assert_array_equal(col, [-1, -1, 0, -1])
    np.testing.assert_array_equal(row, [-1, -1, 1, -1])
    c, r = grid.owner_of(5.0, 9.5)
    assert c.shape == () and (int(c), int(r)) == (1, 2)
    c, r = grid.owner_of(np.zeros((2, 3)), 7.0)
    assert c.shape == (2, 3)


def tissue_of(mask: np.ndarray, downsample: float) -> SimpleNamespace:
    """The two attributes TileGrid.tiles reads from a TissueMask."""
    return SimpleNamespace(mask=mask, downsample=downsample)


def test_tiles_restricted_to_tissue():
    # Analysis 2 level-0 px per pixel; mask 8 level-0 px per pixel -> a mask pixel is 4x4 analysis pixels.
    grid = TileGrid((40, 24), tile_size_px=8, halo_px=2, downsample=2.0)
    mask = np.zeros((6, 10), dtype=bool)
    mask[1, 2] = True  # level-0 x 16..24, y 8..16 -> analysis x 8..12, y 4..8 -> tile col 1, row 0
    kept = grid.tiles(tissue_of(mask, 8.0))
    assert [t.index for t in kept] == [(1, 0)]
    assert grid.tiles(tissue_of(np.zeros((6, 10), bool), 8.0)) == []
    assert len(grid.tiles(tissue_of(np.ones((6, 10), bool), 8.0))) == len(grid)


@settings(max_examples=80, deadline=None)
@given(
    grids,
    st.sampled_from([1.0, 2.0, 3.7, 4.000122]),
    st.sampled_from([8.0, 16.0, 5.3, 32.0004]),
    st.integers(0, 2**31 - 1),
)
@example(TileGrid((19, 53), tile_size_px=3, halo_px=0), 3.7, 5.3, 0)  # a touch at a float-rounded edge
def test_tissue_tiles_cover_all_tissue(grid: TileGrid, ds_a: float, ds_mask: float, seed: int):
    grid = TileGrid(
        grid.shape_a,
        tile_size_px=grid.tile_size_px,
        halo_px=grid.halo_px,
        origin_px=grid.origin_px,
        downsample=ds_a,
    )
    rng = np.random.default_rng(seed)
    h = int(np.ceil(grid.height * ds_a / ds_mask))
    w = int(np.ceil(grid.width * ds_a / ds_mask))
    mask = rng.random((h, w)) < 0.05
    kept = grid.tiles(tissue_of(mask, ds_mask))
    # Tissue of every analysis pixel by its centre (the rule TissueMask.mask_for_rect uses).
    i = np.arange(grid.width)
    j = np.arange(grid.height)
    mc = np.minimum(np.floor((i + 0.5) * ds_a / ds_mask).astype(int), w - 1)
    mr = np.minimum(np.floor((j + 0.5) * ds_a / ds_mask).astype(int), h - 1)
    tissue_a = mask[np.ix_(mr, mc)]
    covered = np.zeros_like(tissue_a)
    for tile in kept:
        x, y, cw, ch = tile.core_a
        covered[y : y + ch, x : x + cw] = True
        assert isinstance(tile, Tile)
    assert not np.any(tissue_a & ~covered)
    # Dropped tiles really have no mask pixel overlapping their core (not just an arbitrary subset); a pixel
    # that only meets the core's edge to within floating-point rounding does not count.
    kept_idx = {t.index for t in kept}
    eps = 1e-9
    for tile in grid.tiles():
        if tile.index in kept_idx:
            continue
        x, y, cw, ch = tile.core_px
        m = mask[
            int(np.floor(y / ds_mask + eps)) : int(np.ceil((y + ch) / ds_mask - eps)),
            int(np.floor(x / ds_mask + eps)) : int(np.ceil((x + cw) / ds_mask - eps)),
        ]
        assert not m.any()


def test_from_resolution_and_validation():
    res = SimpleNamespace(dimensions_a=(100, 50), downsample=4.0)
    grid = TileGrid.from_resolution(res, tile_size_px=32, halo_px=4)
    assert grid.shape_a == (100, 50) and grid.downsample == 4.0 and len(grid) == 8
    with pytest.raises(ValueError):
        TileGrid((0, 10), tile_size_px=4, halo_px=0)
    with pytest.raises(ValueError):
        TileGrid((10, 10), tile_size_px=0, halo_px=0)
    with pytest.raises(ValueError):
        TileGrid((10, 10), tile_size_px=4, halo_px=-1)
    with pytest.raises(ValueError):
        TileGrid((10, 10), tile_size_px=4, halo_px=0, downsample=0.0)
    with pytest.raises(TypeError):
        TileGrid((10, 10), tile_size_px=4.5, halo_px=0)


@pytest.mark.parametrize("tile_size", [1, 2])
def test_tiny_tiles_partition(tile_size: int):
    grid = TileGrid((7, 5), tile_size_px=tile_size, halo_px=1, origin_px=(1, 1))
    np.testing.assert_array_equal(coverage(grid), 1)
    yy, xx = np.mgrid[0:5, 0:7]
    col, row = grid.owner_of(xx + 0.5, yy + 0.5)
    for tile in grid.tiles():
        x, y, w, h = tile.core_a
        assert np.all(col[y : y + h, x : x + w] == tile.index[0])
        assert np.all(row[y : y + h, x : x + w] == tile.index[1])
