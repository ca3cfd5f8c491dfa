"""cleihc.slide on real files (../shared/data) and on TIFFs the tests write themselves."""

from __future__ import annotations

import pickle

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from cleihc.errors import MissingMppError, NotBrightfieldError
from cleihc.slide import AnalysisResolution, Slide, is_slide, open_slide
from cleihc_testdata import shared_file

pytestmark = []

CMU = ("cmu1_small_region_svs", "CMU-1-Small-Region.svs")
SMALL_SVS = ("openslide_python_fixtures", "small.svs")
BOXES = ("openslide_python_fixtures", "boxes.tiff")
BOXES_PNG = ("openslide_python_fixtures", "boxes.png")
BOXES_DCM = ("openslide_python_fixtures", "boxes_0.dcm")
SM_DCM = ("highdicom_sm_image", "sm_image.dcm")
NDPI = ("ndpi_stritt_fluorescence", "test3-DAPI-2-(387).ndpi")
NDPI2 = ("ndpi_stritt_fluorescence", "test3-TRITC 2 (560).ndpi")
IHC_PNG = ("skimage_ihc", "ihc.png")
DAB_JPG = ("dab_analyzer_samples", "images", "Native_Pan_05.jpg")
ALCIAN_DIR = ("alcian_blue_mouse_mitral_valve", "images")


def texture(h: int, w: int, *, seed: int = 0) -> np.ndarray:
    """A smooth, tissue-like RGB uint8 image (JPEG-friendly) with fine detail."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 16 + 2, w // 16 + 2, 3))
    yy = np.linspace(0, coarse.shape[0] - 1.001, h)
    xx = np.linspace(0, coarse.shape[1] - 1.001, w)
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = (yy - y0)[:, None, None], (xx - x0)[None, :, None]
    c = coarse
    img = (
        c[y0][:, x0] * (1 - fy) * (1 - fx)
        + c[y0 + 1][:, x0] * fy * (1 - fx)
        + c[y0][:, x0 + 1] * (1 - fy) * fx
        + c[y0 + 1][:, x0 + 1] * fy * fx
    )
    img = 60 + 180 * img + rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_aperio(path, levels: list[np.ndarray], *, compression: str = "deflate", mpp: float = 0.25) -> None:
    """An Aperio-style SVS: description "Aperio Image Library ...|MPP = ..|AppMag = 40", reduced levels as
    top-level tiled pages with subfiletype 1 (metadata=None so the Aperio description is the only one)."""
    h, w = levels[0].shape[:2]
    desc = f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] (64x64) JPEG/RGB Q=90|AppMag = 40|MPP = {mpp}"
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(levels):
            tw.write(
                level,
                tile=(64, 64),
                compression=compression,
                photometric="rgb",
                description=desc if i == 0 else None,
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )


def write_ome_pyramid(path, levels: list[np.ndarray], *, mpp: float = 0.5, unit: str = "µm") -> None:
    """A pyramidal OME-TIFF: reduced levels in SubIFDs, PhysicalSizeX/Y in the OME-XML."""
    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
    meta |= {"PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            levels[0],
            subifds=len(levels) - 1,
            tile=(64, 64),
            photometric="rgb",
            compression="zlib",
            metadata=meta,
        )
        for level in levels[1:]:
            tw.write(level, tile=(64, 64), photometric="rgb", compression="zlib", subfiletype=1)


def pyramid(img: np.ndarray, n: int) -> list[np.ndarray]:
    out = [img]
    for _ in range(n - 1):
        out.append(np.ascontiguousarray(out[-1][::2, ::2]))
    return out


def openslide_rgb(path, location, level, size) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as osr:
        rgba = np.asarray(osr.read_region(location, level, size))
    assert (rgba[..., 3] == 255).all()
    return rgba[..., :3]


# ---------------------------------------------------------------------------------------------------------------
# real files
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_cmu_svs_metadata():
    with open_slide(shared_file(*CMU)) as s:
        assert s.backend == "tifffile"
        assert s.format == "aperio" and s.vendor == "aperio"
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1 and s.level_downsamples == (1.0,)
        assert s.mpp == pytest.approx((0.499, 0.499)) and s.mpp_source == "vendor" and s.has_mpp
        assert s.objective_power == 20.0
        assert set(s.associated_image_names) == {"label", "macro", "thumbnail"}
        label = s.read_associated("label")
        assert label.shape == (463, 387, 3) and label.dtype == np.uint8
        assert s.read_associated("macro").shape == (431, 1280, 3)
        assert s.properties["openslide.vendor"] == "aperio"
        info = s.info()
        assert info["mpp_x"] == pytest.approx(0.499) and info["levels"][0]["width"] == 2220
        s.check_brightfield()  # H&E on glass: bright


@pytest.mark.shared_data
@pytest.mark.parametrize("rect", [((0, 0), (240, 240)), ((123, 457), (517, 311)), ((1900, 2700), (320, 267))])
def test_cmu_svs_tifffile_equals_openslide(rect):
    """tifffile decodes Aperio JPEG tiles (with JPEGTables) to exactly OpenSlide's pixels (measured max diff 0)."""
    path = shared_file(*CMU)
    (x, y), (w, h) = rect
    with open_slide(path) as s:
        ours = s.read_region((x, y), (w, h))
    assert ours.shape == (h, w, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, openslide_rgb(path, (x, y), 0, (w, h)))


