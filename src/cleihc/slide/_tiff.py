"""tifffile backend: TIFF-family slides read tile by tile through tifffile's zarr store.

Used for Aperio SVS (JPEG tiles, with their JPEGTables), Hamamatsu NDPI, generic tiled or stripped TIFF,
OME-TIFF pyramids (reduced levels in SubIFDs) and ImageJ TIFFs. tifffile + imagecodecs decode these to the
same pixels as OpenSlide (checked in tests/test_slide.py) and faster, so pixels come from here while metadata
(vendor, MPP, objective, associated images, background) comes from OpenSlide when OpenSlide knows the format.

Formats kept on OpenSlide, and why:
- Aperio JPEG 2000 (compression 33003/33005): OpenSlide applies the vendor's YCbCr handling; not verified here.
- Philips, Leica, Ventana, Trestle TIFF: their level layout / tile overlaps are vendor specific.
- NDPI levels that exist only as OpenSlide's JPEG scale-on-decode levels (e.g. downsample 16, 32, 64 for a
  file with four stored levels) are read through OpenSlide; the stored ones through tifffile.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import tifffile

from cleihc.errors import CorruptSlideError, NotBrightfieldError, UnsupportedFormatError
from cleihc.slide._common import (
    Backend,
    BackendMeta,
    composite_on_white,
    corrupt,
    downsamples_from_dimensions,
    mpp_from_unit,
    parse_aperio_description,
)

logger = logging.getLogger(__name__)

__all__ = ["TiffBackend", "open_tiff"]

# OpenSlide formats whose pixels tifffile decodes identically (verified against OpenSlide in the tests).
TIFFFILE_FORMATS = frozenset({"aperio", "hamamatsu", "generic-tiff"})
# Aperio JPEG 2000 variants: keep on OpenSlide (see module docstring).
_JPEG2000_COMPRESSIONS = frozenset({33003, 33004, 33005, 34712})

_ASSOCIATED_SERIES = {"label": "label", "macro": "macro", "thumbnail": "thumbnail"}


def _tiff_format(tf: tifffile.TiffFile) -> str:
    if tf.is_ome:
        return "ome-tiff"
    if tf.is_svs:
        return "aperio"
    if tf.is_ndpi:
        return "hamamatsu"
    if tf.is_imagej:
        return "imagej-tiff"
    return "generic-tiff"


def _layout(series: tifffile.TiffPageSeries, path: str) -> str:
    """``"interleaved"`` (Y, X, S) or ``"planar"`` (S, Y, X) for 8-bit RGB(A); NotBrightfieldError otherwise."""
    shape, axes, dtype = tuple(series.shape), series.axes, series.dtype
    desc = f"{'x'.join(map(str, shape))} {axes} {dtype}"
    if dtype != np.uint8:
        raise NotBrightfieldError(
            f"{dtype} pixels ({desc}); cleihc measures 8-bit RGB brightfield images, "
            "export the slide as 8-bit RGB",
            path=path,
        )
    if len(shape) == 3 and axes[-1] == "S" and shape[-1] in (3, 4):
        return "interleaved"
    photometric = series.keyframe.photometric
    if len(shape) == 3 and axes[0] in "SC" and shape[0] in (3, 4) and photometric == 2:
        return "planar"
    if len(shape) == 2:
        reason = "single-channel (grayscale or fluorescence) image"
    else:
        reason = "multi-channel or multi-dimensional image (fluorescence, z-stack or time series)"
    raise NotBrightfieldError(
        f"{reason} ({desc}); cleihc measures RGB brightfield slides, export one RGB brightfield image",
        path=path,
    )


def _ome_mpp(tf: tifffile.TiffFile) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the first OME Image, in µm."""
    import defusedxml.ElementTree as ET

    xml = tf.pages.first.description
    try:
        root = ET.fromstring(xml)
    except Exception:  # malformed OME-XML: no physical size, not a reason to refuse the pixels
        logger.warning("%s: unreadable OME-XML, ignoring its physical pixel size", tf.filehandle.path)
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    out = []
    for axis in ("X", "Y"):
        try:
            size = float(pixels.get(f"PhysicalSize{axis}", "nan"))
        except ValueError:
            return None
        mpp = mpp_from_unit(size, pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        if mpp is None:
            return None
        out.append(mpp)
    return out[0], out[1]


def _resolution_mpp(tf: tifffile.TiffFile, page: tifffile.TiffPage) -> tuple[float, float] | None:
    """MPP from XResolution/YResolution + ResolutionUnit (or ImageJ's unit), if plausible for a microscope."""
    tags = page.tags
    xres, yres = tags.valueof("XResolution"), tags.valueof("YResolution")
    if not xres or not yres:
        return None
    try:
        px_per_unit = (xres[0] / xres[1], yres[0] / yres[1])
    except (TypeError, ZeroDivisionError, IndexError):
        return None
    resunit = int(tags.valueof("ResolutionUnit", 2))
    if resunit == 2:
        unit = "inch"
    elif resunit == 3:
        unit = "cm"
    elif resunit == 1 and tf.is_imagej:
        unit = str((tf.imagej_metadata or {}).get("unit", ""))
    else:
        return None
    if min(px_per_unit) <= 0:
        return None
    mx = mpp_from_unit(1.0 / px_per_unit[0], unit)
    my = mpp_from_unit(1.0 / px_per_unit[1], unit)
    if mx is None or my is None:
        return None
    return mx, my


def _check_not_truncated(path: str, pages: list[tifffile.TiffPage], file_size: int) -> None:
    """Cheap truncation check at open: every tile/strip must end inside the file."""
    for page in pages:
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        used = counts > 0
        if not used.any():
            continue
        end = int((offsets[used] + counts[used]).max())
        if end > file_size:
            raise CorruptSlideError(
                f"truncated: image data reaches byte {end} but the file has {file_size} bytes; "
                "re-copy the complete file",
                path=path,
            )


class TiffBackend(Backend):
    """Pixels through tifffile's zarr store; metadata from OpenSlide when it knows the format."""

    name = "tifffile"

    def __init__(self, path: str, tf: tifffile.TiffFile, os_fmt: str | None):
        self.path = path
        self._tf = tf
        self._os = None
        self._assoc_series: dict[str, tifffile.TiffPageSeries] = {}
        self._lock = threading.Lock()
        self._arrays: dict[int, object] = {}
        series = tf.series[0]
        self._series = series
        self._layout = _layout(series, path)
        self._channels = series.shape[-1] if self._layout == "interleaved" else series.shape[0]
        tiff_dims = []
        # each stored level: ("series", level index) or ("page", top-level page) for zarr access
        self._stores: list[tuple[str, object]] = []
        keyframes = []
        for i, lvl in enumerate(series.levels):
            shp = lvl.shape
            h, w = (shp[0], shp[1]) if self._layout == "interleaved" else (shp[1], shp[2])
            tiff_dims.append((int(w), int(h)))
            self._stores.append(("series", i))
            keyframes.append(lvl.keyframe)
        if tf.is_svs and self._layout == "interleaved":
            # tifffile stops an SVS pyramid at the first page flagged "reduced" (subfiletype 1); writers that
            # flag their levels so would lose them: take every further tiled page of the same kind and aspect.
            w0, h0 = tiff_dims[0]
            for page in tf.pages[1:]:
                if not (page.is_tiled and page.dtype == np.uint8 and page.shape[-1:] == (self._channels,)):
                    continue
                h, w = page.shape[:2]
                if (w, h) in tiff_dims or w >= w0 or abs((w0 / w) / (h0 / h) - 1) > 0.02:
                    continue
                tiff_dims.append((int(w), int(h)))
                self._stores.append(("page", page))
                keyframes.append(page)
            order = sorted(range(len(tiff_dims)), key=lambda i: -tiff_dims[i][0])
            tiff_dims = [tiff_dims[i] for i in order]
            self._stores = [self._stores[i] for i in order]
        _check_not_truncated(path, keyframes, os.path.getsize(path))

        if os_fmt is not None:
            from cleihc.slide._openslide import OpenSlideBackend

            try:
                self._os = OpenSlideBackend(path, os_fmt)
            except (UnsupportedFormatError, CorruptSlideError) as exc:
                logger.info("%s: OpenSlide refuses it (%s); using tifffile metadata only", path, exc)
                self._os = None
        if self._os is not None and os_fmt in ("aperio", "hamamatsu"):
            meta = self._os.meta
            # OpenSlide's pyramid is the reference; each level maps to a stored tifffile level of equal size,
            # or is read through OpenSlide (NDPI scale-on-decode levels).
            self._src = [tiff_dims.index(d) if d in tiff_dims else None for d in meta.level_dimensions]
            if self._src[0] is None:
                raise UnsupportedFormatError(
                    f"OpenSlide and tifffile disagree on the slide size ({meta.level_dimensions[0]} vs "
                    f"{tiff_dims[0]}); report this file",
                    path=path,
                )
            if meta.mpp_um is None:
                meta.mpp_um, meta.mpp_source = self._file_mpp()
        else:
            # generic TIFF, OME-TIFF (SubIFD levels OpenSlide does not see), ImageJ: tifffile's own pyramid.
            meta = self._tifffile_meta(tuple(tiff_dims))
            self._src = list(range(len(tiff_dims)))
            if self._os is not None:
                meta.properties = {**self._os.meta.properties, **meta.properties}
                meta.background_rgb = self._os.meta.background_rgb
                meta.associated.update(self._os.meta.associated)
        self.meta = meta

    # -- metadata without OpenSlide -------------------------------------------------------------------------
    def _file_mpp(self) -> tuple[tuple[float, float] | None, str | None]:
        tf = self._tf
        if tf.is_ome:
            mpp = _ome_mpp(tf)
            if mpp is not None:
                return mpp, "ome"
        if tf.is_svs:
            desc = parse_aperio_description(tf.pages.first.description)
            mpp = mpp_from_unit(float(desc.get("MPP", "nan")), "um") if "MPP" in desc else None
            if mpp is not None:
                return (mpp, mpp), "vendor"
        mpp = _resolution_mpp(tf, self._series.keyframe)
        if mpp is not None:
            return mpp, "vendor" if tf.is_ndpi else "tiff-resolution"
        return None, None

    def _tifffile_meta(self, dims: tuple[tuple[int, int], ...]) -> BackendMeta:
        tf = self._tf
        fmt = _tiff_format(tf)
        mpp, source = self._file_mpp()
        props: dict[str, str] = {"tiff.axes": self._series.axes}
        desc = tf.pages.first.description
        if desc:
            props["tiff.ImageDescription"] = desc
        objective = None
        if tf.is_svs:
            aperio = parse_aperio_description(desc)
            props.update({f"aperio.{k}": v for k, v in aperio.items()})
            try:
                objective = float(aperio["AppMag"])
            except (KeyError, ValueError):
                objective = None
        assoc = {}
        for s in tf.series[1:]:
            name = _ASSOCIATED_SERIES.get((s.name or "").lower())
            if name and s.dtype == np.uint8 and len(s.shape) == 3:
                assoc[name] = (int(s.shape[1]), int(s.shape[0]))
                self._assoc_series[name] = s
        return BackendMeta(
            format=fmt,
            vendor=fmt,
            level_dimensions=dims,
            level_downsamples=downsamples_from_dimensions(dims),
            properties=props,
            associated=assoc,
            mpp_um=mpp,
            mpp_source=source,
            objective_power=objective,
        )

    # -- pixels ---------------------------------------------------------------------------------------------
    def _array(self, tiff_level: int):
        arr = self._arrays.get(tiff_level)
        if arr is None:
            import zarr

            with self._lock:
                arr = self._arrays.get(tiff_level)
                if arr is None:
                    # fillvalue 255: missing (sparse) tiles read as white glass, as OpenSlide's transparent
                    # pixels composited on white.
                    kind, obj = self._stores[tiff_level]
                    if kind == "series":
                        store = self._series.aszarr(level=obj, fillvalue=255)
                    else:
                        store = obj.aszarr(fillvalue=255)
                    arr = zarr.open_array(store, mode="r")
                    self._arrays[tiff_level] = arr
        return arr

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        src = self._src[level]
        if src is None:
            return self._os.read_level(level, x, y, w, h)
        arr = self._array(src)
        try:
            if self._layout == "interleaved":
                data = np.asarray(arr[y : y + h, x : x + w, :])
            else:
                data = np.moveaxis(np.asarray(arr[:, y : y + h, x : x + w]), 0, -1)
        except Exception as exc:  # imagecodecs/zlib/tifffile decode errors of many types
            raise corrupt(self.path, exc) from exc
        return composite_on_white(data)

    def read_associated(self, name: str) -> np.ndarray:
        if self._os is not None and name in self._os.meta.associated:
            return self._os.read_associated(name)
        series = self._assoc_series[name]
        try:
            data = series.asarray()
        except Exception as exc:
            raise corrupt(self.path, exc, f"associated image {name!r}") from exc
        return composite_on_white(data) if data.shape[-1] in (3, 4) else np.repeat(data[..., None], 3, -1)

    def close(self) -> None:
        self._arrays.clear()
        self._tf.close()
        if self._os is not None:
            self._os.close()


def open_tiff(path: str, os_fmt: str | None) -> Backend:
    """The backend for a file with a TIFF header: tifffile where it decodes correctly, else OpenSlide."""
    from cleihc.slide._openslide import OpenSlideBackend

    if os_fmt is not None and os_fmt not in TIFFFILE_FORMATS:
        return OpenSlideBackend(path, os_fmt)
    try:
        tf = tifffile.TiffFile(path)
        series = tf.series
    except PermissionError:
        raise
    except Exception as exc:  # tifffile raises TiffFileError, struct.error, ValueError, ... on damaged files
        if os_fmt is not None:
            logger.info("%s: tifffile cannot parse it (%s); trying OpenSlide", path, exc)
            return OpenSlideBackend(path, os_fmt)
        raise CorruptSlideError(
            f"TIFF header but unreadable structure ({type(exc).__name__}: {exc}); the file is truncated or "
            "corrupt, re-copy it",
            path=path,
        ) from exc
    try:
        if not series:
            raise CorruptSlideError(
                "TIFF header but no readable image (truncated or corrupt); re-copy the complete file",
                path=path,
            )
        if series[0].keyframe.compression in _JPEG2000_COMPRESSIONS and os_fmt is not None:
            tf.close()
            return OpenSlideBackend(path, os_fmt)
        return TiffBackend(path, tf, os_fmt)
    except BaseException:
        tf.close()
        raise
