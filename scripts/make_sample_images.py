"""Regenerate the committed sample slides in sample_images/ (see sample_images/README.md).

Usage: python scripts/make_sample_images.py [OUT_DIR]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from cleihc.synthetic import make_sample_set


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "sample_images"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in make_sample_set(out):
        print(f"{path}  ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
