"""OpenSlide backend: every vendor format OpenSlide reads (MIRAX, DICOM, Leica, Philips, Ventana, ...).

OpenSlide is also the metadata source (vendor, MPP, objective, associated images, background) for TIFF-family
slides whose pixels the tifffile backend reads, and the reference for correctness in the tests.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import openslide

from cleihc.errors import CorruptSlideError, UnsupportedFormatError
from cleihc.slide._common import (
    Backend,
    BackendMeta,
    composite_on_white,
    corrupt,
    parse_hex_colour,
)

logger = logging.getLogger(__name__)

__all__ = ["OpenSlideBackend", "detect_format", "openslide_meta"]


def detect_format(path: str) -> str | None:
    """OpenSlide's format name for `path` (``"aperio"``, ``"dicom"``, ...) or None; never raises."""
    try:
        return openslide.OpenSlide.detect_format(path)
    except Exception:  # a probe: any failure means "not OpenSlide's"
        return None


def _float(props: dict[str, str], key: str) -> float | None:
    try:
        value = float(props[key])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def openslide_meta(osr: openslide.OpenSlide, fmt: str) -> BackendMeta:
    """Metadata of an open OpenSlide handle."""
    props = dict(osr.properties)
    vendor = props.get(openslide.PROPERTY_NAME_VENDOR, fmt) or fmt
    mpp_x = _float(props, openslide.PROPERTY_NAME_MPP_X)
    mpp_y = _float(props, openslide.PROPERTY_NAME_MPP_Y)
    mpp = None
    source = None
    # generic-tiff MPP comes from TIFF resolution tags, which are often a 72 dpi default: the tifffile backend
    # judges those; for every vendor format the value is the scanner's.
    if mpp_x and mpp_y and vendor != "generic-tiff":
        mpp, source = (mpp_x, mpp_y), "vendor"
    assoc: dict[str, tuple[int, int]] = {}
    for name in osr.associated_images:
        w = props.get(f"openslide.associated.{name}.width")
        h = props.get(f"openslide.associated.{name}.height")
        if w is not None and h is not None:
            assoc[name] = (int(w), int(h))
        else:
            assoc[name] = osr.associated_images[name].size
    return BackendMeta(
        format=fmt,
        vendor=vendor,
        level_dimensions=tuple(tuple(int(v) for v in d) for d in osr.level_dimensions),
        level_downsamples=tuple(float(d) for d in osr.level_downsamples),
        properties=props,
        associated=assoc,
        mpp_um=mpp,
        mpp_source=source,
        objective_power=_float(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER),
        background_rgb=parse_hex_colour(props.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR)),
    )


def _reason(exc: BaseException, path: str) -> str:
    """OpenSlide's message without its ``Reading <path>:`` prefix (the error already names the file)."""
    text = " ".join(str(exc).split())
    prefix = f"Reading {path}:"
    return text[len(prefix) :].strip() if text.startswith(prefix) else text


def open_openslide(path: str, fmt: str, *, dicom: bool = False) -> openslide.OpenSlide:
    """Open with OpenSlide, mapping its errors onto cleihc errors."""
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise UnsupportedFormatError(
            f"OpenSlide does not support this {fmt} file ({_reason(exc, path)}); convert it to a pyramidal TIFF or SVS",
            path=path,
        ) from exc
    except openslide.OpenSlideError as exc:
        if dicom:
            # e.g. "Couldn't get image flavor": a DICOM object that is not a conformant VL WSI.
            raise UnsupportedFormatError(
                f"DICOM file that OpenSlide cannot read ({_reason(exc, path)}); export it as a conformant DICOM WSI "
                "or as a pyramidal TIFF",
                path=path,
            ) from exc
        raise CorruptSlideError(
            f"OpenSlide recognises a {fmt} slide but cannot open it ({_reason(exc, path)}); the file is truncated or "
            "corrupt, re-copy it",
            path=path,
        ) from exc


class OpenSlideBackend(Backend):
    """Pixels and metadata through OpenSlide."""

    name = "openslide"

    def __init__(self, path: str, fmt: str, *, dicom: bool = False):
        self.path = path
        self._osr = open_openslide(path, fmt, dicom=dicom)
        self.meta = openslide_meta(self._osr, fmt)
        # OpenSlide maps level-0 locations with its own downsamples; the Slide may expose exact integer ones.
        self._os_downsamples = tuple(float(d) for d in self._osr.level_downsamples)

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._os_downsamples[level]
        # OpenSlide takes level-0 coordinates and divides by its downsample; for integer downsamples (all vendor
        # pyramids we know) this maps back exactly onto level pixel (x, y).
        loc = (round(x * ds), round(y * ds))
        try:
            img = self._osr.read_region(loc, level, (w, h))
        except openslide.OpenSlideError as exc:
            raise corrupt(self.path, exc) from exc
        return composite_on_white(np.asarray(img))

    def read_associated(self, name: str) -> np.ndarray:
        try:
            img = self._osr.associated_images[name]
        except openslide.OpenSlideError as exc:
            raise corrupt(self.path, exc, f"associated image {name!r}") from exc
        return composite_on_white(np.asarray(img.convert("RGBA")))

    def read_level0_openslide(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """OpenSlide's own read_region (level-0 location), for comparisons."""
        return composite_on_white(np.asarray(self._osr.read_region((x0, y0), level, (w, h))))

    def close(self) -> None:
        self._osr.close()
