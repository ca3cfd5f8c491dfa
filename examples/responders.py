"""Responders against non-responders: does the change in a stain differ between them? (Mann–Whitney U test)

What it answers
---------------
"Did CXCL10 fall more in patients who responded to treatment than in those who did not?", for every stain and
skin region at once.

Who is a responder
------------------
One of, in this order:

1. ``--responders FILE``: a CSV with columns ``subject`` and ``responder`` (yes/no, true/false, 1/0,
   responder/non-responder) — normally the clinical outcome (e.g. a CLASI-A improvement of at least 50 %).
2. ``--rule STAIN:REGION:METRIC:PERCENT``: a histological rule; a subject responds when METRIC of STAIN in REGION
   changed by PERCENT or less from pre to post (e.g. ``cd8:dermis:positive_cells_per_mm2:-50`` = CD8 density in
   the dermis fell by at least half). The defining stain and region are then left out of the comparison, which
   would otherwise be circular.
3. Otherwise the ``group`` column of the study table, when it holds exactly two values, one of them
   ``responder`` (case-insensitive): e.g. from ``--samples`` at quantify time.

How
---
For each subject the *change* is post − pre (replicate slides averaged; the two timepoints are chosen as in
``paired_pre_post.py`` and named in the columns ``baseline`` and ``follow_up``). The Mann–Whitney U test compares
the changes of the two groups without assuming normal distributions (small groups, skewed densities). Reported:

- U (of the responders) and the two-sided p-value (exact for small groups without ties, SciPy's default);
- the rank-biserial correlation r = 2U / (n_responders · n_non_responders) − 1: the probability that a responder's
  change exceeds a non-responder's, minus the reverse (−1..1; negative = responders' changes are lower, i.e. the
  stain fell more in responders);
- the median change in each group, in the stain's unit;
- q-values: Benjamini–Hochberg false-discovery-rate adjustment over all stains × regions tested (statsmodels).

Usage::

    python examples/responders.py study.csv --responders outcome.csv --out stats/
    python examples/responders.py study.csv --rule cd8:dermis:positive_cells_per_mm2:-50 --out stats/

References: Mann HB, Whitney DR (1947) Ann Math Stat 18:50–60. Kerby DS (2014) Comprehensive Psychology 3:11.IT.3.1.
Benjamini Y, Hochberg Y (1995) J R Stat Soc B 57:289–300.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from study import (
    add_metric_option,
    add_timepoint_options,
    paired_table,
    print_results,
    read_study,
    read_text_csv,
    study_parser,
    two_timepoints,
    with_q_values,
    write_tables,
)

_YES = {"yes", "y", "true", "1", "responder", "r", "response"}
_NO = {"no", "n", "false", "0", "non-responder", "nonresponder", "non_responder", "nr", "no response"}


def _as_bool(values: pd.Series, source: str) -> pd.Series:
    words = values.astype(str).str.strip().str.lower()
    bad = sorted(set(words[~words.isin(_YES | _NO)]))
    if bad:
        raise SystemExit(f"{source}: cannot read {bad[0]!r} as responder yes/no")
    return words.isin(_YES)


def responders_from_csv(path: str | Path) -> pd.Series:
    """Responder status (bool) by subject from a CSV with columns subject, responder.

    Read as text like the study table (:func:`study.read_text_csv`), so subject ``001`` matches ``001`` there.
    """
    df = read_text_csv(path, what="outcome CSV with columns subject, responder")
    if not {"subject", "responder"} <= set(df.columns):
        raise SystemExit(f"{path}: needs columns 'subject' and 'responder'")
    df = df.dropna(subset=["subject"])
    if df["responder"].isna().any():
        raise SystemExit(
            f"{path}: subject {df.loc[df['responder'].isna(), 'subject'].iloc[0]!r} has no responder value"
        )
    return pd.Series(
        _as_bool(df["responder"], str(path)).to_numpy(), index=df["subject"].str.strip(), name="responder"
    )


def responders_from_rule(
    study: pd.DataFrame, rule: str, *, pre: str = "pre", post: str = "post"
) -> pd.Series:
    """Responder status by subject: the percent change of one stain, region and metric at or below a threshold.

    Parameters
    ----------
    rule : str
        ``STAIN:REGION:METRIC:PERCENT``, e.g. ``cd8:dermis:positive_cells_per_mm2:-50``.
    """
    try:
        stain, region, metric, pct = rule.split(":")
        threshold = float(pct)
    except ValueError:
        raise SystemExit(
            f"--rule {rule!r}: expected STAIN:REGION:METRIC:PERCENT, e.g. cd8:dermis:positive_cells_per_mm2:-50"
        ) from None
    ch = paired_table(
        study[(study["stain"] == stain) & (study["region"] == region)], metrics=[metric], pre=pre, post=post
    )
    if ch.empty:
        raise SystemExit(
            f"--rule {rule!r}: no subject has {stain} {region} {metric} at both {pre} and {post}"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        pct_change = 100.0 * ch["change"] / ch["pre"]
    pct_change = pct_change.where(ch["pre"] != 0, np.where(ch["change"] > 0, np.inf, 0.0))
    return pd.Series((pct_change <= threshold).to_numpy(), index=ch["subject"].to_numpy(), name="responder")


def responders_from_group(study: pd.DataFrame) -> pd.Series:
    """Responder status by subject from a two-valued ``group`` column with a value 'responder'."""
    if "group" not in study.columns:
        raise SystemExit(
            "no --responders file, no --rule and no 'group' column: say who responded (see --help)"
        )
    g = study.drop_duplicates("subject").set_index("subject")["group"].astype(str)
    if g.str.lower().nunique() != 2 or "responder" not in set(g.str.lower()):
        raise SystemExit(
            f"the 'group' column holds {sorted(set(g))}; need two values, one of them 'responder'"
        )
    return (g.str.lower() == "responder").rename("responder")


def mann_whitney(resp: np.ndarray, nonresp: np.ndarray) -> dict[str, float]:
    """Two-sided Mann–Whitney U of the responders' values against the non-responders', with rank-biserial r."""
    a = np.asarray(resp, dtype=float)
    b = np.asarray(nonresp, dtype=float)
    out = {
        "n_responders": int(a.size),
        "n_non_responders": int(b.size),
        "median_change_responders": float(np.median(a)) if a.size else np.nan,
        "median_change_non_responders": float(np.median(b)) if b.size else np.nan,
        "u_responders": np.nan,
        "rank_biserial_r": np.nan,
        "p_value": np.nan,
    }
    if a.size == 0 or b.size == 0:
        return out
    res = stats.mannwhitneyu(a, b, alternative="two-sided", method="auto")
    out["u_responders"] = float(res.statistic)
    out["rank_biserial_r"] = float(2 * res.statistic / (a.size * b.size) - 1)
    out["p_value"] = float(res.pvalue)
    return out


def compare_responders(
    study: pd.DataFrame,
    responder: pd.Series,
    *,
    metrics: list[str] | None = None,
    pre: str = "pre",
    post: str = "post",
    exclude: tuple[str, str] | None = None,
) -> pd.DataFrame:
    """Mann–Whitney U per stain × region × metric of the change, responders against non-responders (BH q-values).

    Each row names its ``baseline`` (`pre`) and ``follow_up`` (`post`) timepoints: the change is follow_up −
    baseline.

    Parameters
    ----------
    responder : pandas.Series of bool indexed by subject
    exclude : (stain, region), optional
        Left out (the stain and region that define responders under a rule).
    """

    ch = paired_table(study, metrics=metrics, pre=pre, post=post)
    ch = ch[ch["subject"].isin(responder.index)]
    rows = []
    for (stain, region, metric), g in ch.groupby(["stain", "region", "metric"], sort=True):
        if exclude is not None and (stain, region) == exclude:
            continue
        is_r = g["subject"].map(responder).astype(bool).to_numpy()
        rows.append(
            {
                "stain": stain,
                "region": region,
                "metric": metric,
                "baseline": pre,
                "follow_up": post,
                **mann_whitney(g["change"][is_r], g["change"][~is_r]),
            }
        )
    return with_q_values(pd.DataFrame(rows))


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__)
    who = p.add_mutually_exclusive_group()
    who.add_argument("--responders", metavar="CSV", help="CSV with columns subject, responder")
    who.add_argument(
        "--rule", metavar="STAIN:REGION:METRIC:PERCENT", help="histological responder rule (see above)"
    )
    add_timepoint_options(p)
    add_metric_option(p)
    args = p.parse_args(argv)
    study = read_study(args.study, keep_flagged=args.keep_flagged)
    args.pre, args.post = two_timepoints(study, args.pre, args.post)
    exclude = None
    if args.responders:
        responder = responders_from_csv(args.responders)
    elif args.rule:
        responder = responders_from_rule(study, args.rule, pre=args.pre, post=args.post)
        exclude = tuple(args.rule.split(":")[:2])
    else:
        responder = responders_from_group(study)
    res = compare_responders(
        study, responder, metrics=args.metric, pre=args.pre, post=args.post, exclude=exclude
    )
    status = responder.rename_axis("subject").reset_index()
    written = write_tables(args.out, {"responders.csv": res, "responder_status.csv": status})
    print(f"{int(responder.sum())} responders, {int((~responder).sum())} non-responders")
    print(f"change = {args.post!r} − {args.pre!r} (baseline {args.pre!r})")
    cols = [
        "stain",
        "region",
        "metric",
        "n_responders",
        "n_non_responders",
        "median_change_responders",
        "median_change_non_responders",
        "rank_biserial_r",
        "p_value",
        "q_value",
    ]
    empty = "nothing to compare (no stain with pre and post values for subjects of known status)"
    return print_results(res, written, empty=empty, columns=cols)


if __name__ == "__main__":
    sys.exit(main())
