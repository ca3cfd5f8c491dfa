"""npe2 readers: slides as lazy multiscale images, and cleihc results folders as layers.

Both return None for paths they do not take, so napari can try other readers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from cleihc.errors import CleihcError
from cleihc.slide import is_slide
from napari_cleihc._layers import (
    LayerDataTuple,
    is_results_folder,
    results_folder_layers,
    results_slides,
    slide_layer,
)

__all__ = ["get_results_reader", "get_slide_reader", "read_results", "read_slide"]

log = logging.getLogger(__name__)

ReaderFunction = Callable[[str | list[str]], list[LayerDataTuple]]


def _single(path: str | os.PathLike[str] | list) -> str | None:
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None  # a stack of slides is not one image
        path = path[0]
    return os.fspath(path)


def get_slide_reader(path: str | list[str]) -> ReaderFunction | None:
    """The slide reader when `path` is one file cleihc opens (content sniff), else None."""
    p = _single(path)
    if p is None or not is_slide(p):
        return None
    return read_slide


def read_slide(path: str | list[str]) -> list[LayerDataTuple]:
    """A slide as a lazy multiscale RGB image in µm (one dask array per level, nothing read yet)."""
    p = _single(path)
    return [slide_layer(p)]


def get_results_reader(path: str | list[str]) -> ReaderFunction | None:
    """The results reader for a cleihc results folder (or one of its ``slides/<slide>.json``), else None."""
    p = _single(path)
    if p is None or not is_results_folder(p):
        return None
    return read_results


def read_results(path: str | list[str]) -> list[LayerDataTuple]:
    """One slide's results as layers: the slide, positive overlay, tissue, regions, exclusions, cells.

    A folder opens its first slide (the review queue moves through the others); ``slides/<slide>.json`` opens
    that slide.
    """
    p = Path(_single(path))
    if p.is_dir():
        out_dir, slide = p, results_slides(p)[0]
    else:
        out_dir, slide = p.parent.parent, p.stem
    try:
        return results_folder_layers(out_dir, slide)
    except (OSError, ValueError, KeyError, CleihcError) as exc:
        # napari shows reader errors to the user; make it one line naming the folder.
        raise CleihcError(f"cannot read the results of {slide!r}: {exc}", path=out_dir) from exc
