"""Stain models and colour deconvolution (Ruifrok & Johnston 2001).

A brightfield pixel's optical density (OD) per channel is ``OD_c = -log10(I_c / I0_c)``, where ``I0`` is the
brightness of bare glass (the background). By the Beer-Lambert law, OD is a linear mix of stain OD vectors:
``od = conc @ od_vectors``, with one unit vector per stain as a row (R, G, B). Colour deconvolution inverts it:
``conc = od @ conc_from_od``. Concentrations are in OD units (the OD the stain alone would give along its own
vector), so thresholds such as "DAB >= 0.2" mean the same as in QuPath and ImageJ's Colour Deconvolution.

References
----------
.. [1] A. C. Ruifrok and D. A. Johnston, "Quantification of histochemical staining by color deconvolution",
   Anal. Quant. Cytol. Histol. 23(4):291-299, 2001.
.. [2] G. Landini, G. Martinelli and F. Piccinini, "Colour deconvolution: stain unmixing in histological imaging",
   Bioinformatics 37(10):1485-1487, 2021 (Colour Deconvolution 2 for ImageJ/Fiji, built-in vectors).
.. [3] P. Bankhead et al., "QuPath: Open source software for digital pathology image analysis", Sci. Rep. 7:16878,
   2017 (default H-DAB and H&E stain vectors).
.. [4] M. Macenko et al., "A method for normalizing histology slides for quantitative analysis", ISBI 2009,
   1107-1110.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from cleihc import _kernels
from cleihc.errors import CleihcError, StainDriftError

__all__ = [
    "PRESETS",
    "RESIDUAL",
    "STAIN_VECTORS",
    "AreaCounts",
    "StainFit",
    "StainMatrix",
    "angle_deg",
    "area_counts",
    "available_presets",
    "check_drift",
    "concentration",
    "concentrations",
    "deconvolve",
    "drift_angles",
    "estimate_background",
    "estimate_from_regions",
    "estimate_macenko",
    "od_lut",
    "preset",
    "recompose",
    "stain_fit",
    "stain_vector",
    "tissue_pixels",
]

logger = logging.getLogger(__name__)

RESIDUAL = "residual"

# --------------------------------------------------------------------------------------------------------------
# Built-in stain OD vectors (R, G, B), before normalisation to unit length. Each cites where it comes from.
# Replace any of them by a measured vector in a protocol ([stains] vectors = {...}) or with
# `cleihc stains estimate`; measured vectors of your own scanner and staining beat any published default.
# --------------------------------------------------------------------------------------------------------------
STAIN_VECTORS: Mapping[str, tuple[float, float, float]] = {
    # Ruifrok & Johnston 2001, Table 1 ("H DAB"), also Landini's Colour Deconvolution 2 "H DAB", QuPath's
    # default H-DAB hematoxylin (0.651, 0.701, 0.290) within 0.1 degree, skimage `rgb_from_hdx`.
    "hematoxylin": (0.650, 0.704, 0.286),
    # Ruifrok & Johnston 2001 ("H DAB"); Landini CD2 "H DAB"; QuPath default DAB (0.269, 0.568, 0.778).
    "dab": (0.268, 0.570, 0.776),
    # Landini CD2 "H&E" eosin, measured in Landini's lab ("GL"); QuPath's default H&E eosin (0.093, 0.954, 0.283).
    "eosin": (0.092789, 0.954111, 0.283111),
    # Landini CD2 "H AEC" (3-amino-9-ethylcarbazole); skimage `rgb_from_hax`.
    "aec": (0.2743, 0.6796, 0.6803),
    # Landini CD2 "Alcian blue & H" (Alcian blue 8GX); skimage `rgb_from_ahx`.
    "alcian_blue": (0.874622, 0.457711, 0.158256),
    # Nuclear fast red (Kernechtrot, C.I. 60760, aluminium lake): no mainstream tool ships a vector. Derived from its
    # absorbance spectrum (peak ~520-540 nm, shoulder into the blue, little above 600 nm): relative absorbance
    # over the camera's R/G/B bands ~ 0.25 / 1.0 / 0.45. It sits between Landini's Fast Red (0.214, 0.851, 0.478)
    # and PAS magenta, as its pink-red colour suggests. Measure your own with `cleihc stains estimate`.
    "nuclear_fast_red": (0.25, 1.0, 0.45),
    # Colloidal iron (Hale's / Mowry's): the stain seen is Prussian blue (ferric ferrocyanide) formed on the bound
    # iron. No tool ships a vector; derived from published Prussian blue absorbance spectra (intervalence band,
    # broad peak ~680-700 nm, ~0.85 of peak over the red band 600-650 nm, ~0.45 over green 520-570 nm, ~0.13 over
    # blue 440-490 nm). Strong red, moderate green, weak blue OD, as the brief blue-turquoise colour implies.
    # Easy to replace: put a measured vector in the protocol.
    "colloidal_iron": (0.85, 0.45, 0.13),
    # Landini CD2 "H PAS" (periodic acid-Schiff, magenta); skimage `rgb_from_hpx`.
    "pas": (0.175411, 0.972178, 0.154589),
    # Landini CD2 "FastRed FastBlue DAB" (Fast Red TR/naphthol AS-MX, alkaline phosphatase); skimage `rgb_from_rbd`.
    "fast_red": (0.21393921, 0.85112669, 0.47794022),
    # Landini CD2 "Methyl green DAB"; skimage `rgb_from_gdx`.
    "methyl_green": (0.98003, 0.144316, 0.133146),
}

# Presets: (stain names, vectors) with the combination-specific vectors their sources give.
PRESETS: Mapping[str, tuple[tuple[str, ...], tuple[tuple[float, float, float], ...]]] = {
    # Ruifrok & Johnston 2001 / Landini CD2 "H DAB" / QuPath default H-DAB.
    "hdab": (("hematoxylin", "dab"), (STAIN_VECTORS["hematoxylin"], STAIN_VECTORS["dab"])),
    # Landini CD2 "H&E" (both measured in Landini's lab); QuPath's default H&E within 0.5 degree.
    "he": (("hematoxylin", "eosin"), ((0.644211, 0.716556, 0.266844), STAIN_VECTORS["eosin"])),
    # Landini CD2 "H AEC".
    "haec": (("hematoxylin", "aec"), (STAIN_VECTORS["hematoxylin"], STAIN_VECTORS["aec"])),
    # Alcian blue (Landini CD2) with nuclear fast red counterstain (derived, see STAIN_VECTORS).
    "alcian_nfr": (
        ("alcian_blue", "nuclear_fast_red"),
        (STAIN_VECTORS["alcian_blue"], STAIN_VECTORS["nuclear_fast_red"]),
    ),
    # Landini CD2 "Alcian blue & H" (its hematoxylin differs from the H DAB one: measured with Alcian blue).
    "alcian_h": (
        ("alcian_blue", "hematoxylin"),
        (STAIN_VECTORS["alcian_blue"], (0.552556, 0.7544, 0.353744)),
    ),
    # Colloidal iron (derived, see STAIN_VECTORS) with nuclear fast red counterstain (derived).
    "colloidal_iron_nfr": (
        ("colloidal_iron", "nuclear_fast_red"),
        (STAIN_VECTORS["colloidal_iron"], STAIN_VECTORS["nuclear_fast_red"]),
    ),
    # Landini CD2 "H PAS".
    "hpas": (("hematoxylin", "pas"), ((0.644211, 0.716556, 0.266844), STAIN_VECTORS["pas"])),
}

_MIN_ANGLE_DEG = 2.0  # stains closer than this cannot be separated: the matrix is near singular


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _as_background(rgb: Any) -> tuple[float, float, float]:
    try:
        arr = np.asarray(rgb, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise CleihcError(f"background RGB must be three numbers in 1..255, got {rgb!r}") from None
    if arr.shape != (3,) or not np.all(np.isfinite(arr)) or np.any(arr < 1) or np.any(arr > 255):
        raise CleihcError(f"background RGB must be three numbers in 1..255, got {rgb!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


@dataclass(frozen=True, eq=False)
class StainMatrix:
    """Stain optical-density vectors (one unit row per stain, columns R, G, B) and the background I0.

    Give two or three stains; with two, a third complementary vector named ``"residual"`` is added as the unit
    cross product of the first two (as scikit-image and HistomicsTK do; Ruifrok & Johnston's "third colour").
    Its concentration collects what the two stains do not explain.

    Parameters
    ----------
    names : sequence of str
        Stain names, e.g. ``("hematoxylin", "dab")``; unique.
    od_vectors : array-like, shape (n, 3)
        OD vectors as rows, n = 2 or 3; normalised to unit length here. Stain (non-residual) vectors must be
        non-negative (absorbance cannot be negative).
    background_rgb : three floats in 1..255
        I0: the RGB of bare glass. Defaults to (255, 255, 255); estimate it with :func:`estimate_background`.

    Attributes
    ----------
    names : tuple of str
        Always three names (the third may be ``"residual"``).
    od_vectors : ndarray, shape (3, 3), float64, read-only
        Unit OD vectors as rows.
    conc_from_od : ndarray, shape (3, 3), float64, read-only
        The inverse of ``od_vectors``: ``conc = od @ conc_from_od``.
    """

    names: tuple[str, ...]
    od_vectors: np.ndarray
    background_rgb: tuple[float, float, float] = (255.0, 255.0, 255.0)
    conc_from_od: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        try:
            vec = np.array(self.od_vectors, dtype=np.float64)
        except (TypeError, ValueError):
            raise CleihcError(
                f"stain vectors must be rows of three numbers, got {self.od_vectors!r}"
            ) from None
        if vec.ndim != 2 or vec.shape[1] != 3 or vec.shape[0] not in (2, 3):
            raise CleihcError(f"stain vectors must be 2 or 3 rows of (R, G, B), got shape {vec.shape}")
        if len(names) != vec.shape[0]:
            raise CleihcError(
                f"{len(names)} stain names for {vec.shape[0]} vectors: give one name per vector"
            )
        if len(set(names)) != len(names) or any(not n for n in names):
            raise CleihcError(f"stain names must be unique and non-empty, got {names}")
        if not np.all(np.isfinite(vec)):
            raise CleihcError(f"stain vectors must be finite numbers, got {vec.tolist()}")
        norms = np.linalg.norm(vec, axis=1)
        for name, v, n in zip(names, vec, norms, strict=True):
            if n == 0:
                raise CleihcError(f"stain vector of {name!r} is zero: give its (R, G, B) optical density")
            if name != RESIDUAL and np.any(v < 0):
                raise CleihcError(
                    f"stain vector of {name!r} has a negative component {v.tolist()}: OD is >= 0"
                )
        # Rows already unit (to 1e-12) are kept bit for bit, so a matrix written out and read back is identical.
        vec = np.where(np.abs(norms - 1.0)[:, None] > 1e-12, vec / norms[:, None], vec)
        if vec.shape[0] == 2:
            if names[0] == RESIDUAL or names[1] == RESIDUAL:
                raise CleihcError(
                    "with two stains neither may be named 'residual' (the derived third one is)"
                )
            third = np.cross(vec[0], vec[1])
            if np.linalg.norm(third) < math.sin(math.radians(_MIN_ANGLE_DEG)):
                raise CleihcError(
                    f"stain vectors {names[0]!r} and {names[1]!r} are nearly parallel "
                    f"({angle_deg(vec[0], vec[1]):.2f} degrees): they cannot be separated"
                )
            vec = np.vstack([vec, _unit(third)])
            names = (*names, RESIDUAL)
        for a in range(3):
            for b in range(a + 1, 3):
                ang = angle_deg(vec[a], vec[b])
                if ang < _MIN_ANGLE_DEG or ang > 180 - _MIN_ANGLE_DEG:
                    raise CleihcError(
                        f"stain vectors {names[a]!r} and {names[b]!r} are nearly parallel ({ang:.2f} degrees): "
                        "they cannot be separated"
                    )
        # The three vectors must span RGB: a small determinant means one is (nearly) a mix of the other two.
        if abs(np.linalg.det(vec)) < 1e-3:
            raise CleihcError(f"stain vectors {names} are (nearly) coplanar: they cannot be separated")
        inv = np.linalg.inv(vec)
        vec.setflags(write=False)
        inv.setflags(write=False)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "od_vectors", vec)
        object.__setattr__(self, "background_rgb", _as_background(self.background_rgb))
        object.__setattr__(self, "conc_from_od", inv)

    # -- value semantics (ndarray fields need explicit comparison and hashing) --
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StainMatrix):
            return NotImplemented
        return (
            self.names == other.names
            and np.array_equal(self.od_vectors, other.od_vectors)
            and self.background_rgb == other.background_rgb
        )

    def __hash__(self) -> int:
        return hash((self.names, self.od_vectors.tobytes(), self.background_rgb))

    def __reduce__(self):
        # Rebuild through the constructor so an unpickled matrix (e.g. in a Dask worker) is validated and its
        # arrays are read-only again; unit rows are kept bit for bit.
        return (StainMatrix, (self.names, self.od_vectors, self.background_rgb))

    @property
    def od_from_conc(self) -> np.ndarray:
        """The forward matrix (the OD vectors as rows): ``od = conc @ od_from_conc``."""
        return self.od_vectors

    @property
    def stain_names(self) -> tuple[str, ...]:
        """The names of real stains (without a derived ``"residual"``)."""
        return tuple(n for n in self.names if n != RESIDUAL)

    def index(self, name: str) -> int:
        """Position of stain `name` (its channel in :func:`deconvolve` output)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise CleihcError(
                f"no stain named {name!r}; this stain matrix has {', '.join(self.names)}"
            ) from None

    def vector(self, name: str) -> np.ndarray:
        """The unit OD vector of stain `name` (a read-only row view)."""
        return self.od_vectors[self.index(name)]

    def with_background(self, rgb: Sequence[float] | np.ndarray) -> StainMatrix:
        """The same stains (bit for bit) with background I0 = `rgb`."""
        out = copy.copy(self)
        object.__setattr__(out, "background_rgb", _as_background(rgb))
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record (for provenance); :meth:`from_dict` reads it back exactly."""
        return {
            "names": list(self.names),
            "od_vectors": [[float(x) for x in row] for row in self.od_vectors],
            "background_rgb": [float(x) for x in self.background_rgb],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StainMatrix:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                tuple(d["names"]), np.asarray(d["od_vectors"], dtype=np.float64), tuple(d["background_rgb"])
            )
        except (KeyError, TypeError) as exc:
            raise CleihcError(
                f"invalid stain matrix record ({exc}): need names, od_vectors, background_rgb"
            ) from None


def stain_vector(name: str) -> np.ndarray:
    """The built-in unit OD vector of stain `name` (see ``STAIN_VECTORS`` for sources)."""
    if name not in STAIN_VECTORS:
        raise CleihcError(f"unknown stain {name!r}; built-in stains: {', '.join(sorted(STAIN_VECTORS))}")
    return _unit(np.asarray(STAIN_VECTORS[name], dtype=np.float64))


def available_presets() -> list[str]:
    """Names accepted by :func:`preset`, sorted."""
    return sorted(PRESETS)


def preset(name: str, *, background_rgb: Sequence[float] = (255.0, 255.0, 255.0)) -> StainMatrix:
    """A built-in stain matrix: ``hdab``, ``he``, ``haec``, ``alcian_nfr``, ``alcian_h``, ``colloidal_iron_nfr``, ...

    Parameters
    ----------
    name : str
        Preset name, see :func:`available_presets`.
    background_rgb : three floats, optional
        I0 for the matrix.

    Raises
    ------
    CleihcError
        For an unknown name; the message lists the presets.
    """
    if name not in PRESETS:
        raise CleihcError(
            f"unknown stain preset {name!r}; available presets: {', '.join(available_presets())}"
        )
    names, vectors = PRESETS[name]
    return StainMatrix(names, np.asarray(vectors, dtype=np.float64), tuple(background_rgb))


def angle_deg(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Angle in degrees (0..180) between two vectors."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    # atan2(|a x b|, a . b) stays accurate for tiny angles, where acos of the cosine loses half the digits.
    return math.degrees(math.atan2(float(np.linalg.norm(np.cross(a, b))), float(np.dot(a, b))))


# --------------------------------------------------------------------------------------------------------------
# Deconvolution
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _od_lut_cached(background: tuple[float, float, float]) -> np.ndarray:
    values = np.maximum(np.arange(256, dtype=np.float64), 1.0)
    lut = -np.log10(values[None, :] / np.asarray(background, dtype=np.float64)[:, None])
    lut = lut.astype(np.float32)
    lut.setflags(write=False)
    return lut


def od_lut(background: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per-channel optical density of every 8-bit value: ``lut[c, v] = -log10(max(v, 1) / I0[c])``.

    Parameters
    ----------
    background : three floats in 1..255
        I0 (the glass RGB).

    Returns
    -------
    ndarray, shape (3, 256), float32, read-only
        Computed in float64 and rounded once to float32 (cached per background).
    """
    return _od_lut_cached(_as_background(background))


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray):
        rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit (uint8) RGB image, got dtype {rgb.dtype}")
    return rgb


