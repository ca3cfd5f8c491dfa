"""Positive cell detection on stain concentrations: nuclei, cells, membrane rings, per-cell stain measures.

The method follows QuPath's *positive cell detection* (Bankhead et al. 2017): nuclei are found by thresholding a
smoothed, background-subtracted counterstain optical density, touching nuclei are split by a watershed on the
distance transform, each nucleus is grown by a fixed distance (limited by its neighbours) into a cell, and the
target stain's optical density in the chosen compartment (nucleus, membrane ring or whole cell) decides whether a
cell is positive and its 0/1+/2+/3+ intensity class.

Exactness across tiles (docs/ARCHITECTURE.md): every decision about a cell uses only pixels within
:func:`required_halo_um` of its centroid, and no statistic of the tile itself, so a cell whose centroid lies in a
tile's core gets the same outline and the same values whatever the tile size or origin. Three rules make this
hold: filters have bounded support (Gaussian truncated at 4 sigma, square morphological windows); a thresholded
component longer than ``max_nucleus_length_um`` in x or y is never accepted (it is looked at again at a higher
threshold of the cascade), so every accepted object is small and one cut by the array border lies near that border,
outside the core; hole filling, half-maximum edges, splitting and expansion then act within such small objects.
The tests check this: tiles of several sizes and origins with a halo of :func:`required_halo_um` give the same
cells, with bit-identical values, as one run on the whole image.

Choices that differ from QuPath, and why: the nucleus edge is each object's half maximum (a blurred nucleus is
wider at a low global threshold and would swallow its membrane ring); a cascade of thresholds separates packed
nuclei (epidermis, lymphocyte clusters) that merge at the base threshold; holes of a membranous target ring are
added as nuclei (a pale nucleus hidden by a strong CD3 ring); distances (split, expansion) are 1/sqrt2 chamfer
distances computed in linear time (at most 8% above Euclidean).

References
----------
Bankhead P. et al. (2017) QuPath: Open source software for digital pathology image analysis. Sci Rep 7:16878.
Ruifrok A.C., Johnston D.A. (2001) Quantification of histochemical staining by color deconvolution.
Anal Quant Cytol Histol 23:291-299.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from cleihc._cell_kernels import (
    cascade_kernel,
    component_stats_kernel,
    expand_labels_kernel,
    extreme_filter_kernel,
    gaussian_kernel,
    hole_runs_kernel,
    label_runs_kernel,
    measure_kernel,
    merge_runs_kernel,
    near_runs_kernel,
    paint_runs_kernel,
    runs_of_u8_kernel,
    split_kernel,
)
from cleihc.errors import ProtocolError

__all__ = [
    "TABLE_COLUMNS",
    "CellDetection",
    "CellParams",
    "detect_cells",
    "detect_cells_od",
    "detect_pigment",
    "detect_pigment_od",
    "required_halo_um",
    "residual_channel",
]

logger = logging.getLogger(__name__)

Compartment = Literal["nucleus", "membrane", "cell"]
Measure = Literal["mean", "max"]

# Gaussian support in sigmas (scipy's default truncate): part of the locality budget of required_halo_um.
_TRUNCATE = 4.0
# Safety margin added to the halo for one-pixel connectivity and rounding of µm to pixels.
_HALO_MARGIN_UM = 2.0


@dataclass(frozen=True)
class CellParams:
    """Parameters of positive cell detection: the ``[cells]`` table of a protocol.

    Distances in µm, areas in µm², intensities in optical density (OD) units of the deconvolved stains.
    """

    # Gaussian smoothing of the nucleus detection image before thresholding (QuPath: 1.5 µm at 0.5 µm/px).
    smoothing_sigma_um: float = 1.0
    # Radius of the local background subtraction (grey opening with a square of side 2r, white top-hat):
    # removes diffuse counterstain in stroma and keratin; 0 turns it off. QuPath's default is 8 µm.
    background_radius_um: float = 8.0
    # Threshold on the nucleus detection image (counterstain OD + nucleus_target_weight * target OD, after
    # background subtraction). QuPath's default is hematoxylin OD 0.1.
    nucleus_threshold_od: float = 0.1
    # Weight of the target OD added to the counterstain OD to find nuclei: DAB-positive nuclei (Ki67) are pale in
    # hematoxylin, and under a membranous DAB ring (CD3) a lymphocyte nucleus is still found by its hematoxylin.
    # 0 uses the counterstain only (QuPath's default; right for cytoplasmic markers such as CXCL10); 1 is QuPath's
    # "optical density sum", right for nuclear markers (Ki67); a negative weight (about -0.5) suits membranous
    # markers (CD3/CD4/CD8): the stained membrane between touching lymphocytes then cuts their nuclei apart.
    nucleus_target_weight: float = 0.0
    # Each thresholded object is trimmed to its pixels at or above this fraction of its own peak detection OD
    # (0.5 = half maximum, the true edge of a blurred nucleus); 0 keeps the threshold's outline.
    nucleus_edge_fraction: float = 0.5
    # A pale nucleus fully enclosed by a membranous target ring (smoothed target OD >= this) is a nucleus too:
    # the hole of the ring is added to the nucleus mask. 0 turns it off.
    ring_threshold_od: float = 0.2
    # Number of thresholds tried, rising from nucleus_threshold_od by threshold_step: objects too long at one level
    # (packed epidermal nuclei, lymphocyte clusters merged into a network) are looked for again at the next.
    threshold_levels: int = 6
    # Ratio between successive thresholds of the cascade.
    threshold_step: float = 1.5
    # Nuclei smaller than this (after splitting) are discarded as debris or noise.
    min_nucleus_area_um2: float = 10.0
    # Nuclei larger than this (after hole filling) are discarded as clumps or stained stroma.
    max_nucleus_area_um2: float = 400.0
    # A thresholded component wider or taller than this is discarded: it bounds how far any decision reaches.
    max_nucleus_length_um: float = 25.0
    # Split touching nuclei by a watershed on the distance transform.
    split: bool = True
    # Minimum distance between two nucleus centres kept apart by the split (maxima of the distance transform).
    split_min_distance_um: float = 3.0
    # Cell = nucleus grown by this distance, limited by neighbouring cells (Voronoi-like); membrane ring = cell
    # minus nucleus. QuPath's default is 5 µm; lymphocytes have a thin cytoplasm.
    cell_expansion_um: float = 3.0
    # Which compartment's target OD decides positivity: "membrane" (ring) or "cell" for membranous markers
    # (CD3/CD4/CD8), "nucleus" for nuclear markers (Ki67), "cell" for cytoplasmic ones (CXCL10).
    compartment: Compartment = "cell"
    # Statistic of the target OD in the compartment: "mean" (QuPath's default) or "max".
    measure: Measure = "mean"
    # Detect brown pigment that is not DAB (melanin) and flag the cells whose compartment is mostly pigment.
    exclude_pigment: bool = False
    # A pixel is pigment where its counterstain + target OD reaches this (pigment is dark)...
    pigment_min_od: float = 0.4
    # ... and at most this: darker pixels are near-black, where the camera clips and any stain (DAB too) turns
    # neutral, so their hue says nothing about pigment.
    pigment_max_od: float = 2.0
    # ... and its |residual OD| is at least this fraction of counterstain + target OD (its hue is neither
    # hematoxylin's nor DAB's, so deconvolution leaves a residual).
    pigment_residual_ratio: float = 0.05
    # A cell is flagged pigment when at least this fraction of its deciding compartment is pigment.
    pigment_min_fraction: float = 0.3

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"cells.{name} = {getattr(self, name)!r}: must be {rule}")

        finite = {
            f: float(getattr(self, f))
            for f in self.__dataclass_fields__
            if isinstance(getattr(self, f), float)
        }
        for name, value in finite.items():
            need(math.isfinite(value), name, "a finite number")
        need(0.0 <= self.smoothing_sigma_um <= 10.0, "smoothing_sigma_um", "between 0 and 10 µm")
        need(0.0 <= self.background_radius_um <= 50.0, "background_radius_um", "between 0 (off) and 50 µm")
        need(0.0 < self.nucleus_threshold_od <= 5.0, "nucleus_threshold_od", "in (0, 5] OD")
        need(-1.0 <= self.nucleus_target_weight <= 2.0, "nucleus_target_weight", "between -1 and 2")
        need(
            isinstance(self.threshold_levels, int) and 1 <= self.threshold_levels <= 10,
            "threshold_levels",
            "an integer from 1 to 10",
        )
        need(1.0 < self.threshold_step <= 4.0, "threshold_step", "in (1, 4]")
        need(0.0 <= self.nucleus_edge_fraction < 1.0, "nucleus_edge_fraction", "in [0, 1)")
        need(0.0 <= self.ring_threshold_od <= 5.0, "ring_threshold_od", "between 0 (off) and 5 OD")
        need(0.0 < self.min_nucleus_area_um2, "min_nucleus_area_um2", "> 0 µm²")
        need(
            self.min_nucleus_area_um2 < self.max_nucleus_area_um2 <= 5000.0,
            "max_nucleus_area_um2",
            "greater than min_nucleus_area_um2 and at most 5000 µm²",
        )
        need(1.0 <= self.max_nucleus_length_um <= 100.0, "max_nucleus_length_um", "between 1 and 100 µm")
        need(0.0 < self.split_min_distance_um <= 20.0, "split_min_distance_um", "in (0, 20] µm")
        need(0.0 <= self.cell_expansion_um <= 20.0, "cell_expansion_um", "between 0 and 20 µm")
        need(self.compartment in get_args(Compartment), "compartment", f"one of {get_args(Compartment)}")
        need(self.measure in get_args(Measure), "measure", f"one of {get_args(Measure)}")
        need(0.0 < self.pigment_min_od <= 5.0, "pigment_min_od", "in (0, 5] OD")
        need(
            self.pigment_min_od < self.pigment_max_od <= 10.0,
            "pigment_max_od",
            "greater than pigment_min_od and at most 10 OD",
        )
        need(0.0 < self.pigment_residual_ratio <= 1.0, "pigment_residual_ratio", "in (0, 1]")
        need(0.0 < self.pigment_min_fraction <= 1.0, "pigment_min_fraction", "in (0, 1]")
        for name in ("split", "exclude_pigment"):
            need(isinstance(getattr(self, name), bool), name, "true or false")


#: Columns of :attr:`CellDetection.table`, in order; row ``k`` describes nucleus label ``k + 1``.
TABLE_COLUMNS: tuple[str, ...] = (
    "label",
    "x_a",
    "y_a",
    "nucleus_area_um2",
    "cell_area_um2",
    "target_od_mean",
    "target_od_nucleus_mean",
    "target_od_nucleus_max",
    "target_od_ring_mean",
    "target_od_ring_max",
    "target_od_cell_mean",
    "target_od_cell_max",
    "counterstain_od_mean",
    "pigment_fraction",
    "positive",
    "intensity_class",
    "pigment",
)


@dataclass(frozen=True)
class CellDetection:
    """Result of :func:`detect_cells` on one array (a tile with its halo, or a whole image).

    Attributes
    ----------
    labels : ndarray of int32, shape (H, W)
        Nucleus labels 1..n (0 = background).
    cell_labels : ndarray of int32, shape (H, W)
        Cell labels: nucleus ``k`` grown into cell ``k``; ring of cell ``k`` = ``cell_labels == k`` outside nuclei.
    table : dict of str to 1-D ndarray
        One row per nucleus (row ``k`` is label ``k + 1``), columns :data:`TABLE_COLUMNS`:
        ``label`` (int32); ``x_a``, ``y_a`` nucleus centroid in the array's pixel coordinates (float64, pixel
        centres at integers); ``nucleus_area_um2``, ``cell_area_um2``; target OD ``target_od_mean`` (the deciding
        compartment and measure), ``target_od_{nucleus,ring,cell}_{mean,max}`` (ring columns are NaN where a cell
        has no ring because neighbours leave it none); ``counterstain_od_mean`` (nucleus); ``pigment_fraction``
        of the deciding compartment; ``positive`` (bool: ``target_od_mean >= positive_od``); ``intensity_class``
        (int8: 0 negative, 1 weak 1+, 2 moderate 2+, 3 strong 3+); ``pigment`` (bool: compartment mostly
        non-DAB pigment; such cells should not be counted as positive).
    """

    labels: np.ndarray
    cell_labels: np.ndarray
    table: dict[str, np.ndarray] = field(repr=False)

    @property
    def n_cells(self) -> int:
        """Number of detected cells."""
        return int(self.table["label"].shape[0])


def required_halo_um(params: CellParams) -> float:
    """Context radius (µm, in x and in y) that :func:`detect_cells` needs around a tile's core to be exact.

    Sum of: the support of the smoothing (4 sigma) and of the background opening (twice its radius), the length
    of a nucleus (the cell's own object) and of a neighbouring nucleus (which limits its expansion), the expansion
    on both sides, and a margin of 2 µm for connectivity and rounding.

    Parameters
    ----------
    params : CellParams

    Returns
    -------
    float
        Halo in µm; the engine reads each tile with at least this much context on every side.
    """
    filters = _TRUNCATE * params.smoothing_sigma_um + 2.0 * params.background_radius_um
    return float(
        filters + 2.0 * params.max_nucleus_length_um + 2.0 * params.cell_expansion_um + _HALO_MARGIN_UM
    )


def _channel(names: tuple[str, ...], name: str, role: str) -> int:
    if name not in names:
        raise ProtocolError(
            f"cells: {role} stain {name!r} is not one of the stains {tuple(names)}; set [cells] {role} to one of them"
        )
    return names.index(name)


def _residual_index(names: tuple[str, ...], ci: int, ti: int) -> int | None:
    if "residual" in names:
        return names.index("residual")
    others = [k for k in range(len(names)) if k not in (ci, ti)]
    return others[0] if len(others) == 1 else None


def _opening(image: np.ndarray, radius_px: int, out: np.ndarray, scratch: np.ndarray) -> None:
    """Grey opening by a (2 r + 1)² square into ``out`` (erosion, then dilation; border clamped as scipy's
    ``mode="nearest"``), each a linear-time running extreme along axis 1 then axis 0. ``out`` and ``scratch``
    are float32 planes of ``image``'s shape, distinct from it and from each other."""
    extreme_filter_kernel(image, radius_px, 1, False, out)
    extreme_filter_kernel(out, radius_px, 0, False, scratch)
    extreme_filter_kernel(scratch, radius_px, 1, True, scratch)  # along rows a pass may write over its input
    extreme_filter_kernel(scratch, radius_px, 0, True, out)


def _gaussian_weights(sigma_px: float) -> np.ndarray:
    """Half of scipy's Gaussian kernel (``weights[k]`` at offset ±k), computed with scipy's own formula."""
    radius = int(_TRUNCATE * float(sigma_px) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma_px * sigma_px) * x**2)
    phi = phi / phi.sum()
    return np.ascontiguousarray(phi[::-1][radius:])


