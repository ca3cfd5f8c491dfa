"""cleihc: quantify immunohistochemistry and histochemistry in whole-slide images of skin biopsies.

Data flows one way: slide → tiles → tissue → stain separation → measurement → regions → tables, QC images
and a provenance record. See ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from cleihc.errors import CleihcError

try:
    __version__ = version("cleihc")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["CleihcError", "__version__"]
