"""napari-cleihc: view slides and cleihc results in napari, quantify, review and correct.

All measuring happens in :mod:`cleihc`; this package only reads, displays and edits. The layer builders in
:mod:`napari_cleihc._layers` are pure functions returning napari ``LayerDataTuple`` s (no Qt), the widgets live in
``_quantify_widget``, ``_correct_widget`` and ``_review_widget``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-cleihc")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
