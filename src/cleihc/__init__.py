"""cleihc: quantify immunohistochemistry and histochemistry in whole-slide images of skin biopsies.

Data flows one way: slide → tiles → tissue → stain separation → measurement → regions → tables, QC images
and a provenance record. See ``docs/ARCHITECTURE.md``.

The public API (imported lazily, so ``import cleihc`` stays quick)::

    open_slide, Slide                 cleihc.slide
    load_protocol, list_protocols     cleihc.protocol
    quantify, Result                  cleihc.pipeline
    SlideResults, Corrections         cleihc.corrections
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from cleihc.errors import CleihcError

try:
    __version__ = version("cleihc")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

_LAZY = {
    "open_slide": "cleihc.slide",
    "Slide": "cleihc.slide",
    "load_protocol": "cleihc.protocol",
    "list_protocols": "cleihc.protocol",
    "Protocol": "cleihc.protocol",
    "quantify": "cleihc.pipeline",
    "Result": "cleihc.pipeline",
    "SlideResults": "cleihc.corrections",
    "Corrections": "cleihc.corrections",
    "CellEdit": "cleihc.corrections",
}

__all__ = ["CleihcError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cleihc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
