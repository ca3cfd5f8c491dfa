"""Writers of tiled, JPEG-compressed pyramidal RGB slides: Aperio-style SVS and OME-TIFF (with tifffile).

Both writers build the same pyramid: level ``k + 1`` is the rounded mean of the 4 x 4 blocks of level ``k``
(integer arithmetic, trailing rows/columns that do not fill a block are dropped), while the level is larger than
``min_level_px`` on its longer side. Levels are kept as long as the previous one is above that size, so the smallest
level is at most ``min_level_px``.

The SVS follows what OpenSlide's Aperio reader expects: the first page's ImageDescription starts with
``Aperio Image Library`` and carries ``|AppMag = ..|MPP = ..``; reduced levels are top-level tiled pages
(NewSubfileType 1, OpenSlide ignores SubIFDs); a stripped thumbnail is the second page. Tiles are JPEG, YCbCr
4:2:0, as tifffile writes them; edge tiles are zero-padded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from cleihc.errors import CleihcError
from cleihc.io import atomic_path

__all__ = ["bin4", "pyramid_shapes", "write_ome_tiff", "write_svs", "write_svs_tiles"]

_APERIO_VERSION = "Aperio Image Library v12.0.15"
_MIN_LEVEL_PX = 512
_THUMB_PX = 768


def bin4(img: np.ndarray) -> np.ndarray:
    """Mean of each 4 x 4 block (rounded half up, integer arithmetic) of a uint8 (H, W, C) image."""
    h, w = img.shape[0] // 4 * 4, img.shape[1] // 4 * 4
    s = img[:h, :w].reshape(h // 4, 4, w // 4, 4, img.shape[2]).sum(axis=(1, 3), dtype=np.uint32)
    return ((s + 8) // 16).astype(np.uint8)


def pyramid_shapes(
    width_px: int, height_px: int, *, min_level_px: int = _MIN_LEVEL_PX
) -> list[tuple[int, int]]:
    """(width, height) of every pyramid level: downsample 4 per level while the level is above `min_level_px`."""
    shapes = [(int(width_px), int(height_px))]
    while max(shapes[-1]) > min_level_px and min(shapes[-1]) >= 4:
        w, h = shapes[-1]
        shapes.append((w // 4, h // 4))
    return shapes


def _check(rgb: np.ndarray, mpp_um: float, tile_px: int, jpeg_quality: int) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise CleihcError(f"slide writers need an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    _check_opts(mpp_um, tile_px, jpeg_quality)
    return np.ascontiguousarray(rgb)


def _check_opts(mpp_um: float, tile_px: int, jpeg_quality: int) -> None:
    if not (mpp_um > 0 and np.isfinite(mpp_um)):
        raise CleihcError(f"mpp_um must be a positive number of microns per pixel, got {mpp_um!r}")
    if tile_px < 16 or tile_px % 16:
        raise CleihcError(f"tile_px must be a multiple of 16 (JPEG 4:2:0 blocks), got {tile_px!r}")
    if not (1 <= jpeg_quality <= 100):
        raise CleihcError(f"jpeg_quality must be within 1..100, got {jpeg_quality!r}")


def _jpeg_args(jpeg_quality: int) -> dict:
    return {"compression": "jpeg", "compressionargs": {"level": int(jpeg_quality)}, "photometric": "rgb"}


def _resolution(mpp_um: float) -> dict:
    px_per_cm = 1e4 / mpp_um
    return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}


def _thumbnail(smallest: np.ndarray) -> np.ndarray:
    img = smallest
    while max(img.shape[:2]) > _THUMB_PX and min(img.shape[:2]) >= 8:
        h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
        s = img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3), dtype=np.uint32)
        img = ((s + 2) // 4).astype(np.uint8)
    return img


def _thumbnail_shape(width: int, height: int) -> tuple[int, int]:
    """(width, height) of :func:`_thumbnail` of a level of that size."""
    while max(width, height) > _THUMB_PX and min(width, height) >= 8:
        width, height = width // 2, height // 2
    return width, height


def _aperio_desc(
    width: int,
    height: int,
    *,
    level0: tuple[int, int],
    tile_px: int,
    jpeg_quality: int,
    mpp_um: float,
    magnification: float,
    name: str,
    kind: str,
) -> str:
    fields = f"|AppMag = {magnification:g}|MPP = {mpp_um:.6g}|Filename = {name}|Generator = cleihc"
    w0, h0 = level0
    if kind == "level0":
        head = f"{w0}x{h0} [0,0 {w0}x{h0}] ({tile_px}x{tile_px}) JPEG/RGB Q={jpeg_quality}"
    elif kind == "level":
        head = f"{w0}x{h0} -> {width}x{height} - ({tile_px}x{tile_px}) JPEG/RGB Q={jpeg_quality}"
    else:
        head = f"{w0}x{h0} -> {width}x{height} - "
    return f"{_APERIO_VERSION} \r\n{head}{fields}"


def _bigtiff(width: int, height: int) -> bool:
    # JPEG slides are far below raw size; switch to BigTIFF well before a classic TIFF's 4 GB offset limit.
    return width * height * 3 > 2**31


def write_svs(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    *,
    mpp_um: float,
    magnification: float | None = None,
    tile_px: int = 256,
    jpeg_quality: int = 90,
) -> Path:
    """Write an Aperio-style SVS that OpenSlide (vendor ``aperio``) and tifffile both read.

    Parameters
    ----------
    path : path
        Output file (written atomically).
    rgb : ndarray, shape (H, W, 3), uint8
        Level 0.
    mpp_um : float
        Microns per pixel of level 0 (``MPP`` in the description; also the TIFF resolution tags).
    magnification : float, optional
        ``AppMag``; defaults to ``10 / mpp_um`` (20 at 0.5 µm/px).
    tile_px : int
        Tile edge, a multiple of 16.
    jpeg_quality : int
        JPEG quality 1..100.

    Returns
    -------
    Path
        `path`.
    """
    rgb = _check(rgb, mpp_um, tile_px, jpeg_quality)
    h, w = rgb.shape[:2]
    levels = [rgb]
    for _ in pyramid_shapes(w, h)[1:]:
        levels.append(bin4(levels[-1]))
    return _write_svs(
        path,
        (w, h),
        rgb,
        lambda k: levels[k],
        _thumbnail(levels[-1]),
        mpp_um=mpp_um,
        magnification=magnification,
        tile_px=tile_px,
        jpeg_quality=jpeg_quality,
    )


def write_svs_tiles(
    path: str | os.PathLike[str],
    *,
    width_px: int,
    height_px: int,
    level0_tiles: Callable[[Callable[[np.ndarray, int], None]], Iterator[np.ndarray]],
    mpp_um: float,
    magnification: float | None = None,
    tile_px: int = 256,
    jpeg_quality: int = 90,
) -> Path:
    """Write an SVS from a generator of level-0 tiles without holding level 0 in memory.

    Parameters
    ----------
    level0_tiles : callable
        Called with a ``sink(strip, row0)`` callback; returns an iterator of level-0 tiles of `tile_px` (edge tiles
        may be smaller) in row-major order. Each row of tiles must also be passed to ``sink`` as one (rows, W, 3)
        strip starting at level-0 row ``row0`` (a multiple of 4): it is binned into level 1, which is kept in
        memory (1/16 of level 0) and from which the smaller levels are made.

    Other parameters are as in :func:`write_svs`. Every level's pixels equal those of ``write_svs`` of the
    assembled image; there is no thumbnail page (Aperio's thumbnail must precede the reduced levels, which are
    only known once level 0 is written).
    """
    _check_opts(mpp_um, tile_px, jpeg_quality)
    shapes = pyramid_shapes(width_px, height_px)
    levels: dict[int, np.ndarray] = {}
    if len(shapes) > 1:
        w1, h1 = shapes[1]
        levels[1] = np.zeros((h1, w1, 3), np.uint8)
    else:
        # a one-level slide is small (<= min_level_px): keep it for the thumbnail
        levels[0] = np.zeros((int(height_px), int(width_px), 3), np.uint8)

    def sink(strip: np.ndarray, row0: int) -> None:
        if row0 % 4:
            raise ValueError("strips must start at a multiple of 4 rows")
        if 1 not in levels:
            levels[0][row0 : row0 + strip.shape[0]] = strip
            return
        b = bin4(strip)
        r = row0 // 4
        n = min(b.shape[0], levels[1].shape[0] - r)
        if n > 0:
            levels[1][r : r + n] = b[:n, : levels[1].shape[1]]

    def level(k: int) -> np.ndarray:
        if k not in levels:
            levels[k] = bin4(level(k - 1))
        return levels[k]

    return _write_svs(
        path,
        (int(width_px), int(height_px)),
        level0_tiles(sink),
        level,
        None,
        mpp_um=mpp_um,
        magnification=magnification,
        tile_px=tile_px,
        jpeg_quality=jpeg_quality,
    )


def _write_svs(
    path: str | os.PathLike[str],
    size0: tuple[int, int],
    level0: np.ndarray | Iterator[np.ndarray],
    level: Callable[[int], np.ndarray],
    thumbnail: np.ndarray | None,
    *,
    mpp_um: float,
    magnification: float | None,
    tile_px: int,
    jpeg_quality: int,
) -> Path:
    import tifffile

    path = Path(path)
    mag = float(magnification) if magnification is not None else 10.0 / mpp_um
    shapes = pyramid_shapes(*size0)
    common = {
        "tile_px": tile_px,
        "jpeg_quality": jpeg_quality,
        "mpp_um": mpp_um,
        "magnification": mag,
        "name": path.name,
        "level0": size0,
    }
    w0, h0 = size0
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=_bigtiff(w0, h0)) as tif:
        shape = {} if isinstance(level0, np.ndarray) else {"shape": (h0, w0, 3), "dtype": np.uint8}
        tif.write(
            level0,
            **shape,
            tile=(tile_px, tile_px),
            metadata=None,
            subfiletype=0,
            description=_aperio_desc(w0, h0, kind="level0", **common),
            **_jpeg_args(jpeg_quality),
            **_resolution(mpp_um),
        )
        # OpenSlide's Aperio reader and tifffile's both take the second page, when stripped, as the thumbnail.
        if thumbnail is not None:
            th, tw = thumbnail.shape[:2]
            tif.write(
                thumbnail,
                description=_aperio_desc(tw, th, kind="thumbnail", **common),
                metadata=None,
                rowsperstrip=16,
                **_jpeg_args(jpeg_quality),
            )
        else:
            # Streaming: the smallest level is known only at the end, so reserve an uncompressed single-strip
            # thumbnail now and fill its bytes in place afterwards.
            tw, th = _thumbnail_shape(*shapes[-1])
            tif.write(
                np.zeros((th, tw, 3), np.uint8),
                description=_aperio_desc(tw, th, kind="thumbnail", **common),
                metadata=None,
                rowsperstrip=th,
                photometric="rgb",
            )
        for k, (w, h) in enumerate(shapes[1:], start=1):
            tif.write(
                level(k),
                tile=(tile_px, tile_px),
                metadata=None,
                # NewSubfileType 0 as in Aperio's files: tifffile's SVS parser stops at the first "reduced" page
                subfiletype=0,
                description=_aperio_desc(w, h, kind="level", **common),
                **_jpeg_args(jpeg_quality),
                **_resolution(mpp_um * 4**k),
            )
    if thumbnail is None:
        thumb = _thumbnail(level(len(shapes) - 1))
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[1]
            offset, count = page.dataoffsets[0], page.databytecounts[0]
        if count != thumb.nbytes:
            raise RuntimeError("reserved thumbnail strip has an unexpected size")
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(np.ascontiguousarray(thumb).tobytes())
    return path


def write_ome_tiff(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    *,
    mpp_um: float,
    tile_px: int = 256,
    jpeg_quality: int = 90,
    name: str | None = None,
) -> Path:
    """Write a pyramidal OME-TIFF (reduced levels as SubIFDs) with PhysicalSizeX/Y in µm.

    Parameters
    ----------
    path : path
        Output file, conventionally ``*.ome.tif`` (written atomically).
    rgb : ndarray, shape (H, W, 3), uint8
        Level 0.
    mpp_um : float
        Microns per pixel (OME ``PhysicalSizeX``/``PhysicalSizeY``).
    tile_px : int
        Tile edge, a multiple of 16.
    jpeg_quality : int
        JPEG quality 1..100.
    name : str, optional
        OME image name; defaults to the file name.

    Returns
    -------
    Path
        `path`.
    """
    import tifffile

    rgb = _check(rgb, mpp_um, tile_px, jpeg_quality)
    h, w = rgb.shape[:2]
    path = Path(path)
    levels = [rgb]
    for _ in pyramid_shapes(w, h)[1:]:
        levels.append(bin4(levels[-1]))
    meta = {
        "axes": "YXS",
        "Name": name or path.name,
        "PhysicalSizeX": float(mpp_um),
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": float(mpp_um),
        "PhysicalSizeYUnit": "µm",
    }
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=_bigtiff(w, h), ome=True) as tif:
        tif.write(
            rgb,
            subifds=len(levels) - 1,
            tile=(tile_px, tile_px),
            metadata=meta,
            **_jpeg_args(jpeg_quality),
            **_resolution(mpp_um),
        )
        for k, lvl in enumerate(levels[1:], start=1):
            tif.write(
                lvl,
                subfiletype=1,
                tile=(tile_px, tile_px),
                metadata=None,
                **_jpeg_args(jpeg_quality),
                **_resolution(mpp_um * 4**k),
            )
    return path
