"""tifffile backend: TIFF-family slides read tile by tile with tifffile's decoders.

Interleaved RGB levels are read by `_ChunkedLevel` (positional reads of the tile bytes, tifffile's own decode
function, a small LRU of decoded tiles): what tifffile's zarr store does per chunk, without zarr's per-call
overhead. Other layouts (separate colour planes) go through the zarr store (``series.aszarr(level=...)``).

Used for Aperio SVS (JPEG tiles, with their JPEGTables), Hamamatsu NDPI, generic tiled or stripped TIFF,
OME-TIFF pyramids (reduced levels in SubIFDs) and ImageJ TIFFs. tifffile + imagecodecs decode these to the
same pixels as OpenSlide (checked in tests/test_slide.py) and faster, so pixels come from here while metadata
(vendor, MPP, objective, associated images, background) comes from OpenSlide when OpenSlide knows the format.

Formats kept on OpenSlide, and why:
- Aperio JPEG 2000 (compression 33003 YCbCr / 33005 RGB): OpenSlide converts the codestream as Aperio writes
  it; tifffile and OpenSlide disagree on a 33003 file written by tifffile (measured), so OpenSlide stays the
  reference here.
- Philips, Leica, Ventana, Trestle TIFF: their level layout / tile overlaps are vendor specific.
- NDPI levels that exist only as OpenSlide's JPEG scale-on-decode levels (e.g. downsample 16, 32, 64 for a
  file with four stored levels) are read through OpenSlide; the stored ones through tifffile.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict

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
_JPEG2000_COMPRESSIONS = frozenset({33003, 33005})

# Decoded tiles kept per open slide (tile reads with halos overlap their neighbours): enough for the halo band
# of a row of analysis tiles across a 10k-px-wide level (about 15 MB at 1024-px tiles with a 150-px halo);
# 64 MB cost every worker 32 MB more for no measurable speed.
TILE_CACHE_BYTES = 32 * 1024 * 1024

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


class _TileCache:
    """A small LRU of decoded tiles shared by the levels of one slide: neighbouring reads (tile halos) overlap."""

    def __init__(self, max_bytes: int):
        self._max = max_bytes
        self._bytes = 0
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            tile = self._items.get(key)
            if tile is not None:
                self._items.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        if tile.nbytes > self._max:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self._max:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


class _ChunkedLevel:
    """Direct tile/strip reader for one interleaved 8-bit level: positional reads (``os.pread``, no lock) and
    tifffile's own decoder (JPEG with JPEGTables, NDPI JPEG restart-marker tiles, deflate, LZW, ...).

    This is what tifffile's zarr store does per chunk, without zarr's per-call overhead, which made 512 px reads
    slower than OpenSlide's.
    """

    def __init__(
        self, fd: int, key: int, keyframe: tifffile.TiffPage, page: tifffile.TiffPage, cache: _TileCache
    ):
        self._fd, self._key, self._kf, self._cache = fd, key, keyframe, cache
        self._offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self._counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.tile_h, self.tile_w, self.samples = (int(v) for v in keyframe.chunks)
        self.n_y, self.n_x = int(keyframe.chunked[0]), int(keyframe.chunked[1])
        self._args: dict[str, object] = {"_fullsize": True}
        if keyframe.jpegtables is not None:
            self._args["jpegtables"] = keyframe.jpegtables
        if getattr(keyframe, "jpegheader", None) is not None:
            self._args["jpegheader"] = keyframe.jpegheader

    @staticmethod
    def usable(keyframe: tifffile.TiffPage, n_pages: int) -> bool:
        chunks, chunked = tuple(keyframe.chunks), tuple(keyframe.chunked)
        return (
            n_pages == 1
            and len(chunks) == 3
            and len(chunked) == 3
            and chunked[2] == 1
            and keyframe.planarconfig == 1
        )

    def _tile(self, index: int) -> np.ndarray:
        key = (self._key, index)
        tile = self._cache.get(key)
        if tile is not None:
            return tile
        offset, count = int(self._offsets[index]), int(self._counts[index])
        if offset == 0 or count == 0:
            # missing (sparse) tile: glass, white, as OpenSlide's transparent pixels composited on white
            tile = np.full((self.tile_h, self.tile_w, self.samples), 255, dtype=np.uint8)
        else:
            data = os.pread(self._fd, count, offset)
            if len(data) != count:
                raise EOFError(f"tile {index}: read {len(data)} of {count} bytes at offset {offset}")
            decoded = self._kf.decode(data, index, **self._args)[0]
            if decoded is None or decoded.size != self.tile_h * self.tile_w * self.samples:
                raise ValueError(f"tile {index} decoded to {None if decoded is None else decoded.shape}")
            tile = decoded.reshape(self.tile_h, self.tile_w, self.samples)
        tile.setflags(write=False)
        self._cache.put(key, tile)
        return tile

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        th, tw = self.tile_h, self.tile_w
        out = np.empty((h, w, self.samples), dtype=np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            y0, y1 = max(y, ty * th), min(y + h, (ty + 1) * th)
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                x0, x1 = max(x, tx * tw), min(x + w, (tx + 1) * tw)
                tile = self._tile(ty * self.n_x + tx)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[
                    y0 - ty * th : y1 - ty * th, x0 - tx * tw : x1 - tx * tw
                ]
        return out


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
        self._chunked: dict[int, _ChunkedLevel | None] = {}
        self._cache = _TileCache(TILE_CACHE_BYTES)
        self._fd = -1
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
        self._fd = os.open(path, os.O_RDONLY)  # last: nothing above may leak it
        # closes the descriptor even when a Slide is dropped without close()
        self._fd_finalizer = weakref.finalize(self, os.close, self._fd)

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

    def _direct(self, tiff_level: int) -> _ChunkedLevel | None:
        if tiff_level not in self._chunked:
            kind, obj = self._stores[tiff_level]
            if kind == "series":
                lvl = self._series.levels[obj]
                keyframe, pages = lvl.keyframe, lvl.pages
            else:
                keyframe, pages = obj, [obj]
            reader = None
            if self._layout == "interleaved" and _ChunkedLevel.usable(keyframe, len(pages)):
                reader = _ChunkedLevel(self._fd, tiff_level, keyframe, pages[0], self._cache)
            self._chunked[tiff_level] = reader
        return self._chunked[tiff_level]

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        src = self._src[level]
        if src is None:
            return self._os.read_level(level, x, y, w, h)
        direct = self._direct(src)
        if direct is not None:
            try:
                data = direct.read(x, y, w, h)
            except Exception as exc:  # imagecodecs/zlib/tifffile decode errors of many types
                raise corrupt(self.path, exc) from exc
            return composite_on_white(data)
        arr = self._array(src)
        try:
            if self._layout == "interleaved":
                data = np.asarray(arr[y : y + h, x : x + w, :])
            else:
                data = np.ascontiguousarray(np.moveaxis(np.asarray(arr[:, y : y + h, x : x + w]), 0, -1))
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
        self._chunked.clear()
        self._cache.clear()
        if self._fd >= 0:
            self._fd_finalizer()
            self._fd = -1
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
