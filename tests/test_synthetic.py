"""Tests of the synthetic slide generator, its writers and the committed sample set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import shapely.geometry
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from cleihc.errors import CleihcError
from cleihc.stains import deconvolve, preset
from cleihc.synthetic import (
    STAINS,
    SkinParams,
    _Scene,
    render_skin,
    sample_specs,
    truth_path_for,
    write_large_synthetic_svs,
    write_ome_tiff,
    write_svs,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"

CLEAN = SkinParams(blur_sigma_px=0.0, noise_sigma=0.0)


@pytest.fixture(scope="module")
def cd3_slide():
    return render_skin(stain="cd3", width_px=500, height_px=1400, seed=7, jpeg_quality=90)


def test_same_seed_same_bytes_other_seed_differs():
    a = render_skin(stain="cxcl10", width_px=300, height_px=260, seed=3)
    b = render_skin(stain="cxcl10", width_px=300, height_px=260, seed=3)
    c = render_skin(stain="cxcl10", width_px=300, height_px=260, seed=4)
    assert a.rgb.tobytes() == b.rgb.tobytes()
    assert np.array_equal(a.target_conc, b.target_conc)
    assert a.truth == b.truth
    assert not np.array_equal(a.rgb, c.rgb)


@pytest.mark.parametrize("stain", STAINS)
def test_beer_lambert_exact_without_blur_noise_jpeg(stain):
    sl = render_skin(stain=stain, width_px=400, height_px=500, seed=11, jpeg_quality=None, params=CLEAN)
    t = sl.truth["stains"]
    sm = preset(t["preset"], background_rgb=t["background_rgb"])
    conc = deconvolve(sl.rgb, sm)
    target = conc[..., sm.index(t["target"])]
    # Dark pixels lose precision to 8-bit rounding (OD step 0.5/I): compare where every channel is >= 40.
    ok = sl.rgb.min(axis=2) >= 40
    assert ok.mean() > 0.95
    assert np.abs(target[ok] - sl.target_conc[ok]).max() < 1e-2
    # glass deconvolves to zero of every stain
    glass = ~sl.tissue_mask
    assert np.abs(conc[glass]).max() < 1e-2


def test_target_gap_straddles_threshold(cd3_slide):
    t = cd3_slide.truth
    gap = t["target_od_gap"]
    assert gap["max_below_threshold"] <= SkinParams().background_target_od + 1e-6
    assert gap["min_at_or_above_threshold"] >= SkinParams().min_positive_od - 1e-6
    assert gap["max_below_threshold"] < t["threshold_od"] < gap["min_at_or_above_threshold"]


def test_render_of_a_rectangle_equals_crop_of_full_render():
    params = SkinParams(melanin=0.5)
    full = render_skin(stain="cxcl10", width_px=700, height_px=600, seed=5, jpeg_quality=None, params=params)
    scene = _Scene(stain="cxcl10", width_px=700, height_px=600, mpp_um=0.5, seed=5, params=params)
    rgb, fields = scene.render_rect(301, 157, 250, 190)
    assert np.array_equal(rgb, full.rgb[157:347, 301:551])
    assert np.array_equal(fields["target"], full.target_conc[157:347, 301:551])
    assert np.array_equal(fields["tissue"], full.tissue_mask[157:347, 301:551])


def test_truth_consistency(cd3_slide):
    sl = cd3_slide
    t = json.loads(json.dumps(sl.truth))  # JSON-serialisable
    h, w = sl.tissue_mask.shape
    assert (t["width_px"], t["height_px"]) == (w, h)
    cells = t["cells"]
    assert len(cells) > 200
    xs = np.array([c["x_px"] for c in cells])
    ys = np.array([c["y_px"] for c in cells])
    assert sl.tissue_mask[ys.astype(int), xs.astype(int)].all()
    classes = {c["class"] for c in cells}
    assert classes == {"lymphocyte", "keratinocyte", "fibroblast"}
    assert all(c["class"] == "lymphocyte" for c in cells if c["positive"])
    assert any(c["positive"] for c in cells) and any(
        not c["positive"] and c["class"] == "lymphocyte" for c in cells
    )
    for c in cells:
        assert sl.region_masks[c["region"]][int(c["y_px"]), int(c["x_px"])]
    leaf = ["epidermis", "papillary_dermis", "superficial_dermis", "deep_dermis"]
    assert not np.logical_and(sl.region_masks["epidermis"], sl.region_masks["dermis"]).any()
    assert np.array_equal(sum(sl.region_masks[n].astype(int) for n in leaf) == 1, sl.tissue_mask)
    features = {f["properties"]["classification"]["name"]: f for f in t["regions"]["features"]}
    assert set(features) == {"tissue", "epidermis", "dermis", *leaf}
    px_mm2 = sl.mpp_um**2 / 1e6
    for name, f in features.items():
        mask = sl.tissue_mask if name == "tissue" else sl.region_masks[name]
        area_px = shapely.geometry.shape(f["geometry"]).area
        assert area_px == pytest.approx(mask.sum(), rel=0.01)
        at = t["area_truth"][name]
        assert at["region_area_mm2"] == pytest.approx(mask.sum() * px_mm2)
        in_region = [
            c
            for c in cells
            if (name == "tissue" or c["region"] == name or (name == "dermis" and c["region"] != "epidermis"))
        ]
        assert at["n_positive_cells"] == sum(c["positive"] for c in in_region)
        assert at["n_negative_cells"] == sum(not c["positive"] for c in in_region)
        frac = float((sl.target_conc[mask] >= t["threshold_od"]).mean())
        assert at["positive_area_fraction"] == pytest.approx(frac)
    # cells are not piled up: no two nuclei closer than a doublet's spacing
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.column_stack([xs, ys])).query(np.column_stack([xs, ys]), k=2)
    assert d[:, 1].min() * sl.mpp_um > 4.0


def test_region_bands_follow_parameters():
    p = SkinParams(papillary_um=100.0, superficial_um=250.0)
    sl = render_skin(
        stain="gag-alcian", width_px=500, height_px=1200, seed=2, params=p, regions_geojson=False
    )
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(~sl.region_masks["epidermis"], sampling=sl.mpp_um)
    assert dist[sl.region_masks["papillary_dermis"]].max() <= 100.0
    assert dist[sl.region_masks["superficial_dermis"]].min() > 100.0
    assert dist[sl.region_masks["deep_dermis"]].min() > 250.0
    assert sl.region_masks["deep_dermis"].sum() > 0
    assert sl.truth["region_definitions"]["papillary_um"] == 100.0


@pytest.mark.parametrize("stain", ["cxcl10", "gag-colloidal-iron", "cd8"])
def test_blur_noise_jpeg_move_positive_area_by_under_one_point(stain):
    sl = render_skin(stain=stain, width_px=512, height_px=768, seed=21, jpeg_quality=90)
    t = sl.truth
    sm = preset(t["stains"]["preset"], background_rgb=t["stains"]["background_rgb"])
    target = deconvolve(sl.rgb, sm)[..., sm.index(t["stains"]["target"])]
    for name in ("tissue", "epidermis", "papillary_dermis", "superficial_dermis"):
        mask = sl.tissue_mask if name == "tissue" else sl.region_masks[name]
        measured = 100.0 * float((target[mask] >= t["threshold_od"]).mean())
        assert abs(measured - t["area_truth"][name]["positive_area_percent"]) < 1.0, name


def test_positive_lymphocytes_have_ring_above_threshold_negatives_below(cd3_slide):
    sl = cd3_slide
    t = sl.truth
    sm = preset("hdab", background_rgb=t["stains"]["background_rgb"])
    dab = deconvolve(sl.rgb, sm)[..., 1]
    yy, xx = np.mgrid[0:21, 0:21] - 10
    # nucleus radius ~3.25 µm, ring 1.5 µm beyond it: 3.6-4.5 µm from the centre = 7.2-9 px at 0.5 µm/px
    ring = (np.hypot(xx, yy) >= 7.2) & (np.hypot(xx, yy) <= 9.0)
    pos, neg = [], []
    for c in t["cells"]:
        if c["class"] != "lymphocyte":
            continue
        x, y = int(c["x_px"]), int(c["y_px"])
        if not (10 <= x < dab.shape[1] - 10 and 10 <= y < dab.shape[0] - 10):
            continue
        win = dab[y - 10 : y + 11, x - 10 : x + 11]
        (pos if c["positive"] else neg).append(float(np.median(win[ring])))
    assert len(pos) > 20 and len(neg) > 5
    assert np.median(pos) > 0.3
    assert np.median(neg) < 0.1


def test_post_treatment_has_less():
    pre = render_skin(
        stain="cd3",
        width_px=600,
        height_px=900,
        seed=9,
        params=SkinParams(activity=1.0),
        regions_geojson=False,
    )
    post = render_skin(
        stain="cd3",
        width_px=600,
        height_px=900,
        seed=9,
        params=SkinParams(activity=0.4),
        regions_geojson=False,
    )
    a, b = pre.truth["area_truth"]["dermis"], post.truth["area_truth"]["dermis"]
    assert b["positive_cells_per_mm2"] < 0.6 * a["positive_cells_per_mm2"]


def test_melanin_is_pigment_not_target():
    sl = render_skin(
        stain="cd3",
        width_px=500,
        height_px=400,
        seed=1,
        params=SkinParams(melanin=0.6),
        regions_geojson=False,
    )
    assert sl.pigment_mask.sum() > 20
    assert sl.truth["pigment"]["present"] and sl.truth["pigment"]["area_px"] == int(sl.pigment_mask.sum())
    assert (sl.pigment_mask & sl.region_masks["epidermis"]).sum() == sl.pigment_mask.sum()
    assert (sl.target_conc[sl.pigment_mask] < sl.truth["threshold_od"]).mean() > 0.9


def test_bad_arguments_raise_cleihc_errors():
    with pytest.raises(CleihcError, match="unknown synthetic stain"):
        render_skin(stain="cd99", width_px=100, height_px=100)
    with pytest.raises(CleihcError, match=">= 64"):
        render_skin(stain="cd3", width_px=10, height_px=100)
    with pytest.raises(CleihcError, match="jpeg_quality"):
        render_skin(stain="cd3", width_px=100, height_px=100, jpeg_quality=0)
    with pytest.raises(CleihcError, match="threshold_od"):
        SkinParams(threshold_od=0.5)
    with pytest.raises(CleihcError, match="uint8"):
        write_svs("/nonexistent/x.svs", np.zeros((10, 10), np.float32), mpp_um=0.5)


def test_truth_path_for():
    assert truth_path_for("a/S02_pre_cxcl10.ome.tif") == Path("a/S02_pre_cxcl10.truth.json")
    assert truth_path_for("a/S01_pre_cd3.svs") == Path("a/S01_pre_cd3.truth.json")


# --------------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------------
def test_svs_opens_in_openslide_as_aperio_and_equals_tifffile(tmp_path):
    openslide = pytest.importorskip("openslide")
    sl = render_skin(stain="cd3", width_px=1100, height_px=600, seed=3, jpeg_quality=None)
    path = write_svs(tmp_path / "x.svs", sl.rgb, mpp_um=0.5, jpeg_quality=90)
    with openslide.OpenSlide(path) as osr:
        assert osr.properties["openslide.vendor"] == "aperio"
        assert float(osr.properties["openslide.mpp-x"]) == 0.5
        assert float(osr.properties["openslide.mpp-y"]) == 0.5
        assert osr.properties["aperio.AppMag"] == "20"
        assert osr.level_count == 2
        assert osr.level_dimensions == ((1100, 600), (275, 150))
        assert osr.level_downsamples[1] == pytest.approx(4.0)
        assert "thumbnail" in osr.associated_images
        region = np.asarray(osr.read_region((0, 0), 0, (1100, 600)))[..., :3]
    with tifffile.TiffFile(path) as tf:
        assert tf.is_svs
        levels = tf.series[0].levels
        assert [lv.shape for lv in levels] == [(600, 1100, 3), (150, 275, 3)]
        level0 = tf.pages[0].asarray()
        assert tf.pages[0].tilewidth == 256
    # Same JPEG decoder: identical; and the JPEG emulation of render_skin is what the file holds.
    assert np.array_equal(region, level0)
    emulated = render_skin(stain="cd3", width_px=1100, height_px=600, seed=3, jpeg_quality=90)
    assert np.array_equal(emulated.rgb, level0)
    # JPEG q90 is close to the original
    assert np.abs(level0.astype(int) - sl.rgb).mean() < 3.0


def test_ome_tiff_has_subifd_levels_and_physical_size(tmp_path):
    sl = render_skin(
        stain="cxcl10", width_px=1100, height_px=520, seed=3, jpeg_quality=None, regions_geojson=False
    )
    path = write_ome_tiff(tmp_path / "x.ome.tif", sl.rgb, mpp_um=0.5)
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        assert len(tf.pages) == 1  # the reduced level is a SubIFD, not a top-level page
        assert [lv.shape for lv in tf.series[0].levels] == [(520, 1100, 3), (130, 275, 3)]
        assert re.search(r'PhysicalSizeX="0.5"', tf.ome_metadata)
        assert re.search(r'PhysicalSizeXUnit="µm"', tf.ome_metadata)
        level0 = tf.series[0].levels[0].asarray()
    assert np.abs(level0.astype(int) - sl.rgb).mean() < 3.0


def test_streaming_writer_equals_in_memory_writer(tmp_path):
    openslide = pytest.importorskip("openslide")
    params = SkinParams(melanin=0.3)
    sl = render_skin(stain="cxcl10", width_px=1100, height_px=700, seed=8, jpeg_quality=None, params=params)
    a = write_svs(tmp_path / "a.svs", sl.rgb, mpp_um=0.5)
    b = write_large_synthetic_svs(
        tmp_path / "b.svs", width_px=1100, height_px=700, stain="cxcl10", seed=8, params=params, chunk_px=512
    )
    with openslide.OpenSlide(a) as oa, openslide.OpenSlide(b) as ob:
        assert ob.properties["openslide.vendor"] == "aperio"
        assert oa.level_dimensions == ob.level_dimensions
        assert ob.level_count == 2
        for k in range(oa.level_count):
            size = oa.level_dimensions[k]
            assert np.array_equal(
                np.asarray(oa.read_region((0, 0), k, size)), np.asarray(ob.read_region((0, 0), k, size))
            )
        thumb_a = np.asarray(oa.associated_images["thumbnail"], dtype=int)
        thumb_b = np.asarray(ob.associated_images["thumbnail"], dtype=int)
        assert thumb_a.shape == thumb_b.shape
        assert np.abs(thumb_a - thumb_b).mean() < 3.0
    with tifffile.TiffFile(b) as tf:
        assert [lv.shape for lv in tf.series[0].levels] == [(700, 1100, 3), (175, 275, 3)]


# --------------------------------------------------------------------------------------------------------------
# The committed sample set
# --------------------------------------------------------------------------------------------------------------
def test_sample_images_exist_are_documented_and_load():
    readme = (SAMPLES / "README.md").read_text(encoding="utf-8")
    assert "python scripts/make_sample_images.py" in readme
    total = 0
    for spec in sample_specs():
        path = SAMPLES / spec.file_name
        assert path.is_file(), path
        assert spec.file_name in readme
        truth_file = truth_path_for(path)
        assert truth_file.name in readme
        truth = json.loads(truth_file.read_text(encoding="utf-8"))
        assert truth["stain"] == spec.stain
        assert truth["seed"] == spec.seed
        assert truth["study"] == {"subject": spec.subject, "timepoint": spec.timepoint}
        with tifffile.TiffFile(path) as tf:
            assert tf.series[0].levels[0].shape == (truth["height_px"], truth["width_px"], 3)
        for name in ("tissue", "epidermis", "papillary_dermis", "superficial_dermis", "deep_dermis"):
            assert truth["area_truth"][name]["region_area_px"] > 0, (spec.file_name, name)
        total += path.stat().st_size + truth_file.stat().st_size
    assert total < 8e6


def test_sample_post_treatment_slides_show_less():
    def truth(name):
        return json.loads((SAMPLES / f"{name}.truth.json").read_text(encoding="utf-8"))["area_truth"][
            "dermis"
        ]

    for subject in ("S01", "S02"):
        assert (
            truth(f"{subject}_post_cd3")["positive_cells_per_mm2"]
            < truth(f"{subject}_pre_cd3")["positive_cells_per_mm2"]
        )
    assert (
        truth("S01_post_cxcl10")["positive_area_fraction"] < truth("S01_pre_cxcl10")["positive_area_fraction"]
    )


def test_sample_set_is_reproducible_from_its_seed(tmp_path):
    """The first committed slide's truth equals a fresh render with the recorded parameters."""
    spec = sample_specs()[0]
    stored = json.loads(truth_path_for(SAMPLES / spec.file_name).read_text(encoding="utf-8"))
    fresh = render_skin(
        stain=spec.stain,
        width_px=stored["width_px"],
        height_px=stored["height_px"],
        mpp_um=stored["mpp_um"],
        seed=spec.seed,
        jpeg_quality=None,
        params=spec.params,
        regions_geojson=False,
    )
    assert fresh.truth["cells"] == stored["cells"]
    assert fresh.truth["area_truth"] == stored["area_truth"]


