"""Paired comparison of each stain before and after treatment (Wilcoxon signed-rank test).

What it answers
---------------
"Did CD8 T-cell density in the dermis change between the pre- and post-treatment biopsies of the same patients?",
for every stain and skin region at once.

How
---
Each subject contributes one pair of values (pre, post) per stain and region; the *change* is post − pre. The
Wilcoxon signed-rank test asks whether the changes are centred on zero without assuming they follow a normal
distribution, which suits cell densities and stained-area percentages (skewed, with outliers). It ranks the
absolute changes and compares the rank sums of the increases (R+) and the decreases (R−). Subjects with no change
are left out (Wilcoxon's convention) and equal absolute changes share their mean rank.

- p-value: two-sided. With 15 pairs or fewer it is exact, by enumerating every way the signs of the changes could
  have fallen (exact even with ties); above that, SciPy's default (exact without ties, else the normal
  approximation corrected for ties).
- Effect size: the matched-pairs rank-biserial correlation r = (R+ − R−) / (R+ + R−) (Kerby 2014). It runs from
  −1 (every subject decreased) to +1 (every subject increased); 0 means increases and decreases balance. It is
  reported with the median change so that the size of the change is visible in the stain's own unit.
- Many stains × regions are tested at once, so p-values are adjusted with the Benjamini–Hochberg false-discovery
  rate (column ``q_value``, statsmodels ``multipletests(method="fdr_bh")``). Read q < 0.05 as "a change unlikely to
  be a chance finding among all those tested".
- A subject with several slides for one stain, region and timepoint (replicate sections) contributes their mean.
- With fewer than 6 pairs no two-sided p-value can fall below 0.05: plan sample sizes accordingly.

Input: the tidy table of ``cleihc tables`` (columns subject, timepoint, stain, region, metric, value). By default
the headline metric of each stain is compared (percent positive area for stains measured by area, such as CXCL10
and mucin, positive cells per mm² for cell-only stains such as CD3 and CD8); ``--metric`` chooses others. The two
timepoints are ``pre`` and ``post`` when the table has them, else its only two in study order as ``cleihc report``
orders them (baseline words such as pretreatment or w0 first, follow-up words such as posttreatment last); when no
such word decides the order, stderr says the baseline was taken by natural order only. ``--pre`` / ``--post``
choose. Every output row names its ``baseline`` and ``follow_up`` timepoint.

Usage::

    python examples/paired_pre_post.py study.csv --out stats/ [--pre pre --post post] [--metric NAME ...]

References: Wilcoxon F (1945) Biometrics Bulletin 1:80–83. Kerby DS (2014) The simple difference formula: an
approach to teaching nonparametric correlation. Comprehensive Psychology 3:11.IT.3.1. Benjamini Y, Hochberg Y (1995)
J R Stat Soc B 57:289–300.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from scipy import stats
from study import (
    add_metric_option,
    add_timepoint_options,
    paired_table,
    print_results,
    read_study,
    study_parser,
    two_timepoints,
    with_q_values,
    write_tables,
)


def rank_biserial_paired(change: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation (R+ − R−) / (R+ + R−) of the changes; zeros dropped (Kerby 2014)."""
    d = np.asarray(change, dtype=float)
    d = d[np.isfinite(d) & (d != 0)]
    if d.size == 0:
        return float("nan")
    ranks = stats.rankdata(np.abs(d))
    r_plus, r_minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((r_plus - r_minus) / (r_plus + r_minus))


def exact_signed_rank_p(ranks: np.ndarray, r_plus: float) -> float:
    """Two-sided exact p-value of the signed-rank sum R+ by enumerating all 2^n sign assignments.

    Under the null hypothesis each change is as likely to be an increase as a decrease, so every assignment of
    signs to the (mid)ranks is equally likely; the p-value is the share of assignments whose R+ lies at least as far
    from its mean n(n+1)/4 (the sum of ranks / 2) as the observed one. Exact with ties.
    """
    ranks = np.asarray(ranks, dtype=float)
    n = ranks.size
    signs = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
    sums = signs @ ranks
    centre = ranks.sum() / 2
    tol = 1e-9 * max(1.0, ranks.sum())  # rank sums are multiples of 0.5: compare with a tolerance
    return float(np.mean(np.abs(sums - centre) >= abs(r_plus - centre) - tol))