# The kernels' "no such plane": an array of another shape than the image (numba needs an array of fixed type).
_NO_PLANE = np.zeros((0, 0), dtype=np.float32)  # gaussian_kernel: nothing to add
_NO_MASK = np.zeros((0, 0), dtype=np.uint8)  # measure_kernel: no pigment test


def _smooth_into(image: np.ndarray, sigma_px: float, out: np.ndarray) -> None:
    """Float32 Gaussian of ``image`` into ``out`` (both float32, C-contiguous; ``out`` may be ``image``),
    bit-identical to ``ndimage.gaussian_filter(image, sigma_px, mode="nearest", truncate=4, output=np.float32)``
    (axis 0 then axis 1, float64 accumulation, float32 in between) at a fraction of its cost."""
    if sigma_px <= 1e-15:  # scipy skips an axis whose sigma is this small
        np.copyto(out, image)
        return
    gaussian_kernel(image, _NO_PLANE, np.float32(0.0), _gaussian_weights(sigma_px), out)


def detect_pigment(
    conc: np.ndarray,
    *,
    names: tuple[str, ...],
    counterstain: str,
    target: str,
    mpp_um: float,
    params: CellParams,
) -> np.ndarray:
    """Mask of dark brown pigment that is not DAB (melanin), from the residual of colour deconvolution.

    Melanin absorbs broadly, more in blue than in red, so its OD vector is darker and more neutral than DAB's and
    is not a mixture of hematoxylin and DAB: deconvolution with an H-DAB matrix gives it hematoxylin, DAB *and* a
    residual. A pixel is pigment where its counterstain + target OD is between ``pigment_min_od`` and
    ``pigment_max_od`` (beyond it the camera clips and every stain turns neutral grey) and its absolute residual is at least ``pigment_residual_ratio`` times that sum (a hematoxylin/DAB mixture has a
    residual near 0 whatever its darkness). The test is per pixel; :func:`detect_cells` averages it over a cell's
    compartment (``pigment_fraction``), which is what smooths out noise.

    Limits: light, sparse melanin (residual below the noise of JPEG-compressed slides) is missed; very dark DAB
    deposits that saturate the camera become neutral grey (excluded above ``pigment_max_od``, so pigment that dark
    is missed too); the residual's scale depends on the
    stain matrix, so ``pigment_residual_ratio`` is a per-protocol setting. With no residual channel (two stains
    only) nothing is flagged.

    Parameters
    ----------
    conc : ndarray, shape (H, W, n_stains)
        Stain concentrations (OD units) from :func:`cleihc.stains.deconvolve`.
    names : tuple of str
        Channel names of ``conc`` (``StainMatrix.names``).
    counterstain, target : str
        Names of the counterstain (hematoxylin) and target (DAB) channels.
    mpp_um : float
        Microns per pixel of ``conc``.
    params : CellParams

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    names = tuple(names)
    _check_conc(conc, names, mpp_um)
    ci = _channel(names, counterstain, "counterstain")
    ti = _channel(names, target, "target")
    ri = _residual_index(names, ci, ti)
    if ri is None:
        return np.zeros(conc.shape[:2], dtype=bool)
    return detect_pigment_od(conc[..., ci], conc[..., ti], conc[..., ri], params=params)


def detect_pigment_od(
    counterstain_od: np.ndarray, target_od: np.ndarray, residual_od: np.ndarray, *, params: CellParams
) -> np.ndarray:
    """:func:`detect_pigment` on the three OD planes (counterstain, target, residual), each (H, W).

    Returns
    -------
    ndarray of bool, shape (H, W)
    """
    total = np.asarray(counterstain_od, dtype=np.float32) + np.asarray(target_od, dtype=np.float32)
    residual = np.abs(np.asarray(residual_od, dtype=np.float32))
    return (
        (total >= np.float32(params.pigment_min_od))
        & (total <= np.float32(params.pigment_max_od))
        & (residual >= np.float32(params.pigment_residual_ratio) * total)
    )


def _check_conc(conc: np.ndarray, names: tuple[str, ...], mpp_um: float) -> None:
    if not isinstance(conc, np.ndarray) or conc.ndim != 3 or conc.shape[2] != len(names):
        shape = getattr(conc, "shape", None)
        raise ValueError(
            f"cells: conc must be an (H, W, {len(names)}) array matching names {names}, got {shape}"
        )
    if not np.issubdtype(conc.dtype, np.floating):
        raise ValueError(f"cells: conc must be a float array of OD concentrations, got {conc.dtype}")
    _check_mpp(mpp_um)


def _check_mpp(mpp_um: float) -> None:
    if not (isinstance(mpp_um, int | float) and math.isfinite(mpp_um) and mpp_um > 0):
        raise ValueError(f"cells: mpp_um must be a positive number, got {mpp_um!r}")


def _check_thresholds(positive_od: float, bins_od: tuple[float, ...]) -> np.ndarray:
    bins = np.asarray(bins_od, dtype=np.float64)
    if bins.ndim != 1 or bins.size != 3 or not np.all(np.isfinite(bins)) or not np.all(np.diff(bins) > 0):
        raise ProtocolError(f"cells: bins_od {bins_od!r} must be three increasing OD thresholds (1+, 2+, 3+)")
    if not (math.isfinite(positive_od) and positive_od > 0):
        raise ProtocolError(f"cells: positive_od {positive_od!r} must be a positive OD threshold")
    return bins


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    return runs_of_u8_kernel(mask.view(np.uint8) if mask.dtype == bool else mask)


def _keep_components(
    runs: tuple[np.ndarray, np.ndarray, np.ndarray, int],
    *,
    min_area_px: float,
    max_area_px: float,
    max_len_px: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Runs of the 8-connected components with ``min_area_px <= area <= max_area_px`` and a box at most
    ``max_len_px`` in both directions."""
    row, c0, c1, n = runs
    lab = np.empty(n, dtype=np.int32)
    k = label_runs_kernel(row, c0, c1, n, True, lab)
    stats = np.zeros((k + 1, 3), dtype=np.int64)
    component_stats_kernel(row, c0, c1, n, lab, k, stats)
    area, height, width = stats.T
    keep = (area >= min_area_px) & (area <= max_area_px) & (height <= max_len_px) & (width <= max_len_px)
    sel = keep[lab[:n]]
    return row[:n][sel], c0[:n][sel], c1[:n][sel], int(sel.sum())


