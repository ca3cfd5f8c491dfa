"""Stain matrices, colour deconvolution exactness, fused area counts, background and stain vector estimation."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cleihc import stains
from cleihc.errors import CleihcError, StainDriftError
from cleihc.stains import StainMatrix
from cleihc_testdata import shared_file


def reference_conc(rgb: np.ndarray, m: StainMatrix, background=None) -> np.ndarray:
    """The defining formula in float64."""
    bg = np.asarray(m.background_rgb if background is None else background, dtype=np.float64)
    od = -np.log10(np.maximum(rgb.astype(np.float64), 1.0) / bg)
    return od @ np.linalg.inv(m.od_vectors)


def random_rgb(shape=(67, 53), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    img[0, :] = 0  # the extremes: OD of 0 uses max(I, 1)
    img[1, :] = 255
    img[2, ::2] = (0, 255, 0)
    return img


# ---------------------------------------------------------------------------------------------- StainMatrix
def test_every_preset_has_unit_rows_and_inverse():
    for name in stains.available_presets():
        m = stains.preset(name)
        assert len(m.names) == 3
        np.testing.assert_allclose(np.linalg.norm(m.od_vectors, axis=1), 1.0, atol=1e-12)
        np.testing.assert_allclose(m.od_vectors @ m.conc_from_od, np.eye(3), atol=1e-10)
        assert m.od_from_conc is m.od_vectors


def test_residual_is_unit_cross_product():
    m = stains.preset("hdab")
    assert m.names == ("hematoxylin", "dab", "residual")
    h, d = stains.stain_vector("hematoxylin"), stains.stain_vector("dab")
    cross = np.cross(h, d)
    np.testing.assert_allclose(m.vector("residual"), cross / np.linalg.norm(cross), atol=1e-12)
    assert m.stain_names == ("hematoxylin", "dab")
    assert m.index("dab") == 1


def test_preset_vectors_match_published_sources():
    # Ruifrok & Johnston H DAB as in scikit-image's rgb_from_hdx, and Landini's Alcian blue & H.
    from skimage.color import colorconv

    m = stains.preset("hdab")
    for k in range(2):
        ref = colorconv.rgb_from_hdx[k] / np.linalg.norm(colorconv.rgb_from_hdx[k])
        assert stains.angle_deg(m.od_vectors[k], ref) < 1e-6
    a = stains.preset("alcian_h")
    assert stains.angle_deg(a.vector("alcian_blue"), colorconv.rgb_from_ahx[0]) < 1e-6
    # QuPath's default DAB (0.269, 0.568, 0.778) is within half a degree of ours.
    assert stains.angle_deg(m.vector("dab"), (0.269, 0.568, 0.778)) < 0.5
    # Colloidal iron (Prussian blue): red OD > green OD > blue OD.
    ci = stains.stain_vector("colloidal_iron")
    assert ci[0] > ci[1] > ci[2] > 0


def test_unknown_preset_lists_available():
    with pytest.raises(CleihcError, match="hdab") as exc:
        stains.preset("nope")
    assert "\n" not in str(exc.value)
    with pytest.raises(CleihcError, match="no stain named"):
        stains.preset("hdab").index("eosin")


@pytest.mark.parametrize(
    ("names", "vectors", "match"),
    [
        (("a", "b"), [[1, 0, 0], [1, 0, 0]], "parallel"),
        (("a", "b"), [[1, 0, 0], [0, 0, 0]], "zero"),
        (("a", "b"), [[1, 0, 0], [0, -1, 0.5]], "negative"),
        (("a",), [[1, 0, 0]], "2 or 3"),
        (("a", "a"), [[1, 0, 0], [0, 1, 0]], "unique"),
        (("a", "b", "c"), [[1, 0, 0], [0, 1, 0], [1, 1, 0]], "coplanar"),
        (("a", "b"), [[1, 0, np.nan], [0, 1, 0]], "finite"),
    ],
)
def test_invalid_stain_matrix(names, vectors, match):
    with pytest.raises(CleihcError, match=match):
        StainMatrix(names, np.asarray(vectors, dtype=float))


def test_background_validation_and_dict_round_trip():
    m = stains.preset("he").with_background((240, 238.5, 250))
    assert m.background_rgb == (240.0, 238.5, 250.0)
    back = StainMatrix.from_dict(m.to_dict())
    assert back == m and hash(back) == hash(m)
    assert StainMatrix.from_dict(stains.preset("hdab").to_dict()).names[2] == "residual"
    with pytest.raises(CleihcError, match=r"1\.\.255"):
        m.with_background((0, 255, 255))
    with pytest.raises(CleihcError, match="record"):
        StainMatrix.from_dict({"names": ["a"]})
    with pytest.raises(ValueError):
        m.od_vectors[0, 0] = 1.0  # read-only
    import pickle

    again = pickle.loads(pickle.dumps(m))
    assert again == m and np.array_equal(again.conc_from_od, m.conc_from_od)
    assert not again.od_vectors.flags.writeable


# ---------------------------------------------------------------------------------------------- deconvolve
def test_od_lut_values():
    lut = stains.od_lut((250, 255, 200))
    assert lut.dtype == np.float32 and lut.shape == (3, 256)
    assert lut[0, 0] == np.float32(np.log10(250.0))  # value 0 treated as 1
    assert lut[1, 255] == 0.0
    assert lut[2, 255] == np.float32(-np.log10(255 / 200))


def test_deconvolve_exact_on_real_ihc_image():
    from skimage import io

    rgb = io.imread(shared_file("skimage_ihc", "ihc.png"))[..., :3]
    m = stains.preset("hdab")
    got = stains.deconvolve(rgb, m)
    assert got.dtype == np.float32 and got.shape == rgb.shape
    assert np.abs(got - reference_conc(rgb, m)).max() < 1e-4
    # The image has real DAB: a few percent of pixels above 0.2 OD, and hematoxylin nuclei.
    # The image is strongly DAB-stained: over half the pixels above 0.2 OD, little residual.
    assert 0.5 < (got[..., 1] > 0.2).mean() < 0.7
    assert 0.05 < (got[..., 0] > 0.2).mean() < 0.15
    assert (got[..., 2] > 0.2).mean() < 0.01


@pytest.mark.parametrize("preset_name", ["hdab", "he", "alcian_nfr", "colloidal_iron_nfr"])
def test_deconvolve_exact_random_and_views(preset_name):
    m = stains.preset(preset_name, background_rgb=(243, 240, 251))
    rgb = random_rgb()
    before = rgb.copy()
    np.testing.assert_array_less(np.abs(stains.deconvolve(rgb, m) - reference_conc(rgb, m)), 1e-4)
    # non-contiguous views: strided rows/cols, reversed channels, transposed
    for view in (rgb[::2, ::3], rgb[:, :, ::-1], rgb.transpose(1, 0, 2), rgb[5:40, 7:30]):
        assert not view.flags.c_contiguous
        assert np.abs(stains.deconvolve(view, m) - reference_conc(view, m)).max() < 1e-4
    np.testing.assert_array_equal(rgb, before)


def test_deconvolve_background_argument_and_out_buffer():
    m = stains.preset("hdab")
    rgb = random_rgb((20, 30), seed=3)
    out = np.full((20, 30, 3), np.nan, dtype=np.float32)
    res = stains.deconvolve(rgb, m, background=(230, 231, 232), out=out)
    assert res is out
    assert np.abs(out - reference_conc(rgb, m, (230, 231, 232))).max() < 1e-4
    with pytest.raises(ValueError, match="float32"):
        stains.deconvolve(rgb, m, out=np.empty((20, 30, 3), np.float64))
    with pytest.raises(ValueError, match="uint8"):
        stains.deconvolve(rgb.astype(np.float32), m)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        stains.deconvolve(rgb[..., :2], m)


def test_concentration_is_bit_identical_to_deconvolve_channel():
    m = stains.preset("hdab")
    rgb = random_rgb((31, 17), seed=5)
    full = stains.deconvolve(rgb, m)
    for k, name in enumerate(m.names):
        np.testing.assert_array_equal(stains.concentration(rgb, m, stain=name), full[..., k])


def test_concentrations_planes_equal_their_own_concentration():
    m = stains.preset("hdab")
    rgb = random_rgb((31, 17), seed=6)[::-1]  # a negative-stride view is read as is
    full = stains.deconvolve(rgb, m)
    for names in (
        ("dab",),
        ("hematoxylin", "dab"),
        ("dab", "hematoxylin", "residual"),
        ("residual", "residual"),
    ):
        planes = stains.concentrations(rgb, m, names=names)
        assert planes.shape == (len(names), 31, 17) and planes.dtype == np.float32
        for plane, name in zip(planes, names, strict=True):
            np.testing.assert_array_equal(plane, full[..., m.index(name)])
    with pytest.raises(ValueError, match="at least one"):
        stains.concentrations(rgb, m, names=())


def test_agrees_with_skimage_separate_stains():
    # skimage: stains = max(0, ln(I/255) / ln(1e-6) @ inv(M_sk)) with unnormalised rows M_sk.
    # ln(x)/ln(1e-6) = OD/6, and scaling row k of M by s_k scales column k of the inverse by 1/s_k, so
    # skimage = max(0, ours / (6 * s_k)) for pixels with no zero channel (skimage clips I at 1e-6, ours at 1).
    from skimage import io
    from skimage.color import colorconv, separate_stains

    rgb = io.imread(shared_file("skimage_ihc", "ihc.png"))[..., :3]
    m = stains.preset("hdab")
    ours = stains.deconvolve(rgb, m).astype(np.float64)
    sk = separate_stains(rgb, colorconv.hdx_from_rgb)
    s = np.linalg.norm(colorconv.rgb_from_hdx[:2], axis=1)
    valid = rgb.min(axis=2) > 0
    expected = np.maximum(ours[..., :2] / (6 * s), 0)
    assert np.abs(expected - sk[..., :2])[valid].max() < 2e-5


def test_recompose_round_trip():
    m = stains.preset("hdab", background_rgb=(250, 248, 252))
    rng = np.random.default_rng(1)
    conc = rng.uniform(0, 1.0, (40, 40, 3))
    conc[..., 2] = 0
    rgb = stains.recompose(conc, m)
    assert rgb.dtype == np.uint8
    back = stains.deconvolve(rgb, m)
    # 8-bit rounding: |dOD| <= log10(1 + 0.5/I) per channel; I >= 250 * 10**-2.3 ~ 1.25 for these concentrations.
    bright = rgb.min(axis=2) >= 20
    assert np.abs(back[..., :2] - conc[..., :2])[bright].max() < 0.03
    # and pixel-exact the other way: recompose(deconvolve(rgb)) == rgb where no channel is 0 or saturated
    rgb2 = random_rgb((30, 30), seed=9)
    rgb2 = np.clip(rgb2, 1, 250).astype(np.uint8)
    again = stains.recompose(stains.deconvolve(rgb2, m), m)
    assert np.abs(again.astype(int) - rgb2).max() <= 1


# ---------------------------------------------------------------------------------------------- area_counts
def area_counts_numpy(rgb, m, target, bits, n_regions, thresholds):
    conc = stains.concentration(rgb, m, stain=target).astype(np.float64)
    n_bins = len(thresholds) + 1
    counts = np.zeros((n_regions, n_bins), np.int64)
    pos = np.zeros(n_regions)
    total = np.zeros(n_regions)
    bins = np.searchsorted(np.asarray(thresholds), conc, side="right")
    for r in range(n_regions):
        inside = (bits >> r) & 1 == 1
        counts[r] = np.bincount(bins[inside], minlength=n_bins)
        total[r] = conc[inside].sum()
        pos[r] = conc[inside & (conc >= thresholds[0])].sum()
    return counts, pos, total


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32])
def test_area_counts_matches_numpy(dtype):
    rng = np.random.default_rng(7)
    rgb = random_rgb((90, 70), seed=11)
    m = stains.preset("hdab", background_rgb=(245, 245, 250))
    bits = np.zeros((90, 70), dtype)
    bits[10:80, 5:60] |= 1  # "tissue"
    bits[20:50, 5:60] |= 2  # overlapping "dermis"
    bits |= (rng.random((90, 70)) < 0.3).astype(dtype) << 2  # scattered region 2
    thresholds = (0.2, 0.4, 0.6)
    got = stains.area_counts(rgb, m, target="dab", region_bits=bits, n_regions=3, thresholds_od=thresholds)
    counts, pos, total = area_counts_numpy(rgb, m, "dab", bits, 3, thresholds)
    np.testing.assert_array_equal(got.counts, counts)
    np.testing.assert_allclose(got.positive_od_sum, pos, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(got.od_sum, total, rtol=1e-12, atol=1e-9)
    assert got.counts[0].sum() == 70 * 55


def test_area_counts_accumulates_over_tiles_and_views():
    rgb = random_rgb((64, 64), seed=2)
    m = stains.preset("hdab")
    bits = np.ones((64, 64), np.uint32)
    whole = stains.area_counts(rgb, m, target="dab", region_bits=bits, n_regions=1, thresholds_od=(0.3,))
    acc = None
    for y in (0, 32):
        for x in (0, 32):
            acc = stains.area_counts(
                rgb[y : y + 32, x : x + 32],
                m,
                target="dab",
                region_bits=bits[y : y + 32, x : x + 32],
                n_regions=1,
                thresholds_od=(0.3,),
                accumulate=acc,
            )
    np.testing.assert_array_equal(acc.counts, whole.counts)
    np.testing.assert_allclose(acc.positive_od_sum, whole.positive_od_sum, rtol=1e-12)
    with pytest.raises(ValueError, match="increasing"):
        stains.area_counts(rgb, m, target="dab", region_bits=bits, n_regions=1, thresholds_od=(0.4, 0.2))
    with pytest.raises(ValueError, match="n_regions"):
        stains.area_counts(rgb, m, target="dab", region_bits=bits, n_regions=33, thresholds_od=(0.2,))


# ---------------------------------------------------------------------------------------------- estimation
def synthetic_two_stain(
    m: StainMatrix, *, background=(238, 234, 246), seed=0, shape=(160, 160), glass_rows=40
):
    """Tissue rows mixing the two stains (each pixel mostly one stain), glass rows at the top; noise sd 1.5."""
    rng = np.random.default_rng(seed)
    h, w = shape
    conc = np.zeros((h, w, 3))
    which = rng.random((h, w)) < 0.5
    amount = rng.uniform(0.1, 1.2, (h, w))
    conc[..., 0] = np.where(which, amount, amount * rng.uniform(0, 0.15, (h, w)))
    conc[..., 1] = np.where(~which, amount, amount * rng.uniform(0, 0.15, (h, w)))
    conc[:glass_rows] = 0
    rgb = stains.recompose(conc, m, background=background).astype(np.float64)
    rgb += rng.normal(0, 1.5, rgb.shape)
    tissue = np.zeros((h, w), bool)
    tissue[glass_rows:] = True
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8), tissue


@pytest.mark.parametrize("preset_name", ["hdab", "alcian_nfr", "he", "colloidal_iron_nfr"])
def test_macenko_recovers_known_vectors(preset_name):
    truth = stains.preset(preset_name)
    rgb, tissue = synthetic_two_stain(truth)
    bg = stains.estimate_background(rgb)
    est = stains.estimate_macenko(rgb, background=bg, reference=truth, tissue_mask=tissue)
    assert est.names == truth.names
    for name in truth.stain_names:
        assert stains.angle_deg(est.vector(name), truth.vector(name)) < 2.0
    # order follows the reference even when given swapped
    swapped = StainMatrix(truth.names[1::-1], truth.od_vectors[1::-1])
    est2 = stains.estimate_macenko(rgb[tissue], background=bg, reference=swapped)  # a pixel list
    assert est2.names[:2] == swapped.names[:2]
    assert stains.angle_deg(est2.od_vectors[0], swapped.od_vectors[0]) < 2.0


def test_macenko_too_few_pixels():
    rgb = np.full((20, 20, 3), 240, np.uint8)
    with pytest.raises(CleihcError, match="stained pixels"):
        stains.estimate_macenko(rgb, background=(240, 240, 240), reference=stains.preset("hdab"))


def test_estimate_background_known_glass():
    m = stains.preset("hdab")
    rgb, tissue = synthetic_two_stain(m, background=(238, 234, 246), seed=4)
    bg = stains.estimate_background(rgb)
    np.testing.assert_allclose(bg, (238, 234, 246), atol=1.0)
    bg2 = stains.estimate_background(rgb, tissue_mask=tissue)
    np.testing.assert_allclose(bg2, (238, 234, 246), atol=1.0)
    # no glass: raise, or fall back with a warning
    no_glass = rgb[60:]
    with pytest.raises(CleihcError, match="glass"):
        stains.estimate_background(no_glass, tissue_mask=np.ones(no_glass.shape[:2], bool))
    fb = stains.estimate_background(
        no_glass, tissue_mask=np.ones(no_glass.shape[:2], bool), fallback=(250, 250, 250)
    )
    np.testing.assert_array_equal(fb, (250, 250, 250))


def test_estimate_from_regions_recovers_vectors():
    m = stains.preset("alcian_nfr", background_rgb=(245, 245, 245))
    rng = np.random.default_rng(0)
    pixels = {}
    for k, name in enumerate(m.stain_names):
        conc = np.zeros((50, 50, 3))
        conc[..., k] = rng.uniform(0.2, 1.0, (50, 50))
        pixels[name] = stains.recompose(conc, m)
    est = stains.estimate_from_regions(pixels, background=(245, 245, 245))
    assert est.names == m.names
    for name in m.stain_names:
        assert stains.angle_deg(est.vector(name), m.vector(name)) < 1.0
    with pytest.raises(CleihcError, match="2 or 3"):
        stains.estimate_from_regions({"a": pixels["alcian_blue"]}, background=(245, 245, 245))


def test_check_drift_warns_or_fails(caplog):
    ref = stains.preset("hdab")
    tilted = StainMatrix(ref.names[:2], ref.od_vectors[:2] + np.array([[0.0, 0.0, 0.1], [0.0, 0.0, 0.0]]))
    angles = stains.drift_angles(tilted, ref)
    assert set(angles) == {"hematoxylin", "dab"}
    assert angles["dab"] < 1e-9 and 3 < angles["hematoxylin"] < 10
    assert stains.check_drift(tilted, ref, tolerance_deg=10, action="fail") == ""
    with caplog.at_level(logging.WARNING, logger="cleihc.stains"):
        msg = stains.check_drift(tilted, ref, tolerance_deg=1, action="warn")
    assert "hematoxylin" in caplog.text and "hematoxylin" in msg and "dab" not in msg
    with pytest.raises(StainDriftError, match="hematoxylin"):
        stains.check_drift(tilted, ref, tolerance_deg=1, action="fail")


def test_angle_deg():
    assert stains.angle_deg((1, 0, 0), (0, 1, 0)) == pytest.approx(90)
    assert stains.angle_deg((1, 1, 0), (2, 2, 0)) == pytest.approx(0, abs=1e-6)


def test_agrees_with_histomicstk_color_deconvolution():
    # HistomicsTK's StainsFloat is each stain's intensity alone: 255 * 10**-conc with I0 = 255 (same unit rows).
    htk = pytest.importorskip("histomicstk.preprocessing.color_deconvolution")
    from skimage import io

    rgb = io.imread(shared_file("skimage_ihc", "ihc.png"))[..., :3]
    m = stains.preset("hdab")
    res = htk.color_deconvolution(rgb, m.od_vectors.T.copy(), I_0=255)
    ours = stains.deconvolve(rgb, m).astype(np.float64)
    valid = rgb.min(axis=2) > 0  # HistomicsTK clips I at 1e-10, cleihc at 1
    for k in range(2):
        assert np.abs(255 * 10 ** -ours[..., k] - res.StainsFloat[..., k])[valid].max() < 1e-2


def _background_by_sorting(rgb, tissue_mask, *, max_saturation, window, min_pixels):
    """estimate_background's definition, literally: candidates, their 99.5th grey percentile, channel medians."""
    flat = rgb.reshape(-1, 3).astype(np.int64)
    mx, mn = flat.max(axis=1), flat.min(axis=1)
    cand = ((mx - mn) <= max_saturation * mx) & (mx > 0)
    if tissue_mask is not None:
        cand &= ~tissue_mask.reshape(-1)
    pix = flat[cand]
    if len(pix) < min_pixels:
        return None
    grey = pix.sum(axis=1) / 3.0
    glass = pix[grey >= np.percentile(grey, 99.5) - window]
    if len(glass) < min_pixels:
        return None
    return np.clip(np.median(glass.astype(np.float64), axis=0), 1.0, 255.0)


