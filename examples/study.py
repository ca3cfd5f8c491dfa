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

from cleihc.report import order_timepoints

#: Each stain's headline metric is the first of these it has values for: percent positive area for stains measured
#: by area (CXCL10, mucin), else positive cells per mm² (cell stains such as CD3, CD8).
HEADLINE_METRICS = ("positive_area_percent", "positive_cells_per_mm2")
#: Columns every study table must have.
REQUIRED = ("subject", "timepoint", "stain", "region", "metric", "value")
#: The one numeric column of the study table; every other column (subject, timepoint, group, slide, ...) is text.
NUMERIC = "value"


def _as_text(column: pd.Series) -> pd.Series:
    """A column as text, missing values kept missing; whole numbers a parquet file stored as floats lose ``.0``."""
    if pd.api.types.is_float_dtype(column):
        known = column.dropna()
        if (np.isfinite(known) & known.eq(known.round())).all():
            # subject 101 stored as 101.0 (a float column because another row is empty) is the text "101"
            column = column.astype("Int64")
    return column.astype(object).map(str).where(column.notna())


def read_text_csv(path: str | Path, *, numeric: tuple[str, ...] = (), what: str = "table") -> pd.DataFrame:
    """Read a CSV file with every column as text except `numeric`, so identifiers keep their spelling.

    Parameters
    ----------
    path : str or pathlib.Path
        The CSV file.
    numeric : tuple of str
        Columns read as numbers (an empty cell, ``nan`` or ``NA`` is missing).
    what : str
        What the file is, for the message when it is absent.

    Returns
    -------
    pandas.DataFrame
        Text columns hold the cells as written (subject ``001`` stays ``"001"``, timepoint ``12`` stays ``"12"``
        even when another row is empty); only an empty cell is missing.

    Raises
    ------
    SystemExit
        With a one-line message naming the file, when it is absent or unreadable or a numeric column holds text.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; give the {what}")
    try:
        # only an empty cell is missing: a subject called "NA" or "None" is a name
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SystemExit(f"{path}: cannot read as CSV ({str(exc).strip().splitlines()[0]})") from None
    for col in numeric:
        if col in df.columns:
            text = df[col].str.strip()
            number = pd.to_numeric(text, errors="coerce")
            bad = number.isna() & text.notna() & ~text.str.lower().isin(["nan", "na", "n/a", "null", "none"])
            if bad.any():
                raise SystemExit(
                    f"{path}: column {col!r} holds {text[bad].iloc[0]!r} (line {int(bad.idxmax()) + 2}), "
                    "not a number"
                )
            df[col] = number.astype(float)
    return df


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
        The table with ``value`` as numbers and every other column (subject, timepoint, group, slide, ...) as text
        as written: subject ``001`` stays ``"001"`` and timepoint ``12`` stays ``"12"``, also when a slide without
        metadata leaves those cells empty (missing values stay missing), so that they match the labels given on
        the command line and in an outcome file.

    Raises
    ------
    SystemExit
        With a one-line message naming the file and the fix, when it is absent or lacks a required column.
    """
    path = Path(path)
    what = "table written by `cleihc tables ... --out study.csv`"
    if path.suffix.lower() == ".parquet":
        if not path.is_file():
            raise SystemExit(f"{path}: no such file; give the {what}")
        df = pd.read_parquet(path)
        for col in df.columns:
            if col != NUMERIC:
                df[col] = _as_text(df[col])
    else:
        df = read_text_csv(path, numeric=(NUMERIC,), what=what)
    required = REQUIRED if timepoint_required else tuple(c for c in REQUIRED if c != "timepoint")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SystemExit(
            f"{path}: missing column(s) {', '.join(missing)}; make the table with `cleihc tables` from results "
            "quantified with --name-pattern or --samples giving subject and timepoint"
        )
    if "review" in df.columns and not keep_flagged:
        flagged = df["review"].eq("flagged").fillna(False).astype(bool)
        if flagged.any():
            names = sorted(set(df.loc[flagged, "slide"].dropna())) if "slide" in df.columns else []
            print(
                f"{path}: left out {len(names)} slide(s) flagged in review ({', '.join(names)}); "
                "--keep-flagged keeps them",
                file=sys.stderr,
            )
            df = df.loc[~flagged].reset_index(drop=True)
    if "timepoint" not in df.columns:
        df["timepoint"] = "all"
    return df


def visit_word(label: str) -> str | None:
    """``"baseline"`` or ``"follow-up"`` when :func:`cleihc.report.order_timepoints` knows `label` as such a word."""
    # order_timepoints puts the baseline words it knows before every other label and the follow-up words after
    # them; "" sorts first and U+10FFFF last among the labels it does not know, so a label sorting before "" or
    # after U+10FFFF is one of its words (asked this way so that the examples and the report share one vocabulary)
    if not label.strip():
        return None
    if order_timepoints([label, ""])[0] == label:
        return "baseline"
    if order_timepoints([label, "\U0010ffff"])[-1] == label:
        return "follow-up"
    return None


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
        timepoints in study order as the report orders them (:func:`cleihc.report.order_timepoints`: baseline
        words such as pre, pretreatment, baseline, screening, w0 first, follow-up words such as post,
        posttreatment, followup, eot last, others in natural order, w4 before w12). When one label is given the
        other is the table's other timepoint. When the order is not decided by those words (neither label is
        one, or both are the same kind), it is a guess and stderr says so.

    Raises
    ------
    SystemExit
        When the table holds other than two timepoints and neither pre/post nor both labels were given.
    """
    present = order_timepoints(study["timepoint"].dropna().tolist())
    if pre and post:
        return pre, post
    if {"pre", "post"} <= set(present) and (pre or "pre") != (post or "post"):
        return pre or "pre", post or "post"
    if len(present) == 2:
        if pre or post:
            given = pre or post
            other = next((t for t in present if t != given), None)
            if other is not None and given in present:
                return (pre, other) if pre else (other, post)
        else:
            a, b = present
            kind = visit_word(a)
            if kind == visit_word(b):
                why = (
                    f"both are {kind} words"
                    if kind
                    else "neither is a word such as pre, baseline, post, followup"
                )
                print(
                    f"timepoints {a!r} and {b!r}: {why}, so {a!r} is taken as the baseline and {b!r} as the "
                    "follow-up only by natural order (numbers as numbers, else alphabetical); give --pre and "
                    "--post to be sure",
                    file=sys.stderr,
                )
            return a, b
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
        The results (numbers printed to 4 significant digits, missing values as ``NA``).
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
    # a missing value prints as NA in every column (the CSV leaves it empty): pandas prints NaN, <NA> or None by
    # dtype, and a converged flag printed "None" read as a value
    shown = shown.assign(
        **{
            c: shown[c].astype(object).where(shown[c].notna(), "NA")
            for c in shown.columns
            if not pd.api.types.is_float_dtype(shown[c]) and shown[c].isna().any()
        }
    )
    with pd.option_context("display.width", 200, "display.max_rows", 300):
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="NA"))
    print(f"written: {', '.join(map(str, written))}")
    return 0
