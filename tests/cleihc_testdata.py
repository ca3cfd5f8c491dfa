"""Where the test data lives: ``../shared/data`` (real files by others) and ``sample_images/`` (our own).

A module with a unique name, so tests can import it whatever other ``conftest.py`` files pytest collects.
"""

from __future__ import annotations

from pathlib import Path

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
