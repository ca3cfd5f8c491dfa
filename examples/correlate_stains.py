"""Correlation between stains in the same biopsies (Spearman rank correlation).

What it answers
---------------
"Where there are more CD8 T cells, is there more CXCL10?" — for every pair of stains, in each skin region and at
each timepoint.

How
---
Stains of one biopsy are cut from the same block, so a subject's CD8 section and CXCL10 section at one timepoint
form a pair (matched on subject and timepoint; replicate slides averaged). For each pair of stains and each region
the Spearman rank correlation ρ is computed across subjects: it measures whether higher values of one stain go with
higher values of the other (a monotone relation, not necessarily a straight line) and is insensitive to outliers
and skew. ρ = 1: perfectly the same order; 0: no monotone relation; −1: opposite order.

- Timepoints are analysed separately by default: pooling pre and post would count each subject twice and treat
  dependent observations as independent (``--pool`` pools them anyway, for exploration only).
- p-value: two-sided, from SciPy (t approximation; with fewer than ~10 subjects treat it with caution).
- Each stain is represented by its headline metric (percent positive area for area stains such as CXCL10, positive
  cells per mm² for cell stains such as CD8); ``--x`` / ``--y`` restrict to one pair of stains, ``--metric-x`` /
  ``--metric-y`` choose other metrics.
- q-values: Benjamini–Hochberg false-discovery-rate adjustment over all correlations tested (statsmodels).

Usage::

    python examples/correlate_stains.py study.csv --out stats/ [--x cd8 --y cxcl10] [--pool]

References: Spearman C (1904) Am J Psychol 15:72–101. Benjamini Y, Hochberg Y (1995) J R Stat Soc B 57:289–300.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pandas as pd
from scipy import stats
from study import headline_metrics, print_results, read_study, study_parser, with_q_values, write_tables


def stain_matrix(study: pd.DataFrame, metric_of: dict[str, str], *, pool: bool = False) -> pd.DataFrame:
    """Wide table: one row per subject × timepoint × region, one column per stain (its chosen metric)."""
    sel = study["metric"] == study["stain"].astype(str).map(metric_of)
    d = study[sel].dropna(subset=["value"]).copy()
    d["timepoint"] = "pooled" if pool else d["timepoint"].astype(str)
    return d.pivot_table(
        index=["timepoint", "region", "subject"], columns="stain", values="value", aggfunc="mean"
    )


def spearman(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Spearman ρ and its two-sided p-value over the pairs where both values are known."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    out = {"n": n, "spearman_rho": np.nan, "p_value": np.nan}
    if n >= 3 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0:
        res = stats.spearmanr(x[ok], y[ok])
        out["spearman_rho"] = float(res.statistic)
        out["p_value"] = float(res.pvalue)
    return out


def correlate(
    study: pd.DataFrame,
    *,
    x: str | None = None,
    y: str | None = None,
    metric_x: str | None = None,
    metric_y: str | None = None,
    pool: bool = False,
) -> pd.DataFrame:
    """Spearman ρ for every pair of stains (or the one pair x, y), per timepoint and region, with BH q-values."""
    metric_of = headline_metrics(study)
    if metric_x and x:
        metric_of[x] = metric_x
    if metric_y and y:
        metric_of[y] = metric_y
    wide = stain_matrix(study, metric_of, pool=pool)
    stains = [s for s in wide.columns if (x is None or s in (x, y))]
    pairs = [(x, y)] if x and y else list(itertools.combinations(sorted(stains), 2))
    rows = []
    for (tp, region), g in wide.groupby(level=["timepoint", "region"], sort=True):
        for a, b in pairs:
            if a not in g.columns or b not in g.columns:
                continue
            rows.append(
                {
                    "timepoint": tp,
                    "region": region,
                    "stain_x": a,
                    "metric_x": metric_of[a],
                    "stain_y": b,
                    "metric_y": metric_of[b],
                    **spearman(g[a].to_numpy(), g[b].to_numpy()),
                }
            )
    return with_q_values(pd.DataFrame(rows))


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__)
    p.add_argument("--x", help="first stain (protocol name, e.g. cd8)")
    p.add_argument("--y", help="second stain (e.g. cxcl10)")
    p.add_argument("--metric-x", help="metric of the first stain (default: its headline metric)")
    p.add_argument("--metric-y", help="metric of the second stain")
    p.add_argument(
        "--pool", action="store_true", help="pool timepoints (exploration only: repeated measures)"
    )
    args = p.parse_args(argv)
    if bool(args.x) != bool(args.y):
        p.error("give both --x and --y, or neither")
    study = read_study(args.study, timepoint_required=False, keep_flagged=args.keep_flagged)
    res = correlate(study, x=args.x, y=args.y, metric_x=args.metric_x, metric_y=args.metric_y, pool=args.pool)
    written = write_tables(args.out, {"stain_correlations.csv": res})
    return print_results(res, written, empty="no pair of stains measured on the same subjects and timepoints")


if __name__ == "__main__":
    sys.exit(main())