@pytest.mark.shared_data
def test_small_svs():
    with open_slide(shared_file(*SMALL_SVS)) as s:
        assert (s.format, s.backend, s.dimensions, s.level_count) == ("aperio", "tifffile", (16, 16), 1)
        assert s.mpp == pytest.approx((0.499, 0.499))
        assert s.associated_image_names == ("thumbnail",)
        np.testing.assert_array_equal(
            s.read_region((0, 0), (16, 16)), openslide_rgb(s.path, (0, 0), 0, (16, 16))
        )


@pytest.mark.shared_data
def test_boxes_tiff_levels_and_exact_pixels():
    path = shared_file(*BOXES)
    with open_slide(path) as s:
        assert (s.format, s.backend) == ("generic-tiff", "tifffile")
        assert s.level_dimensions == ((300, 250), (150, 125), (75, 62), (37, 31))
        with openslide.OpenSlide(str(path)) as osr:
            assert osr.level_downsamples == pytest.approx((1, 2, 4.016129, 8.086312))
        # the true (integer) scales of the binned levels, not OpenSlide's mean of width and height ratios
        assert s.level_downsamples == (1.0, 2.0, 4.0, 8.0)
        # level-0 x = 296 lies in level-2 pixel 74 (296 / 4), not 73 (296 / 4.016)
        np.testing.assert_array_equal(
            s.read_region((296, 0), (1, 62), level=2), s.read_level_rect(2, (74, 0), (1, 62))
        )
        # 72 dpi resolution tags are a software default, not a microscope scale: no MPP
        assert not s.has_mpp and s.mpp_source is None
        with pytest.raises(MissingMppError, match="--mpp"):
            _ = s.mpp
        ref = np.asarray(Image.open(shared_file(*BOXES_PNG)).convert("RGB"))
        np.testing.assert_array_equal(s.read_region((0, 0), (300, 250)), ref)
        for level, (w, h) in enumerate(s.level_dimensions):
            np.testing.assert_array_equal(
                s.read_level_rect(level, (0, 0), (w, h)), openslide_rgb(path, (0, 0), level, (w, h))
            )
        # odd sub-rectangles of level 1 via both readers (deflate: exact)
        np.testing.assert_array_equal(
            s.read_level_rect(1, (37, 11), (61, 93)), openslide_rgb(path, (74, 22), 1, (61, 93))
        )


@pytest.mark.shared_data
def test_boxes_png_is_an_image_slide():
    with open_slide(shared_file(*BOXES_PNG)) as s:
        assert (s.backend, s.format, s.dimensions, s.level_count) == ("image", "png", (300, 250), 1)
        assert not s.has_mpp


@pytest.mark.shared_data
def test_dicom_files():
    with open_slide(shared_file(*BOXES_DCM)) as s:
        assert (s.backend, s.format, s.vendor) == ("openslide", "dicom", "dicom")
        assert s.dimensions == (16, 16) and s.mpp == pytest.approx((0.499, 0.499))
        assert s.associated_image_names == ("thumbnail",)
        np.testing.assert_array_equal(
            s.read_region((0, 0), (16, 16)), openslide_rgb(s.path, (0, 0), 0, (16, 16))
        )
    with open_slide(shared_file(*SM_DCM)) as s:
        assert (s.backend, s.format, s.dimensions, s.level_count) == ("openslide", "dicom", (50, 50), 1)
        assert s.mpp == pytest.approx((0.499, 0.499))
        assert s.read_region((40, 40), (20, 20))[10:, 10:].min() == 255  # outside: white


@pytest.mark.shared_data
@pytest.mark.parametrize("parts", [NDPI, NDPI2])
def test_ndpi_metadata_and_levels(parts):
    with open_slide(shared_file(*parts)) as s:
        assert (s.format, s.vendor, s.backend) == ("hamamatsu", "hamamatsu", "tifffile")
        assert s.dimensions == (3968, 4864)
        assert s.level_count == 7
        assert s.level_downsamples == pytest.approx((1, 2, 4, 8, 16, 32, 64))
        assert s.level_dimensions[-1] == (62, 76)
        assert s.mpp == pytest.approx((0.2282, 0.2282), abs=1e-4) and s.mpp_source == "vendor"
        assert s.objective_power == 40.0
        assert s.associated_image_names == ("macro",)
        assert s.read_associated("macro").shape == (406, 1188, 3)


