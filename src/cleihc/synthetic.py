"""Synthetic skin slides with exact ground truth: the sample-slide generator.

A skin section on glass is rendered through the Beer-Lambert law, ``I = I0 * 10**(-sum_s c_s * v_s)`` per
channel, with the unit OD vectors ``v_s`` of a :func:`cleihc.stains.preset`. The scene holds an epidermis with rete
ridges and a thin stratum corneum over dermis (collagen bundles, fibroblasts, small vessels), lymphocytes
(denser in the papillary dermis, around vessels and along the basal epidermis) that are positive or negative for
the target, diffuse CXCL10-like DAB patches, interstitial dermal mucin (Alcian blue or colloidal iron) and,
optionally, melanin in the basal epidermis. Optical blur, sensor noise and JPEG tiles are applied last.

Ground truth is exact because it is taken from the rendered concentrations, before blur and noise: the
positive-area fraction of a region is the fraction of its tissue pixels whose target concentration is at least
``threshold_od``. Rendered target concentrations are either at most ``SkinParams.background_target_od`` or at
least ``SkinParams.min_positive_od``, so any threshold between the two gives the same truth and blur, noise and
JPEG move the measured fraction very little.

Everything is a deterministic function of global level-0 coordinates and the seed: noise fields are hash-based
value noise on a global lattice, objects are drawn per fixed block of the global grid with a
``numpy.random.Generator`` seeded by ``(seed, block)``, sensor noise per fixed 256-pixel block. Rendering any
rectangle therefore gives the same pixels as cutting it out of a full render: this is what lets
:func:`write_large_synthetic_svs` stream a 40,000 x 30,000 slide tile by tile and still equal the in-memory
render.

Pixel convention: pixel (row ``r``, column ``c``) covers ``[c, c+1) x [r, r+1)`` in level-0 pixel coordinates and
samples the scene at its centre ``(c + 0.5, r + 0.5)``; cell positions and region polygons use the same frame.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from cleihc._tiffwrite import write_ome_tiff, write_svs, write_svs_tiles
from cleihc.errors import CleihcError
from cleihc.io import atomic_write, jsonable
from cleihc.stains import StainMatrix, preset

__all__ = [
    "GENERATOR_VERSION",
    "STAINS",
    "SampleSpec",
    "SkinParams",
    "SyntheticSlide",
    "make_sample_set",
    "render_skin",
    "sample_specs",
    "truth_path_for",
    "write_large_synthetic_svs",
    "write_ome_tiff",
    "write_svs",
    "write_truth",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"

#: Protocol names accepted by :func:`render_skin`.
STAINS: tuple[str, ...] = ("cd3", "cd4", "cd8", "cxcl10", "gag-alcian", "gag-colloidal-iron")


@dataclass(frozen=True)
class _StainSetup:
    preset: str
    counterstain: str
    target: str
    pattern: (
        str  # "membrane" (positive cells), "diffuse" (CXCL10-like patches), "mucin" (interstitial deposits)
    )


_SETUP: Mapping[str, _StainSetup] = {
    "cd3": _StainSetup("hdab", "hematoxylin", "dab", "membrane"),
    "cd4": _StainSetup("hdab", "hematoxylin", "dab", "membrane"),
    "cd8": _StainSetup("hdab", "hematoxylin", "dab", "membrane"),
    "cxcl10": _StainSetup("hdab", "hematoxylin", "dab", "diffuse"),
    "gag-alcian": _StainSetup("alcian_nfr", "nuclear_fast_red", "alcian_blue", "mucin"),
    "gag-colloidal-iron": _StainSetup("colloidal_iron_nfr", "nuclear_fast_red", "colloidal_iron", "mucin"),
}

# Melanin is a pigment, not a stain, so no preset carries it. Eumelanin absorbs broadly with a rise towards the
# blue; in RGB OD it is a dark, nearly neutral brown-black: more red OD and less blue OD than DAB (about 17
# degrees from the DAB vector), so it is "brown that is not DAB". Unit-normalised below.
_MELANIN_OD = (0.52, 0.58, 0.62)

# Default fraction of lymphocytes positive per marker at activity 1 (CD3 marks most T cells; CD4 > CD8 in CLE).
_POSITIVE_FRACTION = {"cd3": 0.75, "cd4": 0.5, "cd8": 0.35}

_CLASSES = ("lymphocyte", "keratinocyte", "fibroblast")
_LYM, _KER, _FIB = 0, 1, 2
_REGION_ORDER = ("tissue", "epidermis", "dermis", "papillary_dermis", "superficial_dermis", "deep_dermis")
_LEAF_REGIONS = ("epidermis", "papillary_dermis", "superficial_dermis", "deep_dermis")
_REGION_COLORS = {
    "tissue": [80, 80, 80],
    "epidermis": [200, 0, 200],
    "dermis": [0, 150, 0],
    "papillary_dermis": [0, 200, 200],
    "superficial_dermis": [0, 100, 200],
    "deep_dermis": [0, 0, 160],
}

_BLOCK_PX = 512  # object-generation block of the global grid, level-0 pixels
_NOISE_BLOCK_PX = 256  # sensor-noise block of the global grid
_CURVE_STEP_UM = 0.5  # tabulation step of the 1D outline curves
_CURVE_CHUNK = 4096  # table entries per cached chunk


@dataclass(frozen=True)
class SkinParams:
    """What the synthetic skin looks like. Lengths in µm, densities per mm² of the region.

    Parameters
    ----------
    activity : float
        Disease activity in 0..1.5 scaling inflammatory cell density, the positive fraction of lymphocytes,
        CXCL10 patches and mucin (e.g. 1.0 before treatment, 0.4 after).
    threshold_od : float
        Target concentration (OD units) at or above which a pixel counts as positive in the truth.
    min_positive_od, max_positive_od : float
        Range of rendered target concentration in positive structures (DAB rings, patches, mucin).
    background_target_od : float
        Largest faint non-specific target concentration elsewhere in tissue.
    papillary_um, superficial_um : float
        Depth bands by Euclidean distance below the epidermis: papillary dermis ``(0, papillary_um]``,
        superficial dermis ``(papillary_um, superficial_um]``, deep dermis beyond.
    epidermis_min_um, epidermis_max_um : float
        Depth of the dermo-epidermal junction below the surface between rete ridges and at their tips.
    rete_spacing_um : float
        Mean distance between rete ridges.
    stratum_corneum_um : float
        Thickness of the stratum corneum.
    keratinocyte_spacing_um : float
        Lattice spacing of keratinocyte nuclei.
    lymphocyte_diameter_um : float
        Mean lymphocyte nucleus diameter.
    ring_um : float
        Thickness of the DAB membrane/cytoplasm ring of positive lymphocytes.
    cytoplasm_um : float
        How far beyond its nucleus a CXCL10-expressing cell is stained (the cell's cytoplasm).
    ring_min_od, ring_max_od : float
        Range of a positive lymphocyte's ring OD. Dark enough that the mean over a cell expanded 3 µm beyond its
        nucleus (QuPath-style, ring diluted by unstained pixels) is still clearly above the threshold.
    lymphocytes_papillary_per_mm2, lymphocytes_deep_per_mm2, lymphocytes_interface_per_mm2 : float
        Lymphocyte density just below the DEJ, deep in the dermis and in the basal epidermis, at activity 1.
    perivascular_per_mm2 : float
        Peak extra lymphocyte density in a perivascular cuff, at activity 1.
    doublet_fraction : float
        Fraction of lymphocytes drawn as touching pairs.
    fibroblasts_per_mm2, vessels_per_mm2 : float
        Dermal fibroblast and small-vessel densities.
    positive_fraction : float or None
        Fraction of lymphocytes positive at activity 1; None uses the marker's default (CD3 0.75, CD4 0.5,
        CD8 0.35).
    cxcl10_cover : float
        Approximate dermal cover of CXCL10 patches at activity 1.
    mucin_cover : float
        Approximate dermal cover of mucin deposits at activity 1.
    melanin : float
        Probability that a basal keratinocyte carries a melanin cap (0 = no pigment).
    blur_sigma_px : float
        Optical blur (Gaussian sigma, level-0 pixels).
    noise_sigma : float
        Sensor noise (standard deviation in 8-bit grey levels).
    background_rgb : tuple of three floats
        Glass brightness I0.
    """

    activity: float = 1.0
    threshold_od: float = 0.2
    min_positive_od: float = 0.35
    max_positive_od: float = 0.75
    background_target_od: float = 0.03
    papillary_um: float = 150.0
    superficial_um: float = 500.0
    epidermis_min_um: float = 60.0
    epidermis_max_um: float = 120.0
    rete_spacing_um: float = 110.0
    stratum_corneum_um: float = 10.0
    keratinocyte_spacing_um: float = 10.0
    lymphocyte_diameter_um: float = 6.5
    ring_um: float = 2.0
    ring_min_od: float = 0.55
    cytoplasm_um: float = 3.0
    ring_max_od: float = 0.95
    lymphocytes_papillary_per_mm2: float = 1500.0
    lymphocytes_deep_per_mm2: float = 120.0
    lymphocytes_interface_per_mm2: float = 600.0
    perivascular_per_mm2: float = 9000.0
    doublet_fraction: float = 0.1
    fibroblasts_per_mm2: float = 450.0
    vessels_per_mm2: float = 30.0
    positive_fraction: float | None = None
    cxcl10_cover: float = 0.15
    mucin_cover: float = 0.2
    melanin: float = 0.0
    blur_sigma_px: float = 0.7
    noise_sigma: float = 1.5
    background_rgb: tuple[float, float, float] = (242.0, 240.0, 244.0)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "background_rgb", tuple(float(v) for v in self.background_rgb))
        except (TypeError, ValueError):
            raise CleihcError(
                f"SkinParams.background_rgb must be three numbers, got {self.background_rgb!r}"
            ) from None
        checks = {
            "activity": 0.0 <= self.activity <= 1.5,
            "threshold_od": self.background_target_od < self.threshold_od < self.min_positive_od,
            "max_positive_od": self.min_positive_od <= self.max_positive_od,
            "ring_min_od": self.threshold_od < self.ring_min_od <= self.ring_max_od,
            "superficial_um": 0.0 < self.papillary_um < self.superficial_um,
            "epidermis_max_um": 0.0 < self.epidermis_min_um <= self.epidermis_max_um,
            "melanin": 0.0 <= self.melanin <= 1.0,
            "doublet_fraction": 0.0 <= self.doublet_fraction <= 0.5,
            "blur_sigma_px": 0.0 <= self.blur_sigma_px <= 3.0,
            "noise_sigma": 0.0 <= self.noise_sigma <= 20.0,
            "positive_fraction": self.positive_fraction is None or 0.0 <= self.positive_fraction <= 1.0,
            "background_rgb": len(self.background_rgb) == 3
            and all(1 <= v <= 255 for v in self.background_rgb),
        }
        for name, ok in checks.items():
            if not ok:
                raise CleihcError(
                    f"SkinParams.{name} is out of range ({getattr(self, name)!r}); see its docstring"
                )


@dataclass(frozen=True)
class SyntheticSlide:
    """A rendered slide and its exact ground truth.

    Attributes
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
        The brightfield image (after blur, noise and, if asked, JPEG).
    mpp_um : float
        Microns per pixel.
    truth : dict
        JSON-serialisable ground truth (see :func:`render_skin`).
    tissue_mask : ndarray, shape (H, W), bool
        Exact tissue.
    region_masks : dict of str to ndarray (H, W) bool
        ``epidermis``, ``dermis``, ``papillary_dermis``, ``superficial_dermis``, ``deep_dermis`` (all within
        tissue).
    target_conc : ndarray, shape (H, W), float32
        Rendered target-stain concentration (OD units) before blur and noise.
    pigment_mask : ndarray, shape (H, W), bool
        Pixels with melanin (all False without pigment).
    """

    rgb: np.ndarray = field(repr=False)
    mpp_um: float
    truth: dict[str, Any] = field(repr=False)
    tissue_mask: np.ndarray = field(repr=False)
    region_masks: dict[str, np.ndarray] = field(repr=False)
    target_conc: np.ndarray = field(repr=False)
    pigment_mask: np.ndarray = field(repr=False)


# ---------------------------------------------------------------------------------------------------------------
# Deterministic noise on the global grid
# ---------------------------------------------------------------------------------------------------------------
_M32 = np.uint64(0xFFFFFFFF)


def _hash01(seed: int, stream: int, ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) values hashed from integer lattice coordinates (a 32-bit avalanche hash)."""
    with np.errstate(over="ignore"):
        h = (
            ix.astype(np.uint64) * np.uint64(0x9E3779B1)
            + iy.astype(np.uint64) * np.uint64(0x85EBCA77)
            + np.uint64((seed * 0xC2B2AE3D + stream * 0x27D4EB2F) & 0xFFFFFFFF)
        ) & _M32
        h ^= h >> np.uint64(15)
        h = (h * np.uint64(0x2C1B3C6D)) & _M32
        h ^= h >> np.uint64(12)
        h = (h * np.uint64(0x297A2D39)) & _M32
        h ^= h >> np.uint64(15)
    return h.astype(np.float64) / 4294967296.0


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _value_noise_2d(
    seed: int, stream: int, xs: np.ndarray, ys: np.ndarray, sx: float, sy: float
) -> np.ndarray:
    """Value noise in [0, 1] on the grid ``xs`` (columns) x ``ys`` (rows), lattice cells ``sx`` x ``sy``.

    Separable interpolation of a global hashed lattice: the value at a point never depends on the grid it is
    evaluated on.
    """
    gx = xs / sx
    gy = ys / sy
    ix = np.floor(gx).astype(np.int64)
    iy = np.floor(gy).astype(np.int64)
    tx = _smooth(gx - ix)
    ty = _smooth(gy - iy)
    x0, y0 = int(ix.min()), int(iy.min())
    lx = np.arange(x0, int(ix.max()) + 2)
    ly = np.arange(y0, int(iy.max()) + 2)
    lat = _hash01(seed, stream, lx[None, :], ly[:, None])
    jx = ix - x0
    jy = iy - y0
    along_x = (lat[:, jx] * (1.0 - tx) + lat[:, jx + 1] * tx).astype(np.float32)
    ty32 = ty.astype(np.float32)[:, None]
    out = along_x[jy + 1] - along_x[jy]
    out *= ty32
    out += along_x[jy]
    return out


