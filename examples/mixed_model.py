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
the stain's unit, with its 95 % confidence interval and p-value. The random intercept per subject accounts
for repeated biopsies of one person being alike (patients differ in their level; the model estimates the change
within patients). In a complete, balanced design the estimated change equals the mean paired difference.

- Baseline: ``--baseline``, else the study's earliest timepoint as the report orders them
  (``cleihc.report.order_timepoints``: words such as pre, pretreatment, baseline, screening first, then natural
  order, w4 before w12). When words do not decide it (no label is a baseline word, or two are), stderr says the
  baseline is a natural-order guess. Every row names its ``baseline``.
- p-values and intervals use Student's t with the "between-within" degrees of freedom (column ``df``): the
  number of biopsies minus the rank of the timepoint and subject indicators together, i.e. the residual degrees
  of freedom of the same model with a fixed effect per subject (SAS PROC MIXED ``DDFM=BETWITHIN``; for this model
  also its default containment method). Why: the change from baseline is a within-subject contrast, and its
  standard error rests on the residual variance, which the within-subject comparisons estimate. With two visits
  and no missing biopsy this is n_subjects − 1, and estimate, standard error, p-value and interval are those of
  the paired t-test; with a subject missing one of the two biopsies it is the paired test's df on the complete
  pairs (a subject with a single biopsy adds one biopsy and one subject, so nothing). With V visits, complete and
  balanced, it is (n_subjects − 1)(V − 1), which is exact under the model: with one random intercept the model
  assumes every pair of visits is equally correlated (compound symmetry), so all visits share one error variance.
  When that is doubtful (the spread of the change grows with time), the per-visit paired tests of
  ``paired_pre_post.py`` (df n − 1) are the safer reading. The normal (z) distribution that statsmodels reports
  is not used: with 8 subjects it gave p = 1e-204 where the paired t-test gives 1e-8. With missing biopsies the
  between-within df is an approximation; Satterthwaite's or Kenward–Roger's would be better, but statsmodels
  ``MixedLM`` provides neither (R's lmerTest or SAS do).
- ``--log``: model log(value + 1) instead; coefficients are then changes on the log scale and are reported as
  ratios ``exp(coef)`` (e.g. 0.5 = halved), which suits densities that vary over orders of magnitude.
- q-values: Benjamini–Hochberg over all stain × region × visit coefficients (statsmodels ``multipletests``).
- Mixed models need enough subjects: with fewer than 5 subjects (``--min-subjects``), without baseline biopsies,
  or when the fit fails (statsmodels reports it did not converge, or warns that the Hessian is not positive
  definite, or a standard error is not a positive finite number), a row has no change, interval or p-value and its
  ``note`` says why; such rows are left out of the q-values, and their ``converged`` is empty when no model was
  fitted (too few subjects, no baseline) and False when the fit failed. A subject variance estimated as zero
  (statsmodels' warning "on the boundary") is kept: the data then show no subject-to-subject difference in level
  to allow for.

Usage::

    python examples/mixed_model.py study.csv --out stats/ [--baseline pre] [--log] [--metric NAME ...]

References: Laird NM, Ware JH (1982) Random-effects models for longitudinal data. Biometrics 38:963–974.
Kenward MG, Roger JH (1997) Small sample inference for fixed effects from restricted maximum likelihood.
Biometrics 53:983–997. SAS/STAT User's Guide, The MIXED Procedure, DDFM=BETWITHIN.
Seabold S, Perktold J (2010) statsmodels: Econometric and statistical modeling with Python. Proc. 9th Python in
Science Conf.
"""

from __future__ import annotations

import re
import sys
import warnings

import numpy as np
import pandas as pd
from scipy import stats
from study import (
    add_metric_option,
    print_results,
    read_study,
    select_metrics,
    study_parser,
    visit_word,
    with_q_values,
    write_tables,
)

from cleihc.report import order_timepoints

#: Fewer subjects than this give no estimate: the subject variance, and with it the interval and p-value, cannot
#: be estimated from so few (``--min-subjects`` changes it).
MIN_SUBJECTS = 5
#: Gradient tolerance of statsmodels' BFGS fit (its default, 1e-5, left the standard error 1e-5 to 1e-4 off the
#: exact paired-t value in a balanced two-visit design; statsmodels falls back to L-BFGS when BFGS does not get
#: there, so a tight tolerance costs no convergence).
GTOL = 1e-10


def default_baseline(timepoints) -> str | None:
    """The study's earliest timepoint, the baseline when ``--baseline`` is not given.

    Parameters
    ----------
    timepoints : iterable
        The timepoint labels of the study table (missing values are ignored).

    Returns
    -------
    str or None
        The first label in study order (:func:`cleihc.report.order_timepoints`), None when there is none. When
        words do not decide it (another label is of the same kind: neither a baseline word such as pre or
        baseline, or both are), it is a natural-order guess and stderr says so, as
        :func:`study.two_timepoints` does.
    """
    present = order_timepoints(list(timepoints))
    if not present:
        return None
    first = present[0]
    # order_timepoints ranks baseline words, then other labels, then follow-up words; within a rank it is natural
    # order, which is a guess about the study, not knowledge of it
    rank = {"baseline": 0, None: 1, "follow-up": 2}
    kind = visit_word(first)
    tied = [t for t in present[1:] if rank[visit_word(t)] == rank[kind]]
    if tied:
        why = (
            f"{first!r} and {tied[0]!r} are both {kind} words"
            if kind
            else f"neither {first!r} nor {tied[0]!r} is a word such as pre or baseline"
        )
        print(
            f"timepoints {', '.join(map(repr, present))}: {why}, so {first!r} is taken as the baseline only by "
            "natural order (numbers as numbers, else alphabetical); give --baseline to be sure",
            file=sys.stderr,
        )
    return first


def between_within_df(d: pd.DataFrame) -> int:
    """Residual degrees of freedom of ``value ~ timepoint + subject`` (subjects as fixed effects).

    Parameters
    ----------
    d : pandas.DataFrame
        One row per biopsy with columns subject and timepoint.

    Returns
    -------
    int
        Biopsies minus the rank of the timepoint and subject indicator columns together: n_subjects − 1 for a
        complete two-visit design, (n_subjects − 1)(visits − 1) for a complete one with more visits; 0 or less
        when no within-subject comparison is left to estimate the error from.
    """
    # the rank, not n_subjects + visits - 1, so that a visit seen only in subjects with no other biopsy (its
    # change not estimable within subjects) does not count
    design = np.hstack(
        [pd.get_dummies(d["timepoint"]).to_numpy(float), pd.get_dummies(d["subject"]).to_numpy(float)]
    )
    return int(len(d) - np.linalg.matrix_rank(design))


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
        The reference timepoint (see :func:`default_baseline`).
    log : bool
        Model log(value + 1).
    min_subjects : int
        Fewer subjects than this give no estimate (:data:`MIN_SUBJECTS`).

    Returns
    -------
    pandas.DataFrame
        One row per non-baseline timepoint (in study order): n_subjects, n_biopsies, baseline, timepoint, change
        (or ratio with `log`), ci_lower, ci_upper (95 %, Student's t), p_value (two-sided t-test), df (the
        between-within degrees of freedom, :func:`between_within_df`), converged (nullable boolean: empty when no
        model was fitted), note. A row whose model cannot be trusted (fewer than `min_subjects` subjects, no
        baseline biopsies, no within-subject comparison, a fit that did not converge, a standard error that is
        not a positive finite number) has no estimate, interval, p-value or df and a note saying why.
    """
    import statsmodels.formula.api as smf

    d = data.groupby(["subject", "timepoint"], as_index=False)["value"].mean()
    d = d.dropna(subset=["value"])
    if log:
        d["value"] = np.log1p(d["value"])
    others = [t for t in order_timepoints(d["timepoint"].tolist()) if t != baseline]
    effect = "ratio" if log else "change"
    base = {"n_subjects": d["subject"].nunique(), "n_biopsies": len(d), "baseline": baseline}

    def blank(t: str, note: str, converged: bool | None) -> dict:
        nothing = {effect: np.nan, "ci_lower": np.nan, "ci_upper": np.nan, "p_value": np.nan, "df": None}
        return {**base, "timepoint": t, **nothing, "converged": converged, "note": note}

    def table(rows: list[dict]) -> pd.DataFrame:
        if not rows:  # no later timepoint: nothing to report
            return pd.DataFrame()
        # nullable columns: "no model fitted" is an empty cell in the CSV, not the text None
        return pd.DataFrame(rows).astype({"df": "Int64", "converged": "boolean"})

    def without_estimate(note: str, converged: bool | None = None) -> pd.DataFrame:
        return table([blank(t, note, converged) for t in others])

    if baseline not in set(d["timepoint"]) or not others:
        return without_estimate(f"no {baseline!r} biopsies")
    if base["n_subjects"] < min_subjects:
        # a subject variance from so few subjects is unreliable, and the Wald p-value absurdly small (2 subjects
        # gave p = 5e-7 for a change the data cannot support)
        return without_estimate(f"{base['n_subjects']} subject(s), fewer than {min_subjects}: no estimate")
    df = between_within_df(d)
    if df < 1:
        return without_estimate("no subject has biopsies at two visits (df = 0): no estimate")
    # A safe category name for the formula; the reference level is the baseline.
    d["tp"] = pd.Categorical(d["timepoint"], categories=[baseline, *others])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = smf.mixedlm("value ~ C(tp)", d, groups=d["subject"]).fit(reml=True, gtol=GTOL)
        except (np.linalg.LinAlgError, ValueError) as exc:
            return without_estimate(f"the model could not be fitted ({exc}): no estimate", converged=False)
    failed = _failed_fit(caught, fit)
    if failed:
        return without_estimate(failed, converged=False)
    # statsmodels' conf_int and pvalues use the normal distribution, far too confident with few subjects
    t_crit = float(stats.t.ppf(0.975, df))
    rows = []
    for t in others:
        name = next((k for k in fit.params.index if re.search(rf"\[T\.{re.escape(t)}\]$", k)), None)
        se = float(fit.bse[name]) if name is not None else np.nan
        if name is None or not (np.isfinite(se) and se > 0):
            rows.append(blank(t, "no finite standard error: no estimate", converged=True))
            continue
        coef = float(fit.params[name])
        lo, hi = coef - t_crit * se, coef + t_crit * se
        p_value = float(2 * stats.t.sf(abs(coef / se), df))
        if log:
            coef, lo, hi = float(np.exp(coef)), float(np.exp(lo)), float(np.exp(hi))
        rows.append(
            {
                **base,
                "timepoint": t,
                effect: coef,
                "ci_lower": lo,
                "ci_upper": hi,
                "p_value": p_value,
                "df": df,
                "converged": True,
                "note": "",
            }
        )
    return table(rows)


def change_over_time(
    study: pd.DataFrame,
    *,
    baseline: str | None = None,
    log: bool = False,
    metrics: list[str] | None = None,
    min_subjects: int = MIN_SUBJECTS,
) -> pd.DataFrame:
    """:func:`fit_change` for every stain × region × metric, with Benjamini–Hochberg q-values.

    Parameters
    ----------
    study : pandas.DataFrame
        The study table.
    baseline : str, optional
        The reference timepoint; by default the study's earliest (:func:`default_baseline`, which says on stderr
        when that is only a natural-order guess).
    log, min_subjects
        As in :func:`fit_change`.
    metrics : list of str, optional
        Metrics to model (default: each stain's headline metric).

    Returns
    -------
    pandas.DataFrame
        The rows of :func:`fit_change` with stain, region and metric in front and ``q_value`` last: Benjamini–
        Hochberg over the rows with a p-value (rows without an estimate are left out of the family). Empty when
        there is nothing to model.
    """
    if baseline is None:
        baseline = default_baseline(study["timepoint"])
        if baseline is None:
            return pd.DataFrame()
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
    p.add_argument(
        "--baseline",
        help="reference timepoint (default: the earliest, pre or baseline before others, w4 before w12)",
    )
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
