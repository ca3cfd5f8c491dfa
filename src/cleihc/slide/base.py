"""The `Slide`: one type over three pixel backends (OpenSlide, tifffile, Pillow), chosen by file content.

Coordinates follow OpenSlide: locations ``(x, y)`` in level-0 pixels unless the name says otherwise (``_l`` level
pixels, ``_a`` analysis pixels), sizes ``(width, height)``, arrays ``(H, W, 3)`` RGB uint8. Reads outside the image
return white (glass), never an error.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np

from cleihc.errors import (
    MissingMppError,
    NotBrightfieldError,
    SlideError,
    SlideNotFoundError,
    SlidePermissionError,
    UnsupportedFormatError,
)
from cleihc.slide._common import Backend, exact_downsamples

logger = logging.getLogger(__name__)

__all__ = ["AnalysisResolution", "Slide", "is_slide", "open_slide"]

# Tolerance of the level choice: a level at 0.499 µm/px serves a request for 0.5 µm/px.
MPP_TOLERANCE = 1.1
# Thumbnails are built from bands of at most this many level pixels, so a single-level giant never loads whole.
_BAND_PIXELS = 4_000_000  # level pixels read at once by read_analysis_image: bounds its memory (~60 MB)
# Above this many level pixels (~190 MB of RGB) read_analysis_rect bins in bands of _BAND_PIXELS; below, in one
# read (the engine's tiles, even at factor 2, stay below it).
_MAX_BLOCK_PIXELS = 64_000_000
# Brightfield glass is bright; a fluorescence slide's background is near black (see Slide.check_brightfield).
_MIN_BRIGHTFIELD_P95 = 120.0
_MIN_BRIGHTFIELD_MEDIAN = 40.0

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _sniff(head: bytes) -> str | None:
    """File kind from its first bytes: ``tiff``, ``png``, ``jpeg``, ``dicom`` or None."""
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[128:132] == b"DICM":
        return "dicom"
    return None


def _read_head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(512)
    except PermissionError as exc:
        raise SlidePermissionError(
            "permission denied; make the file readable (chmod a+r) or run as its owner", path=path
        ) from exc
    except IsADirectoryError as exc:
        raise UnsupportedFormatError("is a directory; pass a slide file inside it", path=path) from exc
    except FileNotFoundError as exc:
        raise SlideNotFoundError("no such file; check the path", path=path) from exc


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise SlideNotFoundError("no such file; check the path", path=path)
    if os.path.isdir(path):
        raise UnsupportedFormatError(
            "is a directory, not a slide; pass the slide file (for MIRAX the .mrxs file beside the folder)",
            path=path,
        )
    if not os.path.isfile(path):
        raise UnsupportedFormatError("not a regular file; pass a slide file", path=path)
    if not os.access(path, os.R_OK):
        raise SlidePermissionError(
            "permission denied; make the file readable (chmod a+r) or run as its owner", path=path
        )


def _open_backend(path: str) -> Backend:
    from cleihc.slide._openslide import OpenSlideBackend, detect_format

    _check_path(path)
    head = _read_head(path)
    if not head:
        raise UnsupportedFormatError("empty file (0 bytes); re-copy the slide", path=path)
    kind = _sniff(head)
    os_fmt = detect_format(path)
    if kind == "tiff":
        from cleihc.slide._tiff import open_tiff

        return open_tiff(path, os_fmt)
    if os_fmt is not None:
        return OpenSlideBackend(path, os_fmt, dicom=kind == "dicom" or os_fmt == "dicom")
    if kind in ("png", "jpeg"):
        from cleihc.slide._image import ImageBackend

        return ImageBackend(path, kind)
    if kind == "dicom":
        raise UnsupportedFormatError(
            "DICOM file that is not a whole-slide image OpenSlide can read; export it as a conformant "
            "DICOM WSI or as a pyramidal TIFF",
            path=path,
        )
    raise UnsupportedFormatError(
        "not a slide or image cleihc can read (supported: SVS, NDPI, VMS, MRXS, SCN, BIF, Philips TIFF, "
        "DICOM WSI, tiled/OME/ImageJ TIFF, PNG, JPEG)",
        path=path,
    )


def slide_stem(path: str | os.PathLike[str]) -> str:
    """A slide's name in tables and output files: the file name without its extension (``.ome.tif`` counts as one).

    Examples
    --------
    >>> slide_stem("/data/S01_pre_cd3.svs"), slide_stem("S02_pre_cxcl10.ome.tif")
    ('S01_pre_cd3', 'S02_pre_cxcl10')
    """
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def is_slide(path: str | os.PathLike[str]) -> bool:
    """Whether `path` looks like a slide or image cleihc can open (a cheap content sniff, no decoding).

    Used by batch mode to pick slides out of a folder; `open_slide` still decides for real.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    if _sniff(head) in ("tiff", "png", "jpeg"):
        return True
    from cleihc.slide._openslide import detect_format

    return detect_format(path) is not None


