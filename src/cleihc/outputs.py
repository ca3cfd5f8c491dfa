"""The one writer of a results folder (a contract: other tools read these names).

::

    OUT/
      regions.csv, regions.parquet   one row per slide × region (rebuilt from slides/*.json)
      cells/<slide>.parquet          one row per cell (cell protocols)
      masks/<slide>.ome.tif          positive-pixel fraction on the totals raster, as a pyramid, for review
      qc/<slide>.png                 thumbnail with tissue outline, regions, positive overlay and cells
      regions/<slide>.geojson        tissue and regions used (automatic and user), level-0 px, for correction
      totals/<slide>.npz             additive totals raster and region masks (recompute without the slide)
      slides/<slide>.json            per-slide record: region rows, input hash, protocol hash, provenance
      run.json, failures.csv         the run: arguments, versions, inputs, timings, failures

Every file is written atomically (temporary file, then rename), and ``slides/<slide>.json`` last: a slide counts
as done only when its record exists, so a run killed at any moment leaves a consistent folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cleihc.errors import ResultsFolderError
from cleihc.geometry import feature_collection, to_feature
from cleihc.io import atomic_path, atomic_write, jsonable
from cleihc.measure import row_blocks

if TYPE_CHECKING:
    from cleihc.protocol import Protocol

__all__ = [
    "SLIDE_RECORD_VERSION",
    "check_results_folder",
    "read_slide_records",
    "rebuild_tables",
    "results_folder_lock",
    "write_json",
    "write_slide_outputs",
]

SLIDE_RECORD_VERSION = 1

_REGION_COLOURS = {
    "tissue": (0, 170, 0),
    "epidermis": (230, 140, 0),
    "dermis": (0, 120, 220),
    "papillary_dermis": (150, 80, 220),
    "superficial_dermis": (0, 190, 190),
    "deep_dermis": (120, 120, 120),
}


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2) -> None:
    """Write JSON atomically (NaN becomes null); ``indent=None`` writes it compact (and with the C encoder)."""
    with atomic_write(path, mode="w") as f:
        json.dump(jsonable(data), f, indent=indent, sort_keys=False)
        f.write("\n")


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_slide_outputs(
    result: Any, out_dir: str | os.PathLike[str], *, extra: dict | None = None, threads: int = 2
) -> Path:
    """Write every per-slide output of a :class:`cleihc.pipeline.Result`; the record last.

    Parameters
    ----------
    result : cleihc.pipeline.Result
    out_dir : path
    extra : dict, optional
        More fields for the slide record (for example study metadata).
    threads : int
        Files written at once. One where other processes already use every core (a worker measuring a whole
        slide): no faster then, and the files' temporaries do not add up.

    Returns
    -------
    Path
        The slide record ``slides/<slide>.json``.
    """
    out = Path(out_dir)
    stem = result.slide
    plan = result.plan
    jobs: list[tuple[Callable[[Any, Path], None], Path]] = [
        (write_totals, out / "totals" / f"{stem}.npz"),
        (write_qc_png, out / "qc" / f"{stem}.png"),
        (write_mask_pyramid, out / "masks" / f"{stem}.ome.tif"),
        (write_regions_geojson, out / "regions" / f"{stem}.geojson"),
    ]
    if "cells" in plan.protocol.measure:
        jobs.append((lambda res, path: _write_parquet(res.cells, path), out / "cells" / f"{stem}.parquet"))
    # Independent files, each written atomically: two at a time (deflate, PNG and Parquet encoders release the
    # GIL), about 1.7x faster than one after another. The record, which marks the slide as done, comes last.
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="cleihc-write") as pool:
        for future in [pool.submit(write, result, path) for write, path in jobs]:
            future.result()  # the first failure, once every file has been attempted
    record = {
        "record_version": SLIDE_RECORD_VERSION,
        "slide": stem,
        "path": result.path,
        "input_sha256": result.provenance["slide"]["sha256"],
        "protocol_sha256": result.plan.protocol.sha256,
        "cleihc_version": result.provenance["cleihc_version"],
        "rows": result.regions.to_dict(orient="records"),
        "provenance": result.provenance,
        **(extra or {}),
    }
    path = out / "slides" / f"{stem}.json"
    write_json(path, record)
    return path


def check_results_folder(
    out_dir: str | os.PathLike[str], protocol: Protocol, *, records: Iterable[dict[str, Any]] | None = None
) -> None:
    """Refuse a results folder that holds another protocol's results: measuring a slide it has with this one
    would overwrite them. (A new version of the same protocol is meant to replace them.)

    Parameters
    ----------
    out_dir : path
    protocol : cleihc.protocol.Protocol
    records : iterable of dict, optional
        The folder's slide records, when already read.

    Raises
    ------
    ResultsFolderError
    """
    records = read_slide_records(out_dir) if records is None else records
    names = Counter(
        ((rec.get("provenance") or {}).get("protocol") or {}).get("protocol", {}).get("name")
        for rec in records
    )
    names.pop(None, None)
    names.pop(protocol.name, None)
    if names:
        other, n = names.most_common(1)[0]
        raise ResultsFolderError(
            f"it holds results of protocol {other!r} ({n} slides), which measuring with {protocol.name!r} could "
            f"overwrite; give another results folder (the command's default is cleihc-results/{protocol.name}/)",
            path=out_dir,
        )


@contextlib.contextmanager
def results_folder_lock(out_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold a results folder for one writer at a time (an advisory lock on ``.cleihc.lock`` inside it).

    Two runs writing one folder at once would measure the same slides twice and rebuild the tables from each
    other's half-written state. The lock goes with its process, however it ends (even ``kill -9``).

    Raises
    ------
    ResultsFolderError
        Another process holds the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".cleihc.lock"
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ResultsFolderError(
                f"another cleihc run is writing to this folder ({holder}); wait for it to end, or give another "
                "results folder",
                path=out,
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_slide_records(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-slide records of a results folder, sorted by slide name."""
    folder = Path(out_dir) / "slides"
    records = []
    for p in sorted(folder.glob("*.json")):
        with open(p, encoding="utf-8") as f:
            records.append(json.load(f))
    return records


