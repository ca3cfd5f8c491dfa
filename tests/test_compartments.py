"""cleihc.regions.skin_compartments: epidermis, dermis and depth bands below the DEJ."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest

from cleihc.regions import (
    COMPARTMENT_NAMES,
    CompartmentParams,
    Compartments,
    compartments_from_epidermis,
    skin_compartments,
)

MPP = 2.0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[0] // f * f, a.shape[1] // f * f
    a = a[:h, :w]
    return a.reshape(h // f, f, w // f, f, *a.shape[2:]).mean(axis=(1, 3))


def _dotted_block(seed: int = 0, *, epidermis: bool = True):
    """A tissue block (2 µm/px) whose top 80 µm is a dense layer of nuclei; sparse nuclei below.

    Tissue: rows 20..379, columns 10..289. Epidermis (when present): rows 20..59, so the DEJ lies at y = 60 px.
    """
    rng = np.random.default_rng(seed)
    h, w = 400, 300
    tissue = np.zeros((h, w), bool)
    tissue[20:380, 10:290] = True
    od = np.where(tissue, 0.08, 0.0) + rng.normal(0, 0.01, (h, w))
    yy, xx = np.mgrid[:h, :w]
    epi = np.zeros((h, w), bool)
    if epidermis:
        epi[20:60, 10:290] = True
        od[epi] = 0.14
        # keratinocyte nuclei every ~10 µm (5 px)
        for y in range(22, 59, 5):
            for x in range(12, 289, 5):
                cy, cx = y + rng.integers(-1, 2), x + rng.integers(-1, 2)
                od[(yy - cy) ** 2 + (xx - cx) ** 2 <= 2] = 0.6
    # sparse dermal nuclei (fibroblasts, lymphocytes): ~1 per 40 x 40 µm
    n = int(0.0025 * (~epi & tissue).sum())
    ys = rng.integers(60 if epidermis else 22, 378, n)
    xs = rng.integers(12, 288, n)
    for cy, cx in zip(ys, xs, strict=True):
        od[(yy - cy) ** 2 + (xx - cx) ** 2 <= 2] = 0.6
    od[~tissue] = rng.normal(0, 0.01, (~tissue).sum())
    od.setflags(write=False)
    tissue.setflags(write=False)
    return od, tissue, epi


def test_dotted_block_finds_epidermis_and_exact_depth_bands():
    od, tissue, epi = _dotted_block()
    od_before = od.copy()
    c = skin_compartments(od, tissue, mpp_um=MPP, downsample=8.0)
    np.testing.assert_array_equal(od, od_before)
    assert c.warnings == ()
    assert set(c.masks) == set(COMPARTMENT_NAMES)
    assert _iou(c.masks["epidermis"], epi) >= 0.95
    assert np.array_equal(c.masks["dermis"], tissue & ~c.masks["epidermis"])
    # The depth bands partition the dermis.
    bands = [c.masks[k] for k in ("papillary_dermis", "superficial_dermis", "deep_dermis")]
    assert np.array_equal(bands[0] | bands[1] | bands[2], c.masks["dermis"])
    assert not (bands[0] & bands[1]).any() and not (bands[1] & bands[2]).any()
    # Flat DEJ at y = 60 px: papillary rows 60..134 (75 rows = 150 µm), superficial 135..309 (175 rows), deep
    # 310..379; a junction found within a pixel moves each band edge by at most one row.
    width = 280
    assert abs(bands[0].sum() / width - 75) <= 1.5
    assert abs(bands[1].sum() / width - 175) <= 1.5
    assert abs(bands[2].sum() / width - 70) <= 1.5
    col = 150
    assert bands[0][61:134, col].all() and bands[1][136:309, col].all() and bands[2][311:380, col].all()
    # depth is the distance below the junction
    assert c.depth_um[100, col] == pytest.approx((100 + 0.5 - 60) * MPP, abs=2 * MPP)
    assert np.isnan(c.depth_um[30, col]) and np.isnan(c.depth_um[5, 5])


def test_masks_are_read_only_and_result_frozen():
    od, tissue, _ = _dotted_block()
    c = skin_compartments(od, tissue, mpp_um=MPP, downsample=8.0)
    with pytest.raises(ValueError):
        c.masks["epidermis"][0, 0] = True
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.mpp_um = 1.0  # type: ignore[misc]


def test_no_epidermis_gives_dermis_equal_tissue_and_a_warning():
    od, tissue, _ = _dotted_block(epidermis=False)
    c = skin_compartments(od, tissue, mpp_um=MPP, downsample=8.0)
    assert not c.masks["epidermis"].any()
    assert np.array_equal(c.masks["dermis"], tissue)
    for k in ("papillary_dermis", "superficial_dermis", "deep_dermis"):
        assert not c.masks[k].any()
    assert any("no epidermis" in w for w in c.warnings)
    assert any("depth bands undefined" in w for w in c.warnings)
    assert [r.name for r in c.to_regions()] == ["dermis"]


def test_disabled_and_empty_tissue():
    od, tissue, _ = _dotted_block()
    c = skin_compartments(od, tissue, mpp_um=MPP, downsample=8.0, params=CompartmentParams(enabled=False))
    assert not c.masks["epidermis"].any() and np.array_equal(c.masks["dermis"], tissue)
    assert any("disabled" in w for w in c.warnings)
    empty = skin_compartments(od, np.zeros_like(tissue), mpp_um=MPP, downsample=8.0)
    assert not any(m.any() for m in empty.masks.values())
    assert empty.to_regions() == []


def test_to_regions_and_geojson_in_level0_pixels():
    od, tissue, _ = _dotted_block()
    c = skin_compartments(od, tissue, mpp_um=MPP, downsample=8.0, origin_px=(1000.0, 2000.0))
    regions = c.to_regions()
    assert [r.name for r in regions] == list(COMPARTMENT_NAMES)
    for r in regions:
        assert r.source == "auto"
        assert r.geometry.is_valid
        assert r.geometry.area == c.masks[r.name].sum() * 64.0
    x0, y0, _, _ = regions[0].geometry.bounds
    assert (x0, y0) == (1000.0 + 10 * 8, 2000.0 + 20 * 8)
    fc = c.to_geojson()
    assert fc["type"] == "FeatureCollection"
    assert [f["properties"]["classification"]["name"] for f in fc["features"]] == list(COMPARTMENT_NAMES)


def test_thick_dense_mass_and_small_pieces_are_not_epidermis():
    rng = np.random.default_rng(1)
    tissue = np.zeros((400, 700), bool)
    tissue[20:380, 10:690] = True
    od = np.where(tissue, 0.08, 0.0) + rng.normal(0, 0.01, tissue.shape)
    od[20:300, 150:550] = 0.4  # a dense mass 560 µm deep at the surface: an infiltrate, not epidermis
    c = skin_compartments(od, tissue, mpp_um=MPP, downsample=8.0)
    assert not c.masks["epidermis"].any()
    assert any("too thick" in w for w in c.warnings)
    # the same mass 80 µm deep is a surface layer
    od_thin = np.where(tissue, 0.08, 0.0) + rng.normal(0, 0.01, tissue.shape)
    od_thin[20:60, 150:550] = 0.4
    thin = skin_compartments(od_thin, tissue, mpp_um=MPP, downsample=8.0)
    assert thin.warnings == ()
    assert _iou(thin.masks["epidermis"], np.pad(np.ones((40, 400), bool), ((20, 340), (150, 150)))) > 0.9
    od2, tissue2, _ = _dotted_block(epidermis=False)
    od2 = od2.copy()
    od2[20:40, 100:130] = 0.5  # 40 x 60 µm: below min_epidermis_um2
    c2 = skin_compartments(od2, tissue2, mpp_um=MPP, downsample=8.0)
    assert not c2.masks["epidermis"].any()
    assert any("minimum size" in w for w in c2.warnings)


def test_params_validate_ranges_and_are_simple_toml_types():
    with pytest.raises(ValueError, match="superficial_um"):
        CompartmentParams(papillary_um=600.0, superficial_um=500.0)
    with pytest.raises(ValueError, match="mpp_um"):
        CompartmentParams(mpp_um=0.0)
    with pytest.raises(ValueError, match="min_contrast"):
        CompartmentParams(min_contrast=0.5)
    with pytest.raises(ValueError, match="enabled"):
        CompartmentParams(enabled="yes")  # type: ignore[arg-type]
    hints = typing.get_type_hints(CompartmentParams)
    for f in dataclasses.fields(CompartmentParams):
        assert hints[f.name] in (bool, int, float, str), f.name
    assert CompartmentParams().papillary_um == 150.0 and CompartmentParams().superficial_um == 500.0


def test_bad_arguments_raise():
    od, tissue, _ = _dotted_block()
    with pytest.raises(ValueError):
        skin_compartments(od, tissue[:-1], mpp_um=MPP, downsample=8.0)
    with pytest.raises(ValueError):
        skin_compartments(od, tissue, mpp_um=0.0, downsample=8.0)


# --- against the synthetic skin generator's exact masks ---------------------------------------------------------
STAINS = ("cd3", "cxcl10", "gag-alcian", "gag-colloidal-iron")
RENDER_W, RENDER_H, RENDER_MPP = 600, 800, 1.0  # 600 x 800 µm: deep enough for the deep dermis
BIN = 2  # 1 µm/px rendered, 2 µm/px working resolution


@pytest.fixture(scope="module")
def rendered():
    synthetic = pytest.importorskip("cleihc.synthetic")
    stains = pytest.importorskip("cleihc.stains")
    out = {}
    for stain in STAINS:
        s = synthetic.render_skin(
            stain=stain,
            width_px=RENDER_W,
            height_px=RENDER_H,
            mpp_um=RENDER_MPP,
            seed=3,
            jpeg_quality=None,
            regions_geojson=False,
        )
        matrix = stains.preset(s.truth["stains"]["preset"])
        rgb = np.rint(_block_mean(s.rgb.astype(np.float64), BIN)).astype(np.uint8)
        od = stains.deconvolve(rgb, matrix)[..., matrix.names.index(s.truth["stains"]["counterstain"])]
        tissue = _block_mean(s.tissue_mask.astype(np.float64), BIN) > 0.5
        truth = {k: _block_mean(v.astype(np.float64), BIN) > 0.5 for k, v in s.region_masks.items()}
        out[stain] = (od, tissue, truth, s.mpp_um * BIN)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stain", STAINS)
def test_compartments_match_synthetic_truth(rendered, stain):
    od, tissue, truth, mpp = rendered[stain]
    c = skin_compartments(od, tissue, mpp_um=mpp, downsample=float(BIN))
    assert c.warnings == ()
    assert _iou(c.masks["epidermis"], truth["epidermis"]) >= 0.8
    assert _iou(c.masks["dermis"], truth["dermis"]) >= 0.9
    for band in ("papillary_dermis", "superficial_dermis", "deep_dermis"):
        assert truth[band].sum() > 1000, band  # the scene is deep enough for every band
        assert c.masks[band].sum() / truth[band].sum() == pytest.approx(1.0, abs=0.10), band


@pytest.mark.slow
@pytest.mark.parametrize("stain", ("cd3", "gag-alcian"))
def test_synthetic_dermis_without_epidermis_is_recognised(rendered, stain):
    od, tissue, truth, mpp = rendered[stain]
    rows = np.flatnonzero(truth["epidermis"].any(axis=1))
    cut = rows[-1] + 10  # a section cut below the deepest rete ridge: dermis only
    c = skin_compartments(od[cut:], tissue[cut:], mpp_um=mpp, downsample=float(BIN))
    assert not c.masks["epidermis"].any()
    assert np.array_equal(c.masks["dermis"], tissue[cut:])
    assert any("no epidermis" in w for w in c.warnings)


def test_compartments_type_is_exported():
    assert Compartments.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_air_margin_does_not_change_the_result():
    od, tissue, _ = _dotted_block(seed=2)
    c = skin_compartments(od, tissue, mpp_um=MPP, downsample=8.0)
    pad = ((37, 11), (5, 60))
    big = skin_compartments(np.pad(od, pad), np.pad(tissue, pad), mpp_um=MPP, downsample=8.0)
    for name in COMPARTMENT_NAMES:
        np.testing.assert_array_equal(big.masks[name][37:-11, 5:-60], c.masks[name])
        assert big.masks[name].sum() == c.masks[name].sum()


def test_compartments_from_a_user_epidermis():
    _, tissue, epi = _dotted_block()
    user_epi = epi.copy()
    user_epi[60:70, :] |= tissue[60:70, :]  # the user drew the junction 20 µm lower
    c = compartments_from_epidermis(user_epi, tissue, mpp_um=MPP, downsample=8.0)
    assert c.warnings == ()
    np.testing.assert_array_equal(c.masks["epidermis"], user_epi & tissue)
    np.testing.assert_array_equal(c.masks["dermis"], tissue & ~user_epi)
    width = 280
    assert c.masks["papillary_dermis"].sum() == 75 * width  # rows 70..144 exactly
    assert c.masks["papillary_dermis"][70:145, 10:290].all()
    assert c.masks["superficial_dermis"].sum() == 175 * width
    assert c.masks["deep_dermis"].sum() == (380 - 320) * width
    none = compartments_from_epidermis(np.zeros_like(tissue), tissue, mpp_um=MPP, downsample=8.0)
    assert not none.masks["epidermis"].any() and any("does not overlap" in w for w in none.warnings)


def test_distance_and_median_helpers_equal_scipy():
    # The lean helpers (edt's float32 transform, a median over the chosen labels only) stand in for scipy's.
    from scipy import ndimage as ndi

    from cleihc.regions import _distance_um, _median_by_label

    rng = np.random.default_rng(7)
    mask = ~ndi.binary_dilation(rng.random((300, 420)) > 0.999, iterations=9)
    for mpp in (0.5, 4.0, 6.12):
        d = _distance_um(mask, mpp)
        assert d.dtype == np.float32
        np.testing.assert_allclose(d, ndi.distance_transform_edt(mask, sampling=mpp), rtol=1e-6, atol=1e-4)
    labels, n = ndi.label(ndi.binary_opening(mask))
    values = rng.random(mask.shape).astype(np.float32)
    ids = np.arange(1, n + 1)[::2]
    assert len(ids) >= 1
    np.testing.assert_allclose(
        _median_by_label(values, labels, ids), ndi.median(values, labels, ids), rtol=1e-7
    )
    single = np.zeros((5, 5), np.int32)
    single[2, 3], single[0, 0:2] = 1, 2  # one pixel; two pixels (mean of both)
    np.testing.assert_allclose(
        _median_by_label(values[:5, :5], single, np.array([1, 2])),
        [values[2, 3], values[0, :2].mean()],
        rtol=1e-6,
    )
