"""Plain images (PNG, JPEG) as one-level slides, through Pillow.

Camera pictures and exported crops carry no trustworthy physical scale (a JPEG's 72 dpi is a default, not a
measurement), so these never have an MPP unless the user passes one.
"""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image, ImageOps

from cleihc.errors import CorruptSlideError, NotBrightfieldError, UnsupportedFormatError
from cleihc.slide._common import Backend, BackendMeta, composite_on_white, corrupt

__all__ = ["ImageBackend"]

_ACCEPTED_MODES = {"RGB", "RGBA", "P", "PA", "RGBX", "YCbCr", "LA", "CMYK"}
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
# Pillow refuses images above ~179 Mpx as a decompression-bomb guard; a plain image that big is not a photo but
# a slide export, and should be a pyramidal TIFF instead.
_MAX_PIXELS = 150_000_000


class ImageBackend(Backend):
    """A whole PNG/JPEG decoded once, on first read."""

    name = "image"

    def __init__(self, path: str, kind: str):
        self.path = path
        self._lock = threading.Lock()
        self._pixels: np.ndarray | None = None
        try:
            with Image.open(path) as im:
                mode, size = im.mode, im.size
                orientation = im.getexif().get(0x0112, 1) if kind == "jpeg" else 1
        except PermissionError:
            raise
        except Image.DecompressionBombError as exc:
            raise UnsupportedFormatError(
                "plain image too large to decode at once; convert it to a pyramidal tiled TIFF", path=path
            ) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise CorruptSlideError(
                f"{kind.upper()} header unreadable ({exc}); the file is truncated or corrupt", path=path
            ) from exc
        if mode in ("L", "1") or mode.startswith("I") or mode.startswith("F"):
            raise NotBrightfieldError(
                f"{mode!r} {kind.upper()} (grayscale or more than 8 bits per channel); cleihc measures "
                "8-bit RGB brightfield images, export RGB",
                path=path,
            )
        if mode not in _ACCEPTED_MODES:
            raise UnsupportedFormatError(
                f"image mode {mode!r} is not RGB; export an 8-bit RGB image", path=path
            )
        if mode == "LA":
            raise NotBrightfieldError(
                "grayscale image with alpha; cleihc measures RGB brightfield, export RGB", path=path
            )
        w, h = size
        if w * h > _MAX_PIXELS:
            raise UnsupportedFormatError(
                f"{w}x{h} plain image is too large to decode at once; convert it to a pyramidal tiled TIFF",
                path=path,
            )
        self._orientation = orientation
        if orientation in _TRANSPOSED_ORIENTATIONS:
            w, h = h, w
        self.meta = BackendMeta(
            format=kind,
            vendor=kind,
            level_dimensions=((int(w), int(h)),),
            level_downsamples=(1.0,),
            properties={"image.mode": mode, "image.orientation": str(orientation)},
        )

    def _load(self) -> np.ndarray:
        if self._pixels is None:
            with self._lock:
                if self._pixels is None:
                    try:
                        with Image.open(self.path) as im:
                            im = ImageOps.exif_transpose(im) if self._orientation != 1 else im
                            rgba = (
                                im.convert("RGBA") if "A" in im.mode or im.mode == "P" else im.convert("RGB")
                            )
                            arr = composite_on_white(np.asarray(rgba))
                    except PermissionError:
                        raise
                    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                        raise corrupt(self.path, exc, "image data") from exc
                    arr.setflags(write=False)
                    self._pixels = arr
        return self._pixels

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._load()[y : y + h, x : x + w].copy()

    def read_associated(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def close(self) -> None:
        self._pixels = None
