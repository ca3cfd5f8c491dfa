"""Change over time with a linear mixed model (all timepoints, subjects with missing biopsies kept).

What it answers
---------------
"How much did each stain change from baseline at each later visit?", when a study has more than two timepoints,
or some subjects miss a biopsy: the paired Wilcoxon test (``paired_pre_post.py``) must drop those subjects, a
mixed model keeps every available biopsy.

How
---
For each stain and region: ``value ~ timepoint + (1 | subject)`` (statsmodels ``MixedLM``, REML). The timepoint is
a category with the baseline as reference, so each coefficient is the mean change from baseline at that visit, in
the stain's unit, with its 95 % confidence interval and Wald p-value. The random intercept per subject accounts
for repeated biopsies of one person being alike (patients differ in their level; the model estimates the change
within patients). In a complete, balanced design the estimated change equals the mean paired difference.

- ``--log``: model log(value + 1) instead; coefficients are then changes on the log scale and are reported as
  ratios ``exp(coef)`` (e.g. 0.5 = halved), which suits densities that vary over orders of magnitude.
- q-values: Benjamini–Hochberg over all stain × region × visit coefficients (statsmodels ``multipletests``).
- Mixed models need enough subjects: with fewer than ~5 subjects, or if the model fails to converge, a row says so
  (``converged`` False or an ``error``) instead of giving a number.

Usage::

    python examples/mixed_model.py study.csv --out stats/ [--baseline pre] [--log] [--metric NAME ...]

References: Laird NM, Ware JH (1982) Random-effects models for longitudinal data. Biometrics 38:963–974.
Seabold S, Perktold J (2010) statsmodels: Econometric and statistical modeling with Python. Proc. 9th Python in
Science Conf.
"""

from __future__ import annotations

import re
import sys
import warnings

import numpy as np
import pandas as pd
from study import (
    add_metric_option,
    print_results,
    read_study,
    select_metrics,
    study_parser,
    with_q_values,
    write_tables,
)


def fit_change(data: pd.DataFrame, *, baseline: str, log: bool = False) -> pd.DataFrame:
    """Fit ``value ~ C(timepoint, baseline) + (1 | subject)`` to one stain × region × metric.

    Parameters
    ----------
    data : pandas.DataFrame
        Columns subject, timepoint, value (replicate slides are averaged first).
    baseline : str
        The reference timepoint.
    log : bool
        Model log(value + 1).

    Returns
    -------
    pandas.DataFrame
        One row per non-baseline timepoint: n_subjects, n_biopsies, change (or ratio with `log`), ci_lower,
        ci_upper, p_value, converged.
    """
    import statsmodels.formula.api as smf

    d = data.groupby(["subject", "timepoint"], as_index=False)["value"].mean()
    d = d.dropna(subset=["value"])
    if log:
        d["value"] = np.log1p(d["value"])
    others = sorted(t for t in d["timepoint"].unique() if t != baseline)
    base = {"n_subjects": d["subject"].nunique(), "n_biopsies": len(d)}
    if baseline not in set(d["timepoint"]) or not others:
        return pd.DataFrame([{**base, "timepoint": t, "error": f"no {baseline!r} biopsies"} for t in others])
    # A safe category name for the formula; the reference level is the baseline.
    d["tp"] = pd.Categorical(d["timepoint"], categories=[baseline, *others])
    rows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = smf.mixedlm("value ~ C(tp)", d, groups=d["subject"]).fit(reml=True)
        except (np.linalg.LinAlgError, ValueError) as exc:
            return pd.DataFrame([{**base, "timepoint": t, "error": str(exc)} for t in others])
    ci = fit.conf_int()
    converged = bool(getattr(fit, "converged", True)) and not any(
        "converge" in str(w.message).lower() for w in caught
    )
    for t in others:
        name = next((k for k in fit.params.index if re.search(rf"\[T\.{re.escape(t)}\]$", k)), None)
        if name is None:
            rows.append({**base, "timepoint": t, "error": "no estimate"})
            continue
        coef, lo, hi = float(fit.params[name]), float(ci.loc[name, 0]), float(ci.loc[name, 1])
        row = {**base, "timepoint": t, "p_value": float(fit.pvalues[name]), "converged": converged}
        if log:
            row.update(
                {"ratio": float(np.exp(coef)), "ci_lower": float(np.exp(lo)), "ci_upper": float(np.exp(hi))}
            )
        else:
            row.update({"change": coef, "ci_lower": lo, "ci_upper": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def change_over_time(
    study: pd.DataFrame, *, baseline: str = "pre", log: bool = False, metrics: list[str] | None = None
) -> pd.DataFrame:
    """:func:`fit_change` for every stain × region × metric, with Benjamini–Hochberg q-values."""
    parts = []
    chosen = study[select_metrics(study, metrics)]
    for (stain, region, metric), g in chosen.groupby(["stain", "region", "metric"], sort=True):
        res = fit_change(g, baseline=baseline, log=log)
        if len(res):
            res.insert(0, "metric", metric)
            res.insert(0, "region", region)
            res.insert(0, "stain", stain)
            parts.append(res)
    if not parts:
        return pd.DataFrame()
    return with_q_values(pd.concat(parts, ignore_index=True))


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__)
    p.add_argument("--baseline", default="pre", help="reference timepoint (default pre)")
    p.add_argument("--log", action="store_true", help="model log(value + 1); report ratios")
    add_metric_option(p, verb="model")
    args = p.parse_args(argv)
    res = change_over_time(
        read_study(args.study, keep_flagged=args.keep_flagged),
        baseline=args.baseline,
        log=args.log,
        metrics=args.metric,
    )
    written = write_tables(args.out, {"mixed_model.csv": res})
    return print_results(
        res, written, empty="nothing to model (no stain with a baseline and a later timepoint)"
    )


if __name__ == "__main__":
    sys.exit(main())
