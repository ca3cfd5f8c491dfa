"""``cleihc info``: text and JSON output, exit status, one error line per failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cleihc.cli import main
from cleihc_testdata import shared_file


@pytest.fixture
def ome(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (128, 192, 3), dtype=np.uint8)
    path = tmp_path / "s.ome.tif"
    meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(img, subifds=1, tile=(64, 64), photometric="rgb", metadata=meta)
        tw.write(np.ascontiguousarray(img[::2, ::2]), tile=(64, 64), photometric="rgb", subfiletype=1)
    return path


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.full((30, 40, 3), 220, np.uint8)).save(path)
    return path


def test_info_text(ome, capsys):
    assert main(["info", str(ome)]) == 0
    out = capsys.readouterr().out
    assert str(ome) in out
    assert "ome-tiff" in out and "tifffile" in out
    assert "192 x 128 px" in out
    assert "2: 192x128 (/1), 96x64 (/2)" in out
    assert "0.5 x 0.5 um/px (ome)" in out


def test_info_json_and_mpp_override(ome, png, capsys):
    assert main(["info", "--json", "--mpp", "0.25", str(ome), str(png)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["format"] for d in data] == ["ome-tiff", "png"]
    assert data[0]["levels"] == [
        {"level": 0, "width": 192, "height": 128, "downsample": 1.0},
        {"level": 1, "width": 96, "height": 64, "downsample": 2.0},
    ]
    assert data[1]["mpp_x"] == 0.25 and data[1]["mpp_source"] == "user"
    assert data[1]["dimensions"] == [40, 30] and data[1]["backend"] == "image"


def test_info_without_mpp(png, capsys):
    assert main(["info", "--json", str(png)]) == 0
    (d,) = json.loads(capsys.readouterr().out)
    assert d["mpp_x"] is None and d["mpp_source"] is None


def test_info_failures_one_line_each(ome, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    missing = tmp_path / "missing.svs"
    status = main(["info", str(missing), str(ome), str(text)])
    assert status == 1
    captured = capsys.readouterr()
    assert "192 x 128 px" in captured.out  # the good file is still described
    lines = captured.err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"cleihc info: error: {missing}: no such file")
    assert lines[1].startswith(f"cleihc info: error: {text}: not a slide")
    assert "Traceback" not in captured.err


@pytest.mark.shared_data
def test_info_real_svs_json(capsys):
    path = shared_file("cmu1_small_region_svs", "CMU-1-Small-Region.svs")
    assert main(["info", "--json", str(path)]) == 0
    (d,) = json.loads(capsys.readouterr().out)
    assert (d["format"], d["vendor"], d["backend"]) == ("aperio", "aperio", "tifffile")
    assert d["dimensions"] == [2220, 2967]
    assert d["mpp_x"] == pytest.approx(0.499) and d["mpp_source"] == "vendor"
    assert d["objective_power"] == 20.0
    assert {a["name"] for a in d["associated_images"]} == {"label", "macro", "thumbnail"}


def test_info_subprocess(ome, tmp_path):
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    script = Path(sys.executable).with_name("cleihc")  # the installed console script
    cmd = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "import sys, cleihc.cli as c; sys.exit(c.main())"]
    )
    proc = subprocess.run(
        [*cmd, "info", "--json", str(ome), str(empty)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert len(data) == 1 and data[0]["mpp_source"] == "ome"
    assert proc.stderr.strip() == f"cleihc info: error: {empty}: empty file (0 bytes); re-copy the slide"