@pytest.mark.shared_data
def test_ndpi_pixels_equal_openslide_on_all_levels():
    """Stored levels (1, 2, 4, 8) are decoded by tifffile, the scale-on-decode ones (16, 32, 64) by OpenSlide;
    both must match OpenSlide exactly (measured max diff 0)."""
    path = shared_file(*NDPI)
    with open_slide(path) as s:
        assert s._backend._src == [0, 1, 2, 3, None, None, None]
        for level, ds in enumerate(s.level_downsamples):
            x_l, y_l = 13 if level < 5 else 3, 17 if level < 5 else 5
            lw, lh = s.level_dimensions[level]
            size = (min(211, lw - x_l), min(97, lh - y_l))
            ours = s.read_level_rect(level, (x_l, y_l), size)
            ref = openslide_rgb(path, (int(x_l * ds), int(y_l * ds)), level, size)
            np.testing.assert_array_equal(ours, ref, err_msg=f"level {level}")


@pytest.mark.shared_data
def test_ndpi_fluorescence_is_refused_by_check_brightfield():
    with open_slide(shared_file(*NDPI)) as s, pytest.raises(NotBrightfieldError, match="fluorescence"):
        s.check_brightfield()


@pytest.mark.shared_data
def test_alcian_imagej_tiffs_have_resolution_mpp(shared_data):
    files = sorted((shared_data / ALCIAN_DIR[0] / ALCIAN_DIR[1]).glob("*.tif"))
    assert len(files) == 4
    for f in files:
        with open_slide(f) as s:
            assert (s.format, s.backend, s.level_count) == ("imagej-tiff", "tifffile", 1)
            assert s.mpp == pytest.approx((0.912, 0.912), abs=1e-3)
            assert s.mpp_source == "tiff-resolution"
            w, h = s.dimensions
            assert 229 <= min(w, h) and max(w, h) <= 1088
            np.testing.assert_array_equal(s.read_region((0, 0), (w, h)), tifffile.imread(f))


@pytest.mark.shared_data
def test_dab_jpeg_has_no_mpp_unless_given():
    path = shared_file(*DAB_JPG)
    with open_slide(path) as s:
        assert (s.format, s.backend, s.dimensions) == ("jpeg", "image", (2080, 1544))
        assert not s.has_mpp and s.mpp_source is None
        with pytest.raises(MissingMppError) as err:
            _ = s.mpp
        msg = str(err.value)
        assert str(path) in msg and "--mpp" in msg and "\n" not in msg
        with pytest.raises(MissingMppError):
            s.analysis_resolution(0.5)
        s.check_brightfield()
    with open_slide(path, mpp=0.3) as s:
        assert s.mpp == (0.3, 0.3) and s.mpp_source == "user"


@pytest.mark.shared_data
def test_ihc_png_pixels():
    path = shared_file(*IHC_PNG)
    with open_slide(path) as s:
        assert (s.format, s.dimensions) == ("png", (512, 512))
        np.testing.assert_array_equal(
            s.read_region((0, 0), (512, 512)), np.asarray(Image.open(path).convert("RGB"))
        )
        np.testing.assert_array_equal(
            s.read_region((500, -3), (20, 10))[3:, :12], np.asarray(Image.open(path).convert("RGB"))[:7, 500:]
        )
        s.check_brightfield()


@pytest.mark.shared_data
def test_is_slide_on_real_files(shared_data):
    assert is_slide(shared_file(*CMU))
    assert is_slide(shared_file(*NDPI))
    assert is_slide(shared_file(*IHC_PNG))
    assert is_slide(shared_file(*BOXES_DCM))
    assert not is_slide(shared_data / "README.md")
    assert not is_slide(shared_data)


# ---------------------------------------------------------------------------------------------------------------
# analysis resolution and exact binning
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_analysis_resolution_choices_ndpi():
    with open_slide(shared_file(*NDPI)) as s:
        mpp0 = s.mpp[0]
        r = s.analysis_resolution(0.5)  # level 1 is 0.456 µm/px <= 0.55
        assert (r.level, r.factor) == (1, 1)
        assert r.mpp_um == pytest.approx((2 * mpp0, 2 * mpp0)) and r.downsample == 2.0
        assert r.dimensions_a == (1984, 2432)
        assert (s.analysis_resolution(0.2282).level, s.analysis_resolution(0.2282).factor) == (0, 1)
        assert (s.analysis_resolution(1.0).level, s.analysis_resolution(1.0).factor) == (2, 1)
        r = s.analysis_resolution(30.0)  # coarser than the smallest level (14.6 µm/px): bin it
        assert (r.level, r.factor) == (6, 2) and r.dimensions_a == (31, 38) and r.downsample == 128.0
        assert s.analysis_resolution(0.1).level == 0  # finer than level 0: level 0, no upsampling