def _fbm_2d(
    seed: int, stream: int, xs: np.ndarray, ys: np.ndarray, sx: float, sy: float, octaves: int
) -> np.ndarray:
    """Fractal sum of value-noise octaves, normalised to [0, 1]."""
    total = np.zeros((len(ys), len(xs)), dtype=np.float32)
    amp, norm = 1.0, 0.0
    for k in range(octaves):
        o = _value_noise_2d(seed, stream * 16 + k, xs, ys, sx / 2**k, sy / 2**k)
        if amp != 1.0:
            o *= np.float32(amp)
        total += o
        norm += amp
        amp *= 0.5
    total *= np.float32(1.0 / norm)
    return total


@functools.cache
def _fbm_reference(octaves: int) -> np.ndarray:
    """Sorted sample of the fBm distribution (stationary, so one fixed sample serves every seed and place)."""
    xs = np.arange(1024, dtype=np.float64)
    return np.sort(_fbm_2d(12345, 99, xs, xs, 16.0, 16.0, octaves).ravel())


def _fbm_quantile(q: float, octaves: int) -> float:
    ref = _fbm_reference(octaves)
    return float(ref[min(len(ref) - 1, max(0, round(q * (len(ref) - 1))))])


def _fbm_points(
    seed: int, stream: int, x: np.ndarray, y: np.ndarray, sx: float, sy: float, octaves: int
) -> np.ndarray:
    """The fractal value noise of :func:`_fbm_2d` at scattered points (x, y)."""
    total = np.zeros(np.shape(x))
    amp, norm = 1.0, 0.0
    for k in range(octaves):
        gx, gy = x / (sx / 2**k), y / (sy / 2**k)
        ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
        tx, ty = _smooth(gx - ix), _smooth(gy - iy)
        st = stream * 16 + k
        top = _hash01(seed, st, ix, iy) * (1 - tx) + _hash01(seed, st, ix + 1, iy) * tx
        bottom = _hash01(seed, st, ix, iy + 1) * (1 - tx) + _hash01(seed, st, ix + 1, iy + 1) * tx
        total += amp * (top * (1 - ty) + bottom * ty)
        norm += amp
        amp *= 0.5
    return total / norm


def _fbm_1d(seed: int, stream: int, t: np.ndarray, scale: float, octaves: int = 3) -> np.ndarray:
    """1D fractal value noise in [0, 1] at positions ``t`` (any shape)."""
    t = np.asarray(t, dtype=np.float64)
    total = np.zeros_like(t)
    amp, norm = 1.0, 0.0
    for k in range(octaves):
        g = t / (scale / 2**k)
        i = np.floor(g).astype(np.int64)
        f = _smooth(g - i)
        zero = np.zeros_like(i)
        a = _hash01(seed, stream * 16 + k, i, zero)
        b = _hash01(seed, stream * 16 + k, i + 1, zero)
        total += amp * (a * (1.0 - f) + b * f)
        norm += amp
        amp *= 0.5
    return total / norm