def test_streaming_writer_single_level_slide(tmp_path):
    openslide = pytest.importorskip("openslide")
    path = write_large_synthetic_svs(tmp_path / "s.svs", width_px=300, height_px=200, stain="cd4", seed=2)
    expected = render_skin(stain="cd4", width_px=300, height_px=200, seed=2, jpeg_quality=90).rgb
    with openslide.OpenSlide(path) as osr:
        assert osr.level_dimensions == ((300, 200),)
        assert osr.associated_images["thumbnail"].size == (300, 200)
        assert np.array_equal(np.asarray(osr.read_region((0, 0), 0, (300, 200)))[..., :3], expected)


_FULL_CACHE: dict = {}


def _full_gag():
    if not _FULL_CACHE:
        params = SkinParams(noise_sigma=2.0)
        _FULL_CACHE["slide"] = render_skin(
            stain="gag-colloidal-iron",
            width_px=640,
            height_px=520,
            seed=13,
            jpeg_quality=None,
            params=params,
            regions_geojson=False,
        )
        _FULL_CACHE["params"] = params
    return _FULL_CACHE["slide"], _FULL_CACHE["params"]


@settings(max_examples=6, deadline=None)
@given(x0=st.integers(-40, 600), y0=st.integers(-40, 480), w=st.integers(1, 300), h=st.integers(1, 300))
def test_any_rectangle_renders_like_the_full_image(x0, y0, w, h):
    full, params = _full_gag()
    scene = _Scene(
        stain="gag-colloidal-iron", width_px=640, height_px=520, mpp_um=0.5, seed=13, params=params
    )
    rgb, fields = scene.render_rect(x0, y0, w, h)
    assert rgb.shape == (h, w, 3)
    # compare where the rectangle overlaps the image
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, 640), min(y0 + h, 520)
    if cx0 < cx1 and cy0 < cy1:
        sub = rgb[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        assert np.array_equal(sub, full.rgb[cy0:cy1, cx0:cx1])
        assert np.array_equal(
            fields["target"][cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0], full.target_conc[cy0:cy1, cx0:cx1]
        )