@pytest.mark.shared_data
def test_analysis_resolution_choices_single_level_svs():
    with open_slide(shared_file(*CMU)) as s:
        r = s.analysis_resolution(0.5)  # 0.499 counts as 0.5
        assert r == AnalysisResolution(
            level=0, factor=1, mpp_um=(0.499, 0.499), downsample=1.0, dimensions_a=(2220, 2967)
        )
        r = s.analysis_resolution(2.0)
        assert (r.level, r.factor, r.dimensions_a) == (0, 4, (555, 741))
        assert r.mpp_um == pytest.approx((1.996, 1.996))


@pytest.mark.shared_data
def test_read_analysis_rect_is_independent_of_the_rectangle():
    with open_slide(shared_file(*CMU)) as s:
        res = s.analysis_resolution(1.5)
        assert res.factor == 3
        wa, ha = res.dimensions_a
        assert (wa, ha) == (740, 989)
        big = s.read_analysis_rect(res, (-5, -7), (wa + 11, 300))
        assert big.shape == (300, wa + 11, 3)
        # outside the analysis image: white
        assert (big[:7] == 255).all() and (big[:, :5] == 255).all() and (big[:, 5 + wa :] == 255).all()
        for x, y, w, h in [(0, 0, 17, 13), (101, 37, 211, 97), (727, 250, 19, 43), (3, 290, 5, 3)]:
            sub = s.read_analysis_rect(res, (x, y), (w, h))
            np.testing.assert_array_equal(sub, big[y + 7 : y + 7 + h, x + 5 : x + 5 + w])
        # definition: mean of the 3x3 level block, rounded half up
        level = s.read_level_rect(0, (0, 0), (30, 30)).astype(np.int64)
        sums = level.reshape(10, 3, 10, 3, 3).sum(axis=(1, 3))
        expected = np.floor(sums / 9 + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(s.read_analysis_rect(res, (0, 0), (10, 10)), expected)
        # the last analysis column/row use complete blocks only; beyond is white
        edge = s.read_analysis_rect(res, (wa - 1, ha - 1), (2, 2))
        assert (edge[1] == 255).all() and (edge[:, 1] == 255).all()


def test_bin_mean_rounds_half_up(tmp_path):
    img = np.full((64, 64, 3), 255, np.uint8)
    img[0, 0] = (0, 1, 2)  # block (0, 0) sums: 0+3*255, 1+3*255, 2+3*255 over 4 -> 191.25, 191.5, 191.75
    path = tmp_path / "half.tif"
    tifffile.imwrite(
        path, img, photometric="rgb", tile=(16, 16), resolution=(1e4, 1e4), resolutionunit="CENTIMETER"
    )
    with open_slide(path) as s:
        assert s.mpp == pytest.approx((1.0, 1.0)) and s.mpp_source == "tiff-resolution"
        res = s.analysis_resolution(2.0)
        assert (res.level, res.factor) == (0, 2)
        assert tuple(s.read_analysis_rect(res, (0, 0), (1, 1))[0, 0]) == (191, 192, 192)


@pytest.mark.parametrize("factor", [1, 2, 3, 5, 16, 65])  # 65: beyond the lookup table, divides
def test_bin_mean_equals_the_integer_formula(factor):
    from cleihc.slide.base import _bin_mean

    rng = np.random.default_rng(factor)
    block = rng.integers(0, 256, size=(factor * 13, factor * 17, 3), dtype=np.uint8)
    before = block.copy()
    n = factor * factor
    sums = block.reshape(13, factor, 17, factor, 3).sum(axis=(1, 3), dtype=np.int64)
    np.testing.assert_array_equal(_bin_mean(block, factor), (2 * sums + n) // (2 * n))
    np.testing.assert_array_equal(block, before)


# ---------------------------------------------------------------------------------------------------------------
# TIFFs written by the tests
# ---------------------------------------------------------------------------------------------------------------


def test_ome_tiff_subifd_pyramid(tmp_path):
    img = texture(300, 420, seed=1)
    levels = pyramid(img, 3)
    path = tmp_path / "pyr.ome.tif"
    write_ome_pyramid(path, levels, mpp=0.5)
    assert is_slide(path)
    with open_slide(path) as s:
        assert (s.format, s.backend) == ("ome-tiff", "tifffile")
        assert s.level_dimensions == ((420, 300), (210, 150), (105, 75))
        assert s.level_downsamples == pytest.approx((1, 2, 4))
        assert s.mpp == pytest.approx((0.5, 0.5)) and s.mpp_source == "ome"
        for i, level in enumerate(levels):
            h, w = level.shape[:2]
            np.testing.assert_array_equal(s.read_level_rect(i, (0, 0), (w, h)), level)
        np.testing.assert_array_equal(s.read_region((84, 40), (50, 30), level=1), levels[1][20:50, 42:92])
        r = s.analysis_resolution(2.0)
        assert (r.level, r.factor, r.mpp_um) == (2, 1, (2.0, 2.0))


def test_ome_tiff_physical_size_in_nm(tmp_path):
    path = tmp_path / "nm.ome.tif"
    write_ome_pyramid(path, pyramid(texture(128, 128), 2), mpp=250.0, unit="nm")
    with open_slide(path) as s:
        assert s.mpp == pytest.approx((0.25, 0.25))


@pytest.mark.parametrize("compression", ["deflate", "jpeg"])
def test_aperio_style_svs_via_tifffile_and_openslide(tmp_path, compression):
    img = texture(300, 400, seed=2)
    levels = pyramid(img, 3)
    path = tmp_path / f"synthetic_{compression}.svs"
    write_aperio(path, levels, compression=compression, mpp=0.25)
    assert openslide.OpenSlide.detect_format(str(path)) == "aperio"
    with open_slide(path) as s:
        assert (s.format, s.vendor, s.backend) == ("aperio", "aperio", "tifffile")
        assert s.mpp == pytest.approx((0.25, 0.25)) and s.mpp_source == "vendor"
        assert s.objective_power == 40.0
        assert s.level_dimensions == ((400, 300), (200, 150), (100, 75))
        assert s._backend._src == [0, 1, 2]  # every level decoded by tifffile, none by OpenSlide
        max_diff = 0
        for level, (w, h) in enumerate(s.level_dimensions):
            ours = s.read_level_rect(level, (0, 0), (w, h))
            ref = openslide_rgb(path, (0, 0), level, (w, h))
            max_diff = max(max_diff, int(np.abs(ours.astype(int) - ref).max()))
            if compression == "deflate":
                np.testing.assert_array_equal(ours, levels[level])
        # same libjpeg-turbo decode in both readers: measured 0; deflate is lossless
        assert max_diff == 0


def test_aperio_description_read_without_openslide(tmp_path, monkeypatch):
    """tifffile-only path (OpenSlide absent or refusing): MPP and objective from the Aperio description."""
    path = tmp_path / "a.svs"
    write_aperio(path, pyramid(texture(128, 192), 2), mpp=0.2527)
    monkeypatch.setattr("cleihc.slide._openslide.detect_format", lambda p: None)
    with open_slide(path) as s:
        assert (s.format, s.backend) == ("aperio", "tifffile")
        assert s.mpp == pytest.approx((0.2527, 0.2527)) and s.mpp_source == "vendor"
        assert s.objective_power == 40.0
        assert s.level_count == 2


@pytest.mark.parametrize(
    ("resolution", "unit", "expected"),
    [((1e4 / 0.5, 1e4 / 0.5), "CENTIMETER", 0.5), ((25400 / 0.25, 25400 / 0.25), "INCH", 0.25)],
)
def test_tiled_tiff_resolution_tags(tmp_path, resolution, unit, expected):
    img = texture(200, 260, seed=3)
    path = tmp_path / "res.tif"
    tifffile.imwrite(
        path,
        img,
        photometric="rgb",
        tile=(64, 64),
        compression="zlib",
        resolution=resolution,
        resolutionunit=unit,
    )
    with open_slide(path) as s:
        assert (s.format, s.backend) == ("generic-tiff", "tifffile")
        assert s.mpp == pytest.approx((expected, expected)) and s.mpp_source == "tiff-resolution"
        np.testing.assert_array_equal(s.read_region((0, 0), (260, 200)), img)


def test_imagej_tiff_micron_unit(tmp_path):
    img = texture(100, 120)
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, img, imagej=True, resolution=(1 / 0.912, 1 / 0.912), metadata={"unit": "um"})
    with open_slide(path) as s:
        assert s.format == "imagej-tiff"
        assert s.mpp == pytest.approx((0.912, 0.912)) and s.mpp_source == "tiff-resolution"


def test_user_mpp_overrides_file(tmp_path):
    path = tmp_path / "o.ome.tif"
    write_ome_pyramid(path, pyramid(texture(64, 64), 1), mpp=0.5)
    with open_slide(path, mpp=(0.3, 0.31)) as s:
        assert s.mpp == (0.3, 0.31) and s.mpp_source == "user"
    with pytest.raises(MissingMppError, match="positive"):
        open_slide(path, mpp=-1)


def test_plain_stripped_tiff_and_rgba(tmp_path):
    img = texture(50, 70)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent corner -> white
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=[2])
    with open_slide(path) as s:
        out = s.read_region((0, 0), (70, 50))
        assert (out[:10, :10] == 255).all()
        np.testing.assert_array_equal(out[10:, 10:], img[10:, 10:])