def _ring_holes(ring: np.ndarray, params: CellParams, mpp_um: float) -> np.ndarray:
    """Small holes of the target ring mask (uint8 image): pale nuclei enclosed by a membranous ring.

    Holes are background components (4-connected) not touching the array border; only 8-connected groups of them
    no longer than the nucleus length bound and no larger than its area count: whether a large region is
    enclosed depends on pixels far away (a tile may cut the enclosing ring open), whether a small one is does not.
    """
    h, w = ring.shape
    row, c0, c1, n = _runs(ring)
    holes = hole_runs_kernel(row, c0, c1, n, h, w)
    small = _keep_components(
        holes,
        min_area_px=0.0,
        max_area_px=params.max_nucleus_area_um2 / (mpp_um * mpp_um),
        max_len_px=params.max_nucleus_length_um / mpp_um,
    )
    out = np.zeros(ring.shape, dtype=np.uint8)
    paint_runs_kernel(*small, np.uint8(1), out)
    return out


def _nucleus_mask(
    det: np.ndarray, ring_holes: np.ndarray | None, params: CellParams, mpp_um: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Nucleus clumps (as runs): a cascade of thresholds, long objects discarded, edges at half maximum, holes
    filled, areas checked.

    Level ``k`` thresholds the detection image at ``nucleus_threshold_od * threshold_step**k``. A component is
    accepted at the first level where it is at most ``max_nucleus_length_um`` wide and tall and at most
    ``max_nucleus_area_um2``; a component inside one accepted at a lower level is skipped. Packed nuclei
    (epidermis) that merge into a long network at the base threshold thus separate at a higher one, and every
    accepted object is small, so whether it is accepted depends only on pixels near it (a component cut by the
    array border lies within the length bound of that border, outside the tile's core). Half-maximum edge: a
    blurred nucleus is wider at the threshold than it is; cutting each object at a fraction of its own peak puts
    the edge back where it was (the 50% point of a blurred step) and keeps the membrane ring out of the nucleus.
    Holes are filled only among accepted (small) objects: a hole then lies inside one small object's box, so
    whether it is filled never depends on pixels far away (a hole in a tissue-wide network would).
    """
    px_area_um2 = mpp_um * mpp_um
    max_area_px = params.max_nucleus_area_um2 / px_area_um2
    thresholds = np.array(
        [
            np.float32(params.nucleus_threshold_od * params.threshold_step**level)
            for level in range(params.threshold_levels)
        ],
        dtype=np.float32,
    )
    use_ring = ring_holes is not None
    result = np.zeros(det.shape, dtype=np.uint8)
    cascade_kernel(
        det,
        ring_holes if use_ring else np.zeros((det.shape[0], 1), dtype=np.uint8),
        use_ring,
        thresholds,
        params.max_nucleus_length_um / mpp_um,
        max_area_px,
        params.nucleus_edge_fraction,
        result,
    )
    h, w = det.shape
    runs = _runs(result)
    filled = merge_runs_kernel(*runs, *hole_runs_kernel(*runs, h, w))
    return _keep_components(
        filled,
        min_area_px=params.min_nucleus_area_um2 / px_area_um2,
        max_area_px=max_area_px,
        max_len_px=np.inf,
    )


def _split(
    clump_runs: tuple[np.ndarray, np.ndarray, np.ndarray, int],
    shape: tuple[int, int],
    params: CellParams,
    mpp_um: float,
) -> np.ndarray:
    """Nucleus labels: each clump split by a watershed on its distance transform (markers = its maxima).

    Markers are the maxima of the chamfer distance within a ``2 md + 1`` square (``md`` = split_min_distance_um
    in pixels), grown by ``md // 2`` so that a plateau or equal maxima closer than ``md`` become one marker; a
    clump with two or more markers is flooded from them (priority flood on the negated distance), the others
    stay whole. Split pieces too small to be nuclei are dropped rather than merged: merging would need a second
    rule. Labels: whole clumps first (raster order), then pieces (raster order of their markers).
    """
    out = np.zeros(shape, dtype=np.int32)
    md_px = max(1, round(params.split_min_distance_um / mpp_um))
    split_kernel(*clump_runs, params.split, md_px, params.min_nucleus_area_um2 / (mpp_um * mpp_um), out)
    return out


def detect_cells(
    conc: np.ndarray,
    *,
    names: tuple[str, ...],
    counterstain: str,
    target: str,
    mpp_um: float,
    params: CellParams,
    positive_od: float,
    bins_od: tuple[float, ...],
) -> CellDetection:
    """Detect nuclei and cells and score each cell for the target stain (QuPath-style positive cell detection).

    Steps: detection image = counterstain OD + ``nucleus_target_weight`` × target OD; Gaussian smoothing; white
    top-hat (local background subtraction); a cascade of thresholds from ``nucleus_threshold_od`` (plus the holes
    of the smoothed target mask at ``ring_threshold_od``: pale nuclei inside membranous rings) accepting components
    no longer than ``max_nucleus_length_um`` and no larger than ``max_nucleus_area_um2``, each trimmed at
    ``nucleus_edge_fraction`` of its own peak; holes filled; areas checked; touching nuclei split by a marker
    watershed on the (chamfer) distance transform (markers: its maxima at least ``split_min_distance_um`` apart);
    split pieces below ``min_nucleus_area_um2`` dropped; cells = nuclei expanded by ``cell_expansion_um`` without
    overlap (like :func:`skimage.segmentation.expand_labels`, with chamfer distances); per-cell statistics of
    the raw (unsmoothed) target and counterstain OD in one pass.

    Parameters
    ----------
    conc : ndarray, shape (H, W, n_stains)
        Stain concentrations in OD units (:func:`cleihc.stains.deconvolve`); a tile with its halo or a whole image.
        Not modified.
    names : tuple of str
        Channel names of ``conc``.
    counterstain : str
        Name of the nuclear counterstain channel (e.g. ``"hematoxylin"``).
    target : str
        Name of the target stain channel (e.g. ``"dab"``).
    mpp_um : float
        Microns per pixel of ``conc``.
    params : CellParams
    positive_od : float
        A cell is positive when its target OD (compartment and measure of ``params``) is at least this.
        Computed once per slide or set by the protocol, never per tile.
    bins_od : tuple of 3 floats
        Increasing OD thresholds of the 1+, 2+ and 3+ intensity classes (e.g. ``(0.2, 0.4, 0.6)``); a positive
        cell's class is the number of them it reaches, at least 1; negative cells are class 0.

    Returns
    -------
    CellDetection

    Raises
    ------
    ProtocolError
        When ``counterstain`` or ``target`` is not a channel, or the thresholds are invalid.
    """
    names = tuple(names)
    _check_conc(conc, names, mpp_um)
    ci = _channel(names, counterstain, "counterstain")
    ti = _channel(names, target, "target")
    ri = _residual_index(names, ci, ti)
    pigment = None
    if params.exclude_pigment and ri is not None:
        pigment = detect_pigment_od(conc[..., ci], conc[..., ti], conc[..., ri], params=params)
    return detect_cells_od(
        conc[..., ci],
        conc[..., ti],
        pigment=pigment,
        mpp_um=mpp_um,
        params=params,
        positive_od=positive_od,
        bins_od=bins_od,
    )


def residual_channel(names: tuple[str, ...], counterstain: str, target: str) -> str | None:
    """Name of the channel that :func:`detect_cells` uses as the residual (pigment test), or None.

    The channel named ``"residual"``, else the one channel that is neither the counterstain nor the target.
    """
    names = tuple(names)
    ri = _residual_index(
        names, _channel(names, counterstain, "counterstain"), _channel(names, target, "target")
    )
    return None if ri is None else names[ri]


def detect_cells_od(
    counterstain_od: np.ndarray,
    target_od: np.ndarray,
    *,
    pigment: np.ndarray | None = None,
    mpp_um: float,
    params: CellParams,
    positive_od: float,
    bins_od: tuple[float, ...],
) -> CellDetection:
    """:func:`detect_cells` on separate OD planes: the counterstain's and the target's (each (H, W); neither is
    modified), and the pigment mask made from them and the residual (:func:`detect_pigment_od`).

    The tile engine makes just these planes from RGB (:func:`cleihc.stains.concentrations`, bit-identical to
    the channels of :func:`cleihc.stains.deconvolve`) rather than all channels and then copies of two of them,
    and tests pigment once per tile, for the area and the cells alike. Without `pigment` (or with
    ``params.exclude_pigment`` off) no cell is flagged as pigment.

    Returns
    -------
    CellDetection
    """
    bins = _check_thresholds(positive_od, bins_od)
    _check_mpp(mpp_um)
    mpp_um = float(mpp_um)
    counter_od = _od_plane(counterstain_od, "counterstain_od")
    target_od = _od_plane(target_od, "target_od")
    if target_od.shape != counter_od.shape:
        raise ValueError(
            f"cells: target_od {target_od.shape} and counterstain_od {counter_od.shape} differ in shape"
        )
    pig = None
    if params.exclude_pigment and pigment is not None:
        pigment = np.asarray(pigment)
        if pigment.shape != counter_od.shape:
            raise ValueError(
                f"cells: pigment {pigment.shape} and counterstain_od {counter_od.shape} differ in shape"
            )
        pig = np.ascontiguousarray(pigment != 0).view(np.uint8)
    sigma_px = params.smoothing_sigma_um / mpp_um

    # Besides the inputs, three working planes serve every step in turn (det, a, b; then det as the expansion's
    # scratch): a tile's peak memory is what limits the tile size, and larger tiles waste less time on halos.
    # Detection image counterstain + weight x target, smoothed as it is made (the same float32 values as the
    # plane computed first).
    det = np.empty_like(counter_od)
    weight = np.float32(params.nucleus_target_weight)
    if sigma_px <= 1e-15:
        np.multiply(target_od, weight, out=det)
        det += counter_od
    else:
        gaussian_kernel(counter_od, target_od, weight, _gaussian_weights(sigma_px), det)
    a = np.empty_like(det)
    b = np.empty_like(det)
    r_px = round(params.background_radius_um / mpp_um)
    if r_px > 0:  # white top-hat: subtract the grey opening
        _opening(det, r_px, a, b)
        det -= a
    ring_holes = None
    if params.ring_threshold_od > 0:
        _smooth_into(target_od, sigma_px, a)
        ring_holes = _ring_holes(a >= np.float32(params.ring_threshold_od), params, mpp_um)
    del a, b
    clump_runs = _nucleus_mask(det, ring_holes, params, mpp_um)
    del ring_holes
    nuclei = _split(clump_runs, det.shape, params, mpp_um)
    cells = np.empty_like(nuclei)
    grow_px = np.float32(params.cell_expansion_um / mpp_um)
    # Nuclei lie within their clumps, so the pixels within reach of a clump hold every pixel a cell can reach.
    near = near_runs_kernel(*clump_runs, *det.shape, math.ceil(grow_px))
    expand_labels_kernel(nuclei, grow_px, *near, det, cells)
    del det
    table = _measure(nuclei, cells, near, target_od, counter_od, pig, params, mpp_um, positive_od, bins)
    return CellDetection(labels=nuclei, cell_labels=cells, table=table)


def _od_plane(a: np.ndarray, what: str) -> np.ndarray:
    """A 2-D float32 C-contiguous plane (the kernels' input), copied only when it is not one already."""
    if not isinstance(a, np.ndarray) or a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"cells: {what} must be a 2-D float array, got {getattr(a, 'shape', None)}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _measure(
    nuclei: np.ndarray,
    cells: np.ndarray,
    near: tuple[np.ndarray, np.ndarray, np.ndarray],
    target_od: np.ndarray,
    counter_od: np.ndarray,
    pigment: np.ndarray | None,
    params: CellParams,
    mpp_um: float,
    positive_od: float,
    bins: np.ndarray,
) -> dict[str, np.ndarray]:
    n = int(nuclei.max(initial=0))
    ints = np.zeros((6, n + 1), dtype=np.int64)
    sums = np.zeros((3, n + 1), dtype=np.float64)
    maxs = np.full((2, n + 1), -np.inf, dtype=np.float64)
    pig = _NO_MASK if pigment is None else pigment
    measure_kernel(nuclei, cells, target_od, counter_od, pig, *near, ints, sums, maxs)
    ints, sums, maxs = ints[:, 1:], sums[:, 1:], maxs[:, 1:]
    n_area, sx, sy, n_pig, r_area, r_pig = ints
    n_t, n_c, r_t = sums
    n_max, r_max = maxs
    c_area = n_area + r_area
    with np.errstate(invalid="ignore", divide="ignore"):
        nuc_mean = n_t / n_area
        ring_mean = np.where(r_area > 0, r_t / r_area, np.nan)
        cell_mean = (n_t + r_t) / c_area
        n_pig_frac = n_pig / n_area
        r_pig_frac = np.where(r_area > 0, r_pig / np.maximum(r_area, 1), np.nan)
        c_pig_frac = (n_pig + r_pig) / c_area
    ring_max = np.where(r_area > 0, r_max, np.nan)
    cell_max = np.maximum(n_max, r_max)

    # A cell whose neighbours leave it no ring is judged on the whole cell (= its nucleus) for "membrane".
    if params.compartment == "nucleus":
        value = nuc_mean if params.measure == "mean" else n_max
        pig_frac = n_pig_frac
    elif params.compartment == "membrane":
        if params.measure == "mean":
            value = np.where(r_area > 0, ring_mean, nuc_mean)
        else:
            value = np.where(r_area > 0, ring_max, n_max)
        pig_frac = np.where(r_area > 0, r_pig_frac, n_pig_frac)
    else:
        value = cell_mean if params.measure == "mean" else cell_max
        pig_frac = c_pig_frac
    positive = value >= positive_od
    intensity = (value[:, None] >= bins[None, :]).sum(axis=1)
    intensity = np.where(positive, np.maximum(intensity, 1), 0).astype(np.int8)
    pigment = pig_frac >= params.pigment_min_fraction
    px_area_um2 = mpp_um * mpp_um
    return {
        "label": np.arange(1, n + 1, dtype=np.int32),
        "x_a": sx / n_area,
        "y_a": sy / n_area,
        "nucleus_area_um2": n_area * px_area_um2,
        "cell_area_um2": c_area * px_area_um2,
        "target_od_mean": value.astype(np.float64),
        "target_od_nucleus_mean": nuc_mean,
        "target_od_nucleus_max": n_max,
        "target_od_ring_mean": ring_mean,
        "target_od_ring_max": ring_max,
        "target_od_cell_mean": cell_mean,
        "target_od_cell_max": cell_max,
        "counterstain_od_mean": n_c / n_area,
        "pigment_fraction": pig_frac.astype(np.float64),
        "positive": positive,
        "intensity_class": intensity,
        "pigment": pigment,
    }
