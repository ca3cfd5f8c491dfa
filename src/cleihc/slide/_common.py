"""What every backend shares: the backend interface, alpha compositing, error wrapping, MPP helpers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from cleihc.errors import CorruptSlideError

__all__ = [
    "Backend",
    "BackendMeta",
    "composite_on_white",
    "exact_downsamples",
    "mpp_from_unit",
    "parse_aperio_description",
]

# A resolution coarser than this is not a microscope scale: 72/96/150/300 dpi are screen or scanner defaults
# written by ordinary image software (72 dpi -> 352.8 µm/px), and using them would silently give absurd areas.
MAX_PLAUSIBLE_MPP_UM = 50.0

_UNIT_TO_UM = {
    "um": 1.0,
    "µm": 1.0,  # micro sign
    "μm": 1.0,  # greek mu
    "\\u00b5m": 1.0,  # ImageJ writes the escape literally
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "inch": 25400.0,
    "in": 25400.0,
}


def mpp_from_unit(size_per_px: float, unit: str) -> float | None:
    """Microns per pixel from a pixel size expressed in `unit`, or None if the unit or value is not usable."""
    factor = _UNIT_TO_UM.get(unit.strip().lower())
    if factor is None or not math.isfinite(size_per_px) or size_per_px <= 0:
        return None
    mpp = size_per_px * factor
    if not (0 < mpp <= MAX_PLAUSIBLE_MPP_UM):
        return None
    return mpp


def parse_aperio_description(description: str) -> dict[str, str]:
    """Key/value pairs of an Aperio ImageDescription (``...|MPP = 0.25|AppMag = 40``)."""
    out: dict[str, str] = {}
    for part in description.split("|")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB uint8 from RGB(A) uint8: transparent pixels become white (non-premultiplied alpha).

    Integer arithmetic with rounding half up, so the result is exact and deterministic.
    """
    if rgba.shape[-1] == 3:
        return rgba
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(rgba[..., :3])
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def corrupt(path: str, exc: BaseException, what: str = "tile data") -> CorruptSlideError:
    """A CorruptSlideError naming the file, for a decode failure in a backend."""
    detail = " ".join(str(exc).split())[:200] or type(exc).__name__
    return CorruptSlideError(
        f"cannot decode {what} ({type(exc).__name__}: {detail}); the file is truncated or corrupt, "
        "re-export or re-copy it",
        path=path,
    )


_HEX_COLOUR = re.compile(r"^#?([0-9a-fA-F]{6})$")


def parse_hex_colour(text: str | None) -> tuple[int, int, int] | None:
    """``"FFFFFF"`` -> (255, 255, 255); None when absent or malformed."""
    if not text:
        return None
    m = _HEX_COLOUR.match(text.strip())
    if not m:
        return None
    v = int(m.group(1), 16)
    return ((v >> 16) & 255, (v >> 8) & 255, v & 255)


@dataclass
class BackendMeta:
    """Metadata a backend found in the file (everything but pixels)."""

    format: str
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str] = field(default_factory=dict)
    associated: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (width, height)
    mpp_um: tuple[float, float] | None = None
    mpp_source: str | None = None
    objective_power: float | None = None
    background_rgb: tuple[int, int, int] | None = None


class Backend:
    """Interface of a pixel source. Subclasses set `name` and `meta` and implement the readers.

    `read_level` is only called with a rectangle fully inside the level; the `Slide` handles borders.
    """

    name: str = ""
    meta: BackendMeta

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of level pixels [y, y+h) x [x, x+w), inside the level."""
        raise NotImplementedError

    def read_associated(self, name: str) -> np.ndarray:
        """RGB uint8 array of an associated image (label, macro, thumbnail, ...)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles."""


def downsamples_from_dimensions(dims: tuple[tuple[int, int], ...]) -> tuple[float, ...]:
    """OpenSlide's convention: the mean of the x and y ratios to level 0."""
    w0, h0 = dims[0]
    return tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)


def exact_downsamples(dims: tuple[tuple[int, int], ...], downsamples: tuple[float, ...]) -> tuple[float, ...]:
    """Integer downsamples where the level sizes say so, else the given (OpenSlide-convention) values.

    OpenSlide reports the mean of the width and height ratios, e.g. 4.016 for a 300x250 slide's 75x62 level,
    although the level was made by binning 4 x 4 and dropping the remainder. When both sides of a level are
    ``floor`` or ``ceil`` of level 0 divided by the nearest integer, that integer is the true scale: it maps level
    pixels onto level-0 pixels exactly and gives exact areas.
    """
    w0, h0 = dims[0]
    out = []
    for (w, h), ds in zip(dims, downsamples, strict=True):
        d = round(ds)
        fits = d >= 1 and w in (w0 // d, -(-w0 // d)) and h in (h0 // d, -(-h0 // d))
        out.append(float(d) if fits else float(ds))
    return tuple(out)