def test_sparse_tiles_read_white(tmp_path):
    """A missing tile (offset 0) is glass: white, as OpenSlide's transparent pixels on white."""
    img = texture(128, 128)
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64))
    with tifffile.TiffFile(path, mode="r+b") as tf:
        page = tf.pages.first
        tag = page.tags["TileOffsets"]
        offsets = list(tag.value)
        offsets[1] = 0
        tag.overwrite(offsets)
    with open_slide(path) as s:
        out = s.read_region((0, 0), (128, 128))
        assert (out[:64, 64:] == 255).all()
        np.testing.assert_array_equal(out[64:], img[64:])


# ---------------------------------------------------------------------------------------------------------------
# reading conveniences, pickling, threads
# ---------------------------------------------------------------------------------------------------------------


def test_read_region_outside_is_white(tmp_path):
    img = texture(64, 96)
    path = tmp_path / "p.png"
    Image.fromarray(img).save(path)
    with open_slide(path) as s:
        assert (s.read_region((200, 200), (10, 5)) == 255).all()
        out = s.read_region((-4, 60), (10, 8))
        assert out.shape == (8, 10, 3)
        np.testing.assert_array_equal(out[:4, 4:], img[60:, :6])
        assert (out[4:] == 255).all() and (out[:, :4] == 255).all()
        assert s.read_region((0, 0), (0, 0)).shape == (0, 0, 3)


