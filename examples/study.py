"""Shared pieces of the statistics scripts in this folder: reading the study table, choosing what to compare,
Benjamini–Hochberg q-values, the common command-line options and the written output.

Not a script: ``paired_pre_post.py``, ``responders.py``, ``correlate_stains.py`` and ``mixed_model.py`` import it
(``from study import ...``), which works when they are run as scripts because Python puts their folder on
``sys.path``; to import a script from elsewhere, put this folder on ``sys.path`` first.

The study table is the tidy table written by ``cleihc tables``: one row per slide × region × metric, with columns
subject, timepoint, stain, region, metric and value (subject and timepoint come from ``--name-pattern`` or
``--samples`` at quantify time).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

#: Each stain's headline metric is the first of these it has values for: percent positive area for stains measured
#: by area (CXCL10, mucin), else positive cells per mm² (cell stains such as CD3, CD8).
HEADLINE_METRICS = ("positive_area_percent", "positive_cells_per_mm2")
#: Columns every study table must have.
REQUIRED = ("subject", "timepoint", "stain", "region", "metric", "value")
#: Labels read as the earlier visit when the table holds exactly two timepoints (compared lower-case).
EARLY_TIMEPOINTS = ("screening", "baseline", "pre", "before", "w0", "week0", "day0", "d0", "v1")
#: Labels read as the later visit when the table holds exactly two timepoints (compared lower-case).
LATE_TIMEPOINTS = ("post", "after", "end")


def read_study(
    path: str | Path, *, timepoint_required: bool = True, keep_flagged: bool = False
) -> pd.DataFrame:
    """Read the tidy study table and check its columns.

    Parameters
    ----------
    path : str or pathlib.Path
        The table written by ``cleihc tables`` (``.csv``, or ``.parquet`` by its suffix).
    timepoint_required : bool
        When False, a table without a ``timepoint`` column is accepted and every row gets timepoint ``"all"``
        (for analyses that do not compare visits).
    keep_flagged : bool
        Keep the slides a reviewer flagged (``review == "flagged"``: a fold, a failed stain). By default they
        are left out, and the slides left out are named on stderr.

    Returns
    -------
    pandas.DataFrame
        The table, with subject and timepoint as text (missing values stay missing), so that subjects ``1`` and
        ``"1"`` or timepoints ``0`` and ``"0"`` from different sources match.

    Raises
    ------
    SystemExit
        With a one-line message naming the file and the fix, when it is absent or lacks a required column.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(
            f"{path}: no such file; give the table written by `cleihc tables ... --out study.csv`"
        )
    df = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    required = REQUIRED if timepoint_required else tuple(c for c in REQUIRED if c != "timepoint")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SystemExit(
            f"{path}: missing column(s) {', '.join(missing)}; make the table with `cleihc tables` from results "
            "quantified with --name-pattern or --samples giving subject and timepoint"
        )
    if "review" in df.columns and not keep_flagged:
        flagged = df["review"].astype(str).eq("flagged")
        if flagged.any():
            names = sorted(set(df.loc[flagged, "slide"].astype(str))) if "slide" in df.columns else []
            print(
                f"{path}: left out {len(names)} slide(s) flagged in review ({', '.join(names)}); "
                "--keep-flagged keeps them",
                file=sys.stderr,
            )
            df = df.loc[~flagged].reset_index(drop=True)
    if "timepoint" not in df.columns:
        df["timepoint"] = "all"
    df["subject"] = df["subject"].astype(str)
    df["timepoint"] = df["timepoint"].astype(str)
    return df


def two_timepoints(study: pd.DataFrame, pre: str | None, post: str | None) -> tuple[str, str]:
    """The baseline and follow-up labels to compare.

    Parameters
    ----------
    study : pandas.DataFrame
        The study table (only its ``timepoint`` column is read).
    pre, post : str or None
        Labels given by the user; either may be None.

    Returns
    -------
    tuple of str
        ``(pre, post)``: as given, else ``"pre"`` and ``"post"`` when the table has both, else the table's only two
        timepoints in study order (a label in :data:`EARLY_TIMEPOINTS` first, one in :data:`LATE_TIMEPOINTS`
        last, otherwise alphabetical). A label given by the user always wins.

    Raises
    ------
    SystemExit
        When the table holds other than two timepoints and neither pre/post nor both labels were given.
    """
    present = sorted(set(study["timepoint"].dropna().astype(str)))
    if pre and post:
        return pre, post
    if {"pre", "post"} <= set(present):
        return pre or "pre", post or "post"
    if len(present) == 2:
        a, b = present
        if b.lower() in EARLY_TIMEPOINTS or a.lower() in LATE_TIMEPOINTS:
            a, b = b, a
        return pre or a, post or b
    raise SystemExit(f"timepoints in the table: {', '.join(present)}; choose two with --pre and --post")


def headline_metrics(study: pd.DataFrame) -> dict[str, str]:
    """The headline metric of each stain.

    Parameters
    ----------
    study : pandas.DataFrame
        The study table.

    Returns
    -------
    dict of str to str
        Stain → the first of :data:`HEADLINE_METRICS` with at least one value for that stain: percent positive
        area when measured (area stains such as CXCL10 or mucin), else positive cells per mm² (cell stains such as
        CD3, CD8). Stains with neither are absent.
    """
    out = {}
    for stain, g in study.groupby("stain"):
        present = set(g.loc[g["value"].notna(), "metric"])
        metric = next((m for m in HEADLINE_METRICS if m in present), None)
        if metric is not None:
            out[str(stain)] = metric
    return out