@pytest.mark.parametrize("seed", range(12))
def test_estimate_background_equals_sorting_definition(seed):
    # The counts-based estimate is exact: the same percentile interpolation and medians (even counts included)
    # as sorting every candidate pixel, bit for bit.
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(8, 120, size=2))
    base = rng.integers(150, 256, size=3)
    rgb = np.clip(base + rng.normal(0, rng.uniform(0.5, 8), (h, w, 3)), 0, 255).astype(np.uint8)
    rgb[: h // 3] = rng.integers(0, 256, (h // 3, w, 3), dtype=np.uint8)  # tissue-like clutter
    tissue = rng.random((h, w)) < 0.3 if seed % 2 else None
    kw = dict(
        max_saturation=float(rng.choice([0.05, 0.12, 0.3])),
        window=int(rng.integers(0, 15)),
        min_pixels=int(rng.integers(1, 60)),
    )
    want = _background_by_sorting(rgb, tissue, **kw)
    if want is None:
        with pytest.raises(CleihcError, match="glass"):
            stains.estimate_background(rgb, tissue_mask=tissue, **kw)
    else:
        np.testing.assert_array_equal(stains.estimate_background(rgb, tissue_mask=tissue, **kw), want)


def _fit_oracle(rgb, m, *, target, positive_od, angle_deg=15.0):
    """Float64 reference of stain_fit: positive by the target's concentration, off the plane by the angle."""
    od = -np.log10(np.maximum(rgb.reshape(-1, 3).astype(float), 1.0) / np.asarray(m.background_rgb))
    pos = od @ m.conc_from_od[:, m.index(target)] >= positive_od
    sin_off = np.abs(od @ m.vector("residual")) / np.maximum(np.linalg.norm(od, axis=1), 1e-12)
    return int(pos.sum()), int((pos & (sin_off > np.sin(np.radians(angle_deg)))).sum())


def test_stain_fit_counts_colours_off_the_stains_plane():
    hd = stains.preset("hdab", background_rgb=(245, 243, 247))
    eosin = stains.preset("he").vector("eosin")
    # 300 brown-and-blue cells (in the plane), 200 blue nuclei (not DAB-positive), 100 pink (eosin: read as
    # "DAB" 0.31 OD, 32 degrees off the hematoxylin-DAB plane) and 50 glass pixels.
    conc = np.zeros((650, 3))
    conc[:300] = (0.4, 0.5, 0.0)
    conc[300:500] = (0.6, 0.0, 0.0)
    od = conc @ hd.od_vectors
    od[500:600] = 0.8 * eosin
    rgb = np.round(np.asarray(hd.background_rgb) * 10.0**-od).astype(np.uint8).reshape(26, 25, 3)
    before = rgb.copy()
    fit = stains.stain_fit(rgb, hd, target="dab", positive_od=0.2)
    assert fit == stains.StainFit(400, 100, 15.0)
    assert fit == (*_fit_oracle(rgb, hd, target="dab", positive_od=0.2), 15.0)
    assert fit.off_plane_fraction == 0.25 and not fit.explained
    np.testing.assert_array_equal(rgb, before)
    # Without the pink pixels (the mask leaves them out) the slide is explained by its stains.
    mask = np.ones(650, bool)
    mask[500:600] = False
    fit = stains.stain_fit(rgb, hd, target="dab", positive_od=0.2, tissue_mask=mask.reshape(26, 25))
    assert fit == (300, 0, 15.0) and fit.explained
    # A narrower angle counts what a wider one lets through; the hematoxylin target counts its own positives.
    assert stains.stain_fit(rgb, hd, target="dab", positive_od=0.2, angle_deg=40.0).off_plane_px == 0
    h_fit = stains.stain_fit(rgb, hd, target="hematoxylin", positive_od=0.3)
    assert h_fit == (*_fit_oracle(rgb, hd, target="hematoxylin", positive_od=0.3), 15.0)


def test_stain_fit_edge_cases():
    hd = stains.preset("hdab")
    glass = np.full((30, 30, 3), 255, np.uint8)
    fit = stains.stain_fit(glass, hd, target="dab", positive_od=0.2)
    assert fit == (0, 0, 15.0) and np.isnan(fit.off_plane_fraction) and fit.explained
    # Too few positive pixels to judge: explained, whatever their colour.
    pink = np.tile(np.array([200, 60, 150], np.uint8), (10, 10, 1))
    few = stains.stain_fit(pink, hd, target="dab", positive_od=0.2)
    assert few.positive_px == few.off_plane_px == 100 and few.explained
    # Three real stains explain every colour: nothing is off a plane.
    three = StainMatrix(
        ("hematoxylin", "eosin", "dab"), np.vstack([stains.preset("he").od_vectors[:2], hd.vector("dab")])
    )
    assert stains.stain_fit(pink, three, target="dab", positive_od=-10.0) == (100, 0, 15.0)
    with pytest.raises(ValueError, match="angle_deg"):
        stains.stain_fit(pink, hd, target="dab", positive_od=0.2, angle_deg=95.0)
    with pytest.raises(ValueError, match="tissue_mask shape"):
        stains.stain_fit(pink, hd, target="dab", positive_od=0.2, tissue_mask=np.ones((3, 3), bool))
    with pytest.raises(CleihcError, match="no stain named"):
        stains.stain_fit(pink, hd, target="alcian", positive_od=0.2)


def _overview(path, factor=8):
    from PIL import Image

    if path.suffix == ".svs":
        import openslide

        with openslide.OpenSlide(path) as s:
            im = s.read_region((0, 0), 0, s.dimensions).convert("RGB")
    else:
        im = Image.open(path).convert("RGB")
    return np.asarray(im.resize((im.width // factor, im.height // factor), Image.BOX))


def test_stain_fit_on_real_images():
    """Real H-DAB images are explained by hematoxylin + DAB (at most 1.7 % of DAB-positive pixels off the plane at
    full resolution, none at an overview's); an H&E slide is not (its eosin reads as DAB)."""
    hd = stains.preset("hdab")
    ihc = [
        shared_file("skimage_ihc", "ihc.png"),
        *sorted(shared_file("bcdata_ki67_sample", "1.images", "test").glob("*.png")),
        *sorted(shared_file("nuclick_ihc_lyon19_minitest", "images").glob("*.jpg")),
        *sorted(shared_file("dab_analyzer_samples", "images").glob("*.jpg")),
    ]
    assert len(ihc) > 50
    for path in ihc:
        for factor in (1, 8):
            fit = stains.stain_fit(_overview(path, factor), hd, target="dab", positive_od=0.2)
            assert fit.off_plane_fraction < 0.02 or fit.positive_px < stains.OFF_PLANE_MIN_PX, (
                path,
                factor,
                fit,
            )
            assert fit.explained
    he = _overview(shared_file("cmu1_small_region_svs", "CMU-1-Small-Region.svs"))
    fit = stains.stain_fit(he, hd, target="dab", positive_od=0.2)
    assert fit.positive_px > 10_000 and fit.off_plane_fraction > 0.12 and not fit.explained


def test_stain_fit_melanin_is_not_another_stain():
    """Melanin (neutral brown, about 3 degrees off the hematoxylin-DAB plane) must not make a pigmented CD3 skin
    slide look stained otherwise."""
    from cleihc import synthetic

    syn = synthetic.render_skin(
        stain="cd3", width_px=700, height_px=600, seed=3, params=synthetic.SkinParams(melanin=1.0)
    )
    m = stains.preset("hdab", background_rgb=tuple(syn.truth["stains"]["background_rgb"]))
    fit = stains.stain_fit(syn.rgb, m, target="dab", positive_od=0.2)
    assert fit.positive_px > 2000 and fit.off_plane_px == 0


def sparse_target(truth: StainMatrix, *, pure_fraction: float, seed: int = 0) -> np.ndarray:
    """Pixels (N, 3) of an IHC-like image: the counterstain everywhere (with a faint target), a few per cent of
    pixels mixing both (membrane ring edges) and only `pure_fraction` nearly pure target."""
    rng = np.random.default_rng(seed)
    n = 200_000
    conc = np.zeros((n, 1, 3))
    conc[:, 0, 0] = rng.uniform(0.1, 0.8, n)
    conc[:, 0, 1] = rng.uniform(0.0, 0.03, n)
    k_mix, k_pure = int(0.03 * n), int(pure_fraction * n)
    mix = slice(0, k_mix)
    conc[mix, 0, 1] = rng.uniform(0.3, 0.9, k_mix)
    conc[mix, 0, 0] = conc[mix, 0, 1] * rng.uniform(0.3, 1.0, k_mix)
    pure = slice(k_mix, k_mix + k_pure)
    conc[pure, 0, 1] = rng.uniform(0.4, 0.9, k_pure)
    conc[pure, 0, 0] = conc[pure, 0, 1] * rng.uniform(0.0, 0.05, k_pure)
    rgb = stains.recompose(conc, truth).astype(np.float64) + rng.normal(0, 1.0, (n, 1, 3))
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8).reshape(-1, 3)


def test_macenko_finds_a_sparse_target_stain():
    # 0.3 % of the pixels are nearly pure DAB, 3 % mix DAB with hematoxylin (like blurred CD3 membrane rings).
    # Macenko's 99th percentile of all angles fell among the mixes: DAB 11.3 degrees towards hematoxylin. Alpha
    # taken of each stain's side of the plane finds the pure pixels.
    truth = stains.preset("hdab")
    px = sparse_target(truth, pure_fraction=0.003)
    est = stains.estimate_macenko(px, background=(255, 255, 255), reference=truth)
    assert stains.angle_deg(est.vector("dab"), truth.vector("dab")) < 1.5
    assert stains.angle_deg(est.vector("hematoxylin"), truth.vector("hematoxylin")) < 1.5
    # abundant stains (the old test images) are unchanged in accuracy; see test_macenko_recovers_known_vectors


def test_macenko_keeps_a_third_reference_stain():
    truth = stains.preset("hdab")
    rgb, tissue = synthetic_two_stain(truth)
    three = StainMatrix(
        ("hematoxylin", "dab", "eosin"), [*truth.od_vectors[:2], stains.stain_vector("eosin")]
    )
    est = stains.estimate_macenko(
        rgb, background=stains.estimate_background(rgb), reference=three, tissue_mask=tissue
    )
    assert est.names == ("hematoxylin", "dab", "eosin")
    np.testing.assert_array_equal(est.vector("eosin"), three.vector("eosin"))
    for name in ("hematoxylin", "dab"):
        assert stains.angle_deg(est.vector(name), truth.vector(name)) < 2.0