def rebuild_tables(out_dir: str | os.PathLike[str], *, lead_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Rebuild ``regions.csv`` and ``regions.parquet`` from the per-slide records (atomically).

    Parameters
    ----------
    out_dir : path
    lead_columns : tuple of str
        Columns moved to the front when present (study metadata such as subject and timepoint).

    Returns
    -------
    pandas.DataFrame
        The combined table.
    """
    out = Path(out_dir)
    rows = [row for rec in read_slide_records(out) for row in rec["rows"]]
    df = pd.DataFrame(rows)
    if len(df):
        lead = [c for c in lead_columns if c in df.columns]
        df = df[lead + [c for c in df.columns if c not in lead]]
        # Slides in name order; regions keep the protocol's order within a slide.
        df = df.sort_values(["slide"], kind="stable").reset_index(drop=True)
    with atomic_write(out / "regions.csv", mode="w") as f:
        df.to_csv(f, index=False, lineterminator="\n")
    _write_parquet(df, out / "regions.parquet")
    return df


def write_totals(result: Any, path: Path) -> None:
    """The totals raster and region masks, as a plain ``.npz`` (no pickled objects; ``numpy.load`` reads it).

    Deflated at level 1 rather than ``numpy.savez_compressed``'s 6: on the 10k benchmark slide 0.75 against
    2.35 s for a file 15 % larger (10.4 against 9.0 MB).
    """
    raster = result.raster
    names = list(result.region_masks)
    arrays = {
        "bin_px": raster.bin_px,
        "positive_od_sum": raster.positive_od_sum,
        "pigment_px": raster.pigment_px,
        "region_names": np.array(names, dtype=str),
        "raster_downsample": np.float64(result.plan.raster_downsample),
        "raster_factor": np.int64(raster.raster_factor),
        "pixel_area_um2": np.float64(result.plan.pixel_area_um2),
    }
    masks = [np.ascontiguousarray(result.region_masks[n], dtype=bool) for n in names]
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for name, value in arrays.items():
                with zf.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
            # region_masks, (n, h, w) bool: streamed mask by mask rather than stacked in memory.
            with zf.open("region_masks.npy", mode="w", force_zip64=True) as member:
                shape = (len(masks), *raster.positive_od_sum.shape)
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(bool)), "fortran_order": False}
                np.lib.format.write_array_header_1_0(member, {**header, "shape": shape})
                for mask in masks:
                    member.write(memoryview(mask).cast("B"))


def _draw_dots(pixels: np.ndarray, x: np.ndarray, y: np.ndarray, positive: np.ndarray) -> None:
    """A 3 x 3 dot per cell (thumbnail pixel coordinates), negatives blue, then positives red on top.

    In numpy, not one drawing call per cell: a big slide has a quarter of a million cells (1.5 s of ellipses).
    """
    h, w = pixels.shape[:2]
    for mask, colour in ((~positive, (0, 60, 200)), (positive, (200, 0, 0))):
        cx = np.floor(x[mask]).astype(np.int64)
        cy = np.floor(y[mask]).astype(np.int64)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                xx, yy = cx + dx, cy + dy
                inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
                pixels[yy[inside], xx[inside]] = colour


def write_regions_geojson(result: Any, path: Path) -> None:
    """Tissue and every region used, in level-0 pixels (QuPath-style features a user can edit)."""
    plan = result.plan
    features = [to_feature(plan.tissue.polygons, name="tissue", classification="tissue")]
    for region in plan.regions:
        features.append(
            to_feature(
                region.geometry,
                name=region.name,
                classification=region.name,
                properties={"source": region.source},
            )
        )
    write_json(path, feature_collection(features), indent=None)  # outlines: 4-5x smaller and faster compact


def write_mask_pyramid(result: Any, path: Path) -> None:
    """Positive-pixel fraction (0–255) on the totals raster as a pyramidal OME-TIFF with its µm/px."""
    import tifffile

    frac = result.raster.positive_fraction()
    tissue = result.region_masks["tissue"]
    img = np.empty(frac.shape, np.uint8)
    for rows in row_blocks(frac.shape):  # float temporaries stay small
        f = frac[rows]
        img[rows] = np.where(np.isfinite(f) & tissue[rows], np.round(f * 255), 0)
    plan = result.plan
    mpp = plan.resolution.mpp_um[0] * plan.raster_factor
    levels = [img]
    while max(levels[-1].shape) > 512:
        a = levels[-1]
        h, w = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
        if h == 0 or w == 0:
            break
        levels.append(a[:h, :w].reshape(h // 2, 2, w // 2, 2).max(axis=(1, 3)))
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, ome=True, bigtiff=img.size > 2**31) as tif:
            # zlib at level 1: a 0-255 mask of mostly empty cells compresses well even so, 3x faster than level 6.
            opts = {
                "tile": (256, 256),
                "compression": "zlib",
                "compressionargs": {"level": 1},
                "photometric": "minisblack",
            }
            tif.write(
                levels[0],
                subifds=len(levels) - 1,
                metadata={
                    "axes": "YX",
                    "PhysicalSizeX": mpp,
                    "PhysicalSizeY": mpp,
                    "Name": "positive_fraction",
                },
                resolution=(1e4 / mpp, 1e4 / mpp),
                resolutionunit="CENTIMETER",
                **opts,
            )
            for k, lev in enumerate(levels[1:], 1):
                tif.write(
                    lev,
                    subfiletype=1,
                    resolution=(1e4 / (mpp * 2**k),) * 2,
                    resolutionunit="CENTIMETER",
                    **opts,
                )


def write_qc_png(result: Any, path: Path, *, max_size_px: int = 1600) -> None:
    """A thumbnail with the tissue outline, region outlines, the positive overlay and the cells."""
    from PIL import Image, ImageDraw

    from cleihc.slide import open_slide

    plan = result.plan
    with open_slide(plan.slide_path, mpp=plan.mpp_override) as slide:
        thumb = slide.get_thumbnail((max_size_px, max_size_px))
        w0 = slide.dimensions[0]
    th, tw = thumb.shape[:2]
    scale = tw / w0  # thumbnail px per level-0 px
    # Positive overlay: red tint proportional to the positive fraction of the raster cell under each thumbnail
    # pixel (only those cells are looked at), in bands of rows: float32 temporaries of a whole 1600 px thumbnail
    # were 150 MB of a small slide's peak, written while its other files are.
    _, fh, fw = result.raster.bin_px.shape
    ys = np.clip(((np.arange(th) + 0.5) / scale / plan.raster_downsample).astype(int), 0, fh - 1)
    xs = np.clip(((np.arange(tw) + 0.5) / scale / plan.raster_downsample).astype(int), 0, fw - 1)
    tint = np.array([230.0, 0.0, 40.0], dtype=np.float32) * np.float32(0.6)
    pixels = np.empty_like(thumb)
    for rows in row_blocks((th, tw), cells=1 << 18):
        f = np.nan_to_num(result.raster.positive_fraction_at(ys[rows], xs), nan=0.0)[..., None]
        band = thumb[rows].astype(np.float32)
        band *= np.float32(1.0) - np.float32(0.6) * f
        band += tint * f
        pixels[rows] = np.clip(band, 0, 255)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)

    def outline(geom: Any, colour: tuple[int, int, int], width: int) -> None:
        polys = getattr(geom, "geoms", [geom])
        for poly in polys:
            if poly.is_empty:
                continue
            for ring in [poly.exterior, *poly.interiors]:
                pts = [(x * scale, y * scale) for x, y in ring.coords]
                if len(pts) > 1:
                    draw.line(pts, fill=colour, width=width)

    outline(plan.tissue.polygons, _REGION_COLOURS["tissue"], 2)
    for region in plan.regions:
        outline(region.geometry, _REGION_COLOURS.get(region.name, (250, 200, 0)), 1)
    cells = result.cells
    if len(cells) and "positive" in cells:
        pixels = np.array(img)
        _draw_dots(
            pixels,
            cells["x_px"].to_numpy() * scale,
            cells["y_px"].to_numpy() * scale,
            cells["positive"].to_numpy(dtype=bool),
        )
        img = Image.fromarray(pixels)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=1)  # a QC picture: fast deflate, a somewhat larger file
