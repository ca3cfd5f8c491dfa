"""Additive totals: hand-checkable counts, tile invariance, and the metric definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from cleihc.measure import AreaTotals, TotalsRaster, accumulate_area, area_metrics, cell_metrics, map_mask

BINS = (0.2, 0.4, 0.6)


def test_accumulate_counts_each_bin_by_hand():
    od = np.array([[0.0, 0.19, 0.2, 0.39], [0.4, 0.59, 0.6, 2.0]], np.float32)
    win = accumulate_area(od, location_a=(0, 0), raster_factor=4, bins_od=BINS)
    assert win.bin_px[:, 0, 0].tolist() == [2, 2, 2, 2]
    assert win.positive_od_sum[0, 0] == pytest.approx(0.2 + 0.39 + 0.4 + 0.59 + 0.6 + 2.0, abs=1e-6)


def test_pigment_is_counted_apart_and_never_positive():
    od = np.full((2, 2), 0.9, np.float32)
    pig = np.array([[True, False], [False, False]])
    win = accumulate_area(od, location_a=(0, 0), raster_factor=2, bins_od=BINS, pigment=pig)
    assert win.pigment_px[0, 0] == 1
    assert win.bin_px[3, 0, 0] == 3


def test_input_is_not_modified():
    od = np.random.default_rng(0).random((17, 9)).astype(np.float32)
    before = od.copy()
    accumulate_area(od, location_a=(3, 5), raster_factor=4, bins_od=BINS)
    np.testing.assert_array_equal(od, before)


@pytest.mark.parametrize("tile", [7, 16, 33])
@pytest.mark.parametrize("origin", [(0, 0), (5, 3)])
def test_raster_totals_do_not_depend_on_tiling(tile, origin):
    rng = np.random.default_rng(1)
    od = rng.gamma(1.0, 0.25, size=(70, 90)).astype(np.float32)
    r = 4
    shape_r = ((90 + r - 1) // r, (70 + r - 1) // r)
    whole = TotalsRaster(shape_r, r)
    whole.add(accumulate_area(od, location_a=(0, 0), raster_factor=r, bins_od=BINS))
    tiled = TotalsRaster(shape_r, r)
    xs = sorted({0, *range(origin[0] % tile, 90, tile)} | {90})
    ys = sorted({0, *range(origin[1] % tile, 70, tile)} | {70})
    for y0, y1 in itertools.pairwise(ys):
        for x0, x1 in itertools.pairwise(xs):
            tiled.add(accumulate_area(od[y0:y1, x0:x1], location_a=(x0, y0), raster_factor=r, bins_od=BINS))
    np.testing.assert_array_equal(whole.bin_px, tiled.bin_px)
    np.testing.assert_allclose(whole.positive_od_sum, tiled.positive_od_sum, rtol=0, atol=1e-9)
    assert whole.bin_px.sum() == 70 * 90


def test_area_metrics_definitions():
    t = AreaTotals(bin_px=(50, 20, 20, 10), positive_od_sum=30.0, pigment_px=0)
    m = area_metrics(t, pixel_area_um2=0.25)
    assert m["region_area_mm2"] == pytest.approx(100 * 0.25e-6)
    assert m["positive_area_percent"] == pytest.approx(50.0)
    assert m["h_score"] == pytest.approx(20 + 2 * 20 + 3 * 10)
    assert m["positive_mean_od"] == pytest.approx(0.6)
    assert m["ppc_positivity"] == pytest.approx(0.5)


def test_cell_metrics_exclude_pigment_and_use_region_area():
    cells = pd.DataFrame(
        {
            "positive": [True, True, False, False, True],
            "intensity_class": [1, 3, 0, 0, 2],
            "pigment": [False, False, False, False, True],
        }
    )
    m = cell_metrics(cells, region_area_mm2=0.5)
    assert m["cells_total"] == 4 and m["cells_positive"] == 2 and m["pigment_cells"] == 1
    assert m["positive_cells_per_mm2"] == pytest.approx(4.0)
    assert m["cells_h_score"] == pytest.approx(25 + 3 * 25)


def test_map_mask_by_centres_is_window_invariant():
    rng = np.random.default_rng(2)
    low = rng.random((20, 30)) > 0.5
    whole = map_mask(low, mask_downsample=16, shape=(100, 60), downsample=5)
    part = map_mask(low, mask_downsample=16, shape=(30, 20), downsample=5, origin_px=(7 * 5, 11 * 5))
    np.testing.assert_array_equal(part, whole[11:31, 7:37])
    # centre of output pixel (0, 0) is at 2.5 → mask pixel (0, 0)
    assert whole[0, 0] == low[0, 0]


@pytest.mark.parametrize(
    ("origin", "shape", "ds"),
    [
        ((0.0, 0.0), (100, 60), 5.0),
        ((-40.0, -23.0), (130, 90), 5.0),
        ((300.0, 200.0), (90, 50), 3.0),
        ((1e4, 0.0), (5, 5), 4.0),
    ],
)
def test_map_mask_equals_the_pixel_centre_rule(origin, shape, ds):
    # Grids reaching past the mask on any side (or missing it entirely): the per-pixel definition, literally.
    rng = np.random.default_rng(3)
    low = rng.random((20, 30)) > 0.5
    out = map_mask(low, mask_downsample=16.0, shape=shape, downsample=ds, origin_px=origin)
    w, h = shape
    want = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            mx = int(np.floor((origin[0] + (j + 0.5) * ds) / 16.0))
            my = int(np.floor((origin[1] + (i + 0.5) * ds) / 16.0))
            want[i, j] = 0 <= mx < 30 and 0 <= my < 20 and low[my, mx]
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("origin", [(0, 0), (3, 6), (1025, 2)])
@pytest.mark.parametrize("r", [1, 3, 4])
def test_fused_rgb_accumulation_equals_concentration_then_accumulate(origin, r):
    from cleihc.measure import accumulate_area_rgb
    from cleihc.stains import concentration, preset

    stains = preset("alcian_nfr", background_rgb=(242, 240, 245))
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, size=(45, 61, 3), dtype=np.uint8)
    view = rgb[2:40, 5:60]  # a non-contiguous view, as the engine passes the core of a haloed read
    before = view.copy()
    od = concentration(np.ascontiguousarray(view), stains, stain="alcian_blue")
    want = accumulate_area(od, location_a=origin, raster_factor=r, bins_od=BINS)
    got = accumulate_area_rgb(
        view, stains, stain="alcian_blue", location_a=origin, raster_factor=r, bins_od=BINS
    )
    assert (got.x_r, got.y_r) == (want.x_r, want.y_r)
    np.testing.assert_array_equal(got.bin_px, want.bin_px)
    np.testing.assert_array_equal(got.positive_od_sum, want.positive_od_sum)
    assert got.bin_px.sum() == view.shape[0] * view.shape[1]
    assert 0 < got.bin_px[1:].sum() < view.shape[0] * view.shape[1]  # both sides of the threshold occur
    np.testing.assert_array_equal(view, before)


def test_accumulate_matches_a_per_pixel_reference():
    rng = np.random.default_rng(3)
    od = rng.gamma(1.0, 0.3, size=(23, 31)).astype(np.float32)
    pig = rng.random((23, 31)) < 0.1
    r, x0, y0 = 4, 2, 5
    win = accumulate_area(od, location_a=(x0, y0), raster_factor=r, bins_od=BINS, pigment=pig)
    bins = np.zeros_like(win.bin_px)
    pos = np.zeros_like(win.positive_od_sum)
    npig = np.zeros_like(win.pigment_px)
    for i in range(23):
        for j in range(31):
            ry, rx = (y0 + i) // r - win.y_r, (x0 + j) // r - win.x_r
            if pig[i, j]:
                npig[ry, rx] += 1
                continue
            v = float(od[i, j])
            bins[int(v >= 0.2) + int(v >= 0.4) + int(v >= 0.6), ry, rx] += 1
            pos[ry, rx] += v if v >= 0.2 else 0.0
    np.testing.assert_array_equal(win.bin_px, bins)
    np.testing.assert_array_equal(win.pigment_px, npig)
    np.testing.assert_allclose(win.positive_od_sum, pos, rtol=1e-12)


def test_windows_are_16_bit_and_the_largest_raster_factor_fits():
    from cleihc.measure import MAX_RASTER_FACTOR

    r = MAX_RASTER_FACTOR
    od = np.full((r, r), 2.0, np.float32)  # one full raster cell, every pixel strong
    win = accumulate_area(od, location_a=(0, 0), raster_factor=r, bins_od=BINS)
    assert win.bin_px.dtype == np.uint16 and win.pigment_px is None
    assert win.bin_px[:, 0, 0].tolist() == [0, 0, 0, r * r]
    # The raster counts in 16 bits too: an analysis pixel lands in exactly one cell, so a cell holds at most r².
    raster = TotalsRaster((1, 1), r)
    raster.add(win)
    assert raster.bin_px.dtype == np.uint16 and raster.bin_px[3, 0, 0] == r * r
    assert raster.totals(np.ones((1, 1), bool)).pixels == r * r
    with pytest.raises(ValueError, match="raster_factor"):
        TotalsRaster((1, 1), r + 1)
    with pytest.raises(ValueError, match="raster_factor"):
        accumulate_area(od, location_a=(0, 0), raster_factor=r + 1, bins_od=BINS)


def test_plan_refuses_a_raster_cell_of_more_than_255_pixels(tmp_path):
    from cleihc.errors import ProtocolError
    from cleihc.pipeline import plan_slide
    from cleihc.protocol import Protocol, load_protocol
    from cleihc_testdata import SAMPLE_IMAGES

    d = load_protocol("gag-alcian").to_dict()
    d["analysis"]["mpp_um"] = 0.25
    d["analysis"]["raster_mpp_um"] = 100.0  # 400 analysis pixels per raster cell
    with pytest.raises(ProtocolError, match="raster_mpp_um"):
        plan_slide(SAMPLE_IMAGES / "S01_pre_gag-alcian.svs", Protocol.from_dict(d), mpp=0.25)


def test_positive_fraction_in_row_blocks_equals_the_whole_raster_formula():
    # 1200 rows of 2000 cells: three row blocks of about a million cells each, the last one partial.
    rng = np.random.default_rng(11)
    raster = TotalsRaster((2000, 1200), 4)
    raster.bin_px[...] = rng.integers(1, 5, raster.bin_px.shape, dtype=np.uint16)
    raster.bin_px[:, 5:9, :] = 0  # cells with no measured pixel: NaN
    total = raster.bin_px.sum(axis=0, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = np.where(total > 0, (total - raster.bin_px[0]) / np.maximum(total, 1), np.nan).astype(
            np.float32
        )
    got = raster.positive_fraction()
    assert got.dtype == np.float32 and got.shape == (1200, 2000)
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[5:9]).all() and not np.isnan(got[:5]).any()
    rows, cols = np.array([0, 6, 6, 1199, 500]), np.array([1999, 0, 3, 3])
    np.testing.assert_array_equal(raster.positive_fraction_at(rows, cols), want[np.ix_(rows, cols)])
