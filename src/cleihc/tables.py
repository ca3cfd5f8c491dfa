"""Study tables: the long, tidy table that statistics read (pandas, R).

``tidy(dirs)`` melts the ``regions`` tables of one or more results folders (one per stain, typically) into one
row per slide × region × metric, with the metric's unit in its own column::

    subject, timepoint, group, slide, stain, region, metric, value, unit

Study metadata columns come first when known (from ``--samples`` or ``--name-pattern`` at quantify time).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cleihc.errors import CleihcError
from cleihc.outputs import read_slide_records

log = logging.getLogger(__name__)

__all__ = [
    "ID_COLUMNS",
    "metric_unit",
    "mixed_protocols",
    "regions_table",
    "regions_table_with_metadata",
    "tidy",
]

#: Columns that identify a row rather than measure something.
ID_COLUMNS = ("slide", "path", "stain", "protocol", "protocol_sha256", "region", "corrected", "review")

_METADATA_ORDER = ("subject", "timepoint", "group")


def metric_unit(metric: str) -> str:
    """The unit of a metric, read from its name (every number carries its unit in its name)."""
    rules = (
        ("_per_mm2", "1/mm2"),
        ("_mm2", "mm2"),
        ("_um2", "um2"),
        ("_percent", "%"),
        ("_od", "OD"),
        ("h_score", "score 0-300"),
        ("ppc_positivity", "ratio"),
    )
    for suffix, unit in rules:
        if metric.endswith(suffix):
            return unit
    if metric.startswith("ppc_n"):
        return "pixels"
    if metric.startswith("cells_") or metric.endswith("_cells"):
        return "cells"
    return ""


def regions_table(folder: str | os.PathLike[str]) -> pd.DataFrame:
    """The per-region table of one results folder, rebuilt from its per-slide records."""
    return regions_table_with_metadata(Path(folder))[0]


def regions_table_with_metadata(folder: str | os.PathLike[str]) -> tuple[pd.DataFrame, list[str]]:
    """The per-region table of one results folder and its study-metadata columns (as the records name them).

    A column is study metadata because ``--samples`` or ``--name-pattern`` gave it, whatever its values look
    like (a subject "101" is text); every other column is an identifier or a metric.

    Returns
    -------
    table : pandas.DataFrame
    metadata : list of str
    """
    folder = Path(folder)
    if not (folder / "slides").is_dir():
        if (folder / "run.json").is_file():  # a run whose every slide failed: nothing to add, nothing wrong
            log.warning("%s: no slide was measured in this results folder (see its failures.csv)", folder)
            return pd.DataFrame(), []
        raise CleihcError(
            "not a cleihc results folder (no slides/ inside); pass the --out folder of `cleihc quantify`",
            path=folder,
        )
    records = read_slide_records(folder)
    meta: dict[str, None] = {}
    for rec in records:
        if "metadata" in rec:
            meta.update(dict.fromkeys(rec["metadata"] or {}))
        elif rec["rows"]:  # a record from before the metadata field: the columns that lead "slide"
            cols = list(rec["rows"][0])
            meta.update(dict.fromkeys(cols[: cols.index("slide")] if "slide" in cols else []))
    table = pd.DataFrame([row for rec in records for row in rec["rows"]])
    if len(table):
        # A reviewer's verdict (napari review queue): a statistician keeps or drops flagged slides by it.
        from cleihc.corrections import review_status

        status = review_status(folder, slides=table["slide"].unique())
        table["review"] = table["slide"].map({slide: s["status"] for slide, s in status.items()})
    return table, list(meta)


def mixed_protocols(table: pd.DataFrame) -> list[str]:
    """Why a table's numbers of one stain are not comparable: its slides measured with different protocols.

    A protocol edited under the same name (new thresholds, estimated vectors) and used on some slides of a study
    leaves the others measured with the old one; the long table alone cannot tell them apart.

    Parameters
    ----------
    table : pandas.DataFrame
        Region rows with ``slide``, ``stain``, ``protocol`` and ``protocol_sha256``.

    Returns
    -------
    list of str
        One message per stain measured with more than one protocol (empty when there is none).
    """
    need = {"slide", "stain", "protocol", "protocol_sha256"}
    if table.empty or not need <= set(table.columns):
        return []
    out = []
    slides = table[list(need)].drop_duplicates(["slide", "stain"])
    for stain, group in slides.groupby("stain", sort=True):
        versions = group.groupby(["protocol", "protocol_sha256"], sort=True)["slide"].apply(sorted)
        if len(versions) < 2:
            continue
        parts = [
            f"{protocol} (sha256 {sha[:12]}...): {len(names)} slide(s), e.g. {names[0]}"
            for (protocol, sha), names in versions.items()
        ]
        out.append(
            f"stain {stain!r} was measured with {len(versions)} different protocols, so its slides are not "
            f"comparable: {'; '.join(parts)}; measure every slide with one protocol (cleihc quantify on all of "
            "them), or keep each protocol's results in their own --out folder"
        )
    return out


def _refuse_duplicates(folders: Sequence[Path], parts: Sequence[pd.DataFrame]) -> None:
    """Two results folders holding the same slide for the same stain would count it twice in any statistic."""
    seen: dict[tuple[str, str], Path] = {}
    for folder, part in zip(folders, parts, strict=True):
        if part.empty:
            continue
        for slide, stain in part[["slide", "stain"]].drop_duplicates().itertuples(index=False):
            first = seen.setdefault((slide, stain), folder)
            if first != folder:
                raise CleihcError(
                    f"slide {slide!r} stained {stain!r} is in two results folders ({first} and {folder}); "
                    "merge one run per stain, or remove the slide's record from one of them"
                )


def tidy(folders: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """One long table for all slides, stains and regions.

    Parameters
    ----------
    folders : sequence of path
        Results folders written by ``cleihc quantify``.

    Returns
    -------
    pandas.DataFrame
        Columns: the study metadata present (subject, timepoint, group, then any others), slide, stain, region,
        metric, value, unit, and last `corrected` (True where the row includes manual corrections) and `review`
        (the slide's review state: unreviewed, reviewed or flagged).
    """
    folders = list(dict.fromkeys(Path(f).resolve() for f in folders))  # a folder given twice counts once
    loaded = [regions_table_with_metadata(f) for f in folders]
    parts = [table for table, _ in loaded]
    _refuse_duplicates(folders, parts)
    wide = (
        pd.concat([p for p in parts if len(p)], ignore_index=True)
        if any(len(p) for p in parts)
        else pd.DataFrame()
    )
    if wide.empty:
        return pd.DataFrame(columns=["slide", "stain", "region", "metric", "value", "unit"])
    for message in mixed_protocols(wide):
        log.warning("%s", message)
    # Metadata by name (the records say which: a subject "101" is text), then any other text column; every
    # other column is a metric, even one empty in every row (an H-score the protocol turns off).
    named = {c for _, cols in loaded for c in cols}

    def numbers(col: pd.Series) -> bool:
        # Every value given is a number (an empty H-score of one protocol beside another's numbers included).
        return bool(pd.to_numeric(col, errors="coerce").notna().sum() == col.notna().sum())

    meta = [c for c in wide.columns if c not in ID_COLUMNS and (c in named or not numbers(wide[c]))]
    numeric = [c for c in wide.columns if c not in ID_COLUMNS and c not in meta]
    wide[numeric] = wide[numeric].apply(pd.to_numeric).astype(float)
    meta = [c for c in _METADATA_ORDER if c in meta] + [c for c in meta if c not in _METADATA_ORDER]
    ids = [*meta, "slide", "stain", "region"]
    ids += [c for c in ("corrected", "review") if c in wide.columns]
    long = wide.melt(id_vars=ids, value_vars=numeric, var_name="metric", value_name="value")
    long = long.dropna(subset=["value"])
    long["unit"] = long["metric"].map(metric_unit)
    long = long.sort_values([*ids, "metric"], kind="stable").reset_index(drop=True)
    # The contract's columns first; `corrected` and `review` last.
    order = [*meta, "slide", "stain", "region", "metric", "value", "unit"]
    return long[order + [c for c in long.columns if c not in order]]