def test_get_thumbnail_uses_the_smallest_sufficient_level(tmp_path):
    levels = pyramid(texture(512, 768, seed=4), 4)
    path = tmp_path / "t.ome.tif"
    write_ome_pyramid(path, levels, mpp=0.25)
    with open_slide(path) as s:
        read_levels = []
        original = s._backend.read_level

        def spy(level, *args):
            read_levels.append(level)
            return original(level, *args)

        s._backend.read_level = spy
        thumb = s.get_thumbnail((200, 200))
        assert thumb.shape == (133, 200, 3)
        assert set(read_levels) == {1}  # level 1 is 384x256, level 2 (192x128) is too small
        small = s.get_thumbnail((96, 1000))
        assert small.shape == (64, 96, 3) and set(read_levels) == {1, 3}
        np.testing.assert_array_equal(small, levels[3])
        assert (
            np.abs(thumb.astype(int) - np.asarray(Image.fromarray(levels[0]).resize((200, 133)))).mean() < 6
        )


def test_read_at_mpp(tmp_path):
    levels = pyramid(texture(256, 256, seed=5), 3)
    path = tmp_path / "m.ome.tif"
    write_ome_pyramid(path, levels, mpp=0.5)
    with open_slide(path) as s:
        out = s.read_at_mpp((64, 32), (128, 64), mpp_um=1.0)
        assert out.shape == (32, 64, 3)
        np.testing.assert_array_equal(out, levels[1][16:48, 32:96])  # exactly level 1: no resampling
        coarse = s.read_at_mpp((0, 0), (256, 256), mpp_um=3.0)
        assert coarse.shape == (43, 43, 3)
        ref = np.asarray(Image.fromarray(levels[2]).resize((43, 43), Image.BILINEAR)).astype(int)
        assert np.abs(coarse.astype(int) - ref).mean() < 8


def test_pickle_reopens_by_path(tmp_path):
    levels = pyramid(texture(128, 160, seed=6), 2)
    path = tmp_path / "pk.ome.tif"
    write_ome_pyramid(path, levels, mpp=0.5)
    with open_slide(path, mpp=0.44) as s:
        s.read_region((0, 0), (8, 8))  # zarr stores now exist and must not be pickled
        data = pickle.dumps(s)
        clone = pickle.loads(data)
    with clone:
        assert isinstance(clone, Slide)
        assert clone.mpp == (0.44, 0.44) and clone.mpp_source == "user"
        np.testing.assert_array_equal(clone.read_level_rect(1, (3, 5), (40, 30)), levels[1][5:35, 3:43])


@pytest.mark.shared_data
def test_pickle_openslide_backend():
    with open_slide(shared_file(*BOXES_DCM)) as s:
        clone = pickle.loads(pickle.dumps(s))
        np.testing.assert_array_equal(clone.read_region((0, 0), (16, 16)), s.read_region((0, 0), (16, 16)))
        assert clone.mpp_source == "vendor"
        clone.close()


def test_concurrent_reads_agree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    img = texture(256, 256, seed=7)
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(32, 32), compression="zlib")
    rects = [((x, y), (45, 37)) for x in range(0, 200, 23) for y in range(0, 200, 31)]
    with open_slide(path) as s, ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda r: s.read_region(*r), rects))
    for ((x, y), (w, h)), out in zip(rects, outs, strict=True):
        np.testing.assert_array_equal(out, img[y : y + h, x : x + w])


