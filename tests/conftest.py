"""Shared test fixtures: where the real data lives, and the sample slides."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_IMAGES = REPO / "sample_images"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repo; tests that need it skip with a clear reason where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (see docs: ../shared/data next to the repo)")
    return SHARED_DATA


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data, or a skip naming what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test file absent: {path}")
    return path