# ---------------------------------------------------------------------------------------------------------------
# The scene: geometry, objects per block, rendering of any rectangle
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Cells:
    """Cells as parallel arrays (positions in level-0 px, sizes in µm)."""

    x: np.ndarray
    y: np.ndarray
    cls: np.ndarray  # int8 index into _CLASSES
    a_um: np.ndarray  # semi-axis along theta
    b_um: np.ndarray
    theta: np.ndarray
    positive: np.ndarray
    nuc_od: np.ndarray
    ring_od: np.ndarray
    melanin: np.ndarray  # bool: carries a melanin cap (basal keratinocytes)
    prio: np.ndarray  # conflict priority (higher wins)
    pair: np.ndarray  # int64 pair id for deliberate touching doublets, -1 otherwise

    @staticmethod
    def empty() -> _Cells:
        f = np.zeros(0)
        return _Cells(
            f,
            f,
            np.zeros(0, np.int8),
            f,
            f,
            f,
            np.zeros(0, bool),
            f,
            f,
            np.zeros(0, bool),
            f,
            np.zeros(0, np.int64),
        )

    def take(self, idx: np.ndarray) -> _Cells:
        return _Cells(*(getattr(self, n)[idx] for n in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: list[_Cells]) -> _Cells:
        if not parts:
            return _Cells.empty()
        return _Cells(*(np.concatenate([getattr(p, n) for p in parts]) for n in _Cells.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class _Vessels:
    x: np.ndarray
    y: np.ndarray
    rx_um: np.ndarray
    ry_um: np.ndarray
    theta: np.ndarray


class _Scene:
    """A skin section of `width_px` x `height_px`; every query is a pure function of global coordinates."""

    def __init__(
        self, *, stain: str, width_px: int, height_px: int, mpp_um: float, seed: int, params: SkinParams
    ):
        self.stain = stain
        self.setup = _SETUP[stain]
        self.width_px = width_px
        self.height_px = height_px
        self.mpp = float(mpp_um)
        self.seed = int(seed)
        self.p = params
        sm = preset(self.setup.preset, background_rgb=params.background_rgb)
        self.stains: StainMatrix = sm
        self.v_counter = sm.vector(self.setup.counterstain).astype(np.float64)
        self.v_target = sm.vector(self.setup.target).astype(np.float64)
        mel = np.asarray(_MELANIN_OD, dtype=np.float64)
        self.v_melanin = mel / np.linalg.norm(mel)
        w_um, h_um = width_px * self.mpp, height_px * self.mpp
        self.w_um, self.h_um = w_um, h_um
        # Margins of glass around the section and how much its edges wander.
        self.top_um = max(15.0, 0.05 * h_um)
        self.bottom_um = max(15.0, 0.04 * h_um)
        self.side_um = max(15.0, 0.035 * w_um)
        self.wander_um = min(60.0, 0.05 * min(w_um, h_um))
        self._block_cache: dict[tuple[str, int, int], Any] = {}
        act = params.activity
        pf = (
            params.positive_fraction
            if params.positive_fraction is not None
            else _POSITIVE_FRACTION.get(stain, 0.0)
        )
        # Treatment lowers the share of positive cells less than the cell density.
        self.positive_fraction = (
            float(min(1.0, pf * (0.6 + 0.4 * min(act, 1.0)))) if self.setup.pattern == "membrane" else 0.0
        )
        self.act = act

    # --- geometry (µm in, µm out) ------------------------------------------------------------------------------
    def _curve(self, stream: int, scale_um: float, t_um: np.ndarray) -> np.ndarray:
        """1D fractal noise in [0, 1], tabulated every 0.5 µm on the global axis and linearly interpolated."""
        q = np.asarray(t_um, dtype=np.float64) / _CURVE_STEP_UM
        if q.size == 0:
            return np.zeros(q.shape)
        i = np.floor(q).astype(np.int64)
        f = q - i
        c0, c1 = int(i.min()) // _CURVE_CHUNK, (int(i.max()) + 1) // _CURVE_CHUNK
        parts = []
        for c in range(c0, c1 + 1):
            key = ("curve", stream, c)
            if key not in self._block_cache:
                t = (c * _CURVE_CHUNK + np.arange(_CURVE_CHUNK)) * _CURVE_STEP_UM
                self._block_cache[key] = _fbm_1d(self.seed, stream, t, scale_um)
            parts.append(self._block_cache[key])
        tab = parts[0] if len(parts) == 1 else np.concatenate(parts)
        j = i - c0 * _CURVE_CHUNK
        a = tab[j]
        return a + (tab[j + 1] - a) * f

    def surface_um(self, x_um: np.ndarray) -> np.ndarray:
        return self.top_um + self.wander_um * (self._curve(1, 500.0, x_um) - 0.5) * 1.6

    def dej_um(self, x_um: np.ndarray) -> np.ndarray:
        p = self.p
        phase = 2 * np.pi * x_um / p.rete_spacing_um + 5.0 * self._curve(2, 400.0, x_um)
        ridge = ((1.0 + np.cos(phase)) / 2.0) ** 2 * (0.55 + 0.45 * self._curve(3, 300.0, x_um))
        return self.surface_um(x_um) + p.epidermis_min_um + (p.epidermis_max_um - p.epidermis_min_um) * ridge

    def bottom_edge_um(self, x_um: np.ndarray) -> np.ndarray:
        return self.h_um - self.bottom_um + self.wander_um * (self._curve(4, 300.0, x_um) - 0.7) * 1.6

    def left_edge_um(self, y_um: np.ndarray) -> np.ndarray:
        return self.side_um + self.wander_um * (self._curve(5, 200.0, y_um) - 0.3) * 1.6

    def right_edge_um(self, y_um: np.ndarray) -> np.ndarray:
        return self.w_um - self.side_um + self.wander_um * (self._curve(6, 200.0, y_um) - 0.7) * 1.6

    def tissue_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        return (
            (y_um >= self.surface_um(x_um))
            & (y_um <= self.bottom_edge_um(x_um))
            & (x_um >= self.left_edge_um(y_um))
            & (x_um <= self.right_edge_um(y_um))
        )

    # --- objects per block ------------------------------------------------------------------------------------
    def _rng(self, stream: int, bx: int, by: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, bx + (1 << 20), by + (1 << 20)])

    def evict_blocks_above(self, by_min: int) -> None:
        """Forget cached objects of block rows above `by_min` (streaming renders move down the slide)."""
        for key in [k for k in self._block_cache if k[0] in ("v", "c", "f") and k[2] < by_min]:
            del self._block_cache[key]

    def _block_um(self, bx: int, by: int) -> tuple[float, float, float, float]:
        s = _BLOCK_PX * self.mpp
        return bx * s, by * s, s, s

    def vessels(self, bx: int, by: int) -> _Vessels:
        key = ("v", bx, by)
        if key in self._block_cache:
            return self._block_cache[key]
        x0, y0, sw, sh = self._block_um(bx, by)
        rng = self._rng(11, bx, by)
        n = rng.poisson(self.p.vessels_per_mm2 * sw * sh / 1e6)
        xu = x0 + rng.random(n) * sw
        yu = y0 + rng.random(n) * sh
        rx = rng.uniform(5.0, 13.0, n)
        ry = rx * rng.uniform(0.45, 0.9, n)
        th = rng.uniform(-0.5, 0.5, n)
        depth = yu - self.dej_um(xu)
        margin = rx + 12.0
        ok = (
            self.tissue_at(xu, yu)
            & (depth > 35.0 + margin)
            & (yu < self.bottom_edge_um(xu) - margin)
            & (xu > self.left_edge_um(yu) + margin)
            & (xu < self.right_edge_um(yu) - margin)
        )
        v = _Vessels(xu[ok] / self.mpp, yu[ok] / self.mpp, rx[ok], ry[ok], th[ok])
        self._block_cache[key] = v
        return v

    def vessels_near(self, bx: int, by: int) -> _Vessels:
        parts = [self.vessels(bx + i, by + j) for j in (-1, 0, 1) for i in (-1, 0, 1)]
        return _Vessels(
            *(np.concatenate([getattr(v, n) for v in parts]) for n in ("x", "y", "rx_um", "ry_um", "theta"))
        )

    def _lymph_density(self, xu: np.ndarray, yu: np.ndarray, vess: _Vessels) -> np.ndarray:
        """Lymphocytes per mm² at points (µm), activity included."""
        p = self.p
        act = self.act
        dej = self.dej_um(xu)
        depth = yu - dej
        lam = np.where(
            depth > 0,
            p.lymphocytes_deep_per_mm2
            + (p.lymphocytes_papillary_per_mm2 - p.lymphocytes_deep_per_mm2) * np.exp(-depth / 110.0),
            0.0,
        )
        basal = (depth <= 0) & (depth > -22.0)
        lam = np.where(basal, p.lymphocytes_interface_per_mm2, lam)
        if len(vess.x):
            dx = xu[:, None] - vess.x[None, :] * self.mpp
            dy = yu[:, None] - vess.y[None, :] * self.mpp
            r = np.hypot(dx, dy) - np.maximum(vess.rx_um, vess.ry_um)[None, :]
            cuff = np.exp(-0.5 * ((r - 14.0) / 11.0) ** 2) * (r > 2.0)
            lam = lam + np.where(depth > 0, p.perivascular_per_mm2 * cuff.sum(axis=1), 0.0)
        return act * lam * self.tissue_at(xu, yu)

    def _candidates(self, bx: int, by: int) -> _Cells:
        """Cells drawn in block (bx, by) before conflicts between neighbours are resolved."""
        key = ("c", bx, by)
        if key in self._block_cache:
            return self._block_cache[key]
        p = self.p
        x0, y0, sw, sh = self._block_um(bx, by)
        area_mm2 = sw * sh / 1e6
        parts: list[_Cells] = []
        vess = self.vessels_near(bx, by)
        bid = ((by + (1 << 20)) << 22) + (bx + (1 << 20))

        # Lymphocytes: thinned Poisson process.
        rng = self._rng(21, bx, by)
        lam_max = self.act * (
            p.lymphocytes_papillary_per_mm2 + p.lymphocytes_interface_per_mm2 + 2.2 * p.perivascular_per_mm2
        )
        n = rng.poisson(lam_max * area_mm2)
        xu = x0 + rng.random(n) * sw
        yu = y0 + rng.random(n) * sh
        u = rng.random(n)
        keep = u * lam_max < self._lymph_density(xu, yu, vess) if n else np.zeros(0, bool)
        xu, yu = xu[keep], yu[keep]
        n = len(xu)
        r_um = p.lymphocyte_diameter_um / 2 * rng.uniform(0.9, 1.1, n)
        ecc = rng.uniform(0.85, 1.0, n)
        th = rng.uniform(0, np.pi, n)
        pos = rng.random(n) < self.positive_fraction
        nuc = rng.uniform(0.75, 1.0, n)
        ring = rng.uniform(p.ring_min_od, p.ring_max_od, n)
        prio = 3.0 + rng.random(n)
        doublet = rng.random(n) < p.doublet_fraction
        pair = np.where(doublet, bid * 4096 + np.arange(n), -1)
        lym = _Cells(
            xu / self.mpp,
            yu / self.mpp,
            np.full(n, _LYM, np.int8),
            r_um,
            r_um * ecc,
            th,
            pos,
            nuc,
            ring,
            np.zeros(n, bool),
            prio,
            pair,
        )
        parts.append(lym)
        if doublet.any():
            d = lym.take(np.flatnonzero(doublet))
            ang = rng.uniform(0, np.pi, len(d))
            sep_um = (d.a_um + d.b_um) * rng.uniform(0.85, 0.95, len(d))  # touching, slightly overlapping
            r2 = p.lymphocyte_diameter_um / 2 * rng.uniform(0.9, 1.1, len(d))
            pos2 = rng.random(len(d)) < self.positive_fraction
            x2 = d.x + np.cos(ang) * sep_um / self.mpp
            y2 = d.y + np.sin(ang) * sep_um / self.mpp
            inside = self.tissue_at(x2 * self.mpp, y2 * self.mpp)
            partner = _Cells(
                x2,
                y2,
                d.cls,
                r2,
                r2 * rng.uniform(0.85, 1.0, len(d)),
                rng.uniform(0, np.pi, len(d)),
                pos2,
                rng.uniform(0.75, 1.0, len(d)),
                rng.uniform(p.ring_min_od, p.ring_max_od, len(d)),
                np.zeros(len(d), bool),
                d.prio,
                d.pair,
            )
            parts.append(partner.take(np.flatnonzero(inside)))

        # Fibroblasts: Poisson in the dermis, elongated along the collagen (roughly horizontal).
        rng = self._rng(22, bx, by)
        n = rng.poisson(p.fibroblasts_per_mm2 * area_mm2)
        xu = x0 + rng.random(n) * sw
        yu = y0 + rng.random(n) * sh
        ok = self.tissue_at(xu, yu) & (yu > self.dej_um(xu) + 8.0)
        m = int(ok.sum())
        parts.append(
            _Cells(
                xu[ok] / self.mpp,
                yu[ok] / self.mpp,
                np.full(m, _FIB, np.int8),
                rng.uniform(4.5, 6.5, n)[ok],
                rng.uniform(1.1, 1.6, n)[ok],
                rng.normal(0, 0.3, n)[ok],
                np.zeros(m, bool),
                rng.uniform(0.6, 0.8, n)[ok],
                np.zeros(m),
                np.zeros(m, bool),
                2.0 + rng.random(n)[ok],
                np.full(m, -1, np.int64),
            )
        )

        # Endothelial nuclei on vessel walls (stromal distractors, class "fibroblast").
        own = self.vessels(bx, by)
        rng = self._rng(23, bx, by)
        ex, ey, eth = [], [], []
        for vx, vy, rx, ry, vt in zip(own.x, own.y, own.rx_um, own.ry_um, own.theta, strict=True):
            k = int(rng.integers(2, 4))
            phi = rng.uniform(0, 2 * np.pi) + np.arange(k) * 2 * np.pi / k
            px = (rx + 2.0) * np.cos(phi)
            py = (ry + 2.0) * np.sin(phi)
            ex.append(vx + (px * np.cos(vt) - py * np.sin(vt)) / self.mpp)
            ey.append(vy + (px * np.sin(vt) + py * np.cos(vt)) / self.mpp)
            eth.append(phi + vt + np.pi / 2)
        if ex:
            exa, eya, etha = np.concatenate(ex), np.concatenate(ey), np.concatenate(eth)
            m = len(exa)
            parts.append(
                _Cells(
                    exa,
                    eya,
                    np.full(m, _FIB, np.int8),
                    rng.uniform(4.0, 5.0, m),
                    rng.uniform(1.0, 1.3, m),
                    etha,
                    np.zeros(m, bool),
                    rng.uniform(0.6, 0.8, m),
                    np.zeros(m),
                    np.zeros(m, bool),
                    np.full(m, 5.0),
                    np.full(m, -1, np.int64),
                )
            )

        # Keratinocytes: a jittered hexagonal lattice in the viable epidermis.
        a = p.keratinocyte_spacing_um
        hrow = a * math.sqrt(3) / 2
        j0, j1 = math.floor(y0 / hrow), math.ceil((y0 + sh) / hrow)
        rows = np.arange(j0, j1)
        i0, i1 = math.floor(x0 / a) - 1, math.ceil((x0 + sw) / a) + 1
        cols = np.arange(i0, i1)
        gx = cols[None, :] * a + (rows[:, None] % 2) * a / 2
        gy = np.broadcast_to(rows[:, None] * hrow, gx.shape)
        gx, gy = gx.ravel(), gy.ravel().astype(np.float64)
        inblock = (gx >= x0) & (gx < x0 + sw) & (gy >= y0) & (gy < y0 + sh)
        gx, gy = gx[inblock], gy[inblock]
        rng = self._rng(24, bx, by)
        n = len(gx)
        xu = gx + rng.uniform(-0.18, 0.18, n) * a
        yu = gy + rng.uniform(-0.18, 0.18, n) * a
        occupied = rng.random(n) < 0.93
        dej = self.dej_um(xu)
        surf = self.surface_um(xu)
        depth_frac = (yu - surf) / np.maximum(dej - surf, 1.0)
        ok = occupied & self.tissue_at(xu, yu) & (yu > surf + p.stratum_corneum_um + 4.0) & (yu < dej - 3.5)
        # Basal nuclei are taller than wide, spinous round-oval, granular flat.
        basal = (dej - yu) < 11.0
        a_um = np.where(
            basal,
            rng.uniform(3.8, 4.4, n),
            np.where(depth_frac < 0.35, rng.uniform(4.2, 4.8, n), rng.uniform(3.4, 4.0, n)),
        )
        b_um = np.where(
            basal,
            rng.uniform(2.6, 3.0, n),
            np.where(depth_frac < 0.35, rng.uniform(1.8, 2.4, n), rng.uniform(2.7, 3.2, n)),
        )
        th = np.where(basal, np.pi / 2 + rng.normal(0, 0.25, n), rng.normal(0, 0.35, n))
        mel = basal & (rng.random(n) < p.melanin)
        m = int(ok.sum())
        parts.append(
            _Cells(
                xu[ok] / self.mpp,
                yu[ok] / self.mpp,
                np.full(m, _KER, np.int8),
                a_um[ok],
                b_um[ok],
                th[ok],
                np.zeros(m, bool),
                rng.uniform(0.5, 0.7, n)[ok],
                np.zeros(m),
                mel[ok],
                1.0 + rng.random(n)[ok],
                np.full(m, -1, np.int64),
            )
        )
        cells = _Cells.concat(parts)
        # Nothing inside a vessel or its wall.
        if len(vess.x) and len(cells):
            dx = cells.x[:, None] - vess.x[None, :]
            dy = cells.y[:, None] - vess.y[None, :]
            rr = (np.maximum(vess.rx_um, vess.ry_um)[None, :] + 2.5 + cells.b_um[:, None]) / self.mpp
            in_vessel = ((dx * dx + dy * dy) < rr * rr) & (cells.prio[:, None] < 5.0)
            cells = cells.take(np.flatnonzero(~in_vessel.any(axis=1)))
        self._block_cache[key] = cells
        return cells

    def _extent_um(self, c: _Cells) -> np.ndarray:
        return np.where(c.cls == _LYM, c.a_um + self.p.ring_um, c.a_um)

    def cells_of_block(self, bx: int, by: int) -> _Cells:
        """Final cells drawn in block (bx, by): candidates that lose no conflict with a neighbour."""
        key = ("f", bx, by)
        if key in self._block_cache:
            return self._block_cache[key]
        own = self._candidates(bx, by)
        if not len(own):
            self._block_cache[key] = own
            return own
        nbrs = [self._candidates(bx + i, by + j) for j in (-1, 0, 1) for i in (-1, 0, 1)]
        near = _Cells.concat(nbrs)
        first_own = sum(len(c) for c in nbrs[:4])  # own block is the centre of the 3 x 3
        from scipy.spatial import cKDTree

        ext = self._extent_um(near)
        reach = (2 * ext.max() + 1.0) / self.mpp
        pairs = cKDTree(np.column_stack([near.x, near.y])).query_pairs(reach, output_type="ndarray")
        lost_near = np.zeros(len(near), bool)
        if len(pairs):
            i, j = pairs[:, 0], pairs[:, 1]
            # orient every pair so that i is the lower-priority one (the one that may lose)
            swap = near.prio[i] > near.prio[j]
            i, j = np.where(swap, j, i), np.where(swap, i, j)
            d_um = np.hypot(near.x[j] - near.x[i], near.y[j] - near.y[i]) * self.mpp
            elongated = (near.cls[i] == _FIB) | (near.cls[j] == _FIB)
            # elongated nuclei: short axes plus some slack along the long one
            need = np.where(elongated, 0.6 * (ext[i] + ext[j]) + 1.0, ext[i] + ext[j] + 0.8)
            conflict = (
                (d_um < need)
                & (near.prio[j] > near.prio[i])
                & ~((near.pair[i] >= 0) & (near.pair[i] == near.pair[j]))
                # lattice keratinocytes may touch each other: they only yield to other classes
                & ~((near.cls[i] == _KER) & (near.cls[j] == _KER))
            )
            lost_near[i[conflict]] = True
        lost = lost_near[first_own : first_own + len(own)]
        out = own.take(np.flatnonzero(~lost))
        self._block_cache[key] = out
        return out

    def cells_in(self, x0: float, y0: float, x1: float, y1: float) -> _Cells:
        """Final cells whose centre lies in the level-0 pixel rectangle [x0, x1) x [y0, y1)."""
        bx0, by0 = math.floor(x0 / _BLOCK_PX), math.floor(y0 / _BLOCK_PX)
        bx1, by1 = math.floor((x1 - 1e-9) / _BLOCK_PX), math.floor((y1 - 1e-9) / _BLOCK_PX)
        parts = [self.cells_of_block(bx, by) for by in range(by0, by1 + 1) for bx in range(bx0, bx1 + 1)]
        c = _Cells.concat(parts)
        sel = (c.x >= x0) & (c.x < x1) & (c.y >= y0) & (c.y < y1)
        return c.take(np.flatnonzero(sel))

    def vessels_in(self, x0: float, y0: float, x1: float, y1: float) -> _Vessels:
        bx0, by0 = math.floor(x0 / _BLOCK_PX), math.floor(y0 / _BLOCK_PX)
        bx1, by1 = math.floor((x1 - 1e-9) / _BLOCK_PX), math.floor((y1 - 1e-9) / _BLOCK_PX)
        parts = [self.vessels(bx, by) for by in range(by0, by1 + 1) for bx in range(bx0, bx1 + 1)]
        return _Vessels(
            *(np.concatenate([getattr(v, n) for v in parts]) for n in ("x", "y", "rx_um", "ry_um", "theta"))
        )

    # --- rendering ----------------------------------------------------------------------------------------------
    def fields(self, x0: int, y0: int, w: int, h: int) -> dict[str, np.ndarray]:
        """Concentration maps and masks of the pixel rectangle (before blur and noise), float64 / bool."""
        p, s, mpp = self.p, self.seed, self.mpp
        xs_px = np.arange(x0, x0 + w) + 0.5
        ys_px = np.arange(y0, y0 + h) + 0.5
        xu, yu = xs_px * mpp, ys_px * mpp
        X = xu[None, :]
        Y = yu[:, None]
        surf = self.surface_um(xu)[None, :]
        dej = self.dej_um(xu)[None, :]
        tissue = (
            (Y >= surf)
            & (Y <= self.bottom_edge_um(xu)[None, :])
            & (X >= self.left_edge_um(yu)[:, None])
            & (X <= self.right_edge_um(yu)[:, None])
        )
        epi = tissue & (Y < dej)
        derm = tissue & ~epi
        depth = Y - dej  # vertical depth below the DEJ, µm
        sc = epi & (Y < surf + p.stratum_corneum_um)

        # Counterstain background: collagen bundles (horizontally stretched noise), keratinocyte cytoplasm,
        # basket-weave stratum corneum.
        fib = _fbm_2d(s, 30, xu, yu, 45.0, 7.0, 3)
        fib2 = _fbm_2d(s, 31, xu, yu, 12.0, 30.0, 2)
        collagen = np.clip(1.6 * (0.65 * fib + 0.35 * fib2) - 0.35, 0.0, 1.0)
        counter = np.zeros((h, w), np.float32)
        # Thin wavy fibres inside the bundles: a sine across a slowly warped depth axis, broken up by noise.
        warp = 30.0 * _fbm_2d(s, 35, xu, yu, 70.0, 45.0, 2)
        fibres = (0.5 + 0.5 * np.sin((Y + warp) * np.float32(2 * np.pi / 4.0))) ** 2
        fibres *= _fbm_2d(s, 36, xu, yu, 18.0, 5.0, 2) > 0.45
        counter[derm] = (0.035 + 0.09 * collagen + 0.045 * fibres * (0.3 + 0.7 * collagen))[derm]
        cyto = 0.13 + 0.04 * _fbm_2d(s, 32, xu, yu, 6.0, 6.0, 2)
        counter[epi] = cyto[epi]
        weave = 0.5 + 0.5 * np.sin(2 * np.pi * (Y - surf) / 2.5 + 6.0 * _fbm_2d(s, 33, xu, yu, 30.0, 8.0, 1))
        counter[sc] = (0.09 + 0.07 * weave)[sc]

        target = np.zeros((h, w), np.float32)
        # Faint non-specific target everywhere in tissue, well below any sensible threshold.
        faint = p.background_target_od * _fbm_2d(s, 34, xu, yu, 20.0, 20.0, 2)
        target[tissue] = faint[tissue]

        act = self.act
        pat = self.setup.pattern
        halo_px = 130.0 / mpp  # >= the reach of a vessel's influence (CXCL10 proximity)
        vess = self.vessels_in(x0 - halo_px, y0 - halo_px, x0 + w + halo_px, y0 + h + halo_px)
        if pat == "diffuse":
            # CXCL10-like: cytoplasmic/extracellular patches, favoured around vessels, in the superficial dermis and
            # in the epidermis.
            g = _fbm_2d(s, 40, xu, yu, 45.0, 35.0, 3)
            bias = np.where(
                epi & ~sc, 0.12, np.where(derm, 0.18 * np.exp(-np.maximum(depth, 0) / 180.0), -1.0)
            )
            bias = bias + self._vessel_proximity(vess, xs_px, ys_px, 30.0) * 0.3
            cut = self._cxcl10_cut()
            patch = tissue & ~sc & (g + bias > cut)
            grain = _fbm_2d(s, 41, xu, yu, 3.0, 3.0, 2)
            val = p.min_positive_od + (p.max_positive_od - p.min_positive_od) * (
                0.25 * _fbm_2d(s, 42, xu, yu, 40.0, 40.0, 2) + 0.75 * grain
            )
            target[patch] = val[patch]
        elif pat == "mucin":
            # Interstitial mucin: between collagen bundles (low collagen), in patches of the reticular dermis.
            g = _fbm_2d(s, 50, xu, yu, 90.0, 60.0, 3)
            # patches cover about 2.5x the wanted area; within them only the wisps between bundles stain
            cut = _fbm_quantile(1.0 - float(np.clip(2.5 * act * p.mucin_cover, 1e-3, 0.95)), 3)
            sparse_top = np.clip((depth - 20.0) / 60.0, 0.0, 1.0)  # little mucin right under the DEJ
            wisps = _fbm_2d(s, 51, xu, yu, 25.0, 5.0, 2)
            deposit = derm & (g + 0.08 * (1.0 - sparse_top) > cut) & (collagen < 0.45) & (wisps > 0.42)
            val = p.min_positive_od + (p.max_positive_od - p.min_positive_od) * _fbm_2d(
                s, 52, xu, yu, 8.0, 3.0, 2
            )
            target[deposit] = val[deposit]
            counter[deposit] *= 0.5  # mucin sits where collagen is sparse

        # Vessels: pale lumen inside a thin hematoxylin-rich wall.
        for vx, vy, rx, ry, vt in zip(vess.x, vess.y, vess.rx_um, vess.ry_um, vess.theta, strict=True):
            r = (max(rx, ry) + 4.0) / mpp
            cx0, cx1 = max(0, int(vx - r) - x0), min(w, int(vx + r) + 2 - x0)
            cy0, cy1 = max(0, int(vy - r) - y0), min(h, int(vy + r) + 2 - y0)
            if cx0 >= cx1 or cy0 >= cy1:
                continue
            dx = (xs_px[cx0:cx1][None, :] - vx) * mpp
            dy = (ys_px[cy0:cy1][:, None] - vy) * mpp
            u = dx * math.cos(vt) + dy * math.sin(vt)
            v = -dx * math.sin(vt) + dy * math.cos(vt)
            lumen = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
            wall = ((u / (rx + 2.5)) ** 2 + (v / (ry + 2.5)) ** 2 <= 1.0) & ~lumen
            sub = counter[cy0:cy1, cx0:cx1]
            sub[wall] = 0.24
            sub[lumen] = 0.015
            target[cy0:cy1, cx0:cx1][lumen] = 0.0

        # Cells.
        pigment = np.zeros((h, w), np.float32)
        chrom = _fbm_2d(s, 60, xu, yu, 1.6, 1.6, 2)
        ext = 16.0 / mpp
        cells = self.cells_in(x0 - ext, y0 - ext, x0 + w + ext, y0 + h + ext)
        if pat == "diffuse" and len(cells):
            # A cell expresses CXCL10 or not: its whole cell (pixels within cytoplasm_um of its nucleus and nearer
            # its centre than any other cell's, as a cell detector's expansion partitions them) takes the patch
            # value when its centre lies in a patch and the faint background otherwise.
            inside = self._in_cxcl10_patch(cells, vess)
            owner = np.full((h, w), -1, np.int64)
            best = np.full((h, w), np.inf)
            for i in range(len(cells)):
                win = self._cell_window(cells, i, p.cytoplasm_um, x0, y0, w, h, xs_px, ys_px)
                if win is None:
                    continue
                sl, region = win
                d2 = (xs_px[sl[1]][None, :] - cells.x[i]) ** 2 + (ys_px[sl[0]][:, None] - cells.y[i]) ** 2
                closer = region & (d2 < best[sl])
                best[sl][closer] = d2[closer]
                owner[sl][closer] = i
            owned = (owner >= 0) & tissue & ~sc
            expressing = np.zeros((h, w), bool)
            expressing[owned] = inside[owner[owned]]
            target[owned] = np.where(expressing, val, faint)[owned]
        ring_um = p.ring_um
        membrane = pat == "membrane"
        for i in range(len(cells)):
            cx, cy, a, b, th = cells.x[i], cells.y[i], cells.a_um[i], cells.b_um[i], cells.theta[i]
            is_lym = cells.cls[i] == _LYM
            reach = (a + (ring_um if is_lym else 0.0) + (4.0 if cells.melanin[i] else 1.0)) / mpp
            cx0, cx1 = max(0, int(cx - reach) - x0), min(w, int(cx + reach) + 2 - x0)
            cy0, cy1 = max(0, int(cy - reach) - y0), min(h, int(cy + reach) + 2 - y0)
            if cx0 >= cx1 or cy0 >= cy1:
                continue
            dx = (xs_px[cx0:cx1][None, :] - cx) * mpp
            dy = (ys_px[cy0:cy1][:, None] - cy) * mpp
            ct, st = math.cos(th), math.sin(th)
            u = dx * ct + dy * st
            v = -dx * st + dy * ct
            nucleus = (u / a) ** 2 + (v / b) ** 2 <= 1.0
            sub = counter[cy0:cy1, cx0:cx1]
            val = cells.nuc_od[i] * (0.8 + 0.4 * chrom[cy0:cy1, cx0:cx1])
            np.maximum(sub, np.where(nucleus, val, 0.0), out=sub)
            if is_lym:
                shell = ((u / (a + ring_um)) ** 2 + (v / (b + ring_um)) ** 2 <= 1.0) & ~nucleus
                if membrane and cells.positive[i]:
                    tsub = target[cy0:cy1, cx0:cx1]
                    np.maximum(tsub, np.where(shell, cells.ring_od[i], 0.0), out=tsub)
                else:
                    # a thin rim of pale cytoplasm
                    np.maximum(sub, np.where(shell, 0.18, 0.0), out=sub)
            if cells.melanin[i]:
                # Supranuclear melanin cap: granules above the nucleus (towards the surface).
                rng = np.random.default_rng([self.seed, 70, int(cx * 16), int(cy * 16)])
                k = int(rng.integers(4, 9))
                gx = cx + (rng.uniform(-1.0, 1.0, k) * a) / mpp
                gy = cy - (b + rng.uniform(0.3, 1.8, k)) / mpp
                gr = rng.uniform(0.5, 0.9, k)
                god = rng.uniform(0.7, 1.1, k)
                for j in range(k):
                    d2 = (
                        ((xs_px[cx0:cx1][None, :] - gx[j]) ** 2 + (ys_px[cy0:cy1][:, None] - gy[j]) ** 2)
                        * mpp
                        * mpp
                    )
                    psub = pigment[cy0:cy1, cx0:cx1]
                    np.maximum(psub, np.where(d2 <= gr[j] ** 2, god[j], 0.0), out=psub)
        counter[~tissue] = 0.0
        target[~tissue] = 0.0
        pigment[~tissue] = 0.0
        return {"counter": counter, "target": target, "pigment": pigment, "tissue": tissue, "epidermis": epi}

    def _cxcl10_cut(self) -> float:
        # cut at the noise's quantile for the wanted cover, raised by the mean bias so the cover stays near it
        return _fbm_quantile(1.0 - float(np.clip(self.act * self.p.cxcl10_cover, 1e-3, 0.9)), 3) + 0.12

    def _in_cxcl10_patch(self, cells: _Cells, vess: _Vessels) -> np.ndarray:
        """Whether each cell centre lies in a CXCL10 patch (the patch rule evaluated at the centre point)."""
        xu, yu = cells.x * self.mpp, cells.y * self.mpp
        g = _fbm_points(self.seed, 40, xu, yu, 45.0, 35.0, 3)
        surf, dej = self.surface_um(xu), self.dej_um(xu)
        epi = yu < dej
        sc = yu < surf + self.p.stratum_corneum_um
        bias = np.where(epi, 0.12, 0.18 * np.exp(-np.maximum(yu - dej, 0) / 180.0))
        if len(vess.x) and len(cells):
            d = np.hypot(cells.x[:, None] - vess.x[None, :], cells.y[:, None] - vess.y[None, :]) * self.mpp
            r = np.maximum(vess.rx_um, vess.ry_um)[None, :]
            bias = bias + 0.3 * np.exp(-np.maximum(d - r, 0) / 30.0).max(axis=1)
        return ~sc & (g + bias > self._cxcl10_cut())

    def _cell_window(
        self,
        cells: _Cells,
        i: int,
        grow_um: float,
        x0: int,
        y0: int,
        w: int,
        h: int,
        xs_px: np.ndarray,
        ys_px: np.ndarray,
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Slices of the rectangle around cell `i` and the mask of its nucleus grown by `grow_um` there."""
        mpp = self.mpp
        cx, cy = cells.x[i], cells.y[i]
        a, b = cells.a_um[i] + grow_um, cells.b_um[i] + grow_um
        reach = (a + 1.0) / mpp
        cx0, cx1 = max(0, int(cx - reach) - x0), min(w, int(cx + reach) + 2 - x0)
        cy0, cy1 = max(0, int(cy - reach) - y0), min(h, int(cy + reach) + 2 - y0)
        if cx0 >= cx1 or cy0 >= cy1:
            return None
        dx = (xs_px[cx0:cx1][None, :] - cx) * mpp
        dy = (ys_px[cy0:cy1][:, None] - cy) * mpp
        ct, st = math.cos(cells.theta[i]), math.sin(cells.theta[i])
        region = ((dx * ct + dy * st) / a) ** 2 + ((-dx * st + dy * ct) / b) ** 2 <= 1.0
        return (slice(cy0, cy1), slice(cx0, cx1)), region

    def _vessel_proximity(
        self, vess: _Vessels, xs_px: np.ndarray, ys_px: np.ndarray, scale_um: float
    ) -> np.ndarray:
        out = np.zeros((len(ys_px), len(xs_px)))
        for vx, vy, rx, ry in zip(vess.x, vess.y, vess.rx_um, vess.ry_um, strict=True):
            r = (max(rx, ry) + 3 * scale_um) / self.mpp
            c0 = np.searchsorted(xs_px, vx - r)
            c1 = np.searchsorted(xs_px, vx + r)
            r0 = np.searchsorted(ys_px, vy - r)
            r1 = np.searchsorted(ys_px, vy + r)
            if c0 >= c1 or r0 >= r1:
                continue
            d = np.hypot(xs_px[c0:c1][None, :] - vx, ys_px[r0:r1][:, None] - vy) * self.mpp - max(rx, ry)
            np.maximum(out[r0:r1, c0:c1], np.exp(-np.maximum(d, 0) / scale_um), out=out[r0:r1, c0:c1])
        return out

    def halo_px(self) -> int:
        return int(4.0 * self.p.blur_sigma_px + 0.5) + 1

    def render_rect(self, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """RGB (uint8, no JPEG) and the exact fields of a pixel rectangle; equal to the same crop of a full render."""
        halo = self.halo_px()
        f = self.fields(x0 - halo, y0 - halo, w + 2 * halo, h + 2 * halo)
        od = np.multiply.outer(f["counter"], self.v_counter.astype(np.float32))
        od += np.multiply.outer(f["target"], self.v_target.astype(np.float32))
        if f["pigment"].any():
            od += np.multiply.outer(f["pigment"], self.v_melanin.astype(np.float32))
        od *= np.float32(-math.log(10.0))
        img = np.exp(od, out=od)
        img *= np.asarray(self.p.background_rgb, dtype=np.float32)
        if self.p.blur_sigma_px > 0:
            for c in range(3):
                img[..., c] = ndimage.gaussian_filter(img[..., c], self.p.blur_sigma_px, truncate=4.0)
        img = img[halo : halo + h, halo : halo + w]
        if self.p.noise_sigma > 0:
            img = img + (self.p.noise_sigma * self._sensor_noise(x0, y0, w, h)).astype(np.float32)
        rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        crop = {k: v[halo : halo + h, halo : halo + w] for k, v in f.items()}
        return rgb, crop

    def _sensor_noise(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Standard normal noise (H, W, 3) drawn per fixed block of the global grid."""
        out = np.empty((h, w, 3))
        b = _NOISE_BLOCK_PX
        for by in range(y0 // b, (y0 + h - 1) // b + 1):
            for bx in range(x0 // b, (x0 + w - 1) // b + 1):
                block = self._rng(90, bx, by).standard_normal((b, b, 3))
                gx0, gy0 = max(x0, bx * b), max(y0, by * b)
                gx1, gy1 = min(x0 + w, (bx + 1) * b), min(y0 + h, (by + 1) * b)
                out[gy0 - y0 : gy1 - y0, gx0 - x0 : gx1 - x0] = block[
                    gy0 - by * b : gy1 - by * b, gx0 - bx * b : gx1 - bx * b
                ]
        return out


def _check_args(stain: str, width_px: int, height_px: int, mpp_um: float, jpeg_quality: int | None) -> None:
    if stain not in _SETUP:
        raise CleihcError(f"unknown synthetic stain {stain!r}; use one of: {', '.join(STAINS)}")
    if (
        not (isinstance(width_px, int | np.integer) and isinstance(height_px, int | np.integer))
        or width_px < 64
        or height_px < 64
    ):
        raise CleihcError(f"synthetic slide size must be integers >= 64 px, got {width_px!r} x {height_px!r}")
    if not (0.1 <= float(mpp_um) <= 4.0):
        raise CleihcError(f"synthetic mpp_um must be within 0.1..4 µm per pixel, got {mpp_um!r}")
    if jpeg_quality is not None and not (1 <= int(jpeg_quality) <= 100):
        raise CleihcError(f"jpeg_quality must be within 1..100 or None, got {jpeg_quality!r}")


def _jpeg_tiles(rgb: np.ndarray, *, quality: int, tile_px: int = 256) -> np.ndarray:
    """Round-trip through JPEG tile by tile as a tiled TIFF writer does (YCbCr 4:2:0, zero-padded edge tiles)."""
    import imagecodecs

    h, w = rgb.shape[:2]
    out = np.empty_like(rgb)
    for ty in range(0, h, tile_px):
        for tx in range(0, w, tile_px):
            tile = np.zeros((tile_px, tile_px, 3), np.uint8)
            part = rgb[ty : ty + tile_px, tx : tx + tile_px]
            tile[: part.shape[0], : part.shape[1]] = part
            enc = imagecodecs.jpeg8_encode(
                tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
            )
            dec = imagecodecs.jpeg8_decode(enc)
            out[ty : ty + tile_px, tx : tx + tile_px] = dec[: part.shape[0], : part.shape[1]]
    return out


def _region_masks(scene: _Scene, tissue: np.ndarray, epi: np.ndarray) -> dict[str, np.ndarray]:
    p = scene.p
    derm = tissue & ~epi
    if epi.any():
        dist_um = ndimage.distance_transform_edt(~epi, sampling=scene.mpp)
    else:
        dist_um = np.full(epi.shape, np.inf)
    return {
        "epidermis": epi.copy(),
        "dermis": derm,
        "papillary_dermis": derm & (dist_um <= p.papillary_um),
        "superficial_dermis": derm & (dist_um > p.papillary_um) & (dist_um <= p.superficial_um),
        "deep_dermis": derm & (dist_um > p.superficial_um),
    }


def _region_feature(name: str, mask: np.ndarray) -> dict[str, Any] | None:
    """QuPath-style GeoJSON annotation of a mask's exact pixel-edge outline (level-0 px), or None when empty."""
    from shapely.geometry import mapping

    from cleihc.geometry import mask_to_polygons, to_feature

    if not mask.any():
        return None
    geom = mask_to_polygons(mask)
    feature = to_feature(geom, name=name, classification=name)
    # integer pixel-edge vertices: store them as ints (compact, exact)
    feature["geometry"] = _int_coords(mapping(geom))
    return feature


def _int_coords(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _int_coords(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        if len(obj) == 2 and all(isinstance(v, float) for v in obj):
            return [int(v) if float(v).is_integer() else v for v in obj]
        return [_int_coords(v) for v in obj]
    return obj


def render_skin(
    *,
    stain: str,
    width_px: int,
    height_px: int,
    mpp_um: float = 0.5,
    seed: int = 0,
    jpeg_quality: int | None = 90,
    params: SkinParams | None = None,
    regions_geojson: bool = True,
) -> SyntheticSlide:
    """Render a synthetic skin section with exact ground truth.

    Parameters
    ----------
    stain : str
        Protocol name: ``"cd3"``, ``"cd4"``, ``"cd8"`` (membranous DAB on lymphocytes, hematoxylin),
        ``"cxcl10"`` (diffuse DAB patches, hematoxylin), ``"gag-alcian"`` (Alcian blue mucin, nuclear fast red) or
        ``"gag-colloidal-iron"`` (colloidal iron mucin, nuclear fast red).
    width_px, height_px : int
        Image size in level-0 pixels (at least 64).
    mpp_um : float
        Microns per pixel.
    seed : int
        Seed; the same arguments give bit-identical output.
    jpeg_quality : int or None
        JPEG quality of the 256-pixel tile round trip a scanner applies; None skips it (use None when the image is
        written with :func:`write_svs`, which compresses it once).
    params : SkinParams, optional
        Tissue content, activity, threshold, optics; defaults to ``SkinParams()``.
    regions_geojson : bool
        Compute the region polygons for ``truth["regions"]`` (the slowest part of the truth; off gives an empty
        FeatureCollection).

    Returns
    -------
    SyntheticSlide
        ``truth`` holds: ``generator`` (name, version), ``parameters`` (all of SkinParams, the stain, size),
        ``seed``, ``mpp_um``, ``width_px``, ``height_px``, ``stain``, ``stains`` (preset, counterstain, target,
        StainMatrix record, melanin vector), ``threshold_od`` and the rendered target-OD gap, ``pixel_convention``,
        ``region_definitions``, ``cells`` (x_px, y_px, class, positive, region, target_mean_od; every nucleus
        centred in tissue; ``cell_positive_definition`` says what positive means for the stain), ``regions`` (a
        QuPath-style GeoJSON FeatureCollection in level-0 px with exact pixel-edge outlines), ``area_truth`` per
        region (region_area_mm2, positive_area_fraction, positive_area_percent, cell counts, positive cells per
        mm²) and ``pigment`` (melanin, never part of ``target_conc``). See ``sample_images/README.md``.

    Examples
    --------
    >>> slide = render_skin(stain="cd3", width_px=512, height_px=768, seed=1)
    >>> slide.rgb.shape, slide.truth["threshold_od"]
    ((768, 512, 3), 0.2)

    Raises
    ------
    CleihcError
        Unknown stain, size below 64 px, mpp outside 0.1..4 or a JPEG quality outside 1..100.
    """
    _check_args(stain, width_px, height_px, mpp_um, jpeg_quality)
    params = params or SkinParams()
    scene = _Scene(
        stain=stain, width_px=int(width_px), height_px=int(height_px), mpp_um=mpp_um, seed=seed, params=params
    )
    rgb, f = scene.render_rect(0, 0, int(width_px), int(height_px))
    if jpeg_quality is not None:
        rgb = _jpeg_tiles(rgb, quality=int(jpeg_quality))
    tissue = f["tissue"].copy()
    regions = _region_masks(scene, tissue, f["epidermis"])
    target = f["target"].astype(np.float32)
    pigment = f["pigment"] > 0
    truth = _truth(
        scene, tissue, regions, target, pigment, jpeg_quality=jpeg_quality, with_polygons=regions_geojson
    )
    for a in (rgb, tissue, target, pigment, *regions.values()):
        a.setflags(write=False)
    return SyntheticSlide(
        rgb=rgb,
        mpp_um=float(mpp_um),
        truth=truth,
        tissue_mask=tissue,
        region_masks=regions,
        target_conc=target,
        pigment_mask=pigment,
    )


def _cell_mean_target(cells: _Cells, target: np.ndarray, mpp: float, ring_um: float) -> np.ndarray:
    """Mean rendered target OD over each cell: its nucleus expanded by `ring_um` (pixel centres inside)."""
    h, w = target.shape
    out = np.zeros(len(cells))
    for i in range(len(cells)):
        cx, cy = cells.x[i], cells.y[i]
        a, b = cells.a_um[i] + ring_um, cells.b_um[i] + ring_um
        reach = (a + 1.0) / mpp
        c0, c1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 2)
        r0, r1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 2)
        if c0 >= c1 or r0 >= r1:
            continue
        dx = (np.arange(c0, c1) + 0.5 - cx)[None, :] * mpp
        dy = (np.arange(r0, r1) + 0.5 - cy)[:, None] * mpp
        ct, st = math.cos(cells.theta[i]), math.sin(cells.theta[i])
        inside = ((dx * ct + dy * st) / a) ** 2 + ((-dx * st + dy * ct) / b) ** 2 <= 1.0
        if inside.any():
            out[i] = float(target[r0:r1, c0:c1][inside].mean())
    return out


def _truth(
    scene: _Scene,
    tissue: np.ndarray,
    regions: dict[str, np.ndarray],
    target: np.ndarray,
    pigment: np.ndarray,
    *,
    jpeg_quality: int | None,
    with_polygons: bool,
) -> dict[str, Any]:
    p = scene.p
    h, w = tissue.shape
    mpp = scene.mpp
    cells = scene.cells_in(0, 0, w, h)
    r = np.clip(np.floor(cells.y).astype(np.int64), 0, h - 1)
    c = np.clip(np.floor(cells.x).astype(np.int64), 0, w - 1)
    in_tissue = tissue[r, c]
    cells = cells.take(np.flatnonzero(in_tissue))
    r, c = r[in_tissue], c[in_tissue]
    leaf = np.full(len(cells), "", dtype=object)
    for name in _LEAF_REGIONS:
        leaf[regions[name][r, c]] = name
    order = np.lexsort((cells.x, cells.y))
    mean_od = _cell_mean_target(
        cells, target, mpp, p.cytoplasm_um if scene.setup.pattern == "diffuse" else p.ring_um
    )
    if scene.setup.pattern == "membrane":
        positive = cells.positive
    elif scene.setup.pattern == "diffuse":
        halo = 200.0 / mpp
        positive = scene._in_cxcl10_patch(cells, scene.vessels_in(-halo, -halo, w + halo, h + halo))
    else:
        positive = np.zeros(len(cells), bool)
    cell_list = [
        {
            "x_px": round(float(cells.x[i]), 2),
            "y_px": round(float(cells.y[i]), 2),
            "class": _CLASSES[int(cells.cls[i])],
            "positive": bool(positive[i]),
            "region": str(leaf[i]),
            "target_mean_od": round(float(mean_od[i]), 3),
        }
        for i in order
    ]
    px_mm2 = mpp * mpp / 1e6
    positive_px = target >= p.threshold_od
    all_masks = {"tissue": tissue, **regions}
    members = {
        "tissue": set(_LEAF_REGIONS),
        "epidermis": {"epidermis"},
        "dermis": {"papillary_dermis", "superficial_dermis", "deep_dermis"},
        "papillary_dermis": {"papillary_dermis"},
        "superficial_dermis": {"superficial_dermis"},
        "deep_dermis": {"deep_dermis"},
    }
    area_truth: dict[str, Any] = {}
    for name in _REGION_ORDER:
        m = all_masks[name]
        n_px = int(m.sum())
        n_pos_px = int((m & positive_px).sum())
        in_r = [cl for cl in cell_list if cl["region"] in members[name]]
        n_pos = sum(cl["positive"] for cl in in_r)
        area = n_px * px_mm2
        by_class = {k: sum(cl["class"] == k for cl in in_r) for k in _CLASSES}
        area_truth[name] = {
            "region_area_mm2": area,
            "region_area_px": n_px,
            "positive_area_px": n_pos_px,
            "positive_area_fraction": n_pos_px / n_px if n_px else None,
            "positive_area_percent": 100.0 * n_pos_px / n_px if n_px else None,
            "n_positive_cells": n_pos,
            "n_negative_cells": len(in_r) - n_pos,
            "n_cells_by_class": by_class,
            "n_positive_lymphocytes": sum(cl["positive"] and cl["class"] == "lymphocyte" for cl in in_r),
            "positive_cells_per_mm2": n_pos / area if area > 0 else None,
            "pigment_area_px": int((m & pigment).sum()),
        }
    features = []
    if with_polygons:
        for name in _REGION_ORDER:
            feature = _region_feature(name, all_masks[name])
            if feature is not None:
                features.append(feature)
    below = float(target[~positive_px].max()) if (~positive_px).any() else 0.0
    above = float(target[positive_px].min()) if positive_px.any() else None
    truth = {
        "generator": {"name": "cleihc.synthetic", "version": GENERATOR_VERSION},
        "stain": scene.stain,
        "seed": scene.seed,
        "mpp_um": mpp,
        "width_px": w,
        "height_px": h,
        "jpeg_quality": jpeg_quality,
        "parameters": asdict(p),
        "stains": {
            "preset": scene.setup.preset,
            "counterstain": scene.setup.counterstain,
            "target": scene.setup.target,
            "pattern": scene.setup.pattern,
            "matrix": scene.stains.to_dict(),
            "counterstain_od_vector": scene.v_counter.tolist(),
            "target_od_vector": scene.v_target.tolist(),
            "background_rgb": list(p.background_rgb),
        },
        "threshold_od": p.threshold_od,
        "target_od_gap": {"max_below_threshold": below, "min_at_or_above_threshold": above},
        "pixel_convention": "pixel (row r, col c) covers [c, c+1) x [r, r+1) in level-0 px; its centre is (c+0.5, r+0.5)",
        "region_definitions": {
            "tissue": "exact rendered tissue (glass elsewhere)",
            "epidermis": "tissue above the dermo-epidermal junction (stratum corneum included)",
            "dermis": "tissue below the dermo-epidermal junction",
            "papillary_dermis": f"dermis within {p.papillary_um} µm (Euclidean, from the nearest epidermis pixel centre)",
            "superficial_dermis": f"dermis more than {p.papillary_um} and at most {p.superficial_um} µm below the epidermis",
            "deep_dermis": f"dermis more than {p.superficial_um} µm below the epidermis",
            "papillary_um": p.papillary_um,
            "superficial_um": p.superficial_um,
        },
        "positive_area_definition": "fraction of region pixels whose rendered target concentration (OD units, before blur, noise and JPEG) >= threshold_od",
        "cell_marker": scene.setup.pattern == "membrane",
        "cell_positive_definition": {
            "membrane": "lymphocytes drawn positive carry a DAB ring (membrane/cytoplasm) of ring_um around the nucleus",
            "diffuse": "the cell centre lies in a CXCL10 patch: its whole cell (pixels within cytoplasm_um of the nucleus and nearest its centre) is stained; target_mean_od is over the nucleus expanded by cytoplasm_um",
            "mucin": "no cell marker: every cell is negative",
        }[scene.setup.pattern],
        "cells": [],
        "regions": {"type": "FeatureCollection", "features": []},
        "area_truth": area_truth,
        "pigment": {
            "present": bool(pigment.any()),
            "name": "melanin",
            "od_vector": scene.v_melanin.tolist(),
            "area_px": int(pigment.sum()),
            "area_mm2": float(pigment.sum() * px_mm2),
            "note": "melanin is rendered with its own OD vector and is never part of target_conc",
        },
    }
    truth = jsonable(truth)
    # already plain Python: skip the recursive conversion of the two big members
    truth["cells"] = cell_list
    truth["regions"]["features"] = features
    return truth


# ---------------------------------------------------------------------------------------------------------------
# Files: truth JSON, streaming big slides, the committed sample set
# ---------------------------------------------------------------------------------------------------------------
def truth_path_for(slide_path: str | os.PathLike[str]) -> Path:
    """``<stem>.truth.json`` beside a slide; the stem drops ``.ome.tif``/``.ome.tiff`` whole.

    Examples
    --------
    >>> truth_path_for("x/S02_pre_cxcl10.ome.tif").name
    'S02_pre_cxcl10.truth.json'
    """
    p = Path(slide_path)
    name = p.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return p.with_name(name[: -len(suffix)] + ".truth.json")
    return p.with_name(p.stem + ".truth.json")


def write_truth(path: str | os.PathLike[str], truth: Mapping[str, Any]) -> Path:
    """Write a truth dict as compact JSON (atomically)."""
    path = Path(path)
    with atomic_write(path, mode="w") as f:
        json.dump(truth, f, separators=(",", ":"), ensure_ascii=False)
        f.write("\n")
    return path


def write_large_synthetic_svs(
    path: str | os.PathLike[str],
    *,
    width_px: int,
    height_px: int,
    stain: str,
    mpp_um: float = 0.5,
    seed: int = 0,
    tile_px: int = 256,
    jpeg_quality: int = 90,
    params: SkinParams | None = None,
    chunk_px: int = 2048,
    workers: int = 1,
) -> Path:
    """Render a synthetic slide tile by tile straight into an Aperio-style SVS (for big benchmark slides).

    Level 0 is rendered in strips of `tile_px` rows and chunks of `chunk_px` columns and never held whole: peak
    memory is a strip plus level 1 (1/16 of level 0) plus per-block object caches that are dropped as the strip
    moves down. Every level equals :func:`write_svs` of ``render_skin(..., jpeg_quality=None).rgb`` with the
    same arguments (rendering is a function of global coordinates); the SVS thumbnail is stored uncompressed.
    No ground truth is written: computing it needs whole-slide masks (use :func:`render_skin` for truth).

    Parameters
    ----------
    path : path
        Output ``.svs`` (written atomically; BigTIFF when level 0 exceeds 2 GiB raw).
    width_px, height_px : int
        Level-0 size, e.g. 40,000 x 30,000.
    stain : str
        As in :func:`render_skin`.
    mpp_um, seed, params
        As in :func:`render_skin`.
    tile_px : int
        TIFF tile edge (multiple of 16).
    jpeg_quality : int
        JPEG quality of the tiles.
    chunk_px : int
        Columns rendered at once (rounded down to a multiple of `tile_px`).
    workers : int
        Processes rendering strips ahead of the writer (the output does not depend on it).

    Returns
    -------
    Path
        `path`.
    """
    _check_args(stain, width_px, height_px, mpp_um, jpeg_quality)
    params = params or SkinParams()
    w, h = int(width_px), int(height_px)
    tile = int(tile_px)
    chunk = max(tile, int(chunk_px) // tile * tile)
    key = (stain, w, h, float(mpp_um), int(seed), params, chunk)
    rows = [(ty, min(tile, h - ty)) for ty in range(0, h, tile)]

    def strips() -> Iterator[tuple[int, np.ndarray]]:
        if workers <= 1:
            for ty, th in rows:
                yield ty, _render_strip(key, ty, th)
            return
        import concurrent.futures
        import multiprocessing

        # Strips are rendered ahead by worker processes (each keeps its own scene and caches) and written in
        # order; at most 2 x workers strips wait in memory.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            it = iter(rows)
            pending = [
                (ty, pool.submit(_render_strip, key, ty, th)) for ty, th in itertools.islice(it, 2 * workers)
            ]
            while pending:
                ty, fut = pending.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt[0], pool.submit(_render_strip, key, *nxt)))
                yield ty, fut.result()

    def tiles(sink: Any) -> Iterator[np.ndarray]:
        for ty, strip in strips():
            sink(strip, ty)
            for tx in range(0, w, tile):
                yield strip[:, tx : tx + tile]
            logger.debug("rendered rows %d..%d of %d", ty, ty + strip.shape[0], h)

    try:
        return write_svs_tiles(
            path,
            width_px=w,
            height_px=h,
            level0_tiles=tiles,
            mpp_um=mpp_um,
            tile_px=tile,
            jpeg_quality=jpeg_quality,
        )
    finally:
        _STRIP_SCENES.clear()


_STRIP_SCENES: dict[tuple, _Scene] = {}


def _render_strip(key: tuple, ty: int, th: int) -> np.ndarray:
    """Level-0 rows [ty, ty + th) of the slide `key`, rendered in column chunks (also run in worker processes)."""
    stain, w, h, mpp_um, seed, params, chunk = key
    scene = _STRIP_SCENES.get(key)
    if scene is None:
        _STRIP_SCENES.clear()  # one slide at a time per process
        scene = _STRIP_SCENES[key] = _Scene(
            stain=stain, width_px=w, height_px=h, mpp_um=mpp_um, seed=seed, params=params
        )
    strip = np.empty((th, w, 3), np.uint8)
    for cx in range(0, w, chunk):
        cw = min(chunk, w - cx)
        strip[:, cx : cx + cw], _ = scene.render_rect(cx, ty, cw, th)
    # strips come in increasing order: objects of block rows well above are not needed again
    scene.evict_blocks_above(math.floor((ty - 160.0 / scene.mpp) / _BLOCK_PX) - 1)
    return strip


@dataclass(frozen=True)
class SampleSpec:
    """One slide of the sample set.

    Attributes
    ----------
    file_name : str
        ``<subject>_<timepoint>_<stain>.svs`` or ``.ome.tif``.
    subject, timepoint, stain : str
        Study labels and protocol name.
    seed : int
        Render seed.
    params : SkinParams
        Content (activity lower after treatment).
    """

    file_name: str
    subject: str
    timepoint: str
    stain: str
    seed: int
    params: SkinParams


def sample_specs() -> list[SampleSpec]:
    """The committed sample set: two subjects, before and after treatment, all six protocols."""
    base = {"S01": SkinParams(), "S02": SkinParams(melanin=0.25, lymphocyte_diameter_um=6.8)}
    activity = {"pre": 1.0, "post": 0.4}
    rows = [
        ("S01", "pre", "cd3", ".svs"),
        ("S01", "post", "cd3", ".svs"),
        ("S02", "pre", "cd3", ".svs"),
        ("S02", "post", "cd3", ".svs"),
        ("S01", "pre", "cd8", ".svs"),
        ("S01", "pre", "cxcl10", ".svs"),
        ("S01", "post", "cxcl10", ".svs"),
        ("S02", "pre", "cxcl10", ".ome.tif"),
        ("S01", "pre", "gag-alcian", ".svs"),
        ("S01", "pre", "gag-colloidal-iron", ".svs"),
    ]
    specs = []
    for i, (subject, tp, stain, ext) in enumerate(rows):
        specs.append(
            SampleSpec(
                file_name=f"{subject}_{tp}_{stain}{ext}",
                subject=subject,
                timepoint=tp,
                stain=stain,
                seed=1000 + 17 * i,
                params=replace(base[subject], activity=activity[tp]),
            )
        )
    return specs


def make_sample_set(
    out_dir: str | os.PathLike[str],
    *,
    width_px: int = 1400,
    height_px: int = 1700,
    mpp_um: float = 0.5,
    jpeg_quality: int = 90,
    specs: list[SampleSpec] | None = None,
) -> list[Path]:
    """Write the sample slides and their ``<stem>.truth.json`` files.

    Parameters
    ----------
    out_dir : path
        Folder (created if needed).
    width_px, height_px, mpp_um : int, int, float
        Size and resolution of every slide (default 0.7 x 0.85 mm at 0.5 µm/px: a small punch biopsy section, epidermis to deep dermis).
    jpeg_quality : int
        JPEG quality of the slide tiles.
    specs : list of SampleSpec, optional
        Defaults to :func:`sample_specs`.

    Returns
    -------
    list of Path
        The slide files written, in `specs` order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in specs or sample_specs():
        slide = render_skin(
            stain=spec.stain,
            width_px=width_px,
            height_px=height_px,
            mpp_um=mpp_um,
            seed=spec.seed,
            jpeg_quality=None,
            params=spec.params,
        )
        path = out / spec.file_name
        if spec.file_name.lower().endswith((".ome.tif", ".ome.tiff")):
            write_ome_tiff(path, slide.rgb, mpp_um=mpp_um, jpeg_quality=jpeg_quality, name=spec.file_name)
            fmt = "ome-tiff"
        else:
            write_svs(path, slide.rgb, mpp_um=mpp_um, jpeg_quality=jpeg_quality)
            fmt = "svs"
        truth = dict(slide.truth)
        # The file holds the image JPEG-compressed once, at this quality; the truth is from the exact fields.
        truth["jpeg_quality"] = jpeg_quality
        truth["file"] = {"name": spec.file_name, "format": fmt, "tile_px": 256}
        truth["study"] = {"subject": spec.subject, "timepoint": spec.timepoint}
        write_truth(truth_path_for(path), truth)
        written.append(path)
        logger.info("wrote %s", path)
    return written