def _background_of(stains: StainMatrix, background: Sequence[float] | np.ndarray | None) -> tuple[float, ...]:
    return stains.background_rgb if background is None else _as_background(background)


def deconvolve(
    rgb: np.ndarray,
    stains: StainMatrix,
    *,
    background: Sequence[float] | np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Stain concentrations (OD units) of every pixel: colour deconvolution.

    ``od_c = -log10(max(I_c, 1) / I0_c)`` per channel, then ``conc = od @ stains.conc_from_od``. Values are not
    clipped: pixels brighter than I0 or off the stain plane give small negative concentrations.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
        The image; any strides (views are fine). Never modified.
    stains : StainMatrix
        Stain vectors; channel ``k`` of the output is ``stains.names[k]``.
    background : three floats, optional
        I0; defaults to ``stains.background_rgb``.
    out : ndarray, shape (H, W, 3), float32, optional
        Where to write the result (must not overlap `rgb`).

    Returns
    -------
    ndarray, shape (H, W, 3), float32
        `out` if given. Equal to the float64 formula within 1e-4 (OD from a float32 lookup table, float32
        arithmetic: one core, no temporaries).

    References
    ----------
    Ruifrok & Johnston 2001 (see module docstring).
    """
    rgb = _check_rgb(rgb)
    h, w = rgb.shape[:2]
    if out is None:
        out = np.empty((h, w, 3), dtype=np.float32)
    elif out.shape != (h, w, 3) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {(h, w, 3)}, got {out.dtype} {out.shape}")
    lut = od_lut(_background_of(stains, background))
    _kernels.deconvolve_kernel(rgb, lut, stains.conc_from_od.astype(np.float32), out)
    return out


def concentration(
    rgb: np.ndarray,
    stains: StainMatrix,
    *,
    stain: str,
    background: Sequence[float] | np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One stain's concentration (OD units), computed alone: channel ``stains.index(stain)`` of :func:`deconvolve`.

    Bit-identical to that channel, at a third of the arithmetic and memory traffic.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
    stains : StainMatrix
    stain : str
        Name of the stain, e.g. ``"dab"`` or ``"hematoxylin"``.
    background : three floats, optional
        I0; defaults to ``stains.background_rgb``.
    out : ndarray, shape (H, W), float32, optional

    Returns
    -------
    ndarray, shape (H, W), float32
    """
    rgb = _check_rgb(rgb)
    h, w = rgb.shape[:2]
    k = stains.index(stain)
    if out is None:
        out = np.empty((h, w), dtype=np.float32)
    elif out.shape != (h, w) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {(h, w)}, got {out.dtype} {out.shape}")
    lut = od_lut(_background_of(stains, background))
    col = np.ascontiguousarray(stains.conc_from_od[:, k], dtype=np.float32)
    _kernels.concentration_kernel(rgb, lut, col, out)
    return out


def concentrations(
    rgb: np.ndarray,
    stains: StainMatrix,
    *,
    names: Sequence[str],
    background: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Several stains' concentrations (OD units) in one pass: plane ``k`` is :func:`concentration` of
    ``names[k]``, bit for bit.

    For callers that need some channels but not all (cell detection: counterstain and target): one read of the
    image and no channel it does not use.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
    stains : StainMatrix
    names : sequence of str
        Stain names, e.g. ``("hematoxylin", "dab")``; at least one.
    background : three floats, optional
        I0; defaults to ``stains.background_rgb``.

    Returns
    -------
    ndarray, shape (len(names), H, W), float32
        Each plane C-contiguous.
    """
    rgb = _check_rgb(rgb)
    names = tuple(names)
    if not names:
        raise ValueError("names must name at least one stain")
    cols = np.ascontiguousarray(stains.conc_from_od[:, [stains.index(n) for n in names]], dtype=np.float32)
    out = np.empty((len(names), *rgb.shape[:2]), dtype=np.float32)
    _kernels.concentrations_kernel(rgb, od_lut(_background_of(stains, background)), cols, out)
    return out


def recompose(
    conc: np.ndarray, stains: StainMatrix, *, background: Sequence[float] | np.ndarray | None = None
) -> np.ndarray:
    """RGB image from stain concentrations (the inverse of :func:`deconvolve`), for previews and tests.

    ``I_c = round(I0_c * 10 ** -(conc @ od_vectors)_c)``, clipped to 0..255.

    Parameters
    ----------
    conc : ndarray, shape (H, W, 3)
        Concentrations in OD units, channels ordered as ``stains.names``.
    stains : StainMatrix
    background : three floats, optional
        I0; defaults to ``stains.background_rgb``.

    Returns
    -------
    ndarray, shape (H, W, 3), uint8
    """
    conc = np.asarray(conc)
    if conc.ndim != 3 or conc.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) concentrations, got shape {conc.shape}")
    if not np.issubdtype(conc.dtype, np.floating):
        conc = conc.astype(np.float64)
    out = np.empty(conc.shape, dtype=np.uint8)
    bg = np.asarray(_background_of(stains, background), dtype=np.float64)
    _kernels.recompose_kernel(conc, np.ascontiguousarray(stains.od_vectors), bg, out)
    return out


class AreaCounts(NamedTuple):
    """Per-region totals of one stain over a tile (additive: sum them over tiles).

    Attributes
    ----------
    counts : ndarray, shape (n_regions, n_bins), int64
        Pixels per intensity bin; bin 0 is negative (< thresholds_od[0]), bin k holds
        thresholds_od[k-1] <= c < thresholds_od[k]. ``counts.sum(axis=1)`` is the region's pixel count.
    positive_od_sum : ndarray, shape (n_regions,), float64
        Sum of the stain's concentration over positive pixels (c >= thresholds_od[0]).
    od_sum : ndarray, shape (n_regions,), float64
        Sum of the stain's concentration over all the region's pixels (for mean OD).
    """

    counts: np.ndarray
    positive_od_sum: np.ndarray
    od_sum: np.ndarray


def area_counts(
    rgb: np.ndarray,
    stains: StainMatrix,
    *,
    target: str,
    region_bits: np.ndarray,
    n_regions: int,
    thresholds_od: Sequence[float],
    background: Sequence[float] | np.ndarray | None = None,
    accumulate: AreaCounts | None = None,
) -> AreaCounts:
    """Per-region pixel counts by intensity bin and OD sums of one stain, in one pass without temporaries.

    This is the fused kernel behind percent-positive area, H-score-style bins and Aperio positive pixel count
    style totals: it deconvolves each pixel on the fly (same float32 values as :func:`concentration`), bins the
    target stain against `thresholds_od` and adds the pixel to every region whose bit is set.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
        The tile (with or without halo: pass the matching `region_bits`; only pixels with a bit set count).
    stains : StainMatrix
    target : str
        The measured stain, e.g. ``"dab"``.
    region_bits : ndarray, shape (H, W), unsigned integer (uint8/16/32/64)
        Bit ``r`` set means the pixel belongs to region ``r`` (regions may overlap: tissue, dermis, ...).
        Pixels with no bit set (glass, halo) are skipped.
    n_regions : int
        Number of regions (bits 0..n_regions-1 are read; 1..64 and at most the dtype's bit width).
    thresholds_od : sequence of 1 to 4 floats, strictly increasing
        Lower bounds of the positive bins in OD, e.g. QuPath-like ``(0.2, 0.4, 0.6)`` for weak, moderate,
        strong. ``thresholds_od[0]`` is the positivity threshold.
    background : three floats, optional
        I0; defaults to ``stains.background_rgb``.
    accumulate : AreaCounts, optional
        Totals to add to (in place) instead of starting from zero; returned.

    Returns
    -------
    AreaCounts
        ``counts`` (n_regions, len(thresholds_od) + 1) int64, ``positive_od_sum`` and ``od_sum`` (n_regions,)
        float64.
    """
    rgb = _check_rgb(rgb)
    bits = np.asarray(region_bits)
    if bits.shape != rgb.shape[:2]:
        raise ValueError(f"region_bits shape {bits.shape} differs from the image's {rgb.shape[:2]}")
    if bits.dtype not in (np.uint8, np.uint16, np.uint32, np.uint64):
        raise ValueError(f"region_bits must be an unsigned integer bit mask, got dtype {bits.dtype}")
    n_regions = int(n_regions)
    if not 1 <= n_regions <= bits.dtype.itemsize * 8:
        raise ValueError(
            f"n_regions must be 1..{bits.dtype.itemsize * 8} for {bits.dtype} bits, got {n_regions}"
        )
    thr = np.asarray(thresholds_od, dtype=np.float64).reshape(-1)
    if not 1 <= thr.size <= _kernels.MAX_THRESHOLDS:
        raise ValueError(f"give 1..{_kernels.MAX_THRESHOLDS} thresholds_od, got {thr.size}")
    if not np.all(np.isfinite(thr)) or np.any(np.diff(thr) <= 0):
        raise ValueError(f"thresholds_od must be finite and strictly increasing, got {list(thr)}")
    n_bins = thr.size + 1
    thr = np.concatenate([thr, np.full(_kernels.MAX_THRESHOLDS - thr.size, np.inf)])
    if accumulate is None:
        acc = AreaCounts(
            np.zeros((n_regions, n_bins), np.int64),
            np.zeros(n_regions, np.float64),
            np.zeros(n_regions, np.float64),
        )
    else:
        acc = accumulate
        if (
            acc.counts.shape != (n_regions, n_bins)
            or acc.counts.dtype != np.int64
            or acc.positive_od_sum.shape != (n_regions,)
            or acc.od_sum.shape != (n_regions,)
        ):
            raise ValueError("accumulate does not match n_regions and thresholds_od")
    k = stains.index(target)
    lut = od_lut(_background_of(stains, background))
    col = np.ascontiguousarray(stains.conc_from_od[:, k], dtype=np.float32)
    _kernels.area_counts_kernel(
        rgb, lut, col, bits, n_regions, thr, acc.counts, acc.positive_od_sum, acc.od_sum
    )
    return acc


# --------------------------------------------------------------------------------------------------------------
# Background and stain vector estimation
# --------------------------------------------------------------------------------------------------------------
def estimate_background(
    rgb: np.ndarray,
    *,
    tissue_mask: np.ndarray | None = None,
    max_saturation: float = 0.12,
    window: int = 12,
    min_pixels: int = 50,
    fallback: Sequence[float] | None = None,
) -> np.ndarray:
    """Estimate I0, the RGB of bare glass, from bright, unsaturated pixels outside the tissue.

    Glass is the brightest grey population. Candidates are pixels outside `tissue_mask` whose saturation
    ``(max - min) / max`` is at most `max_saturation`; among them, those whose grey level is within `window`
    levels below the candidates' 99.5th percentile of grey are taken as glass, and I0 is their per-channel median
    (robust to dust, tissue edges and noise; not biased upward as a plain high percentile would be).

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
        A low-resolution view of the slide (a thumbnail) or a tile with some glass.
    tissue_mask : ndarray, shape (H, W), bool, optional
        True on tissue; those pixels are excluded.
    max_saturation : float
        Upper bound of a glass pixel's saturation.
    window : int
        Grey levels below the bright reference still counted as glass.
    min_pixels : int
        Fewest glass pixels needed.
    fallback : three floats, optional
        Returned (with a logged warning) when there are too few glass pixels; without it, that raises.

    Returns
    -------
    ndarray, shape (3,), float64
        I0 per channel, in 1..255.

    Raises
    ------
    CleihcError
        Too few glass pixels and no `fallback`.
    """
    rgb = _check_rgb(rgb)
    exclude = np.zeros((1, 1), dtype=bool)
    if tissue_mask is not None:
        exclude = np.asarray(tissue_mask, dtype=bool)
        if exclude.shape != rgb.shape[:2]:
            raise ValueError(f"tissue_mask shape {exclude.shape} differs from the image's {rgb.shape[:2]}")
    # Counts of the candidates by (r + g + b, channel, value): the percentile and the medians below are exact order
    # statistics read off these counts, with no per-pixel copies (an 8 M-pixel overview made ~130 MB of them).
    hist = np.zeros((766, 3, 256), dtype=np.int64)
    _kernels.glass_histogram_kernel(rgb, exclude, tissue_mask is not None, float(max_saturation), hist)
    sum_counts = hist[:, 0, :].sum(axis=1)
    n_candidates = int(sum_counts.sum())
    if n_candidates >= min_pixels:
        grey_levels = np.arange(766) / 3.0  # a pixel's grey level, (r + g + b) / 3, as before in float64
        top = _percentile_of_counts(grey_levels, sum_counts, 99.5)
        glass = hist[grey_levels >= top - window].sum(axis=0)  # (3, 256) counts of the glass pixels' values
        if int(glass[0].sum()) >= min_pixels:
            bg = np.array([_median_of_counts(glass[c]) for c in range(3)])
            return np.clip(bg, 1.0, 255.0)
    if fallback is not None:
        logger.warning("too few glass pixels to estimate the background; using %s", list(fallback))
        return np.asarray(_as_background(fallback), dtype=np.float64)
    raise CleihcError(
        f"too few glass pixels ({n_candidates} candidates) to estimate the background (I0): "
        "use an image with some bare glass or give the background RGB in the protocol"
    )


def _order_statistic(values: np.ndarray, counts: np.ndarray, k: int) -> float:
    """The `k`-th smallest (0-based) of a sample given as sorted distinct `values` and their `counts`."""
    return float(values[np.searchsorted(np.cumsum(counts), k, side="right")])


def _percentile_of_counts(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """``np.percentile(sample, q)`` (method "linear", numpy's own interpolation arithmetic) of a sample given
    as sorted distinct `values` and their `counts`."""
    n = int(counts.sum())
    index = (n - 1) * (q / 100)
    if index >= n - 1:
        return _order_statistic(values, counts, n - 1)
    lo = math.floor(index)
    gamma = index - lo
    a = _order_statistic(values, counts, lo)
    b = _order_statistic(values, counts, lo + 1)
    diff = b - a
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


def _median_of_counts(counts: np.ndarray) -> float:
    """``np.median`` of a sample of the integers ``0..len(counts) - 1`` given by their counts."""
    n = int(counts.sum())
    values = np.arange(counts.size, dtype=np.float64)
    a = _order_statistic(values, counts, (n - 1) // 2)
    return a if n % 2 else (a + _order_statistic(values, counts, n // 2)) / 2.0


def _od_pixels(pixels: np.ndarray, background: Sequence[float]) -> np.ndarray:
    """OD (float64) of an (N, 3) or (H, W, 3) uint8 pixel array."""
    px = np.asarray(pixels)
    if px.dtype != np.uint8 or px.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB pixels (..., 3), got {px.dtype} {px.shape}")
    px = px.reshape(-1, 3)
    bg = np.asarray(_as_background(background), dtype=np.float64)
    return -np.log10(np.maximum(px.astype(np.float64), 1.0) / bg)


def _match_order(vectors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Reorder two estimated vectors to the reference's two by the smaller total angle."""
    straight = angle_deg(vectors[0], reference[0]) + angle_deg(vectors[1], reference[1])
    swapped = angle_deg(vectors[1], reference[0]) + angle_deg(vectors[0], reference[1])
    return vectors if straight <= swapped else vectors[::-1]


def estimate_macenko(
    rgb: np.ndarray,
    *,
    background: Sequence[float],
    reference: StainMatrix,
    tissue_mask: np.ndarray | None = None,
    od_threshold: float = 0.15,
    alpha_percent: float = 1.0,
    min_pixels: int = 100,
) -> StainMatrix:
    """Estimate two stain vectors from an image by Macenko's method.

    Pixels whose OD vector is shorter than `od_threshold` (glass, faint) are dropped; the OD of the rest is
    projected on the plane of its two principal directions, and each stain is the direction at the
    `alpha_percent` extreme of the angle in that plane among the pixels on its side of the plane (see Notes).
    The two vectors are named and ordered to match the first two stains of `reference` (smallest total angle).

    Macenko et al. drop pixels with OD below beta in *any* channel. Here beta applies to the OD vector's length:
    stains with a near-zero channel (eosin and Prussian blue have little red or blue OD) would otherwise keep
    only pixels mixed with the other stain, which biases the estimate towards it (by ~2 degrees for H&E).

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3) or (N, 3), uint8
        An image, or a list of pixels (e.g. ``image[tissue_mask]``). Give pixels at the resolution the slide is
        measured at (see :func:`tissue_pixels`): on a coarse overview thin stains (a membrane ring) are mixed
        with the counterstain in every pixel and their estimate leans towards it.
    background : three floats
        I0 (see :func:`estimate_background`).
    reference : StainMatrix
        Gives the names and the expected order (its first two stains). With three real stains, the third one's
        vector is kept as it is: Macenko's method finds two.
    tissue_mask : ndarray, shape (H, W) or (N,), bool, optional
        Only these pixels are used.
    od_threshold : float
        Macenko's beta (0.15), on the OD vector's length.
    alpha_percent : float
        Macenko's alpha (1 percentile), of each stain's side of the plane.
    min_pixels : int
        Fewest stained pixels needed.

    Returns
    -------
    StainMatrix
        The two estimated stains plus the residual (or, for a three-stain `reference`, plus its third stain's
        vector), with background `background`.

    Notes
    -----
    Macenko et al. take the alpha and 100 - alpha percentiles of the angle over *all* pixels, which assumes each
    stain has at least alpha percent of nearly pure pixels. An IHC target often has fewer: on the project's CD3
    sample slides DAB membrane rings are ~2 % of the tissue, and after optical blur and JPEG's 2 x 2 chroma
    subsampling only ~0.2 % of the tissue is >90 % DAB, so the 99th percentile fell among DAB-hematoxylin mixes
    (DAB 5-6.5 degrees off at full resolution). Here the angles are split at the bisector of those two
    percentiles and alpha is taken of each side's own pixels, i.e. of each stain's population (DAB 3.4-3.7
    degrees on the same slides); a side with fewer than `min_pixels` pixels keeps the all-pixel percentile.
    With two abundant stains both rules agree within ~1 degree (docs/stains.md).

    References
    ----------
    Macenko et al. 2009 (see module docstring).
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim not in (2, 3) or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB pixels (H, W, 3) or (N, 3), got {rgb.dtype} {rgb.shape}")
    pix = rgb.reshape(-1, 3)
    if tissue_mask is not None:
        tm = np.asarray(tissue_mask, dtype=bool)
        if tm.shape != rgb.shape[:-1]:
            raise ValueError(f"tissue_mask shape {tm.shape} differs from the image's {rgb.shape[:-1]}")
        pix = pix[tm.reshape(-1)]
    od = _od_pixels(pix, background)
    od = od[np.linalg.norm(od, axis=1) >= od_threshold]
    if len(od) < min_pixels:
        raise CleihcError(
            f"only {len(od)} stained pixels (OD >= {od_threshold}) for stain estimation: "
            "use a larger or more strongly stained region, or the protocol's fixed vectors"
        )
    cov = np.cov(od, rowvar=False)
    _, eigvecs = np.linalg.eigh(cov)  # ascending eigenvalues
    plane = eigvecs[:, [2, 1]]
    # Orient the principal axes into the positive octant so the angles are comparable with the stain vectors.
    if plane[:, 0].sum() < 0:
        plane[:, 0] *= -1
    if plane[:, 1].sum() < 0:
        plane[:, 1] *= -1
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha_percent, 100.0 - alpha_percent])
    # Alpha of each stain's own pixels (see Notes): a sparse stain's extreme is then its purest pixels, not mixes.
    mid = 0.5 * (lo + hi)
    low_side, high_side = phi[phi <= mid], phi[phi > mid]
    if len(low_side) >= min_pixels:
        lo = np.percentile(low_side, alpha_percent)
    if len(high_side) >= min_pixels:
        hi = np.percentile(high_side, 100.0 - alpha_percent)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    vecs = np.vstack([v1, v2])
    vecs *= np.where(vecs.sum(axis=1) < 0, -1.0, 1.0)[:, None]
    # Tiny negative components come from noise; absorbance is non-negative.
    vecs = np.clip(vecs, 0.0, None)
    vecs = _match_order(vecs, reference.od_vectors[:2])
    if len(reference.stain_names) == 3:
        # Two stains span a plane only: the third real stain keeps its reference vector (callers say so).
        return StainMatrix(
            reference.names, np.vstack([vecs, reference.od_vectors[2]]), tuple(_as_background(background))
        )
    return StainMatrix(reference.names[:2], vecs, tuple(_as_background(background)))


def tissue_pixels(
    slide: Any,
    mask: np.ndarray,
    *,
    mask_downsample: float,
    mpp_um: float,
    max_pixels: int = 4_000_000,
    tile_px: int = 512,
) -> np.ndarray:
    """The slide's pixels inside `mask`, read at `mpp_um` µm/px, for stain estimation.

    Stains must be estimated where they are not mixed: at 2-4 µm/px a CD3 membrane ring (2 µm) shares every
    pixel with its nucleus and the stroma, and Macenko's DAB leaned 16-18 degrees towards hematoxylin on the
    project's sample slides. The pixels are read tile by tile at the analysis resolution
    (``slide.analysis_resolution(mpp_um)``); when the tissue holds more than `max_pixels`, evenly spaced tiles
    (in row-major order) are read until about that many pixels, so memory stays bounded on any slide.

    Parameters
    ----------
    slide : cleihc.slide.Slide
        An open slide with a known µm/px.
    mask : ndarray, shape (H, W), bool
        Where to take pixels (tissue, or annotated regions), on a grid of `mask_downsample` level-0 pixels.
    mask_downsample : float
        Level-0 pixels per mask pixel.
    mpp_um : float
        µm per pixel to read at (a protocol's ``[analysis] mpp_um``).
    max_pixels : int
        About the most pixels returned.
    tile_px : int
        Side of the tiles read, in analysis pixels.

    Returns
    -------
    ndarray, shape (N, 3), uint8
        The pixels (deterministic: the same slide and mask give the same pixels).
    """
    mask = np.asarray(mask, dtype=bool)
    res = slide.analysis_resolution(mpp_um)
    wa, ha = res.dimensions_a
    scale = float(res.downsample) / float(mask_downsample)  # mask pixels per analysis pixel
    mh, mw = mask.shape

    def mask_window(x: int, y: int, w: int, h: int) -> np.ndarray:
        # Each analysis pixel takes the mask pixel holding its centre (as measure.map_mask does).
        cols = np.floor((x + np.arange(w) + 0.5) * scale).astype(np.int64)
        rows = np.floor((y + np.arange(h) + 0.5) * scale).astype(np.int64)
        inside = (cols[None, :] < mw) & (rows[:, None] < mh)
        return mask[np.minimum(rows, mh - 1)[:, None], np.minimum(cols, mw - 1)[None, :]] & inside

    tiles = []
    for y in range(0, ha, tile_px):
        for x in range(0, wa, tile_px):
            w, h = min(tile_px, wa - x), min(tile_px, ha - y)
            # Tissue in the tile, counted on the mask's own grid (cheap), scaled to analysis pixels.
            r0, r1 = int(y * scale), min(mh, int(np.ceil((y + h) * scale)))
            c0, c1 = int(x * scale), min(mw, int(np.ceil((x + w) * scale)))
            n = int(mask[r0:r1, c0:c1].sum()) / max(scale * scale, 1e-12)
            if n > 0:
                tiles.append((x, y, w, h, n))
    total = sum(t[4] for t in tiles)
    if total > max_pixels and tiles:
        keep = max(1, int(len(tiles) * max_pixels / total))
        tiles = [tiles[i] for i in np.unique(np.linspace(0, len(tiles) - 1, keep).round().astype(int))]
    parts = []
    for x, y, w, h, _ in tiles:
        m = mask_window(x, y, w, h)
        if m.any():
            parts.append(slide.read_analysis_rect(res, (x, y), (w, h))[m])
    if not parts:
        return np.empty((0, 3), dtype=np.uint8)
    return np.concatenate(parts)


def estimate_from_regions(
    rgb_by_stain: Mapping[str, np.ndarray],
    *,
    background: Sequence[float],
    od_threshold: float = 0.05,
) -> StainMatrix:
    """Stain vectors from pixels marked as stained by one stain each ("From ROI" in Colour Deconvolution 2).

    Each stain's vector is the normalised mean OD of its pixels (pixels with total OD below `od_threshold`,
    i.e. glass, are left out).

    Parameters
    ----------
    rgb_by_stain : mapping of str to ndarray
        Stain name to its pixels, uint8 shaped (N, 3) or (H, W, 3). Two or three stains, in order.
    background : three floats
        I0.
    od_threshold : float
        Minimum OD sum for a pixel to count.

    Returns
    -------
    StainMatrix
    """
    if not 2 <= len(rgb_by_stain) <= 3:
        raise CleihcError(f"give pixels of 2 or 3 stains, got {len(rgb_by_stain)}: {list(rgb_by_stain)}")
    names, vecs = [], []
    for name, pixels in rgb_by_stain.items():
        od = _od_pixels(pixels, background)
        od = od[od.sum(axis=1) >= od_threshold]
        if len(od) == 0:
            raise CleihcError(f"no stained pixels for {name!r}: mark a region that holds that stain")
        names.append(name)
        vecs.append(np.clip(od.mean(axis=0), 0.0, None))
    return StainMatrix(tuple(names), np.vstack(vecs), tuple(_as_background(background)))


def drift_angles(estimated: StainMatrix, reference: StainMatrix) -> dict[str, float]:
    """Angle in degrees between each reference stain and the estimated stain of the same name.

    A derived ``"residual"`` is not compared; stains missing from `estimated` are left out.
    """
    return {
        name: angle_deg(estimated.vector(name), reference.vector(name))
        for name in reference.stain_names
        if name in estimated.names
    }


def check_drift(
    estimated: StainMatrix,
    reference: StainMatrix,
    *,
    tolerance_deg: float,
    action: Literal["warn", "fail"] = "warn",
) -> str:
    """Compare estimated stain vectors with the reference, stain by stain (see :func:`drift_angles`).

    Parameters
    ----------
    estimated, reference : StainMatrix
        Stains are matched by name; a derived ``"residual"`` is not compared.
    tolerance_deg : float
        Largest acceptable angle.
    action : {"warn", "fail"}
        Beyond tolerance: log a warning (and return it), or raise :class:`~cleihc.errors.StainDriftError`.

    Returns
    -------
    str
        The one-line warning when a stain is beyond tolerance (with ``action="warn"``), else ``""``; callers
        record it with their run's warnings.
    """
    if action not in ("warn", "fail"):
        raise ValueError(f"action must be 'warn' or 'fail', got {action!r}")
    angles = drift_angles(estimated, reference)
    over = {n: a for n, a in angles.items() if a > tolerance_deg}
    if not over:
        return ""
    detail = ", ".join(f"{n} {a:.1f} deg" for n, a in over.items())
    msg = (
        f"estimated stain vectors differ from the reference beyond {tolerance_deg:g} degrees ({detail}): "
        "check the staining and scanner, or re-measure the protocol's vectors"
    )
    if action == "fail":
        raise StainDriftError(msg)
    logger.warning(msg)
    return msg


#: A target-positive pixel is "off the stains' plane" beyond this angle. On real H-DAB images (BCData, DeepLIIF,
#: LYON19, scikit-image's IHC image, DAB-analyzer samples) at most 1.7 % of DAB-positive pixels are; on an H&E
#: slide (CMU-1) 23 %, on Alcian blue and colloidal iron slides read as H-DAB 79-84 % (docs/stains.md).
OFF_PLANE_DEG = 15.0
#: Above this fraction of off-plane target-positive pixels a slide is reported as not explained by its stains.
OFF_PLANE_WARN_FRACTION = 0.10
#: Fewest target-positive pixels for the check to say anything (a negative control has almost none).
OFF_PLANE_MIN_PX = 200


class StainFit(NamedTuple):
    """How well two stains explain the colour of the pixels where the target stain is positive.

    Attributes
    ----------
    positive_px : int
        Pixels (of the mask) whose target concentration is at or above the positivity threshold.
    off_plane_px : int
        Of those, pixels whose OD vector lies more than `angle_deg` from the plane of the two stains' vectors:
        a colour neither stain, nor any mix of them, makes (eosin on an H&E slide read as hematoxylin + DAB).
    angle_deg : float
        The angle used.
    """

    positive_px: int
    off_plane_px: int
    angle_deg: float

    @property
    def off_plane_fraction(self) -> float:
        """``off_plane_px / positive_px`` (NaN when no pixel is positive)."""
        return self.off_plane_px / self.positive_px if self.positive_px else math.nan

    @property
    def explained(self) -> bool:
        """False when enough pixels are positive and too many of them are off the plane (see the constants)."""
        return not (
            self.positive_px >= OFF_PLANE_MIN_PX and self.off_plane_fraction > OFF_PLANE_WARN_FRACTION
        )


def stain_fit(
    rgb: np.ndarray,
    stains: StainMatrix,
    *,
    target: str,
    positive_od: float,
    tissue_mask: np.ndarray | None = None,
    angle_deg: float = OFF_PLANE_DEG,
) -> StainFit:
    """Check that a slide is stained with the stains of its protocol, where its target stain is positive.

    Colour deconvolution gives every pixel a target concentration, whatever its colour: read with hematoxylin +
    DAB vectors, the eosin of an H&E slide or the blue of Alcian blue has a "DAB" concentration too. Genuine
    mixes of two stains have OD vectors in the plane of the two stain vectors; this counts how many
    target-positive pixels lie off that plane by more than `angle_deg`. With three real stains every colour is
    a mix of them, and no pixel is counted off the plane.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
        The image (a slide's overview); never modified.
    stains : StainMatrix
        The stains used, with the slide's background I0.
    target : str
        The target stain's name.
    positive_od : float
        Positivity threshold on the target's concentration.
    tissue_mask : ndarray, shape (H, W), bool, optional
        Only these pixels are counted (default: all).
    angle_deg : float
        How far off the plane a pixel's OD vector may lie, in degrees (0-90).

    Returns
    -------
    StainFit
    """
    rgb = _check_rgb(rgb)
    if not 0.0 <= angle_deg <= 90.0:
        raise ValueError(f"angle_deg must be in 0..90, got {angle_deg}")
    h, w = rgb.shape[:2]
    if tissue_mask is None:
        mask = np.ones((h, w), dtype=np.bool_)
    else:
        mask = np.asarray(tissue_mask, dtype=np.bool_)
        if mask.shape != (h, w):
            raise ValueError(f"tissue_mask shape {mask.shape} differs from the image's {(h, w)}")
    col = np.ascontiguousarray(stains.conc_from_od[:, stains.index(target)], dtype=np.float32)
    if RESIDUAL in stains.names:
        normal = np.asarray(stains.vector(RESIDUAL), dtype=np.float32)  # the unit normal of the stains' plane
        sin2 = np.float32(math.sin(math.radians(angle_deg)) ** 2)
    else:
        normal = np.zeros(3, dtype=np.float32)
        sin2 = np.float32(np.inf)  # three stains explain every colour: nothing is off a plane
    out = np.zeros(2, dtype=np.int64)
    lut = od_lut(stains.background_rgb)
    _kernels.stain_fit_kernel(rgb, mask, lut, col, normal, np.float32(positive_od), sin2, out)
    return StainFit(int(out[0]), int(out[1]), float(angle_deg))
