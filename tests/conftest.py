"""Shared test fixtures: where the real data lives, and the sample slides."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleihc_testdata import SAMPLE_IMAGES, SHARED_DATA

__all__ = ["SAMPLE_IMAGES", "SHARED_DATA"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repo; tests that need it skip with a clear reason where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (../shared/data next to the repo holds it)")
    return SHARED_DATA