def select_metrics(study: pd.DataFrame, metrics: list[str] | None = None) -> pd.Series:
    """Which rows of the study table to analyse.

    Parameters
    ----------
    study : pandas.DataFrame
        The study table.
    metrics : list of str, optional
        Metrics to keep, for every stain. By default each stain's headline metric (:func:`headline_metrics`).

    Returns
    -------
    pandas.Series of bool
        A row mask aligned with `study`.
    """
    if metrics:
        return study["metric"].isin(metrics)
    return study["metric"] == study["stain"].astype(str).map(headline_metrics(study))


def paired_table(
    study: pd.DataFrame, *, metrics: list[str] | None = None, pre: str = "pre", post: str = "post"
) -> pd.DataFrame:
    """One row per subject × stain × region × metric with the pre and post values and the change (post − pre).

    Parameters
    ----------
    study : pandas.DataFrame
        The study table.
    metrics : list of str, optional
        Metrics to pair (default: each stain's headline metric).
    pre, post : str
        The baseline and follow-up timepoint labels.

    Returns
    -------
    pandas.DataFrame
        Columns subject, stain, region, metric, pre, post, change. Subjects lacking either timepoint are left out
        of that comparison; replicate slides of one subject, stain, region and timepoint are averaged.
    """
    sel = study["timepoint"].astype(str).isin([pre, post]) & select_metrics(study, metrics)
    d = study[sel].dropna(subset=["value"])
    keys = ["subject", "stain", "region", "metric"]
    wide = d.pivot_table(index=keys, columns=d["timepoint"].astype(str), values="value", aggfunc="mean")
    if pre not in wide.columns or post not in wide.columns:
        return pd.DataFrame(columns=[*keys, "pre", "post", "change"])
    wide = wide[[pre, post]].dropna().rename(columns={pre: "pre", post: "post"})
    wide.columns.name = None
    wide["change"] = wide["post"] - wide["pre"]
    return wide.reset_index()


def with_q_values(results: pd.DataFrame) -> pd.DataFrame:
    """Add Benjamini–Hochberg false-discovery-rate q-values over all tests in a results table.

    Parameters
    ----------
    results : pandas.DataFrame
        One row per test, with a ``p_value`` column (rows without a p-value are left out of the adjustment).

    Returns
    -------
    pandas.DataFrame
        A copy with a last column ``q_value`` (NaN where there is no p-value); an empty table is returned as is.

    References
    ----------
    Benjamini Y, Hochberg Y (1995) Controlling the false discovery rate: a practical and powerful approach to
    multiple testing. J R Stat Soc B 57:289–300 (statsmodels ``multipletests(method="fdr_bh")``).
    """
    from statsmodels.stats.multitest import multipletests

    if results.empty:
        return results
    out = results.copy()
    out["q_value"] = np.nan
    if "p_value" in out:
        ok = out["p_value"].notna()
        if ok.any():
            out.loc[ok, "q_value"] = multipletests(out.loc[ok, "p_value"], method="fdr_bh")[1]
    return out


def study_parser(doc: str) -> argparse.ArgumentParser:
    """A command-line parser with the study table and the output folder.

    Parameters
    ----------
    doc : str
        The script's docstring; its first paragraph is the ``--help`` description.

    Returns
    -------
    argparse.ArgumentParser
        With the positional ``study``, ``--out`` (default ``stats``) and ``--keep-flagged``; the script adds its
        own options.
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("study", help="tidy study table from `cleihc tables` (.csv or .parquet)")
    p.add_argument("--out", default="stats", help="output folder (default ./stats)")
    p.add_argument(
        "--keep-flagged", action="store_true", help="keep slides flagged in review (left out by default)"
    )
    return p


def add_timepoint_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--pre`` and ``--post`` (resolved later by :func:`two_timepoints`) to `parser`."""
    parser.add_argument("--pre", help="label of the baseline timepoint (default pre, or the earlier of two)")
    parser.add_argument("--post", help="label of the follow-up timepoint (default post, or the later of two)")


def add_metric_option(parser: argparse.ArgumentParser, *, verb: str = "compare") -> None:
    """Add the repeatable ``--metric`` (default: each stain's headline metric) to `parser`."""
    parser.add_argument(
        "--metric", action="append", help=f"metric(s) to {verb} (default: each stain's headline metric)"
    )


def write_tables(out: str | Path, tables: Mapping[str, pd.DataFrame]) -> list[Path]:
    """Write result tables as CSV files into an output folder, creating it.

    Parameters
    ----------
    out : str or pathlib.Path
        The output folder.
    tables : mapping of str to pandas.DataFrame
        File name → table (written without the index).

    Returns
    -------
    list of pathlib.Path
        The files written, in the order of `tables`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in tables.items():
        table.to_csv(out / name, index=False)
        written.append(out / name)
    return written


def print_results(
    results: pd.DataFrame, written: list[Path], *, empty: str, columns: list[str] | None = None
) -> int:
    """Print a results table and the files written; the script's exit status.

    Parameters
    ----------
    results : pandas.DataFrame
        The results (numbers printed to 4 significant digits).
    written : list of pathlib.Path
        The files written, named on the last line.
    empty : str
        Printed instead when `results` is empty, saying why there was nothing to test.
    columns : list of str, optional
        The columns to print (default all).

    Returns
    -------
    int
        0, or 1 when `results` is empty.
    """
    if results.empty:
        print(empty)
        return 1
    shown = results if columns is None else results[columns]
    with pd.option_context("display.width", 200, "display.max_rows", 300):
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"written: {', '.join(map(str, written))}")
    return 0
