"""Where the test data lives: ``../shared/data`` (real files by others) and ``sample_images/`` (our own).

A module with a unique name, so tests can import it whatever other ``conftest.py`` files pytest collects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_IMAGES = REPO / "sample_images"


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data, or a skip naming what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"real test file absent: {path} (../shared/data next to the repo holds the real test data)"
        )
    return path


#: Stain vectors 5-6 degrees from the hdab preset, as a real scanner might give, and a glass colour.
SCANNER_HDAB = ((0.60, 0.74, 0.30), (0.33, 0.56, 0.76))
SCANNER_GLASS = (241, 238, 246)


def two_stain_slide(tmp_path: Path) -> Path:
    """A 400 x 400 px PNG (read at 2 µm/px): glass around a tissue square, hematoxylin on its left half and DAB
    on its right (each with a trace of the other), recomposed with :data:`SCANNER_HDAB` and 1-level noise."""
    from PIL import Image

    from cleihc import stains

    truth = stains.StainMatrix(("hematoxylin", "dab"), [list(v) for v in SCANNER_HDAB])
    rng = np.random.default_rng(0)
    h = w = 400
    conc = np.zeros((h, w, 3))
    y, x = np.mgrid[0:h, 0:w]
    tissue = (np.abs(y - 200) < 140) & (np.abs(x - 200) < 140)
    left, right = tissue & (x < 200), tissue & (x >= 200)
    conc[..., 0] = np.where(left, rng.uniform(0.15, 1.0, (h, w)), 0) + np.where(
        right, rng.uniform(0, 0.05, (h, w)), 0
    )
    conc[..., 1] = np.where(right, rng.uniform(0.15, 1.0, (h, w)), 0) + np.where(
        left, rng.uniform(0, 0.05, (h, w)), 0
    )
    rgb = stains.recompose(conc, truth, background=SCANNER_GLASS).astype(float) + rng.normal(
        0, 1.0, (h, w, 3)
    )
    path = tmp_path / "slide.png"
    Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8)).save(path)
    return path
