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
- Mixed models need enough subjects: with fewer than 5 subjects (``--min-subjects``), without baseline biopsies,
  or when the fit fails (statsmodels reports it did not converge, or warns that the Hessian is not positive
  definite, or a standard error is not a positive finite number), a row has no change, interval or p-value and its
  ``note`` says why; such rows are left out of the q-values. A subject variance estimated as zero (statsmodels'
  warning "on the boundary") is kept: the data then show no subject-to-subject difference in level to allow for.

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

from cleihc.report import order_timepoints

#: Fewer subjects than this give no estimate: the subject variance, and with it the interval and p-value, cannot
#: be estimated from so few (``--min-subjects`` changes it).
MIN_SUBJECTS = 5


def _failed_fit(caught: list[warnings.WarningMessage], fit) -> str | None:
    """Why a fitted model gives no trustworthy number, or None when it does."""
    if not bool(getattr(fit, "converged", False)):
        return "the model did not converge: no estimate"
    # Of statsmodels' ConvergenceWarnings only this one speaks of the final fit: the others come from optimizers
    # it tried before one converged, or flag a subject variance below an absolute 0.01 ("on the boundary"), which
    # is the data's scale (a CXCL10 area in percent, a log ratio), not a failure; that fit stands.
    hessian = next((str(w.message) for w in caught if "Hessian matrix" in str(w.message)), None)
    if hessian:
        return f"unreliable standard errors ({hessian.rstrip('.')}): no estimate"
    return None


def fit_change(
    data: pd.DataFrame, *, baseline: str, log: bool = False, min_subjects: int = MIN_SUBJECTS
) -> pd.DataFrame:
    """Fit ``value ~ C(timepoint, baseline) + (1 | subject)`` to one stain × region × metric.

    Parameters
    ----------
    data : pandas.DataFrame
        Columns subject, timepoint, value (replicate slides are averaged first).
    baseline : str
        The reference timepoint.
    log : bool
        Model log(value + 1).
    min_subjects : int
        Fewer subjects than this give no estimate (:data:`MIN_SUBJECTS`).

    Returns
    -------
    pandas.DataFrame
        One row per non-baseline timepoint (in study order): n_subjects, n_biopsies, change (or ratio with
        `log`), ci_lower, ci_upper, p_value, converged, note. A row whose model cannot be trusted (fewer than
        `min_subjects` subjects, no baseline biopsies, a fit that did not converge, a standard error that is not a
        positive finite number) has no estimate, interval or p-value and a note saying why.
    """
    import statsmodels.formula.api as smf

    d = data.groupby(["subject", "timepoint"], as_index=False)["value"].mean()
    d = d.dropna(subset=["value"])
    if log:
        d["value"] = np.log1p(d["value"])
    others = [t for t in order_timepoints(d["timepoint"].tolist()) if t != baseline]
    effect = "ratio" if log else "change"
    base = {"n_subjects": d["subject"].nunique(), "n_biopsies": len(d)}

    def blank(t: str, note: str, converged: bool | None) -> dict:
        nothing = {effect: np.nan, "ci_lower": np.nan, "ci_upper": np.nan, "p_value": np.nan}
        return {**base, "timepoint": t, **nothing, "converged": converged, "note": note}

    def without_estimate(note: str, converged: bool | None = None) -> pd.DataFrame:
        return pd.DataFrame([blank(t, note, converged) for t in others])

    if baseline not in set(d["timepoint"]) or not others:
        return without_estimate(f"no {baseline!r} biopsies")
    if base["n_subjects"] < min_subjects:
        # a subject variance from so few subjects is unreliable, and the Wald p-value absurdly small (2 subjects
        # gave p = 5e-7 for a change the data cannot support)
        return without_estimate(f"{base['n_subjects']} subject(s), fewer than {min_subjects}: no estimate")
    # A safe category name for the formula; the reference level is the baseline.
    d["tp"] = pd.Categorical(d["timepoint"], categories=[baseline, *others])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = smf.mixedlm("value ~ C(tp)", d, groups=d["subject"]).fit(reml=True)
        except (np.linalg.LinAlgError, ValueError) as exc:
            return without_estimate(f"the model could not be fitted ({exc}): no estimate", converged=False)
    failed = _failed_fit(caught, fit)
    if failed:
        return without_estimate(failed, converged=False)
    ci = fit.conf_int()
    rows = []
    for t in others:
        name = next((k for k in fit.params.index if re.search(rf"\[T\.{re.escape(t)}\]$", k)), None)
        se = float(fit.bse[name]) if name is not None else np.nan
        if name is None or not (np.isfinite(se) and se > 0):
            rows.append(blank(t, "no finite standard error: no estimate", converged=True))
            continue
        coef, lo, hi = float(fit.params[name]), float(ci.loc[name, 0]), float(ci.loc[name, 1])
        if log:
            coef, lo, hi = float(np.exp(coef)), float(np.exp(lo)), float(np.exp(hi))
        rows.append(
            {
                **base,
                "timepoint": t,
                effect: coef,
                "ci_lower": lo,
                "ci_upper": hi,
                "p_value": float(fit.pvalues[name]),
                "converged": True,
                "note": "",
            }
        )
    return pd.DataFrame(rows)


def change_over_time(
    study: pd.DataFrame,
    *,
    baseline: str = "pre",
    log: bool = False,
    metrics: list[str] | None = None,
    min_subjects: int = MIN_SUBJECTS,
) -> pd.DataFrame:
    """:func:`fit_change` for every stain × region × metric, with Benjamini–Hochberg q-values.

    Rows without an estimate (see :func:`fit_change`) have no p-value and are left out of the q-value family.
    """
    parts = []
    chosen = study[select_metrics(study, metrics)]
    for (stain, region, metric), g in chosen.groupby(["stain", "region", "metric"], sort=True):
        res = fit_change(g, baseline=baseline, log=log, min_subjects=min_subjects)
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
    p.add_argument(
        "--min-subjects",
        type=int,
        default=MIN_SUBJECTS,
        help=f"fewer subjects give no estimate (default {MIN_SUBJECTS})",
    )
    add_metric_option(p, verb="model")
    args = p.parse_args(argv)
    if args.min_subjects < 2:
        p.error("--min-subjects must be at least 2")
    res = change_over_time(
        read_study(args.study, keep_flagged=args.keep_flagged),
        baseline=args.baseline,
        log=args.log,
        metrics=args.metric,
        min_subjects=args.min_subjects,
    )
    written = write_tables(args.out, {"mixed_model.csv": res})
    return print_results(
        res, written, empty="nothing to model (no stain with a baseline and a later timepoint)"
    )


if __name__ == "__main__":
    sys.exit(main())