def wilcoxon_paired(pre: np.ndarray, post: np.ndarray) -> dict[str, float]:
    """Wilcoxon signed-rank test of post − pre with its effect size (see the module docstring)."""
    pre = np.asarray(pre, dtype=float)
    post = np.asarray(post, dtype=float)
    change = post - pre
    nonzero = change[change != 0]
    out = {
        "n_pairs": int(change.size),
        "n_nonzero": int(nonzero.size),
        "median_pre": float(np.median(pre)) if pre.size else np.nan,
        "median_post": float(np.median(post)) if post.size else np.nan,
        "median_change": float(np.median(change)) if change.size else np.nan,
        "rank_biserial_r": rank_biserial_paired(change),
        "statistic_w": np.nan,
        "p_value": np.nan,
        "method": "",
    }
    if nonzero.size == 0:
        out["p_value"], out["method"] = 1.0, "no change"
        return out
    ranks = stats.rankdata(np.abs(nonzero))
    r_plus = float(ranks[nonzero > 0].sum())
    out["statistic_w"] = min(r_plus, float(ranks.sum()) - r_plus)  # the smaller rank sum, as SciPy reports
    if nonzero.size <= 15:
        out["p_value"] = exact_signed_rank_p(ranks, r_plus)
        out["method"] = "exact (all sign flips)"
    else:
        res = stats.wilcoxon(post, pre, zero_method="wilcox", alternative="two-sided", method="auto")
        out["p_value"] = float(res.pvalue)
        out["method"] = "scipy auto (exact without ties, else normal approximation)"
    return out


def compare_pre_post(
    study: pd.DataFrame, *, metrics: list[str] | None = None, pre: str = "pre", post: str = "post"
) -> pd.DataFrame:
    """Wilcoxon test per stain × region × metric, with Benjamini–Hochberg q-values across all of them.

    Each row names its ``baseline`` (`pre`) and ``follow_up`` (`post`) timepoints: the change is follow_up −
    baseline.
    """
    pairs = paired_table(study, metrics=metrics, pre=pre, post=post)
    rows = []
    for (stain, region, metric), g in pairs.groupby(["stain", "region", "metric"], sort=True):
        rows.append(
            {
                "stain": stain,
                "region": region,
                "metric": metric,
                "baseline": pre,
                "follow_up": post,
                **wilcoxon_paired(g["pre"], g["post"]),
            }
        )
    return with_q_values(pd.DataFrame(rows))


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__)
    add_timepoint_options(p)
    add_metric_option(p)
    args = p.parse_args(argv)
    study = read_study(args.study, keep_flagged=args.keep_flagged)
    args.pre, args.post = two_timepoints(study, args.pre, args.post)
    res = compare_pre_post(study, metrics=args.metric, pre=args.pre, post=args.post)
    pairs = paired_table(study, metrics=args.metric, pre=args.pre, post=args.post)
    # the values' columns are named pre and post whatever the labels: say which timepoint each one is
    pairs.insert(4, "baseline", args.pre)
    pairs.insert(5, "follow_up", args.post)
    print(f"change = {args.post!r} − {args.pre!r} (baseline {args.pre!r})")
    written = write_tables(args.out, {"paired_pre_post.csv": res, "paired_values.csv": pairs})
    cols = ["stain", "region", "metric", "n_pairs", "median_change", "rank_biserial_r", "p_value", "q_value"]
    empty = f"no subject has both {args.pre!r} and {args.post!r} values; see {written[1]}"
    return print_results(res, written, empty=empty, columns=cols)


if __name__ == "__main__":
    sys.exit(main())
