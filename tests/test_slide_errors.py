"""cleihc.slide refuses bad input with one-line cleihc errors that name the file."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from cleihc.errors import (
    CorruptSlideError,
    NotBrightfieldError,
    SlideNotFoundError,
    SlidePermissionError,
    UnsupportedFormatError,
)
from cleihc.slide import is_slide, open_slide
from cleihc_testdata import shared_file


def one_line_naming(err: pytest.ExceptionInfo, path) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.svs"
    with pytest.raises(SlideNotFoundError) as err:
        open_slide(path)
    assert isinstance(err.value, FileNotFoundError)
    assert "no such file" in one_line_naming(err, path)
    assert not is_slide(path)


def test_directory(tmp_path):
    with pytest.raises(UnsupportedFormatError) as err:
        open_slide(tmp_path)
    assert "directory" in one_line_naming(err, tmp_path)
    assert not is_slide(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.svs", b"", "empty file"),
        (
            "random.tif.bin",
            bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
            "not a slide",
        ),
        ("notes.svs", b"this is a text file, not a slide\n" * 20, "not a slide"),
    ],
)
def test_not_a_slide(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnsupportedFormatError) as err:
        open_slide(path)
    assert isinstance(err.value, ValueError)
    assert match in one_line_naming(err, path)
    assert not is_slide(path)


def test_permission_denied(tmp_path, monkeypatch):
    """Root bypasses chmod 000, so simulate the denial where the reader checks it."""
    path = tmp_path / "p.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(path) else real_access(p, mode, **kw)
    )
    with pytest.raises(SlidePermissionError) as err:
        open_slide(path)
    assert isinstance(err.value, PermissionError)
    assert "permission denied" in one_line_naming(err, path)


def test_permission_denied_while_opening(tmp_path, monkeypatch):
    """A PermissionError raised by a backend itself (e.g. an ACL os.access does not see) is mapped too."""
    path = tmp_path / "p.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("cleihc.slide._image.Image.open", deny)
    with pytest.raises(SlidePermissionError) as err:
        open_slide(path)
    one_line_naming(err, path)


def test_truncated_synthetic_tiff(tmp_path):
    img = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    full = tmp_path / "full.tif"
    # IFD written first so that truncation cuts tile data, as a partial copy of a slide does
    tifffile.imwrite(full, img, photometric="rgb", tile=(64, 64), compression="zlib")
    data = full.read_bytes()
    with tifffile.TiffFile(full) as tf:
        assert max(tf.pages.first.dataoffsets) > 8  # sanity
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CorruptSlideError) as err:
        open_slide(cut)
    one_line_naming(err, cut)


@pytest.mark.shared_data
def test_truncated_real_svs(tmp_path):
    src = shared_file("cmu1_small_region_svs", "CMU-1-Small-Region.svs")
    cut = tmp_path / "cut.svs"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(CorruptSlideError) as err:
        open_slide(cut)
    one_line_naming(err, cut)


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_corrupt_tile_raises_at_read(tmp_path, compression):
    img = np.full((128, 128, 3), 200, np.uint8)
    path = tmp_path / f"bad_{compression}.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64), compression=compression)
    with tifffile.TiffFile(path) as tf:
        offset = tf.pages.first.dataoffsets[3]
        count = tf.pages.first.databytecounts[3]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + count] = b"\xff\x00" * (count // 2) + b"\xff" * (count % 2)
    path.write_bytes(bytes(raw))
    with open_slide(path) as s:
        assert (s.read_region((0, 0), (64, 64)) == 200).all()  # intact tiles still read
        with pytest.raises(CorruptSlideError) as err:
            s.read_region((64, 64), (64, 64))
    assert "corrupt" in one_line_naming(err, path)


def test_truncated_png(tmp_path):
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:4000])
    with pytest.raises(CorruptSlideError) as err, open_slide(cut) as s:
        s.read_region((0, 0), (10, 10))
    one_line_naming(err, cut)


def test_16_bit_tiff_is_not_brightfield(tmp_path):
    path = tmp_path / "u16.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint16), photometric="rgb", tile=(32, 32))
    with pytest.raises(NotBrightfieldError) as err:
        open_slide(path)
    assert "uint16" in one_line_naming(err, path)


def test_float_tiff_is_not_brightfield(tmp_path):
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.float32), photometric="rgb")
    with pytest.raises(NotBrightfieldError):
        open_slide(path)


def test_two_channel_ome_is_not_brightfield(tmp_path):
    path = tmp_path / "two.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 64, 64), np.uint8), metadata={"axes": "CYX"}, ome=True)
    with pytest.raises(NotBrightfieldError) as err:
        open_slide(path)
    assert "multi-channel" in one_line_naming(err, path)


def test_grayscale_images_are_not_brightfield(tmp_path):
    tif = tmp_path / "gray.tif"
    tifffile.imwrite(tif, np.zeros((64, 64), np.uint8))
    png = tmp_path / "gray.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(png)
    for path in (tif, png):
        with pytest.raises(NotBrightfieldError) as err:
            open_slide(path)
        one_line_naming(err, path)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["4D-series.ome.tiff", "multi-channel-z-series.ome.tif"])
def test_ome_samples_are_refused(name):
    path = shared_file("ome_tiff_samples", name)
    with pytest.raises(NotBrightfieldError) as err:
        open_slide(path)
    assert "int8" in one_line_naming(err, path)


@pytest.mark.shared_data
def test_dicom_openslide_refuses():
    path = shared_file("pathml_small_dicom", "small_dicom.dcm")
    with pytest.raises(UnsupportedFormatError) as err:
        open_slide(path)
    msg = one_line_naming(err, path)
    assert "DICOM" in msg and msg.count(str(path)) == 1


@pytest.mark.shared_data
def test_renamed_file_is_read_by_content(tmp_path):
    """The backend follows content, not extension: an SVS named .png is still an Aperio slide."""
    src = shared_file("openslide_python_fixtures", "small.svs")
    dst = tmp_path / "looks_like.png"
    shutil.copy(src, dst)
    with open_slide(dst) as s:
        assert (s.format, s.backend) == ("aperio", "tifffile")


def test_no_file_descriptor_leak(tmp_path):
    """Opening, reading and closing (or dropping) many slides leaves no open descriptors behind."""
    import gc

    path = tmp_path / "fd.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb", tile=(32, 32))
    bad = tmp_path / "u16.tif"
    tifffile.imwrite(bad, np.zeros((64, 64, 3), np.uint16), photometric="rgb", tile=(32, 32))
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        pytest.skip("needs /proc/self/fd (Linux)")
    before = len(os.listdir(fd_dir))
    for i in range(30):
        s = open_slide(path)
        s.read_region((0, 0), (64, 64))
        if i % 2:
            s.close()
        del s
        with pytest.raises(NotBrightfieldError):
            open_slide(bad)
    gc.collect()
    assert len(os.listdir(fd_dir)) <= before + 1