def _normalise_mpp(mpp: float | Sequence[float] | None, path: str) -> tuple[float, float] | None:
    if mpp is None:
        return None
    values = (mpp, mpp) if np.isscalar(mpp) else tuple(mpp)
    try:
        x, y = (float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise MissingMppError(
            f"mpp must be a number or an (x, y) pair of microns per pixel, got {mpp!r}", path=path
        ) from exc
    if not (math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0):
        raise MissingMppError(f"mpp must be positive microns per pixel, got {mpp!r}", path=path)
    return x, y


def _bin_mean(block: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each factor x factor block, rounded half up, in exact integer arithmetic."""
    h, w = block.shape[0] // factor, block.shape[1] // factor
    out = np.empty((h, w, block.shape[2]), dtype=np.uint8)
    n = int(factor) * int(factor)
    # sum -> rounded mean as a table (exact; a 64-bit division per value cost more than the JPEG decode); very
    # large factors, whose table would be big, divide.
    lut = ((2 * np.arange(255 * n + 1) + n) // (2 * n)).astype(np.uint8) if n <= 4096 else _NO_LUT
    # numpy's sum over a reshaped view took ~18 ns per value: binning cost 4x the JPEG decode of a 40x scan read
    # at 0.5 µm/px.
    _bin_mean_kernel(np.ascontiguousarray(block), int(factor), lut, n <= 4096, out)
    return out


_NO_LUT = np.zeros(1, np.uint8)


@numba.njit(cache=True, nogil=True)
def _bin_mean_kernel(block, f, lut, use_lut, out):  # pragma: no cover - compiled
    h, w, c = out.shape
    n = f * f
    flat = block.reshape(block.shape[0], block.shape[1] * c)  # scalar indexing: no per-pixel array views
    acc = np.zeros(w * c, np.int64)
    for i in range(h):
        acc[:] = 0
        for di in range(f):
            row = flat[i * f + di]
            for j in range(w):
                for dj in range(f):
                    src = (j * f + dj) * c
                    for k in range(c):
                        acc[j * c + k] += row[src + k]
        dst = out[i].reshape(w * c)
        if use_lut:
            for q in range(w * c):
                dst[q] = lut[acc[q]]
        else:
            for q in range(w * c):
                dst[q] = (2 * acc[q] + n) // (2 * n)  # round half up, as integers


def _resize_rgb(image: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Resize of an RGB uint8 image to (H, W), for display (thumbnails, previews), never for measurement.

    Pillow's bilinear filter, which widens its support when shrinking (anti-aliased) and works on 8-bit data in C:
    a slide's 1600 px QC thumbnail took 1.5 s through a float anti-aliased resize, about 20 ms here.
    """
    if image.shape[:2] == tuple(shape_hw):
        return image
    from PIL import Image

    h, w = (int(v) for v in shape_hw)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((w, h), resample=Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


@dataclass(frozen=True)
class AnalysisResolution:
    """Where and how a slide is read for analysis.

    Analysis pixel ``(i, j)`` is the mean of the ``factor x factor`` block of pixels of `level` starting at level
    pixel ``(i * factor, j * factor)``; the grid is global, so a pixel never depends on the tile it is read in.

    Attributes
    ----------
    level : int
        Pyramid level read.
    factor : int
        Integer binning factor (>= 1) applied to level pixels.
    mpp_um : tuple of float
        Effective (x, y) microns per analysis pixel; use these for every area.
    downsample : float
        ``level_downsample * factor``, relative to level 0.
    dimensions_a : tuple of int
        Whole-slide size in analysis pixels, ``floor(level_dimensions / factor)``.
    """

    level: int
    factor: int
    mpp_um: tuple[float, float]
    downsample: float
    dimensions_a: tuple[int, int]


class Slide:
    """A whole-slide image (or a plain image) opened read-only.

    Parameters
    ----------
    path : str or PathLike
        The slide file. Its backend is chosen from its content, not its extension.
    mpp : float or (float, float), optional
        Microns per pixel (x, y) of level 0, overriding the file's value (``mpp_source == "user"``).

    Notes
    -----
    A `Slide` pickles by path (and mpp override) and reopens on unpickling, so it can be sent to Dask workers.
    Reads are thread-safe.

    Examples
    --------
    >>> with open_slide("CMU-1-Small-Region.svs") as s:  # doctest: +SKIP
    ...     tile = s.read_region((0, 0), (512, 512))
    """

    def __init__(self, path: str | os.PathLike[str], *, mpp: float | Sequence[float] | None = None):
        spath = os.fspath(path)
        self.path = Path(spath)
        self._mpp_override = _normalise_mpp(mpp, spath)
        try:
            self._backend = _open_backend(spath)
        except PermissionError as exc:  # raised by a backend opening the file after our access check
            raise SlidePermissionError(
                "permission denied; make the file readable (chmod a+r) or run as its owner", path=spath
            ) from exc
        self._meta = self._backend.meta
        self._meta.level_downsamples = exact_downsamples(
            self._meta.level_dimensions, self._meta.level_downsamples
        )
        self._closed = False

    # -- pickling (zarr stores and OpenSlide handles do not pickle): reopen by path --------------------------
    def __reduce__(self):
        return (_reopen, (str(self.path), self._mpp_override))

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file handles (idempotent)."""
        if not self._closed:
            self._closed = True
            self._backend.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({str(self.path)!r}, backend={self.backend!r}, format={self.format!r}, {w}x{h})"

    # -- description ----------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``"openslide"``, ``"tifffile"`` or ``"image"``: what decodes the pixels."""
        return self._backend.name

    @property
    def format(self) -> str:
        """Detected format: ``"aperio"``, ``"hamamatsu"``, ``"generic-tiff"``, ``"ome-tiff"``, ``"dicom"``, ..."""
        return self._meta.format

    @property
    def vendor(self) -> str:
        """Scanner vendor as OpenSlide names it, else the format."""
        return self._meta.vendor

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self._meta.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._meta.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each level."""
        return self._meta.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of each level relative to level 0.

        The exact integer when the level's size is level 0's divided by it (rounded either way), e.g. 4.0 where
        OpenSlide reports 4.016 for a 75x62 level of a 300x250 slide; otherwise OpenSlide's mean of the width and
        height ratios.
        """
        return self._meta.level_downsamples

    @property
    def has_mpp(self) -> bool:
        return self._mpp_override is not None or self._meta.mpp_um is not None

    @property
    def mpp_source(self) -> str | None:
        """``"user"``, ``"vendor"``, ``"tiff-resolution"``, ``"ome"`` or None."""
        if self._mpp_override is not None:
            return "user"
        return self._meta.mpp_source

    @property
    def file_mpp(self) -> tuple[float, float] | None:
        """The file's own level-0 (x, y) microns per pixel, whatever the override; None when it has none."""
        return self._meta.mpp_um

    @property
    def mpp(self) -> tuple[float, float]:
        """Level-0 (x, y) microns per pixel; MissingMppError when neither the file nor the user gives it.

        Never guessed from the objective power: a 20x scan ranges from 0.46 to 0.55 µm/px across scanners.
        """
        if self._mpp_override is not None:
            return self._mpp_override
        if self._meta.mpp_um is None:
            raise MissingMppError(
                "no microns-per-pixel in the file; pass --mpp 0.25 (or mpp= in Python) with the scanner's "
                "value",
                path=str(self.path),
            )
        return self._meta.mpp_um

    @property
    def objective_power(self) -> float | None:
        return self._meta.objective_power

    @property
    def properties(self) -> dict[str, str]:
        """Raw metadata key/values (OpenSlide's properties when OpenSlide knows the format)."""
        return dict(self._meta.properties)

    @property
    def associated_image_names(self) -> tuple[str, ...]:
        return tuple(self._meta.associated)

    @property
    def background_rgb(self) -> tuple[int, int, int] | None:
        """The scanner's background colour (e.g. from ``openslide.background-color``), if recorded."""
        return self._meta.background_rgb

    def read_associated(self, name: str) -> np.ndarray:
        """An associated image (``"label"``, ``"macro"``, ``"thumbnail"``, ...) as RGB uint8 (H, W, 3)."""
        if name not in self._meta.associated:
            raise KeyError(
                f"{self.path}: no associated image {name!r}; available: {self.associated_image_names}"
            )
        return self._backend.read_associated(name)

    # -- pixels ---------------------------------------------------------------------------------------------
    def _check_level(self, level: int) -> int:
        level = int(level)
        if not 0 <= level < self.level_count:
            raise IndexError(f"{self.path}: level {level} out of range 0..{self.level_count - 1}")
        return level

    def read_level_rect(self, level: int, location_l: Sequence[int], size_l: Sequence[int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `level` pixels from `location_l` (x, y in that level's pixels), size (w, h).

        Pixels outside the level are white.
        """
        level = self._check_level(level)
        x, y = (int(v) for v in location_l)
        w, h = (int(v) for v in size_l)
        if w < 0 or h < 0:
            raise ValueError(f"size must be non-negative, got {(w, h)}")
        lw, lh = self._meta.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x0 == x and y0 == y and x1 == x + w and y1 == y + h and w and h:
            return self._backend.read_level(level, x, y, w, h)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._backend.read_level(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def read_region(self, location_px: Sequence[int], size_px: Sequence[int], level: int = 0) -> np.ndarray:
        """RGB uint8 (h, w, 3): OpenSlide's convention, location in level-0 pixels, size in `level` pixels.

        The level-0 location maps to level pixel ``floor(x / downsample)``; transparency is composited on
        white and pixels outside the slide are white.
        """
        level = self._check_level(level)
        ds = self._meta.level_downsamples[level]
        x, y = (int(v) for v in location_px)
        loc_l = (math.floor(x / ds + 1e-9), math.floor(y / ds + 1e-9))
        return self.read_level_rect(level, loc_l, size_px)

    def _level_for_mpp(self, mpp_um: float) -> int:
        """The level with the largest downsample whose µm/px is at most `mpp_um` (within tolerance)."""
        base = sum(self.mpp) / 2.0
        best = 0
        for i, ds in enumerate(self._meta.level_downsamples):
            if base * ds <= mpp_um * MPP_TOLERANCE and ds > self._meta.level_downsamples[best]:
                best = i
        return best

    def analysis_resolution(self, mpp_um: float) -> AnalysisResolution:
        """The level and integer binning factor that give about `mpp_um` µm per analysis pixel.

        Rule: the level with the largest downsample whose µm/px is <= ``mpp_um * 1.1``, then
        ``factor = max(1, round(mpp_um / level_mpp))``. Raises MissingMppError without an MPP.
        """
        mpp_um = float(mpp_um)
        if not (math.isfinite(mpp_um) and mpp_um > 0):
            raise ValueError(f"mpp_um must be a positive number, got {mpp_um!r}")
        mx, my = self.mpp
        level = self._level_for_mpp(mpp_um)
        ds = self._meta.level_downsamples[level]
        factor = max(1, round(mpp_um / ((mx + my) / 2.0 * ds)))
        lw, lh = self._meta.level_dimensions[level]
        return AnalysisResolution(
            level=level,
            factor=int(factor),
            mpp_um=(mx * ds * factor, my * ds * factor),
            downsample=ds * factor,
            dimensions_a=(lw // factor, lh // factor),
        )

    def read_analysis_rect(
        self, res: AnalysisResolution, location_a: Sequence[int], size_a: Sequence[int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3) of analysis pixels from `location_a` (x, y), size (w, h).

        Analysis pixel (i, j) is the mean, rounded half up, of the ``factor x factor`` block of level pixels
        starting at ``(i * factor, j * factor)``. Pixels outside ``res.dimensions_a`` are white.
        """
        level, f = self._check_level(res.level), int(res.factor)
        x, y = (int(v) for v in location_a)
        w, h = (int(v) for v in size_a)
        if w < 0 or h < 0:
            raise ValueError(f"size must be non-negative, got {(w, h)}")
        if f == 1:
            return self.read_level_rect(level, (x, y), (w, h))
        wa, ha = res.dimensions_a
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, wa), min(y + h, ha)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            size_l = ((x1 - x0) * f, (y1 - y0) * f)
            if size_l[0] * size_l[1] > _MAX_BLOCK_PIXELS:  # e.g. a zoomed-out view of a single-level scan
                binned = self._read_binned(level, (x0 * f, y0 * f), size_l, f)
            else:  # one read: a band edge would decode the tiles it crosses twice
                binned = _bin_mean(self.read_level_rect(level, (x0 * f, y0 * f), size_l), f)
            out[y0 - y : y1 - y, x0 - x : x1 - x] = binned
        return out

    def read_analysis_image(self, res: AnalysisResolution) -> np.ndarray:
        """The whole slide at an analysis resolution, RGB uint8 (h, w, 3) of size ``res.dimensions_a``.

        Read in bands of rows, so memory stays bounded by the output (a single-level giant is never read whole).
        Pixel values equal :meth:`read_analysis_rect`'s for any rectangle.
        """
        w, h = (int(v) for v in res.dimensions_a)
        if w < 1 or h < 1:
            raise SlideError(
                f"the slide is smaller than one pixel at {res.mpp_um[0]:.3g} µm/px; ask for a finer resolution",
                path=self.path,
            )
        band = max(1, _BAND_PIXELS // max(1, w * int(res.factor) ** 2))
        out = np.empty((h, w, 3), dtype=np.uint8)
        for y in range(0, h, band):
            bh = min(band, h - y)
            out[y : y + bh] = self.read_analysis_rect(res, (0, y), (w, bh))
        return out

    def _read_binned(
        self, level: int, location_l: tuple[int, int], size_l: tuple[int, int], factor: int
    ) -> np.ndarray:
        """A level rectangle binned by `factor` (blocks aligned on `location_l`), read in bands of rows so that
        memory stays bounded whatever the size; incomplete blocks at the right and bottom are dropped."""
        x, y = location_l
        w, h = size_l
        wa, ha = max(1, w // factor), max(1, h // factor)
        band = max(1, _BAND_PIXELS // max(1, wa * factor * factor))
        out = np.empty((ha, wa, 3), dtype=np.uint8)
        for ya in range(0, ha, band):
            hb = min(band, ha - ya)
            block = self.read_level_rect(level, (x, y + ya * factor), (wa * factor, hb * factor))
            out[ya : ya + hb] = _bin_mean(block, factor) if factor > 1 else block
        return out

    def read_at_mpp(self, location_px: Sequence[int], size_px: Sequence[int], *, mpp_um: float) -> np.ndarray:
        """A level-0 rectangle resampled to `mpp_um` µm/px (best level, then anti-aliased resize): previews.

        The output is ``round(size * mpp / mpp_um)`` pixels (at least 1). Not for measurements: use
        `read_analysis_rect`, whose binning is exact across tiles.
        """
        mpp_um = float(mpp_um)
        if not (math.isfinite(mpp_um) and mpp_um > 0):
            raise ValueError(f"mpp_um must be a positive number, got {mpp_um!r}")
        mx, my = self.mpp
        x, y = (int(v) for v in location_px)
        w, h = (int(v) for v in size_px)
        out_w, out_h = max(1, round(w * mx / mpp_um)), max(1, round(h * my / mpp_um))
        level = self._level_for_mpp(mpp_um)
        ds = self._meta.level_downsamples[level]
        lx0, ly0 = math.floor(x / ds), math.floor(y / ds)
        lx1, ly1 = max(lx0 + 1, math.ceil((x + w) / ds)), max(ly0 + 1, math.ceil((y + h) / ds))
        lw, lh = lx1 - lx0, ly1 - ly0
        factor = max(1, min(lw // out_w, lh // out_h))
        return _resize_rgb(self._read_binned(level, (lx0, ly0), (lw, lh), factor), (out_h, out_w))

    def get_thumbnail(self, max_size_px: Sequence[int]) -> np.ndarray:
        """The whole slide as RGB uint8 fitting in `max_size_px` (width, height), aspect ratio kept.

        Read from the smallest level at least as large as the thumbnail, in bands with integer pre-binning,
        so a single-level giant is never loaded whole.
        """
        mw, mh = (int(v) for v in max_size_px)
        if mw < 1 or mh < 1:
            raise ValueError(f"max_size_px must be positive, got {(mw, mh)}")
        w0, h0 = self.dimensions
        scale = min(mw / w0, mh / h0, 1.0)
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        level = 0
        for i, (lw, lh) in enumerate(self._meta.level_dimensions):
            if lw >= tw and lh >= th and lw * lh < np.prod(self._meta.level_dimensions[level]):
                level = i
        lw, lh = self._meta.level_dimensions[level]
        factor = max(1, min(lw // tw, lh // th))
        return _resize_rgb(self._read_binned(level, (0, 0), (lw, lh), factor), (th, tw))

    def check_brightfield(self) -> None:
        """Raise NotBrightfieldError when the slide looks like fluorescence (dark background).

        Brightfield glass and even densely stained tissue transmit light, so the brightest pixels of a brightfield
        thumbnail are bright; a fluorescence scan is mostly near-black. Refused when the 95th percentile of
        brightness (mean of R, G, B on a 512 px thumbnail) is below 120/255 or the median below 40/255.
        Measured: fluorescence NDPI p95 14-69; tissue-filled CD3/CD8 IHC crops p95 >= 167, median >= 86.
        """
        brightness = self.get_thumbnail((512, 512)).mean(axis=2)
        p95, median = float(np.percentile(brightness, 95)), float(np.median(brightness))
        if p95 < _MIN_BRIGHTFIELD_P95 or median < _MIN_BRIGHTFIELD_MEDIAN:
            raise NotBrightfieldError(
                f"dark background (brightness median {median:.0f}, 95th percentile {p95:.0f} of 255): this "
                "looks like a fluorescence scan; cleihc measures brightfield (transmitted-light) IHC and "
                "histochemistry",
                path=str(self.path),
            )

    def info(self) -> dict[str, Any]:
        """JSON-serialisable description (what ``cleihc info`` prints)."""
        mpp = self.mpp if self.has_mpp else None
        return {
            "path": str(self.path),
            "format": self.format,
            "vendor": self.vendor,
            "backend": self.backend,
            "dimensions": list(self.dimensions),
            "levels": [
                {"level": i, "width": w, "height": h, "downsample": ds}
                for i, ((w, h), ds) in enumerate(
                    zip(self.level_dimensions, self.level_downsamples, strict=True)
                )
            ],
            "mpp_x": None if mpp is None else mpp[0],
            "mpp_y": None if mpp is None else mpp[1],
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "associated_images": [
                {"name": name, "width": w, "height": h} for name, (w, h) in self._meta.associated.items()
            ],
            "background_rgb": None if self.background_rgb is None else list(self.background_rgb),
        }


def _reopen(path: str, mpp: tuple[float, float] | None) -> Slide:
    return Slide(path, mpp=mpp)


def open_slide(path: str | os.PathLike[str], *, mpp: float | Sequence[float] | None = None) -> Slide:
    """Open a slide or image, choosing the backend from the file's content.

    Parameters
    ----------
    path : str or PathLike
        The file.
    mpp : float or (float, float), optional
        Level-0 microns per pixel overriding the file's value.

    Returns
    -------
    Slide

    Raises
    ------
    SlideNotFoundError, SlidePermissionError, UnsupportedFormatError, NotBrightfieldError, CorruptSlideError
    """
    return Slide(path, mpp=mpp)
