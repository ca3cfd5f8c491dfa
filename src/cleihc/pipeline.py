"""The quantification pipeline: one slide in, one :class:`Result` out.

``quantify`` is a fold over per-tile results:

1. **plan** (:func:`plan_slide`): open the slide, read a low-resolution overview, detect tissue, estimate the
   background (I0) and, if the protocol asks, the stain vectors; find the skin compartments; read the user's
   regions; choose the analysis resolution and the tile grid. Everything a tile needs goes into a picklable
   :class:`SlidePlan`, so tiles can run in other processes or on a Dask cluster.
2. **tiles** (:func:`cleihc.tile_engine.process_tile`, the part Dask workers run): read one tile with its halo,
   deconvolve, add the core's pixels to the totals raster window, detect cells and keep those whose centroid is in
   the core.
3. **fold** (:func:`finalize`): add the windows into the totals raster in tile order, concatenate the cells, build
   region masks on the raster, and compute every ratio once.

``iter_tiles`` yields progress as it goes; the core never prints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
from scipy import ndimage

from cleihc import __version__
from cleihc._malloc import release_free_heap
from cleihc.cells import CellParams, required_halo_um
from cleihc.errors import NoTissueError, ProtocolError
from cleihc.geometry import rasterize
from cleihc.io import sha256_file
from cleihc.measure import (
    MAX_RASTER_FACTOR,
    TotalsRaster,
    area_metrics,
    cell_metrics,
    map_mask,
)
from cleihc.protocol import Protocol, load_protocol
from cleihc.regions import (
    COMPARTMENT_NAMES,
    Region,
    compartments_from_epidermis,
    merge_regions,
    regions_for_slide,
    skin_compartments,
)
from cleihc.slide import AnalysisResolution, Slide, open_slide, slide_stem
from cleihc.stains import (
    StainFit,
    StainMatrix,
    check_drift,
    concentration,
    estimate_background,
    estimate_macenko,
    stain_fit,
    tissue_pixels,
)
from cleihc.tile_engine import SlidePlan, TileResult, iter_tiles, process_tile
from cleihc.tiling import TileGrid
from cleihc.tissue import tissue_mask_for_slide

__all__ = [
    "EXCLUDE_NAMES",
    "Result",
    "SlidePlan",
    "TileResult",
    "finalize",
    "iter_tiles",
    "measure_plan",
    "plan_slide",
    "process_tile",
    "quantify",
    "slide_stem",
]

log = logging.getLogger(__name__)

#: Region names (case-insensitive) that remove their area from every other region: artefacts, folds, ink.
EXCLUDE_NAMES = frozenset({"exclude", "exclusion", "ignore", "ignore*", "artefact", "artifact"})

#: The most specific region wins when a cell is labelled with one region name.
_SPECIFICITY = ("tissue", *COMPARTMENT_NAMES)  # epidermis, dermis, then the depth bands


@dataclass(frozen=True)
class Result:
    """The measurements of one slide with one protocol.

    Attributes
    ----------
    slide : str
        The slide's stem (file name without extension).
    path : str
    regions : pandas.DataFrame
        One row per region (columns defined in ``docs/measurements.md``; the output files in README.md).
    cells : pandas.DataFrame
        One row per detected cell (empty for area-only protocols).
    plan : SlidePlan
        The resolved protocol, stains, tissue, regions and resolution used.
    raster : TotalsRaster
        The additive totals on the raster grid (for review masks and for recomputing with corrections).
    region_masks : dict of str to ndarray
        Each reported region on the raster grid (region ∩ tissue, minus exclusions).
    provenance : dict
        JSON-serialisable record of inputs, versions, parameters and timings.
    """

    slide: str
    path: str
    regions: pd.DataFrame
    cells: pd.DataFrame
    plan: SlidePlan
    raster: TotalsRaster
    region_masks: dict[str, np.ndarray]
    provenance: dict[str, Any] = field(repr=False)


#: Cells of the largest whole-slide grid (overview, totals raster): about 8 million (e.g. 2800 x 2800).
MAX_GRID_CELLS = 8_000_000


def _coarsest_grid_um(slide: Slide) -> float:
    """The finest µm/px at which the whole slide fits in :data:`MAX_GRID_CELLS` cells."""
    w0, h0 = slide.dimensions
    mx, my = slide.mpp
    return float(np.sqrt(w0 * mx * h0 * my / MAX_GRID_CELLS))


def _lowres_overview(slide: Slide, mpp_um: float) -> tuple[np.ndarray, float, float]:
    """The whole slide on the exact analysis grid nearest `mpp_um`: (rgb, level-0 downsample, µm/px)."""
    res = slide.analysis_resolution(mpp_um)
    return slide.read_analysis_image(res), float(res.downsample), float(res.mpp_um[0])


def plan_slide(
    slide_path: str | os.PathLike[str],
    protocol: Protocol | str,
    *,
    regions: str | os.PathLike[str] | Sequence[Region] | None = None,
    mpp: float | tuple[float, float] | None = None,
    tile_size: int | None = None,
    tile_origin_px: tuple[int, int] = (0, 0),
    roi: Any = None,
) -> SlidePlan:
    """Prepare one slide: tissue, background, stains, compartments, regions, resolution and tiles.

    Parameters
    ----------
    slide_path : path
    protocol : Protocol or str
        A protocol, or a name or file path for :func:`cleihc.protocol.load_protocol`.
    regions : path or sequence of Region, optional
        Annotation file or folder (``<slide stem>.<ext>``), or regions already read. A user region replaces the
        automatic region of the same name.
    mpp : float or (float, float), optional
        Microns per pixel at level 0, overriding (or supplying) the file's.
    tile_size : int, optional
        Tile core size in analysis pixels (default: the protocol's).
    tile_origin_px : (int, int)
        Shift of the tile grid in analysis pixels (results do not depend on it; tests use it).
    roi : shapely geometry, optional
        Measure only inside this area (level-0 px): a drawn region or the visible field.

    Returns
    -------
    SlidePlan

    Raises
    ------
    cleihc.errors.MissingMppError
        The slide has no MPP and none was given.
    cleihc.errors.NoTissueError
        No tissue was found.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    proto = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    mpp_override = None if mpp is None else (mpp if isinstance(mpp, tuple) else (float(mpp), float(mpp)))
    warnings: list[str] = []
    with open_slide(slide_path, mpp=mpp_override) as slide:
        resolution = slide.analysis_resolution(proto.analysis.mpp_um)  # raises MissingMppError first
        _check_resolution(slide, resolution, proto, mpp_override, warnings)
        # Tissue is told from the glass as it looks on this slide, even when the protocol fixes I0 for the stain
        # arithmetic: a fixed white I0 against grey glass (OD sum 0.1-0.2) would make every pixel tissue.
        # The protocol's colour is used where the slide shows no glass.
        tissue = tissue_mask_for_slide(slide, params=proto.tissue, reference_rgb=proto.background.rgb)
        if not tissue.mask.any():
            raise NoTissueError(
                "no tissue found; check the slide is a brightfield section, or lower the protocol's "
                "[tissue] threshold",
                path=slide_path,
            )
        timings["tissue_s"] = time.perf_counter() - t0
        release_free_heap()  # each whole-slide step's temporaries go back before the next one's

        t1 = time.perf_counter()
        # Whole-slide grids (overview, totals raster) are kept under a fixed size, so memory does not grow with
        # the slide: a very large scan is measured on a coarser grid, and provenance says so.
        coarse_um = _coarsest_grid_um(slide)
        overview_um = max(proto.compartments.mpp_um, coarse_um)
        raster_um = max(proto.analysis.raster_mpp_um, coarse_um)
        if coarse_um > min(proto.compartments.mpp_um, proto.analysis.raster_mpp_um):
            warnings.append(
                f"large slide: compartments found at {overview_um:.2f} um/px and totals kept at {raster_um:.2f} "
                "um/px to bound memory"
            )
        user_regions = _canonical_names(_user_regions(regions, slide_path), proto)
        _check_region_bounds(user_regions, slide.dimensions, warnings)
        user_epidermis = [r for r in user_regions if r.name == "epidermis"]
        overview, overview_ds, overview_mpp = _lowres_overview(slide, overview_um)
        # Stain vectors are estimated where stains are not mixed: tissue pixels at the analysis resolution.
        estimation_px = (
            tissue_pixels(slide, tissue.mask, mask_downsample=tissue.downsample, mpp_um=proto.analysis.mpp_um)
            if proto.stains.estimate == "macenko"
            else None
        )
    # The slide, and its cache of decoded tiles, is closed here: what follows works on whole-slide arrays only.
    tissue_ov = map_mask(
        tissue.mask,
        mask_downsample=tissue.downsample,
        shape=(overview.shape[1], overview.shape[0]),
        downsample=overview_ds,
    )
    stains = _resolve_stains(
        proto,
        overview,
        tissue_ov,
        warnings,
        glass_seen=tissue.method != "no_glass",
        estimation_pixels=estimation_px,
    )
    del estimation_px
    fit = _check_stain_fit(proto, stains, overview, tissue_ov, warnings)
    overview_wh = (overview.shape[1], overview.shape[0])
    # Automatic compartments need one channel of the overview, not its RGB: dropped before they run.
    auto_compartments = proto.compartments.enabled and not user_epidermis
    counterstain_ov = concentration(overview, stains, stain=proto.counterstain) if auto_compartments else None
    del overview
    release_free_heap()
    compartments = None
    if proto.compartments.enabled and user_epidermis:
        # The user's epidermis moves the junction, so the dermis and depth bands follow it.
        epi = rasterize(user_epidermis[0].geometry, shape=overview_wh, downsample=overview_ds)
        compartments = compartments_from_epidermis(
            epi & tissue_ov,
            tissue_ov,
            mpp_um=overview_mpp,
            downsample=overview_ds,
            params=proto.compartments,
        )
    elif auto_compartments:
        compartments = skin_compartments(
            counterstain_ov,
            tissue_ov,
            mpp_um=overview_mpp,
            downsample=overview_ds,
            params=proto.compartments,
        )
    del counterstain_ov, tissue_ov
    if compartments is not None:
        warnings.extend(compartments.warnings)
    timings["overview_s"] = time.perf_counter() - t1

    if roi is not None:
        # Compartments were found on the whole tissue, so an ROI never changes what counts as epidermis; only
        # the tiles (and, on the raster, every region) are restricted to it.
        h_t, w_t = tissue.mask.shape
        inside = rasterize(roi, shape=(w_t, h_t), downsample=tissue.downsample)
        inside |= ndimage.binary_dilation(inside)  # keep tissue pixels the ROI touches at all
        tissue = dataclasses.replace(tissue, mask=tissue.mask & inside)
        if not tissue.mask.any():
            raise NoTissueError(
                "no tissue inside the region of interest; draw it over the section", path=slide_path
            )

    auto = compartments.to_regions() if compartments is not None else []
    merged = merge_regions(auto, user_regions)
    _check_report_names(proto, merged, warnings)
    comp_masks = dict(compartments.masks) if compartments is not None else {}
    compartment_downsample = compartments.downsample if compartments is not None else 1.0
    del compartments  # its depth map and the overview-sized arrays go before the trim below
    # A user region replaces the automatic region of the same name: drop the automatic mask.
    for r in user_regions:
        comp_masks.pop(r.name, None)

    cells_params: CellParams | None = proto.cells if "cells" in proto.measure else None
    # Area measurement is per pixel: only cells (and pigment, found with them) need to see past the tile core.
    halo_um = max(proto.analysis.halo_um, required_halo_um(cells_params)) if cells_params else 0.0
    halo_a = int(np.ceil(halo_um / min(resolution.mpp_um)))
    grid = TileGrid(
        resolution.dimensions_a,
        tile_size_px=int(tile_size or proto.analysis.tile_size_px),
        halo_px=halo_a,
        origin_px=tile_origin_px,
        downsample=resolution.downsample,
    )
    tiles = tuple(grid.tiles(tissue=tissue))
    raster_factor = max(1, round(raster_um / resolution.mpp_um[0]))
    if raster_factor > MAX_RASTER_FACTOR:
        raise ProtocolError(
            f"[analysis] raster_mpp_um is {raster_factor} analysis pixels ({raster_um:g} / "
            f"{resolution.mpp_um[0]:g} um); at most {MAX_RASTER_FACTOR} are allowed: lower raster_mpp_um or raise mpp_um",
            path=proto.source or None,
        )
    wa, ha = resolution.dimensions_a
    raster_shape = (-(-wa // raster_factor), -(-ha // raster_factor))
    timings["plan_s"] = time.perf_counter() - t0
    release_free_heap()  # the compartments' arrays and polygons are done with
    return SlidePlan(
        slide_path=str(slide_path),
        mpp_override=mpp_override,
        protocol=proto,
        stains=stains,
        resolution=resolution,
        grid=grid,
        tiles=tiles,
        raster_factor=raster_factor,
        raster_shape=raster_shape,
        tissue=tissue,
        regions=tuple(merged),
        compartment_masks=comp_masks,
        compartment_downsample=compartment_downsample,
        warnings=tuple(warnings),
        timings_s=timings,
        roi=roi,
        stain_fit=fit,
    )


def _warn(warnings: list[str], message: str) -> None:
    """A warning of the plan: logged now (console, run.log) and kept with the slide's results."""
    log.warning(message)
    warnings.append(message)


def _check_resolution(
    slide: Slide,
    resolution: AnalysisResolution,
    proto: Protocol,
    mpp_override: tuple[float, float] | None,
    warnings: list[str],
) -> None:
    """Warn about a scan coarser than the protocol's resolution, and about an --mpp that contradicts the file
    (--mpp is given for a whole batch, and reaches slides that carry their own value)."""
    if resolution.mpp_um[0] > 1.25 * proto.analysis.mpp_um:
        _warn(
            warnings,
            f"measured at {resolution.mpp_um[0]:g} um/px, the scan's own resolution, coarser than the "
            f"protocol's {proto.analysis.mpp_um:g} um/px: nuclei and thin structures are found less reliably",
        )
    file_mpp = slide.file_mpp
    if mpp_override is not None and file_mpp is not None and abs(mpp_override[0] / file_mpp[0] - 1) > 0.02:
        _warn(
            warnings,
            f"--mpp {mpp_override[0]:g} overrides the file's {file_mpp[0]:g} um/px: lengths scale by "
            f"{mpp_override[0] / file_mpp[0]:.3g}, areas and densities by its square",
        )


def _canonical_names(regions: Sequence[Region], proto: Protocol) -> list[Region]:
    """User regions named like a known region but for case ("Epidermis", QuPath's capitalised classes) take the
    known name, so they replace the automatic region (and move the dermis and bands) instead of adding a row;
    regions that then share a name are one region (their union)."""
    known = {n.lower(): n for n in ("tissue", *COMPARTMENT_NAMES, *proto.regions.report)}
    by_name: dict[str, list[Region]] = {}
    for r in regions:
        name = known.get(r.name.lower(), r.name)
        if name != r.name:
            log.info("region %r taken as %r", r.name, name)
        by_name.setdefault(name, []).append(dataclasses.replace(r, name=name))
    out = []
    for group in by_name.values():
        if len(group) == 1:
            out.append(group[0])
        else:
            union = shapely.union_all([g.geometry for g in group])
            out.append(
                dataclasses.replace(
                    group[0], geometry=union, properties={**group[0].properties, "merged": len(group)}
                )
            )
    return out


def _check_report_names(proto: Protocol, regions: Sequence[Region], warnings: list[str]) -> None:
    """A `[regions] report` name like a known region's but not it (a typo) would give an empty row silently."""
    import difflib

    known = sorted({"tissue", *COMPARTMENT_NAMES})
    have = {*known, *(r.name for r in regions)}
    for name in proto.regions.report:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8) if name not in have else []
        if close:
            _warn(
                warnings,
                f"protocol: [regions] report lists {name!r}, which no region of this slide has (its row is "
                f"empty); did you mean {close[0]!r}?",
            )


def _check_region_bounds(regions: Sequence[Region], dimensions: tuple[int, int], warnings: list[str]) -> None:
    """Warn about annotations mostly off the slide: coordinates not in level-0 pixels (exported from a
    downsampled image or another scan) would otherwise give regions of zero or partial area without a word."""
    w, h = dimensions
    frame = shapely.box(0, 0, w, h)
    for r in regions:
        area = r.geometry.area
        inside = r.geometry.intersection(frame).area
        if area > 0 and inside < 0.5 * area:
            minx, miny, maxx, maxy = (round(v) for v in r.geometry.bounds)
            _warn(
                warnings,
                f"regions: {r.name!r} lies {1 - inside / area:.0%} outside the slide ({w} x {h} px; the region "
                f"spans x {minx}..{maxx}, y {miny}..{maxy}): annotation coordinates must be level-0 pixels of "
                "this slide",
            )


def _user_regions(regions: Any, slide_path: str | os.PathLike[str]) -> list[Region]:
    if regions is None:
        return []
    if isinstance(regions, str | os.PathLike):
        return list(regions_for_slide(regions, slide_path))
    return list(regions)


def _resolve_stains(
    proto: Protocol,
    overview: np.ndarray,
    tissue_ov: np.ndarray,
    warnings: list[str],
    *,
    glass_seen: bool = True,
    estimation_pixels: np.ndarray | None = None,
) -> StainMatrix:
    """The protocol's stains with this slide's background (I0) and, if asked, its own vectors.

    With ``[stains] estimate = "macenko"`` the vectors are estimated on `estimation_pixels` (tissue pixels at
    the analysis resolution, from :func:`cleihc.stains.tissue_pixels`) when given, else on the overview's
    tissue, where thin stains (a 2 µm membrane ring at 4 µm/px) are mixed with the counterstain and the
    estimate leans towards it (on the CD3 sample slides DAB was 16-18 degrees off at 2 µm/px, 3.4-3.7 at
    0.5 µm/px). A third
    real stain keeps the protocol's vector (Macenko's method finds two), and the slide's warnings say so.
    """
    reference = proto.stains.matrix
    if proto.background.mode == "estimate" and glass_seen:
        # Fallback I0 for a slide whose overview shows too little glass.
        background = estimate_background(overview, tissue_mask=tissue_ov, fallback=proto.background.rgb)
    else:
        if proto.background.mode == "estimate":
            warnings.append(f"no glass seen: background I0 = the protocol's rgb {list(proto.background.rgb)}")
        background = np.asarray(proto.background.rgb, dtype=float)
    stains = reference.with_background(background)
    if proto.stains.estimate == "macenko":
        pixels = overview[tissue_ov] if estimation_pixels is None else estimation_pixels
        estimated = estimate_macenko(pixels, background=background, reference=stains)
        if len(stains.stain_names) == 3:
            warnings.append(
                f"stains: Macenko's method estimates two stains ({', '.join(stains.stain_names[:2])}); "
                f"{stains.stain_names[2]} keeps the protocol's vector"
            )
        message = check_drift(
            estimated,
            stains,
            tolerance_deg=proto.stains.drift_tolerance_deg,
            action=proto.stains.drift_action,
        )
        if message:
            warnings.append(message)
        stains = estimated.with_background(background)
    return stains


def _check_stain_fit(
    proto: Protocol, stains: StainMatrix, overview: np.ndarray, tissue_ov: np.ndarray, warnings: list[str]
) -> StainFit:
    """Warn when the slide's target-positive colours are not the protocol's stains (an H&E or Alcian blue slide
    measured as DAB): deconvolution would report them as positive all the same."""
    fit = stain_fit(
        overview, stains, target=proto.target, positive_od=proto.thresholds.positive_od, tissue_mask=tissue_ov
    )
    if not fit.explained:
        _warn(
            warnings,
            f"stains: {fit.off_plane_fraction:.0%} of the {proto.target}-positive tissue has colours that "
            f"{proto.counterstain} and {proto.target} do not make (more than {fit.angle_deg:g} degrees off their "
            "plane): the slide looks stained with something else (H&E, Alcian blue?); check the slide and "
            "the protocol before trusting its numbers",
        )
    return fit


def region_masks_on_raster(plan: SlidePlan) -> dict[str, np.ndarray]:
    """Every reported region as a mask on the totals raster: region ∩ tissue, minus exclusions."""
    shape = plan.raster_shape
    ds = plan.raster_downsample
    tissue = map_mask(plan.tissue.mask, mask_downsample=plan.tissue.downsample, shape=shape, downsample=ds)
    if plan.roi is not None:
        tissue &= rasterize(plan.roi, shape=shape, downsample=ds)
    masks: dict[str, np.ndarray] = {}
    user: set[str] = set()
    exclude = np.zeros_like(tissue)
    for region in plan.regions:
        if region.source != "auto":
            user.add(region.name)
        if region.source == "auto" and region.name in plan.compartment_masks:
            m = map_mask(
                plan.compartment_masks[region.name],
                mask_downsample=plan.compartment_downsample,
                shape=shape,
                downsample=ds,
            )
        else:
            m = rasterize(region.geometry, shape=shape, downsample=ds)
        if region.name.lower() in EXCLUDE_NAMES:
            exclude |= m
        elif region.name == "tissue":
            tissue &= m  # a user tissue outline restricts the detected tissue
        else:
            masks[region.name] = m
    tissue &= ~exclude
    # The protocol's regions in its order (tissue always, first unless placed), then the user's own regions;
    # automatic compartments the protocol does not list are not reported.
    report = plan.protocol.regions.report
    out = {} if "tissue" in report else {"tissue": tissue}
    for name in report:
        out[name] = tissue if name == "tissue" else masks.pop(name, np.zeros_like(tissue)) & tissue
    for name, m in masks.items():
        if name in user:
            out[name] = m & tissue
    return out


def _cell_regions(
    x_px: np.ndarray, y_px: np.ndarray, masks: dict[str, np.ndarray], raster_ds: float
) -> np.ndarray:
    """Each cell's most specific region name ('outside' when not on tissue), as an object array of str.

    The names are shared objects (one per region, not one string per cell): a million cells cost 8 MB here.
    """
    tissue = masks["tissue"]
    h, w = tissue.shape
    ix = np.clip(np.floor(np.asarray(x_px, dtype=float) / raster_ds).astype(np.int64), 0, w - 1)
    iy = np.clip(np.floor(np.asarray(y_px, dtype=float) / raster_ds).astype(np.int64), 0, h - 1)
    order = sorted(masks, key=lambda n: _SPECIFICITY.index(n) if n in _SPECIFICITY else len(_SPECIFICITY))
    names = ["outside", "tissue", *(n for n in order if n != "tissue")]
    code = tissue[iy, ix].astype(np.int16)
    for k, name in enumerate(names[2:], start=2):  # later (more specific) regions win
        code[masks[name][iy, ix]] = k
    return np.array(names, dtype=object)[code]


def _label_cells(cells: pd.DataFrame, masks: dict[str, np.ndarray], raster_ds: float) -> pd.DataFrame:
    """A copy of `cells` with its ``region`` column (see :func:`_cell_regions`)."""
    cells = cells.copy()
    cells["region"] = _cell_regions(
        cells["x_px"].to_numpy(float), cells["y_px"].to_numpy(float), masks, raster_ds
    )
    return cells


def finalize(
    plan: SlidePlan,
    results: Iterable[TileResult],
    *,
    started: float | None = None,
    timings_s: dict[str, float] | None = None,
) -> Result:
    """Fold tile results into totals, label cells, and compute every metric once.

    `started` (a ``time.perf_counter()`` value) and `timings_s` (e.g. the tiles' time) go into the provenance.
    """
    raster = TotalsRaster(plan.raster_shape, plan.raster_factor)
    cell_parts: list[dict[str, np.ndarray]] = []
    # Folded as they arrive, so no backlog of windows is held (at 40,000 x 30,000 px they weigh as much as the
    # raster). Arrival order does not matter: counts are integers, and a raster cell's OD sums are float64 sums of
    # float32 values at or above the positivity threshold, exact in any order.
    for res in results:
        raster.add(res.window)
        if res.n_cells:
            cell_parts.append(res.cells)
    t0 = time.perf_counter()
    masks = region_masks_on_raster(plan)
    cells = _cells_table(cell_parts, plan, masks)
    del cell_parts
    rows = metrics_table(plan, raster, masks, cells)
    timings = {**plan.timings_s, **(timings_s or {})}
    timings["finalize_s"] = time.perf_counter() - t0
    if started is not None:
        timings["total_s"] = time.perf_counter() - started
    prov = provenance(plan, timings)
    return Result(
        slide=slide_stem(plan.slide_path),
        path=plan.slide_path,
        regions=rows,
        cells=cells,
        plan=plan,
        raster=raster,
        region_masks=masks,
        provenance=prov,
    )


def _cells_table(
    parts: list[dict[str, np.ndarray]], plan: SlidePlan, masks: dict[str, np.ndarray]
) -> pd.DataFrame:
    """The tiles' cells as one table: sorted by position, inside the ROI, with ids, µm and region columns.

    Columns: ``cell_id``, ``x_px``, ``y_px``, ``x_um``, ``y_um``, the tiles' measurements, ``region`` (only
    ``x_px`` and ``y_px`` for a protocol without cells). Each column is gathered once in its final order: a
    big slide's table is not copied whole by sorting and labelling.
    """

    def column(name: str) -> np.ndarray:
        return np.concatenate([p[name] for p in parts]) if parts else np.zeros(0, dtype=np.float64)

    x, y = column("x_px"), column("y_px")
    # A fixed order (by row, then column; stable) gives every cell the same id whatever the tiling.
    order = np.lexsort((x, y))
    if plan.roi is not None and len(order):
        # Tiles reach past the ROI; their cells there were never asked for.
        order = order[shapely.contains_xy(plan.roi, x[order], y[order])]
    x, y = x[order], y[order]
    if "cells" not in plan.protocol.measure:
        return pd.DataFrame({"x_px": x, "y_px": y})
    mpp_x, mpp_y = plan.resolution.mpp_um
    ds = plan.resolution.downsample
    data = {
        "cell_id": np.arange(len(x), dtype=np.int64),
        "x_px": x,
        "y_px": y,
        "x_um": x * (mpp_x / ds),
        "y_um": y * (mpp_y / ds),
    }
    for name in parts[0] if parts else ():
        if name not in data:
            data[name] = column(name)[order]
    data["region"] = _cell_regions(x, y, masks, plan.raster_downsample)
    return pd.DataFrame(data, copy=False)


def metrics_table(
    plan: SlidePlan, raster: TotalsRaster, masks: dict[str, np.ndarray], cells: pd.DataFrame
) -> pd.DataFrame:
    """One row per region: identifiers, then area and cell metrics as the protocol measures."""
    proto = plan.protocol
    ids = {
        "slide": slide_stem(plan.slide_path),
        "path": str(plan.slide_path),
        "stain": proto.name,
        "protocol": f"{proto.name}@{proto.version}",
        "protocol_sha256": proto.sha256,
    }
    rows = region_rows(
        raster,
        masks,
        cells,
        ids=ids,
        measure=tuple(proto.measure),
        pixel_area_um2=plan.pixel_area_um2,
        raster_downsample=plan.raster_downsample,
        h_score=proto.metrics.h_score,
        positive_pixel_count=proto.metrics.positive_pixel_count,
    )
    rows["corrected"] = False  # set by cleihc.corrections when a reviewer's corrections apply
    return rows


def region_rows(
    raster: TotalsRaster,
    masks: dict[str, np.ndarray],
    cells: pd.DataFrame,
    *,
    ids: dict[str, Any],
    measure: tuple[str, ...],
    pixel_area_um2: float,
    raster_downsample: float,
    h_score: bool = True,
    positive_pixel_count: bool = True,
) -> pd.DataFrame:
    """The region table from totals, region masks and cells (also used to recompute with corrections)."""
    rows = []
    for name, mask in masks.items():
        am = area_metrics(raster.totals(mask), pixel_area_um2=pixel_area_um2)
        row: dict[str, Any] = {**ids, "region": name, "region_area_mm2": am["region_area_mm2"]}
        if "cells" in measure:
            inside = cells_in_mask(mask, cells, raster_downsample)
            # Only the columns the metrics read: a region of a big slide would otherwise copy whole rows.
            counted = cells.loc[inside, ["positive", "intensity_class", "pigment"]] if len(cells) else cells
            row.update(cell_metrics(counted, region_area_mm2=am["region_area_mm2"]))
            if not h_score:
                row["cells_h_score"] = float("nan")
        if "area" in measure:
            row.update({k: v for k, v in am.items() if k != "region_area_mm2"})
            if not positive_pixel_count:
                for k in [k for k in row if k.startswith("ppc_")]:
                    del row[k]
            if not h_score:
                # `h_score` is a column of every area table (other tools read it): a protocol that finds it
                # meaningless for its stain (histochemistry) leaves it empty rather than absent.
                row["h_score"] = float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def cells_in_mask(mask: np.ndarray, cells: pd.DataFrame, raster_ds: float) -> np.ndarray:
    """Which cells have their centroid on a raster mask."""
    h, w = mask.shape
    if not len(cells):
        return np.zeros(0, dtype=bool)
    ix = np.floor(cells["x_px"].to_numpy(float) / raster_ds).astype(np.int64)
    iy = np.floor(cells["y_px"].to_numpy(float) / raster_ds).astype(np.int64)
    ok = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out = np.zeros(len(cells), dtype=bool)
    out[ok] = mask[iy[ok], ix[ok]]
    return out


def provenance(plan: SlidePlan, timings: dict[str, float]) -> dict[str, Any]:
    """What produced a result: software, input, resolution, resolved protocol (with vectors and I0), timings."""
    path = Path(plan.slide_path)
    res = plan.resolution
    return {
        "cleihc_version": __version__,
        "slide": {
            "path": str(path),
            "absolute_path": str(
                path.resolve()
            ),  # `path` is as given, maybe relative to where the run started
            "size_bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        },
        "mpp_override": plan.mpp_override,
        "analysis": {
            "level": res.level,
            "factor": res.factor,
            "mpp_um": list(res.mpp_um),
            "downsample": res.downsample,
            "tiles": len(plan.tiles),
            "tile_size_px": plan.grid.tile_size_px,
            "halo_px": plan.grid.halo_px,
            "raster_factor": plan.raster_factor,
        },
        # The protocol with this slide's vectors and I0 fixed: its hash is not the tables' protocol_sha256 (the
        # protocol as named), hence a name of its own.
        "protocol": plan.protocol.resolved(stains=plan.stains).to_dict(),
        "resolved_protocol_sha256": plan.protocol.resolved(stains=plan.stains).sha256,
        "stains": plan.stains.to_dict(),
        "tissue": {
            "area_mm2": plan.tissue.area_mm2,
            "mpp_um": plan.tissue.mpp_um,
            "threshold_od": plan.tissue.threshold_od,
        },
        "regions": [{"name": r.name, "source": r.source} for r in plan.regions],
        "stain_fit": None
        if plan.stain_fit is None
        else {**plan.stain_fit._asdict(), "explained": plan.stain_fit.explained},
        "warnings": list(plan.warnings),
        "timings_s": timings,
    }


def quantify(
    slide_path: str | os.PathLike[str],
    protocol: Protocol | str,
    *,
    regions: str | os.PathLike[str] | Sequence[Region] | None = None,
    mpp: float | tuple[float, float] | None = None,
    tile_size: int | None = None,
    tile_origin_px: tuple[int, int] = (0, 0),
    progress: Callable[[int, int], None] | None = None,
    runner: Any = None,
    roi: Any = None,
) -> Result:
    """Measure one slide with one protocol.

    Parameters
    ----------
    slide_path : path
        Any slide cleihc reads (``cleihc info`` lists what it sees).
    protocol : Protocol or str
        A protocol object, a built-in name (``"cd3"``, ``"cxcl10"``, ...) or a TOML file.
    regions : path or sequence of Region, optional
        Annotation file or folder; a user region replaces the automatic region of the same name.
    mpp : float or (float, float), optional
        Microns per pixel at level 0, if the file lacks it (never guessed).
    tile_size : int, optional
        Tile core size in analysis pixels; results do not depend on it.
    tile_origin_px : (int, int)
        Shift of the tile grid; results do not depend on it.
    progress : callable, optional
        Called as ``progress(done, total)`` after each tile.
    runner : object, optional
        Where tiles run: a :class:`cleihc.parallel.DaskRunner` (or anything with
        ``iter_results(plan, progress=)``); default serial, in this process.
    roi : shapely geometry, optional
        Measure only inside this area (level-0 px), e.g. a drawn region or the visible field.

    Returns
    -------
    Result

    Examples
    --------
    >>> from cleihc import quantify  # doctest: +SKIP
    >>> result = quantify("sample_images/S01_pre_cd3.svs", "cd3")  # doctest: +SKIP
    >>> result.regions[["region", "positive_cells_per_mm2"]]  # doctest: +SKIP
    """
    started = time.perf_counter()
    plan = plan_slide(
        slide_path,
        protocol,
        regions=regions,
        mpp=mpp,
        tile_size=tile_size,
        tile_origin_px=tile_origin_px,
        roi=roi,
    )
    return measure_plan(plan, progress=progress, runner=runner, started=started)


def measure_plan(
    plan: SlidePlan,
    *,
    progress: Callable[[int, int], None] | None = None,
    runner: Any = None,
    started: float | None = None,
) -> Result:
    """Measure a planned slide: its tiles (serially, or on `runner`), then every total and metric.

    :func:`quantify` is :func:`plan_slide` then this; a batch plans the next slide while this runs.

    Parameters
    ----------
    plan : SlidePlan
        From :func:`plan_slide`.
    progress, runner
        As for :func:`quantify`.
    started : float, optional
        ``time.perf_counter()`` when planning began, for the provenance's ``total_s``.

    Returns
    -------
    Result
    """
    timings: dict[str, float] = {}

    def timed(results: Iterable[TileResult]) -> Iterator[TileResult]:
        t0 = time.perf_counter()
        yield from results
        timings["tiles_s"] = time.perf_counter() - t0

    if runner is None:
        runner = _serial_runner()
    results = runner.iter_results(plan, progress=progress)
    return finalize(plan, timed(results), started=started, timings_s=timings)


def _serial_runner() -> Any:
    from cleihc.parallel import SerialRunner  # parallel imports this module

    return SerialRunner()