def test_banded_reads_are_bounded_and_identical(tmp_path, monkeypatch):
    """Thumbnails and overviews of a single-level image read in bands: same pixels, bounded memory."""
    img = texture(300, 250, seed=8)
    path = tmp_path / "single.tif"
    tifffile.imwrite(
        path,
        img,
        photometric="rgb",
        tile=(32, 32),
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    with open_slide(path) as s:
        whole_thumb = s.get_thumbnail((50, 50))
        whole_overview = s.read_at_mpp((0, 0), (250, 300), mpp_um=4.0)
        assert whole_overview.shape == (38, 31, 3)
        monkeypatch.setattr("cleihc.slide.base._BAND_PIXELS", 3000)
        sizes = []
        original = s._backend.read_level

        def spy(level, x, y, w, h):
            sizes.append(w * h)
            return original(level, x, y, w, h)

        s._backend.read_level = spy
        np.testing.assert_array_equal(s.get_thumbnail((50, 50)), whole_thumb)
        np.testing.assert_array_equal(s.read_at_mpp((0, 0), (250, 300), mpp_um=4.0), whole_overview)
        assert len(sizes) > 10 and max(sizes) <= 3000 + 250 * 8


def test_planar_rgb_tiff_via_zarr_store(tmp_path):
    """Separate-plane RGB is read through tifffile's zarr store (the direct tile reader takes interleaved only)."""
    img = texture(130, 150, seed=9)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate", tile=(32, 32))
    with open_slide(path) as s:
        assert s.dimensions == (150, 130)
        assert s._backend._direct(0) is None
        np.testing.assert_array_equal(s.read_region((0, 0), (150, 130)), img)
        np.testing.assert_array_equal(s.read_region((33, 65), (50, 40)), img[65:105, 33:83])


def test_tile_cache_returns_identical_pixels(tmp_path):
    img = texture(200, 200, seed=10)
    path = tmp_path / "cache.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(48, 48), compression="jpeg")
    with open_slide(path) as s:
        first = s.read_region((10, 20), (120, 100))
        again = s.read_region((10, 20), (120, 100))  # served from the tile cache
        s._backend._cache.clear()
        fresh = s.read_region((10, 20), (120, 100))
        np.testing.assert_array_equal(first, again)
        np.testing.assert_array_equal(first, fresh)
        first[:] = 0  # the caller owns its array: the cache must be unaffected
        np.testing.assert_array_equal(s.read_region((10, 20), (120, 100)), fresh)
        assert (
            np.abs(fresh.astype(int) - img[20:120, 10:130]).mean() < 5
        )  # JPEG round trip of a noisy texture (measured 3.2)


def test_aperio_jpeg2000_stays_on_openslide(tmp_path):
    """Aperio JPEG 2000 (33003 YCbCr / 33005 RGB) is vendor specific: read by OpenSlide (documented in _tiff)."""
    img = texture(128, 192, seed=11)
    path = tmp_path / "j2k.svs"
    write_aperio(path, [img, np.ascontiguousarray(img[::2, ::2])], compression=33005)
    with open_slide(path) as s:
        assert (s.backend, s.format, s.level_count) == ("openslide", "aperio", 2)
        assert s.mpp == pytest.approx((0.25, 0.25))
        np.testing.assert_array_equal(s.read_region((0, 0), (192, 128)), img)  # lossless codestream


def test_jpeg_exif_orientation(tmp_path):
    img = texture(40, 60, seed=12)
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    Image.fromarray(img).save(path, exif=exif, quality=95)
    with open_slide(path) as s:
        assert s.dimensions == (40, 60)  # width and height swapped, as displayed
        out = s.read_region((0, 0), (40, 60))
        assert out.shape == (60, 40, 3)
        assert np.abs(out.astype(int) - np.rot90(img, k=-1)).mean() < 4


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["ROI_347_1.jpg", "ROI_346_1.jpg"])
def test_tissue_filled_ihc_crops_are_brightfield(name):
    """Crops with no glass at all (dense CD3/CD8 IHC, median brightness ~86-91) must not be taken for fluorescence."""
    with open_slide(shared_file("nuclick_ihc_lyon19_minitest", "images", name)) as s:
        s.check_brightfield()


def test_check_brightfield_on_synthetic_fluorescence(tmp_path):
    rng = np.random.default_rng(13)
    dark = rng.integers(0, 25, (200, 200, 3), dtype=np.uint8)
    dark[50:60, 50:60] = (0, 0, 255)  # a bright "nucleus" does not make it brightfield
    path = tmp_path / "fluo.png"
    Image.fromarray(dark).save(path)
    with open_slide(path) as s, pytest.raises(NotBrightfieldError, match="fluorescence"):
        s.check_brightfield()


def test_exact_downsamples_rule():
    from cleihc.slide._common import exact_downsamples

    dims = ((2100, 1100), (525, 275), (131, 68), (1000, 300))
    means = (1.0, 4.0, (2100 / 131 + 1100 / 68) / 2, (2.1 + 1100 / 300) / 2)
    assert exact_downsamples(dims, means) == (1.0, 4.0, 16.0, means[3])  # last: not a consistent scale
    assert exact_downsamples(((101, 99), (51, 50)), (1.0, 1.98)) == (1.0, 2.0)  # ceil on x, floor on y


