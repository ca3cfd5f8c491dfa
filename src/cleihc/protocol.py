"""Protocols: versioned, human-readable TOML files that say what to measure and how.

A protocol is data, never code: it is read with :mod:`tomllib`, every key is checked (unknown keys are errors, so
a typo never silently falls back to a default) and the result is a frozen :class:`Protocol`. Its
:attr:`Protocol.sha256` is the hash of a canonical JSON of the *resolved* protocol (every default filled in, the
stain preset expanded to its vectors), so the same content gives the same hash however the file is formatted.

Tables ``[tissue]``, ``[cells]`` and ``[compartments]`` map one to one onto the frozen parameter dataclasses of
the modules that use them (:class:`cleihc.tissue.TissueParams`, :class:`cleihc.cells.CellParams`,
:class:`cleihc.regions.CompartmentParams`); they are validated generically from the dataclass fields and type
hints, so a new parameter there is a new protocol key with no change here.

Lookup of a protocol by name (:func:`find_protocol`): an existing file path first; then ``NAME.toml`` in each
folder of the ``CLEIHC_PROTOCOL_PATH`` environment variable (``os.pathsep``-separated), then in ``./protocols/``
of the current directory, then the built-in protocols shipped with cleihc. A protocol is selected by its file's
stem; its ``[protocol] name`` names results folders and table rows, so :func:`load_protocol` warns when the two
differ, and :func:`list_protocols` lists each protocol by the name that selects it, with where it comes from and
the files of the same name it hides.

Some checks span tables: a protocol that measures cells needs ``[analysis] mpp_um`` of at most
:data:`CELLS_MAX_MPP_UM` (1.0 µm per pixel, to resolve 5-10 µm nuclei); an area-only protocol's non-default
``[cells]`` values are ignored, with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.resources
import json
import logging
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from cleihc.errors import CleihcError, ProtocolError
from cleihc.stains import PRESETS, RESIDUAL, StainMatrix, available_presets

__all__ = [
    "CELLS_MAX_MPP_UM",
    "ENV_VAR",
    "SCHEMA_VERSION",
    "AnalysisParams",
    "BackgroundParams",
    "MetricsParams",
    "Protocol",
    "ProtocolInfo",
    "RegionsParams",
    "StainsParams",
    "Thresholds",
    "build_params",
    "builtin_protocol",
    "find_protocol",
    "list_protocols",
    "load_protocol",
    "protocol_search_path",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ENV_VAR = "CLEIHC_PROTOCOL_PATH"
BUILTIN_PACKAGE = "cleihc.builtin_protocols"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_STAIN_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
)
_MEASURES = ("area", "cells")

# Coarsest analysis resolution (µm per pixel) of a protocol that measures cells. Nuclei are 5-10 µm across
# (lymphocytes 5-7 µm): at 1 µm/px the smallest still spans 5 pixels and the membrane ring (cell_expansion_um,
# 3 µm) 3 pixels. On sample_images/S01_pre_cd3 (truth 859 cells, 219 positive) the cd3 protocol finds 851 / 218 at
# 0.5 µm/px, 840 / 218 at 1.0, 815 / 207 at 1.5, 773 / 16 at 2.0 (rings of one pixel or less) and 38 / 0 at 20.
CELLS_MAX_MPP_UM = 1.0
# Largest stain-vector component accepted. Only a vector's direction counts (it is normalised), so [65, 70, 29]
# means the same as [0.65, 0.70, 0.29]; values beyond this are an RGB colour (0-255) or a typo, and near the float
# limit their norm overflows (a numpy warning and a false "parallel" error).
_MAX_VECTOR_COMPONENT = 100.0


# ----------------------------------------------------------------------------------------------------------------
# The protocol's own tables
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackgroundParams:
    """``[background]``: how I0 (the brightness of bare glass) is obtained.

    Attributes
    ----------
    mode : {"estimate", "fixed"}
        "estimate": from the slide's glass (:func:`cleihc.stains.estimate_background`); "fixed": use `rgb`.
    rgb : (float, float, float)
        I0 when fixed, and the fallback when a slide has too little glass to estimate it.
    """

    mode: Literal["estimate", "fixed"] = "estimate"
    rgb: tuple[float, float, float] = (255.0, 255.0, 255.0)

    def __post_init__(self) -> None:
        if len(self.rgb) != 3 or not all(1.0 <= v <= 255.0 for v in self.rgb):
            raise ValueError(f"rgb = {list(self.rgb)}: must be three numbers in 1..255")
        object.__setattr__(self, "rgb", tuple(float(v) for v in self.rgb))


@dataclass(frozen=True)
class AnalysisParams:
    """``[analysis]``: the resolution and tiling of the measurement.

    Attributes
    ----------
    mpp_um : float
        Analysis resolution, µm per pixel (0.5 ≈ a 20x scan). The slide is read at the nearest level and binned by
        an integer factor; the effective value is recorded with the results.
    tile_size_px : int
        Tile side in analysis pixels (speed and memory only: results do not depend on it).
    halo_um : float
        A floor, in µm, on the overlap read around each tile. A protocol that measures cells reads
        ``max(halo_um, cleihc.cells.required_halo_um(cells))`` (about 76 µm with the built-ins' ``[cells]``), the
        context its nucleus detection needs to find a cell on a tile edge exactly as in one whole image: a smaller
        `halo_um` changes nothing, a larger one only costs time. An area-only protocol reads no overlap (area is
        measured pixel by pixel) and ignores it.
    raster_mpp_um : float
        Resolution of the additive totals raster on which per-region sums and review masks are made; region
        borders are resolved at this granularity. At least `mpp_um` (the raster sums whole analysis pixels).

    Notes
    -----
    A protocol that measures cells also needs ``mpp_um <= 1.0`` (see :data:`CELLS_MAX_MPP_UM`); that bound is
    checked by the protocol, which knows what is measured.
    """

    mpp_um: float = 0.5
    tile_size_px: int = 1024
    halo_um: float = 25.0
    raster_mpp_um: float = 2.0

    def __post_init__(self) -> None:
        if not 0.05 <= self.mpp_um <= 50.0:
            raise ValueError(f"mpp_um = {self.mpp_um!r}: must be between 0.05 and 50 µm per pixel")
        if not 128 <= self.tile_size_px <= 16384:
            raise ValueError(f"tile_size_px = {self.tile_size_px!r}: must be between 128 and 16384 pixels")
        if not 0.0 <= self.halo_um <= 500.0:
            raise ValueError(f"halo_um = {self.halo_um!r}: must be between 0 and 500 µm")
        if not self.raster_mpp_um <= 100.0:
            raise ValueError(f"raster_mpp_um = {self.raster_mpp_um!r}: must be at most 100 µm per pixel")
        if self.mpp_um > self.raster_mpp_um:
            # Named after mpp_um: the usual cause is an analysis resolution in the wrong unit (20 for 0.5), and
            # raster_mpp_um is often not in the file at all (its default is 2.0).
            raise ValueError(
                f"mpp_um = {self.mpp_um!r}: must be at most raster_mpp_um = {self.raster_mpp_um!r} µm per pixel "
                "(raster_mpp_um must be at least mpp_um; mpp_um is in µm per pixel, 0.5 for a 20x scan)"
            )


@dataclass(frozen=True)
class Thresholds:
    """``[thresholds]``: intensity bins of the target stain, in optical density (OD) units.

    Attributes
    ----------
    bins_od : (float, float, float)
        Lower bounds of the weak (1+), moderate (2+) and strong (3+) bins; below the first a pixel or cell is
        negative. QuPath's defaults for DAB are 0.2, 0.4, 0.6.
    positive_od : float
        The positivity threshold; it must equal ``bins_od[0]`` (a pixel or cell is positive when it reaches the
        weak bin), and defaults to it.
    """

    bins_od: tuple[float, float, float] = (0.2, 0.4, 0.6)
    positive_od: float | None = None  # None: the same as bins_od[0]

    def __post_init__(self) -> None:
        b = self.bins_od
        if len(b) != 3 or not all(math.isfinite(v) for v in b) or not 0.0 < b[0] < b[1] < b[2] <= 5.0:
            raise ValueError(f"bins_od = {list(b)}: must be three increasing OD values in (0, 5]")
        if self.positive_od is None:
            object.__setattr__(self, "positive_od", float(b[0]))
        elif self.positive_od != b[0]:
            raise ValueError(
                f"positive_od = {self.positive_od!r}: must equal bins_od[0] = {b[0]!r} (positive means at least weak)"
            )
        object.__setattr__(self, "bins_od", tuple(float(v) for v in b))


@dataclass(frozen=True)
class RegionsParams:
    """``[regions]``: the regions reported, in this order.

    Automatic skin compartments are "tissue", "epidermis", "dermis", "papillary_dermis", "superficial_dermis" and
    "deep_dermis"; a regions file (GeoJSON, ImageScope XML) may add or replace regions by name.
    """

    report: tuple[str, ...] = (
        "tissue",
        "epidermis",
        "dermis",
        "papillary_dermis",
        "superficial_dermis",
        "deep_dermis",
    )

    def __post_init__(self) -> None:
        if not self.report:
            raise ValueError("report = []: list at least one region, e.g. ['tissue']")
        if len(set(self.report)) != len(self.report) or not all(_NAME_RE.match(n) for n in self.report):
            raise ValueError(
                f"report = {list(self.report)}: region names must be unique words (letters, digits, _-.)"
            )


@dataclass(frozen=True)
class MetricsParams:
    """``[metrics]``: optional summary numbers.

    Attributes
    ----------
    h_score : bool
        H-score = 1 × %weak + 2 × %moderate + 3 × %strong (0–300), for cells and for area. False leaves the
        ``h_score`` and ``cells_h_score`` columns empty (NaN; absent from the long table), never absent.
    positive_pixel_count : bool
        Aperio Positive Pixel Count compatible columns (pixel counts per bin and their ratios).
    """

    h_score: bool = True
    positive_pixel_count: bool = False


@dataclass(frozen=True)
class StainsParams:
    """``[stains]``: the stain vectors and whether each slide re-estimates them.

    Attributes
    ----------
    preset : str
        A built-in combination (:func:`cleihc.stains.available_presets`), or "" when `vectors` define the stains.
    vectors : tuple of (name, (r, g, b))
        The stains' optical-density vectors as given (a preset's own vectors when only a preset is named); two
        stains get a derived third "residual" channel.
    estimate : {"fixed", "macenko"}
        "fixed" uses the vectors as they are; "macenko" estimates them on each slide (Macenko et al. 2009) and
        compares them with these.
    drift_tolerance_deg : float
        Largest angle between an estimated and the reference vector before `drift_action` applies.
    drift_action : {"warn", "fail"}
        Record a warning, or refuse to measure the slide.
    matrix : StainMatrix
        The stain matrix, with the protocol's ``[background] rgb`` as I0.
    """

    preset: str
    vectors: tuple[tuple[str, tuple[float, float, float]], ...]
    estimate: Literal["fixed", "macenko"]
    drift_tolerance_deg: float
    drift_action: Literal["warn", "fail"]
    matrix: StainMatrix = field(compare=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.preset:
            d["preset"] = self.preset
        d["estimate"] = self.estimate
        d["drift_tolerance_deg"] = self.drift_tolerance_deg
        d["drift_action"] = self.drift_action
        d["vectors"] = {name: list(v) for name, v in self.vectors}
        return d


class ProtocolInfo(NamedTuple):
    """One protocol found by :func:`list_protocols`.

    Attributes
    ----------
    name : str
        The name that selects it (``--protocol NAME``): the file's stem.
    version, description : str
        From its ``[protocol]`` table.
    path : Path
        The file.
    protocol_name : str
        Its ``[protocol] name``, which names results folders and table rows; "" when equal to `name`.
    origin : str
        Where it was found: "$CLEIHC_PROTOCOL_PATH", "./protocols" or "built-in".
    shadows : tuple of (Path, str)
        Files of the same name later on the search path, which this one hides, each with its origin.
    """

    name: str
    version: str
    description: str
    path: Path
    protocol_name: str = ""
    origin: str = ""
    shadows: tuple[tuple[Path, str], ...] = ()


# ----------------------------------------------------------------------------------------------------------------
# Generic table -> frozen dataclass mapping
# ----------------------------------------------------------------------------------------------------------------
class _Invalid(Exception):
    """Internal: a value does not fit its type; the message says what is allowed."""


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(value: Any, hint: Any) -> Any:
    """Convert a TOML value to the type `hint` (bool, int, float, str, Literal, tuple, Union) or raise _Invalid."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid("must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Invalid("must be a whole number")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                out = float(value)
            except OverflowError:
                raise _Invalid("must be a finite number") from None
            if not math.isfinite(out):
                raise _Invalid("must be a finite number")
            return out
        raise _Invalid("must be a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Invalid("must be a text string in quotes")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, str | int | float | bool) and any(
            type(value) is type(a) and value == a for a in allowed
        ):
            return value
        raise _Invalid(f"must be one of {', '.join(_describe(a) for a in allowed)}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list):
            raise _Invalid("must be a list [ ... ]")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Invalid(f"must be a list of {len(args)} values")
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    if origin in (typing.Union, types.UnionType):
        reasons = []
        for a in typing.get_args(hint):
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except _Invalid as exc:
                reasons.append(str(exc).removeprefix("must be "))
        raise _Invalid("must be " + " or ".join(reasons))
    raise TypeError(f"protocol mapping does not support the parameter type {hint!r}")  # a programming error


def _dataclass_to_dict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def build_params(cls: type, table: Any, *, section: str, path: str | os.PathLike[str] | None = None) -> Any:
    """Build the frozen dataclass `cls` from a TOML table, checking every key against its fields and types.

    Unknown keys are rejected; missing keys take the dataclass defaults; values are checked against the type hints
    (bool, int, float, str, ``Literal``, ``tuple``, unions) and then the dataclass's own ``__post_init__`` checks
    run. Every failure is a :class:`~cleihc.errors.ProtocolError` naming the file, ``[section] key``, the value and
    what is allowed.

    Parameters
    ----------
    cls : type
        A dataclass whose init fields all have defaults.
    table : dict
        The parsed TOML table.
    section : str
        The table's name, for messages.
    path : str or PathLike, optional
        The protocol file, for messages.

    Returns
    -------
    instance of `cls`
    """
    if not isinstance(table, dict):
        raise ProtocolError(
            f"[{section}] must be a table of key = value lines, got {_describe(table)}", path=path
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ProtocolError(
                f"unknown key [{section}] {key}; allowed keys: {', '.join(fields)}",
                path=path,
            )
        try:
            kwargs[key] = _coerce(value, hints[key])
        except _Invalid as exc:
            raise ProtocolError(f"[{section}] {key} = {_describe(value)}: {exc}", path=path) from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, CleihcError) as exc:
        reason = exc.reason if isinstance(exc, CleihcError) else str(exc)
        # Owners name their keys "cells.key" so the message reads alone in Python; here [cells] already says it.
        reason = reason.removeprefix(f"{section}.")
        raise ProtocolError(f"[{section}] {reason}", path=path) from None


# ----------------------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------------------
# Tables owned by other modules: table name -> (module, class). Imported on first use (those modules are heavier
# and some import this one indirectly through the pipeline).
_EXTERNAL_TABLES: dict[str, tuple[str, str]] = {
    "tissue": ("cleihc.tissue", "TissueParams"),
    "cells": ("cleihc.cells", "CellParams"),
    "compartments": ("cleihc.regions", "CompartmentParams"),
}

_OWN_TABLES: dict[str, type] = {
    "background": BackgroundParams,
    "analysis": AnalysisParams,
    "thresholds": Thresholds,
    "regions": RegionsParams,
    "metrics": MetricsParams,
}

_TABLE_ORDER = (
    "protocol",
    "stains",
    "background",
    "analysis",
    "thresholds",
    "tissue",
    "cells",
    "compartments",
    "regions",
    "metrics",
)


def _external_class(table: str) -> type:
    module, name = _EXTERNAL_TABLES[table]
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Protocol:
    """A validated protocol (see the module docstring and ``docs/stains.md``).

    Attributes
    ----------
    name, version, description : str
        ``[protocol]``: identity (version is semantic: MAJOR.MINOR.PATCH).
    measure : tuple of {"area", "cells"}
        What to measure: percent positive area, positive cells, or both.
    target : str
        The measured stain (e.g. "dab", "alcian_blue", "colloidal_iron").
    counterstain : str
        The counterstain (e.g. "hematoxylin", "nuclear_fast_red"): finds nuclei and skin compartments.
    stains : StainsParams
    background : BackgroundParams
    analysis : AnalysisParams
    thresholds : Thresholds
    tissue : cleihc.tissue.TissueParams
    cells : cleihc.cells.CellParams
    compartments : cleihc.regions.CompartmentParams
    regions : RegionsParams
    metrics : MetricsParams
    source : str
        Where it was read from ("" if built in memory); not part of the hash.
    """

    name: str
    version: str
    description: str
    measure: tuple[str, ...]
    target: str
    counterstain: str
    stains: StainsParams
    background: BackgroundParams
    analysis: AnalysisParams
    thresholds: Thresholds
    tissue: Any
    cells: Any
    compartments: Any
    regions: RegionsParams
    metrics: MetricsParams
    source: str = field(default="", compare=False)

    @property
    def schema(self) -> int:
        """The protocol schema version (1)."""
        return SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The resolved protocol as plain JSON-serialisable data, table by table (the provenance record).

        :meth:`from_dict` reads it back; every default is explicit and the stains are given as vectors.
        """
        return {
            "protocol": {
                "name": self.name,
                "version": self.version,
                "schema": SCHEMA_VERSION,
                "description": self.description,
                "measure": list(self.measure),
                "target": self.target,
                "counterstain": self.counterstain,
            },
            "stains": self.stains.to_dict(),
            "background": _dataclass_to_dict(self.background),
            "analysis": _dataclass_to_dict(self.analysis),
            "thresholds": _dataclass_to_dict(self.thresholds),
            "tissue": _dataclass_to_dict(self.tissue),
            "cells": _dataclass_to_dict(self.cells),
            "compartments": _dataclass_to_dict(self.compartments),
            "regions": _dataclass_to_dict(self.regions),
            "metrics": _dataclass_to_dict(self.metrics),
        }

    @property
    def canonical_json(self) -> str:
        """The canonical JSON text hashed by :attr:`sha256` (sorted keys, no spaces, exact float repr)."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )

    @property
    def sha256(self) -> str:
        """Hex sha256 of :attr:`canonical_json`: equal for equal content, whatever the file's formatting."""
        return hashlib.sha256(self.canonical_json.encode("utf-8")).hexdigest()

    def to_toml(self) -> str:
        """The resolved protocol as TOML text (loads back to an equal protocol with the same sha256)."""
        header = (
            f"# cleihc protocol {self.name} {self.version}, resolved: every value explicit.\n"
            f"# sha256 of the resolved content: {self.sha256}\n"
            "# Sections are explained in docs/stains.md and in the built-in protocols' comments.\n\n"
        )
        return header + _dumps_toml(self.to_dict())

    def resolved(
        self,
        *,
        stains: StainMatrix | None = None,
        background: tuple[float, float, float] | np.ndarray | None = None,
    ) -> Protocol:
        """A copy with the stain vectors and I0 actually used on a slide, fixed (estimate = "fixed", mode = "fixed").

        Measuring with the resolved protocol reproduces the run without re-estimating anything.

        Parameters
        ----------
        stains : StainMatrix, optional
            The vectors used (e.g. Macenko estimates); its stains must include the target and counterstain.
        background : three floats, optional
            I0 used; defaults to ``stains.background_rgb`` when `stains` is given.
        """
        st = self.stains
        bg = self.background
        if stains is not None:
            names = stains.stain_names
            for role, name in (("target", self.target), ("counterstain", self.counterstain)):
                if name not in names:
                    raise ProtocolError(f"resolved stains {names} lack the protocol's {role} {name!r}")
            if background is None:
                background = stains.background_rgb
            vectors = tuple(
                (n, tuple(float(x) for x in stains.od_vectors[i]))
                for i, n in enumerate(stains.names)
                if n != RESIDUAL or len(names) == 3
            )
            st = dataclasses.replace(st, preset="", vectors=vectors, estimate="fixed", matrix=stains)
        if background is not None:
            rgb = tuple(float(v) for v in np.asarray(background, dtype=np.float64).reshape(-1))
            try:
                bg = BackgroundParams(mode="fixed", rgb=rgb)  # type: ignore[arg-type]
            except ValueError as exc:
                raise ProtocolError(f"[background] {exc}") from None
            st = dataclasses.replace(st, matrix=st.matrix.with_background(bg.rgb))
        elif stains is not None:
            bg = dataclasses.replace(bg, mode="fixed")
        return dataclasses.replace(self, stains=st, background=bg)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | os.PathLike[str] = "") -> Protocol:
        """Validate parsed protocol data (a TOML document or :meth:`to_dict` output)."""
        return _parse(dict(data), path=source or None)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    """A scalar, list or flat table as TOML (JSON string escapes are valid TOML basic-string escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write non-finite number {value!r} to a protocol")
        return repr(value)  # shortest repr: reads back to the same float
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to a protocol")


def _dumps_toml(data: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML text of a two-level document (tables of values), one `key = value` per line."""
    parts = []
    for table, values in data.items():
        lines = [f"[{_toml_key(table)}]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _require(table: dict[str, Any], key: str, section: str, path: Any) -> Any:
    if key not in table:
        raise ProtocolError(
            f"[{section}] {key} is missing; add it (see the built-in protocols for examples)", path=path
        )
    return table[key]


def _parse_header(table: Any, path: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ProtocolError("[protocol] must be a table: start the file with a [protocol] section", path=path)
    allowed = ("name", "version", "schema", "description", "measure", "target", "counterstain")
    for key in table:
        if key not in allowed:
            raise ProtocolError(
                f"unknown key [protocol] {key}; allowed keys: {', '.join(allowed)}", path=path
            )
    schema = _require(table, "schema", "protocol", path)
    if isinstance(schema, bool) or not isinstance(schema, int) or schema != SCHEMA_VERSION:
        raise ProtocolError(
            f"[protocol] schema = {_describe(schema)}: this cleihc reads schema {SCHEMA_VERSION}; "
            "upgrade cleihc or convert the file",
            path=path,
        )
    out: dict[str, Any] = {}
    for key in ("name", "version", "description", "target", "counterstain"):
        value = table.get(key, "") if key == "description" else _require(table, key, "protocol", path)
        if not isinstance(value, str):
            raise ProtocolError(
                f"[protocol] {key} = {_describe(value)}: must be a text string in quotes", path=path
            )
        out[key] = value
    if not _NAME_RE.match(out["name"]):
        raise ProtocolError(
            f"[protocol] name = {_describe(out['name'])}: use 1-64 letters, digits, '_', '-' or '.'",
            path=path,
        )
    if not _SEMVER_RE.match(out["version"]):
        raise ProtocolError(
            f'[protocol] version = {_describe(out["version"])}: use a semantic version such as "1.0.0"',
            path=path,
        )
    measure = _require(table, "measure", "protocol", path)
    if (
        not isinstance(measure, list)
        or not measure
        or not all(isinstance(m, str) and m in _MEASURES for m in measure)
        or len(set(measure)) != len(measure)
    ):
        raise ProtocolError(
            f"[protocol] measure = {_describe(measure)}: must be a list of distinct values from "
            f"{', '.join(repr(m) for m in _MEASURES)}",
            path=path,
        )
    out["measure"] = tuple(measure)
    return out


def _parse_stains(table: Any, background_rgb: tuple[float, float, float], path: Any) -> StainsParams:
    if not isinstance(table, dict):
        raise ProtocolError('[stains] must be a table with preset = "..." or vectors = { ... }', path=path)
    allowed = ("preset", "vectors", "estimate", "drift_tolerance_deg", "drift_action")
    for key in table:
        if key not in allowed:
            raise ProtocolError(f"unknown key [stains] {key}; allowed keys: {', '.join(allowed)}", path=path)
    preset = table.get("preset", "")
    if not isinstance(preset, str) or (preset and preset not in PRESETS):
        raise ProtocolError(
            f"[stains] preset = {_describe(preset)}: must be one of {', '.join(available_presets())}",
            path=path,
        )
    raw_vectors = table.get("vectors")
    if raw_vectors is None and not preset:
        raise ProtocolError('[stains] needs preset = "..." or vectors = { name = [r, g, b], ... }', path=path)
    if raw_vectors is None:
        names, vecs = PRESETS[preset]
        vectors = tuple((n, tuple(float(x) for x in v)) for n, v in zip(names, vecs, strict=True))
    else:
        if not isinstance(raw_vectors, dict) or not 2 <= len(raw_vectors) <= 3:
            raise ProtocolError(
                f"[stains] vectors = {_describe(raw_vectors)}: must be a table of 2 or 3 stains, "
                "e.g. { hematoxylin = [0.65, 0.70, 0.29], dab = [0.27, 0.57, 0.78] }",
                path=path,
            )
        items = []
        for name, v in raw_vectors.items():
            if not _STAIN_NAME_RE.match(name) or name == RESIDUAL:
                raise ProtocolError(
                    f"[stains] vectors: stain name {_describe(name)} must be a lower-case word (a-z, 0-9, _) "
                    "other than 'residual'",
                    path=path,
                )
            try:
                rgb = _coerce(v, tuple[float, float, float])
            except _Invalid:
                raise ProtocolError(
                    f"[stains] vectors.{name} = {_describe(v)}: must be three numbers [r, g, b] (optical density)",
                    path=path,
                ) from None
            if max(abs(x) for x in rgb) > _MAX_VECTOR_COMPONENT:
                raise ProtocolError(
                    f"[stains] vectors.{name} = {_describe(v)}: components must be optical densities from 0 to "
                    f"{_MAX_VECTOR_COMPONENT:g} (only the direction counts: [0.65, 0.70, 0.29] = [65, 70, 29]); "
                    "an RGB colour (0-255) is not an OD vector: measure one with `cleihc stains estimate`",
                    path=path,
                )
            items.append((name, rgb))
        vectors = tuple(items)
        if preset and {n for n, _ in vectors} != set(PRESETS[preset][0]):
            raise ProtocolError(
                f"[stains] vectors name {[n for n, _ in vectors]} but preset {preset!r} has stains "
                f"{list(PRESETS[preset][0])}: name the same stains, or drop the preset",
                path=path,
            )
    estimate = table.get("estimate", "fixed")
    tol = table.get("drift_tolerance_deg", 10.0)
    action = table.get("drift_action", "warn")
    try:
        estimate = _coerce(estimate, Literal["fixed", "macenko"])
    except _Invalid as exc:
        raise ProtocolError(f"[stains] estimate = {_describe(estimate)}: {exc}", path=path) from None
    try:
        tol = _coerce(tol, float)
        if not 0.0 < tol <= 90.0:
            raise _Invalid("must be an angle in (0, 90] degrees")
    except _Invalid as exc:
        raise ProtocolError(f"[stains] drift_tolerance_deg = {_describe(tol)}: {exc}", path=path) from None
    try:
        action = _coerce(action, Literal["warn", "fail"])
    except _Invalid as exc:
        raise ProtocolError(f"[stains] drift_action = {_describe(action)}: {exc}", path=path) from None
    try:
        matrix = StainMatrix(
            tuple(n for n, _ in vectors),
            np.asarray([v for _, v in vectors], dtype=np.float64),
            background_rgb,
        )
    except CleihcError as exc:
        raise ProtocolError(f"[stains] vectors: {exc.reason}", path=path) from None
    return StainsParams(preset, vectors, estimate, tol, action, matrix)


def _check_cells_resolution(analysis: Any, path: Any) -> None:
    """Refuse an ``[analysis] mpp_um`` too coarse to resolve nuclei in a protocol that measures cells.

    Checked on the raw value before ``[analysis]`` is built, so ``mpp_um = 20`` (a unit mistake) is reported as
    what it is rather than as a conflict with ``raster_mpp_um``; other problems with the value are left to
    :func:`build_params`. Measuring cells that coarse gives wrong counts silently, never an error, hence a refusal.
    """
    if not isinstance(analysis, dict):
        return
    mpp = analysis.get("mpp_um")
    if isinstance(mpp, float) and not math.isfinite(mpp):
        return  # inf and nan: build_params says "must be a finite number", the actual problem
    if isinstance(mpp, int | float) and not isinstance(mpp, bool) and mpp > CELLS_MAX_MPP_UM:
        raise ProtocolError(
            f"[analysis] mpp_um = {_describe(mpp)}: a protocol that measures cells needs at most "
            f"{CELLS_MAX_MPP_UM} µm per pixel (nuclei are 5-10 µm across; coarser pixels merge and miss them: "
            'at 2 µm/px CD3 found 16 of 219 positive cells); use 0.5 (a 20x scan), or measure = ["area"] only',
            path=path,
        )


def _parse(data: dict[str, Any], *, path: Any) -> Protocol:
    for key in data:
        if key not in _TABLE_ORDER:
            raise ProtocolError(
                f"unknown table [{key}]; allowed tables: {', '.join(_TABLE_ORDER)}", path=path
            )
    if "protocol" not in data:
        raise ProtocolError(
            "the [protocol] table is missing; start the file with [protocol] name = ...", path=path
        )
    header = _parse_header(data["protocol"], path)
    if "cells" in header["measure"]:
        _check_cells_resolution(data.get("analysis"), path)
    own = {
        name: build_params(cls, data.get(name, {}), section=name, path=path)
        for name, cls in _OWN_TABLES.items()
    }
    external = {
        name: build_params(_external_class(name), data.get(name, {}), section=name, path=path)
        for name in _EXTERNAL_TABLES
    }
    stains = _parse_stains(_require(data, "stains", "stains", path), own["background"].rgb, path)
    names = stains.matrix.stain_names
    for role in ("target", "counterstain"):
        if header[role] not in names:
            raise ProtocolError(
                f"[protocol] {role} = {header[role]!r} is not one of the stains {', '.join(names)}", path=path
            )
    if header["target"] == header["counterstain"]:
        raise ProtocolError("[protocol] target and counterstain must be different stains", path=path)
    return Protocol(
        name=header["name"],
        version=header["version"],
        description=header["description"],
        measure=header["measure"],
        target=header["target"],
        counterstain=header["counterstain"],
        stains=stains,
        background=own["background"],
        analysis=own["analysis"],
        thresholds=own["thresholds"],
        tissue=external["tissue"],
        cells=external["cells"],
        compartments=external["compartments"],
        regions=own["regions"],
        metrics=own["metrics"],
        source="" if path is None else str(path),
    )


# ----------------------------------------------------------------------------------------------------------------
# Files and lookup
# ----------------------------------------------------------------------------------------------------------------
def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ProtocolError("protocol file not found; check the path", path=path) from None
    except IsADirectoryError:
        raise ProtocolError("is a folder, not a protocol file; give a .toml file", path=path) from None
    except PermissionError:
        raise ProtocolError(
            "protocol file is not readable by this user; check its permissions", path=path
        ) from None
    except OSError as exc:
        raise ProtocolError(f"cannot read the protocol file ({exc.strerror or exc})", path=path) from None
    try:
        # utf-8-sig: Windows Notepad saves UTF-8 with a byte-order mark, which TOML would read as a stray character.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ProtocolError("is not UTF-8 text; save the protocol as UTF-8 TOML", path=path) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProtocolError(f"is not valid TOML ({exc}); fix the syntax", path=path) from None
    except (ValueError, RecursionError) as exc:  # e.g. pathological nesting
        raise ProtocolError(f"is not valid TOML ({type(exc).__name__}); fix the syntax", path=path) from None


def protocol_search_path() -> list[Path]:
    """Folders searched by name, in order: ``$CLEIHC_PROTOCOL_PATH`` entries, ``./protocols``, the built-ins.

    ``$CLEIHC_PROTOCOL_PATH`` entries that are not folders are left out, with one logged warning naming them.
    """
    return [folder for folder, _ in _search_folders()]


def _search_folders() -> list[tuple[Path, str]]:
    """The search path with where each folder comes from ("$CLEIHC_PROTOCOL_PATH", "./protocols", "built-in")."""
    entries = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    _warn_bad_env_entries(tuple(entries))
    builtin = _builtin_dir()
    folders = [(Path(p), f"${ENV_VAR}") for p in entries if Path(p).is_dir()]
    folders.append((Path.cwd() / "protocols", "./protocols"))
    folders.append((builtin, "built-in"))
    unique: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for f, origin in folders:  # the same folder twice (e.g. run from the source tree) is searched once
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            # Run from the source tree, ./protocols *is* the built-ins: say so rather than call them local.
            unique.append((f, "built-in" if key == builtin.resolve() else origin))
    return unique


@functools.lru_cache(maxsize=8)
def _warn_bad_env_entries(entries: tuple[str, ...]) -> None:
    # Cached on the variable's value: every lookup walks the search path, and one warning per run is enough.
    bad = []
    for entry in entries:
        path = Path(entry)
        if path.is_file():
            bad.append(f"{entry} (a file: list the folder that holds it)")
        elif not path.is_dir():
            bad.append(f"{entry} (does not exist)")
    if bad:
        logger.warning("$%s: ignoring entries that are not folders: %s", ENV_VAR, "; ".join(bad))


def _builtin_dir() -> Path:
    return Path(str(importlib.resources.files(BUILTIN_PACKAGE)))


def builtin_protocol(name: str) -> Path | None:
    """The built-in protocol file of that name, or None (a local file of the same name hides it by name)."""
    path = _builtin_dir() / f"{name}.toml"
    return path if path.is_file() else None


def find_protocol(name_or_path: str | os.PathLike[str]) -> Path:
    """The protocol file for a path or a name (see the module docstring for the search order).

    Raises
    ------
    ProtocolError
        Nothing found; the message lists the protocols that exist.
    """
    text = os.fspath(name_or_path)
    candidate = Path(text)
    if candidate.is_file():
        return candidate
    if candidate.is_dir() and (os.sep in text or text in (".", "..")):
        raise ProtocolError(
            "is a folder, not a protocol file; give a .toml file or a protocol name", path=text
        )
    looks_like_path = (
        text.endswith(".toml") or os.sep in text or (os.altsep is not None and os.altsep in text)
    )
    if looks_like_path:
        raise ProtocolError("protocol file not found; check the path or give a protocol name", path=text)
    if not _NAME_RE.match(text):
        raise ProtocolError(f"{text!r} is not a protocol name or an existing file")
    for folder in protocol_search_path():
        path = folder / f"{text}.toml"
        if path.is_file():
            return path
    names = sorted(
        {p.stem for folder in protocol_search_path() if folder.is_dir() for p in folder.glob("*.toml")}
    )
    raise ProtocolError(
        f"no protocol named {text!r}; available: {', '.join(names) or 'none'} "
        f"(searched ${ENV_VAR}, ./protocols and the built-ins)"
    )


def load_protocol(name_or_path: str | os.PathLike[str]) -> Protocol:
    """Find, read and validate a protocol.

    Parameters
    ----------
    name_or_path : str or PathLike
        A TOML file, or a protocol name such as ``"cd3"`` (see :func:`find_protocol`).

    Returns
    -------
    Protocol

    Raises
    ------
    ProtocolError
        Not found, unreadable, not TOML, an unknown key or an invalid value; one line naming the file.

    Notes
    -----
    Logs a warning (one line naming the file) when the file's stem differs from its ``[protocol] name`` (results
    folders and tables use the latter, while ``--protocol NAME`` selects by the former), and when an area-only
    protocol sets ``[cells]`` values, which are then ignored.
    """
    path = find_protocol(name_or_path)
    data = _read_toml(path)
    proto = _parse(data, path=path)
    if path.stem != proto.name:
        # Results folders (cleihc-results/NAME), table rows and `cleihc report`'s reference vectors all go by the
        # [protocol] name, so a copy named my-cd3.toml that keeps name = "cd3" mixes with the built-in cd3.
        logger.warning(
            "%s: the file name %r differs from its [protocol] name = %r, which names the results folder and "
            "table rows (and --protocol %s selects %s.toml, not this file): make them the same",
            path,
            path.stem,
            proto.name,
            proto.name,
            proto.name,
        )
    ignored = _ignored_cells_keys(data, proto)
    if ignored:
        logger.warning(
            '%s: [cells] %s ignored: measure = ["area"] counts no cells; remove them, or add "cells" to measure',
            path,
            ", ".join(ignored) + (" is" if len(ignored) == 1 else " are"),
        )
    return proto


def _ignored_cells_keys(data: Mapping[str, Any], proto: Protocol) -> list[str]:
    """``[cells]`` keys an area-only protocol sets to a value other than the default (they change nothing).

    A warning, not an error: ``cleihc protocols show`` writes every table with its defaults, so an area protocol
    started from its output carries a full ``[cells]`` table, and values that are not used cannot change a
    result. Only non-default values are named, so such a file loads silently while a real edit is pointed out.
    """
    if "cells" in proto.measure or not isinstance(data.get("cells"), dict):
        return []
    defaults = type(proto.cells)()
    return [key for key in data["cells"] if getattr(proto.cells, key) != getattr(defaults, key)]


def list_protocols() -> list[ProtocolInfo]:
    """Every protocol on the search path, by the name that selects it (the file's stem), sorted by name.

    A name found earlier shadows later files of the same name (recorded in :attr:`ProtocolInfo.shadows`). Files
    that fail validation are skipped with a logged warning naming the problem; a broken file still takes its name
    (lookup stops there), so a later file of that name is not listed as if it could be selected.
    """
    found: dict[str, list[tuple[Path, str]]] = {}
    for folder, origin in _search_folders():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, []).append((path, origin))
    infos = []
    for stem in sorted(found):
        (path, origin), *hidden = found[stem]
        shadows = tuple(hidden)
        try:
            p = _parse(_read_toml(path), path=path)
        except ProtocolError as exc:
            also = f" (and hides {', '.join(str(p) for p, _ in shadows)})" if shadows else ""
            logger.warning("%s; skipped%s", exc, also)
            continue
        infos.append(
            ProtocolInfo(
                stem,
                p.version,
                p.description,
                path,
                protocol_name="" if p.name == stem else p.name,
                origin=origin,
                shadows=shadows,
            )
        )
    return infos
