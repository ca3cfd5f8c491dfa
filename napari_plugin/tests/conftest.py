"""Fixtures of the napari-cleihc tests: a sample slide, and a results folder made by cleihc from it.

The slide is ``sample_images/S01_pre_cd3.svs`` when the repository has it, else an equivalent synthetic slide
written by :mod:`cleihc.synthetic` (smaller, so the suite stays quick).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# napari's canvas needs OpenGL, which Qt's offscreen platform does not give here; pytest-xvfb provides a
# virtual X server with Mesa instead, so an inherited QT_QPA_PLATFORM=offscreen would only break the tests.
if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
    del os.environ["QT_QPA_PLATFORM"]

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_images" / "S01_pre_cd3.svs"


@pytest.fixture(scope="session")
def sample_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if SAMPLE.is_file():
        return SAMPLE
    from cleihc.synthetic import render_skin, write_svs

    syn = render_skin(stain="cd3", width_px=1200, height_px=900, mpp_um=0.5, seed=7, jpeg_quality=None)
    return write_svs(tmp_path_factory.mktemp("slide") / "S01_pre_cd3.svs", syn.rgb, mpp_um=0.5)


@pytest.fixture(scope="session")
def _results_master(sample_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cleihc import quantify
    from cleihc.outputs import rebuild_tables, write_slide_outputs

    out = tmp_path_factory.mktemp("results")
    write_slide_outputs(quantify(sample_slide, "cd3"), out)
    rebuild_tables(out)
    return out


@pytest.fixture
def results_dir(_results_master: Path, tmp_path: Path) -> Path:
    """A fresh copy of the results folder (tests write corrections and review states into it)."""
    out = tmp_path / "results"
    shutil.copytree(_results_master, out)
    return out