def test_synthetic_module_writers_are_read_exactly(tmp_path):
    """Files from cleihc._tiffwrite (sample slides): SVS with 4x levels and a thumbnail, OME-TIFF with SubIFDs."""
    tiffwrite = pytest.importorskip("cleihc._tiffwrite")
    img = texture(1100, 2100, seed=3)
    svs = tiffwrite.write_svs(tmp_path / "s.svs", img, mpp_um=0.25, magnification=40)
    ome = tiffwrite.write_ome_tiff(tmp_path / "s.ome.tif", img, mpp_um=0.25)
    with open_slide(svs) as a, open_slide(ome) as b:
        for s in (a, b):
            assert s.backend == "tifffile"
            assert s.level_dimensions == ((2100, 1100), (525, 275), (131, 68))
            assert s.level_downsamples == (1.0, 4.0, 16.0)
            assert s.mpp == (0.25, 0.25)
            r = s.analysis_resolution(4.0)
            assert (r.level, r.factor, r.mpp_um) == (2, 1, (4.0, 4.0))
        assert (a.format, a.mpp_source, a.objective_power) == ("aperio", "vendor", 40.0)
        assert (b.format, b.mpp_source) == ("ome-tiff", "ome")
        assert a._backend._src == [0, 1, 2]
        for level, (w, h) in enumerate(a.level_dimensions):
            ours = a.read_level_rect(level, (0, 0), (w, h))
            np.testing.assert_array_equal(ours, openslide_rgb(svs, (0, 0), level, (w, h)))
            np.testing.assert_array_equal(ours, b.read_level_rect(level, (0, 0), (w, h)))


@pytest.mark.parametrize("suffix", [".tif", ".png", ".planar.tif"])
def test_reads_return_fresh_writeable_arrays(tmp_path, suffix):
    img = texture(64, 64, seed=14)
    path = tmp_path / f"w{suffix}"
    if suffix == ".png":
        Image.fromarray(img).save(path)
    elif suffix == ".tif":
        tifffile.imwrite(path, img, photometric="rgb", tile=(32, 32))
    else:
        tifffile.imwrite(path, np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate")
    with open_slide(path) as s:
        for out in (s.read_region((0, 0), (64, 64)), s.read_region((10, 10), (64, 64))):
            assert out.flags.writeable and out.flags.c_contiguous and out.dtype == np.uint8
            out[:] = 0
        np.testing.assert_array_equal(s.read_region((0, 0), (64, 64)), img)


def test_read_analysis_image_equals_one_rect_read(tmp_path):
    """The banded whole-slide read gives the same pixels as one rectangle read."""
    import cleihc.slide.base as base
    from cleihc.synthetic import render_skin, write_svs

    syn = render_skin(stain="cd3", width_px=700, height_px=500, mpp_um=0.5, seed=1, jpeg_quality=None)
    path = tmp_path / "s.svs"
    write_svs(path, syn.rgb, mpp_um=0.5)
    with open_slide(path) as s:
        res = s.analysis_resolution(2.0)
        whole = s.read_analysis_rect(res, (0, 0), res.dimensions_a)
        old = base._BAND_PIXELS
        base._BAND_PIXELS = 5000  # force many bands
        try:
            banded = s.read_analysis_image(res)
        finally:
            base._BAND_PIXELS = old
    np.testing.assert_array_equal(banded, whole)
    assert banded.shape == (res.dimensions_a[1], res.dimensions_a[0], 3)


def test_a_large_binned_read_is_made_in_bands_with_the_same_pixels(monkeypatch):
    """Regression: a binned read (napari's zoomed-out view of a single-level scan) read its whole level-0 block
    at once: a 1024-px chunk at factor 16 held 16384² level pixels (~800 MB). Above a bound it is read in bands;
    the pixels are the same."""
    import cleihc.slide.base as base
    from cleihc_testdata import SAMPLE_IMAGES

    with open_slide(SAMPLE_IMAGES / "S01_pre_cd3.svs") as s:
        res = s.analysis_resolution(1.0)  # level 0 binned by 2 (the file's next level is 4x)
        assert res.factor == 2
        whole = s.read_analysis_rect(res, (-3, 5), (res.dimensions_a[0] + 6, 300))
        reads = []
        original = s.read_level_rect

        def counted(level, location, size):
            reads.append(size[0] * size[1])
            return original(level, location, size)

        monkeypatch.setattr(s, "read_level_rect", counted)
        monkeypatch.setattr(base, "_MAX_BLOCK_PIXELS", 100_000)
        monkeypatch.setattr(base, "_BAND_PIXELS", 50_000)
        banded = s.read_analysis_rect(res, (-3, 5), (res.dimensions_a[0] + 6, 300))
    np.testing.assert_array_equal(banded, whole)
    assert len(reads) > 5 and max(reads) <= 50_000 + res.dimensions_a[0] * 4
