"""Validation: agreement of automated results with reference counts, areas or point annotations.

Two kinds of reference ("truth") are compared with a results folder of ``cleihc quantify``:

- **values** per slide × region (counts, densities, areas, percentages), compared metric by metric with
  Bland–Altman bias and limits of agreement, the intraclass correlation ICC(2,1) (and ICC(3,1)) and Lin's
  concordance correlation coefficient;
- **points** (cell centroids with a positive/negative class), matched one-to-one to the detected cells within a
  radius in µm (Hungarian matching), giving detection precision, recall and F1 per class, and per-slide counts that
  are then compared as values too.

Accepted truth (``--truth``): a CSV of values (``slide, region`` and metric columns named as in ``regions.csv``, or
long ``slide, region, metric, value``), a CSV of points (``slide, x_px, y_px`` or ``x_um, y_um``, and ``class`` or
``positive``), a GeoJSON of QuPath point annotations (classification ``Positive``/``Negative``), a synthetic
``<slide>.truth.json`` from :mod:`cleihc.synthetic`, or a folder of any of these named ``<slide>.<ext>``.

References
----------
Bland JM, Altman DG. Statistical methods for assessing agreement between two methods of clinical measurement.
Lancet 1986;327:307–310.
Shrout PE, Fleiss JL. Intraclass correlations: uses in assessing rater reliability. Psychol Bull 1979;86:420–428.
McGraw KO, Wong SP. Forming inferences about some intraclass correlation coefficients. Psychol Methods
1996;1:30–46.
Lin LI-K. A concordance correlation coefficient to evaluate reproducibility. Biometrics 1989;45:255–268.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, sparse, stats
from scipy.spatial import cKDTree

from cleihc.errors import CleihcError
from cleihc.io import atomic_path, atomic_write, read_user_csv

__all__ = [
    "ICC",
    "Agreement",
    "BlandAltman",
    "Concordance",
    "Detection",
    "PointMatch",
    "Truth",
    "ValidationResult",
    "agreement",
    "bland_altman",
    "detection_by_region",
    "detection_scores",
    "icc",
    "lin_ccc",
    "match_points",
    "read_truth",
    "validate",
    "write_validation",
]

log = logging.getLogger(__name__)

#: Synthetic ``area_truth`` keys and the ``regions.csv`` metric each one is the truth of.
SYNTHETIC_METRICS = {
    "region_area_mm2": "region_area_mm2",
    "positive_area_percent": "positive_area_percent",
    "n_positive_cells": "cells_positive",
    "n_negative_cells": "cells_negative",
    "positive_cells_per_mm2": "positive_cells_per_mm2",
}

#: Truth-table columns that identify a row or describe the study, never metrics, even when they hold numbers (a
#: subject 1, 2, 3; a timepoint 0/12): cleihc's identifier columns and the study metadata of ``--samples``.
_IDENTIFIER_COLUMNS = frozenset({"subject", "timepoint", "group", "stain_label", "metric", "value", "unit"})

_POSITIVE_WORDS = {"positive", "pos", "true", "1", "yes", "+", "tumor: positive"}
_NEGATIVE_WORDS = {"negative", "neg", "false", "0", "no", "-", "tumor: negative"}


# --------------------------------------------------------------------------------------------------------------
# Agreement statistics on paired values
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlandAltman:
    """Bland–Altman agreement of `measured` with `reference` (difference = measured − reference).

    Attributes
    ----------
    n : int
        Number of pairs.
    bias : float
        Mean difference.
    sd : float
        Standard deviation of the differences (n − 1 denominator).
    loa_lower, loa_upper : float
        95 % limits of agreement, ``bias ∓ 1.96 sd``.
    bias_ci_lower, bias_ci_upper : float
        95 % confidence interval of the bias (t distribution).
    """

    n: int
    bias: float
    sd: float
    loa_lower: float
    loa_upper: float
    bias_ci_lower: float
    bias_ci_upper: float


@dataclass(frozen=True)
class ICC:
    """An intraclass correlation with its 95 % confidence interval.

    Attributes
    ----------
    kind : str
        ``"ICC(2,1)"`` (two-way random effects, absolute agreement, single measurement; McGraw & Wong ICC(A,1)) or
        ``"ICC(3,1)"`` (two-way mixed effects, consistency, single measurement; McGraw & Wong ICC(C,1)).
    value, ci_lower, ci_upper : float
    n : int
        Number of targets (slide × region pairs).
    """

    kind: str
    value: float
    ci_lower: float
    ci_upper: float
    n: int


@dataclass(frozen=True)
class Concordance:
    """Lin's concordance correlation coefficient with its 95 % confidence interval (Fisher z, Lin 1989).

    Attributes
    ----------
    ccc : float
        ``2 s_xy / (s_x² + s_y² + (mean_x − mean_y)²)`` with 1/n moments.
    ci_lower, ci_upper : float
    pearson_r : float
        The precision component; ``ccc = pearson_r · accuracy``.
    accuracy : float
        The bias-correction factor C_b (1 when there is no location or scale shift).
    n : int
    """

    ccc: float
    ci_lower: float
    ci_upper: float
    pearson_r: float
    accuracy: float
    n: int


def _pairs(reference: Any, measured: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(reference, dtype=np.float64).ravel()
    y = np.asarray(measured, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise CleihcError(f"reference and measured values differ in length ({x.size} vs {y.size})")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def bland_altman(reference: Any, measured: Any) -> BlandAltman:
    """Bias and 95 % limits of agreement of `measured` against `reference` (Bland & Altman 1986).

    Parameters
    ----------
    reference, measured : array-like, same length
        Paired values; pairs with a NaN are left out.

    Returns
    -------
    BlandAltman
        NaN fields where fewer than two pairs remain (the bias needs one).
    """
    x, y = _pairs(reference, measured)
    d = y - x
    n = d.size
    nan = math.nan
    if n == 0:
        return BlandAltman(0, nan, nan, nan, nan, nan, nan)
    bias = float(d.mean())
    if n < 2:
        return BlandAltman(n, bias, nan, nan, nan, nan, nan)
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return BlandAltman(n, bias, sd, bias - 1.96 * sd, bias + 1.96 * sd, bias - half, bias + half)


def _anova_two_way(ratings: np.ndarray) -> tuple[float, float, float]:
    """Mean squares for rows (targets), columns (raters) and error of an (n, k) table without replication."""
    n, k = ratings.shape
    grand = ratings.mean()
    ss_rows = k * float(((ratings.mean(axis=1) - grand) ** 2).sum())
    ss_cols = n * float(((ratings.mean(axis=0) - grand) ** 2).sum())
    ss_total = float(((ratings - grand) ** 2).sum())
    ss_err = max(ss_total - ss_rows - ss_cols, 0.0)  # rounding can make an exact zero slightly negative
    return ss_rows / (n - 1), ss_cols / (k - 1), ss_err / ((n - 1) * (k - 1))


def icc(ratings: Any, *, kind: str = "ICC(2,1)") -> ICC:
    """Intraclass correlation of an (n targets × k raters) table, single-measurement form.

    Parameters
    ----------
    ratings : array-like, shape (n, k)
        One row per target (e.g. slide × region), one column per method (reference, automated). Rows with a NaN
        are left out.
    kind : {"ICC(2,1)", "ICC(3,1)"}
        ``ICC(2,1)``: two-way random effects, absolute agreement (a systematic offset between methods lowers it),
        ``(MSR − MSE) / (MSR + (k − 1) MSE + k (MSC − MSE) / n)``. ``ICC(3,1)``: two-way mixed effects,
        consistency (an offset does not lower it), ``(MSR − MSE) / (MSR + (k − 1) MSE)``. MSR, MSC and MSE are the
        row, column and residual mean squares of the two-way ANOVA.

    Returns
    -------
    ICC
        Value and the 95 % confidence interval of McGraw & Wong (1996, cases 2A and 3C); NaN for n < 2.

    References
    ----------
    Shrout & Fleiss 1979 (ICC(2,1), ICC(3,1)); McGraw & Wong 1996 (ICC(A,1), ICC(C,1) and their intervals).
    """
    if kind not in ("ICC(2,1)", "ICC(3,1)"):
        raise CleihcError(f"unknown ICC kind {kind!r}; use 'ICC(2,1)' or 'ICC(3,1)'")
    r = np.asarray(ratings, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise CleihcError(f"ICC needs an (n targets, k >= 2 raters) table, got shape {r.shape}")
    r = r[np.isfinite(r).all(axis=1)]
    n, k = r.shape
    nan = math.nan
    if n < 2:
        return ICC(kind, nan, nan, nan, n)
    msr, msc, mse = _anova_two_way(r)
    alpha = 0.05
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "ICC(3,1)":
            den = msr + (k - 1) * mse
            value = (msr - mse) / den if den > 0 else nan
            if mse > 0:
                f_obs = msr / mse
                df1, df2 = n - 1, (n - 1) * (k - 1)
                f_l = f_obs / stats.f.ppf(1 - alpha / 2, df1, df2)
                f_u = f_obs * stats.f.ppf(1 - alpha / 2, df2, df1)
                lo, hi = (f_l - 1) / (f_l + k - 1), (f_u - 1) / (f_u + k - 1)
            else:  # no residual variance: the interval is a point only when agreement is perfect
                lo = hi = value if value == 1 else nan
        else:
            den = msr + (k - 1) * mse + k * (msc - mse) / n
            value = (msr - mse) / den if den > 0 else nan
            if mse > 0 and math.isfinite(value) and value < 1:
                a = k * value / (n * (1 - value))
                b = 1 + k * value * (n - 1) / (n * (1 - value))
                v = (a * msc + b * mse) ** 2 / (
                    (a * msc) ** 2 / (k - 1) + (b * mse) ** 2 / ((n - 1) * (k - 1))
                )
                f_l = stats.f.ppf(1 - alpha / 2, n - 1, v)
                f_u = stats.f.ppf(1 - alpha / 2, v, n - 1)
                base = k * msc + (k * n - k - n) * mse
                lo = n * (msr - f_l * mse) / (f_l * base + n * msr)
                hi = n * (f_u * msr - mse) / (base + n * f_u * msr)
            else:
                lo = hi = value if value == 1 else nan
    return ICC(kind, float(value), float(lo), float(hi), n)


def lin_ccc(reference: Any, measured: Any) -> Concordance:
    """Lin's concordance correlation coefficient (Lin 1989), with its 95 % interval by the Fisher z transform.

    Parameters
    ----------
    reference, measured : array-like, same length
        Pairs with a NaN are left out.

    Returns
    -------
    Concordance
        All NaN for fewer than two pairs. With two pairs the coefficient is defined but its interval is NaN (the
        Fisher z variance divides by n − 2), unless agreement is perfect (interval [1, 1]). Two constant series:
        1 when equal (perfect agreement); 0 when they differ (2·s_xy = 0 over (x̄ − ȳ)² > 0: no concordance),
        then with NaN interval, `pearson_r` and `accuracy`, as when only one series is constant.
    """
    x, y = _pairs(reference, measured)
    n = x.size
    nan = math.nan
    if n < 2:
        return Concordance(nan, nan, nan, nan, nan, n)
    mx, my = x.mean(), y.mean()
    vx, vy = float(((x - mx) ** 2).mean()), float(((y - my) ** 2).mean())
    sxy = float(((x - mx) * (y - my)).mean())
    den = vx + vy + (mx - my) ** 2
    if den == 0:  # both constant and equal: perfect agreement
        return Concordance(1.0, 1.0, 1.0, nan, 1.0, n)
    ccc = 2 * sxy / den
    if vx == 0 or vy == 0:
        return Concordance(float(ccc), nan, nan, nan, nan, n)
    r = sxy / math.sqrt(vx * vy)
    accuracy = ccc / r if r != 0 else nan
    lo = hi = nan
    if n > 2 and abs(ccc) < 1 and r != 0:
        u = (mx - my) / (vx * vy) ** 0.25
        var_z = (
            (1 - r**2) * ccc**2 / ((1 - ccc**2) * r**2)
            + 2 * ccc**3 * (1 - ccc) * u**2 / (r * (1 - ccc**2) ** 2)
            - ccc**4 * u**4 / (2 * r**2 * (1 - ccc**2) ** 2)
        ) / (n - 2)
        if var_z > 0:
            z = math.atanh(ccc)
            half = 1.959963984540054 * math.sqrt(var_z)
            lo, hi = math.tanh(z - half), math.tanh(z + half)
    elif abs(ccc) >= 1:
        lo = hi = float(ccc)
    return Concordance(float(ccc), float(lo), float(hi), float(r), float(accuracy), n)


@dataclass(frozen=True)
class Agreement:
    """All agreement statistics for one metric (and region scope)."""

    bland_altman: BlandAltman
    icc_2_1: ICC
    icc_3_1: ICC
    concordance: Concordance
    mean_reference: float
    mean_measured: float

    def as_row(self) -> dict[str, float]:
        """A flat dict for a table row."""
        ba, c = self.bland_altman, self.concordance
        return {
            "n": ba.n,
            "mean_reference": self.mean_reference,
            "mean_measured": self.mean_measured,
            "bias": ba.bias,
            "bias_ci_lower": ba.bias_ci_lower,
            "bias_ci_upper": ba.bias_ci_upper,
            "sd_difference": ba.sd,
            "loa_lower": ba.loa_lower,
            "loa_upper": ba.loa_upper,
            "icc_2_1": self.icc_2_1.value,
            "icc_2_1_ci_lower": self.icc_2_1.ci_lower,
            "icc_2_1_ci_upper": self.icc_2_1.ci_upper,
            "icc_3_1": self.icc_3_1.value,
            "ccc": c.ccc,
            "ccc_ci_lower": c.ci_lower,
            "ccc_ci_upper": c.ci_upper,
            "pearson_r": c.pearson_r,
        }


def agreement(reference: Any, measured: Any) -> Agreement:
    """Bland–Altman, ICC(2,1), ICC(3,1) and Lin's CCC of paired values (NaN pairs left out)."""
    x, y = _pairs(reference, measured)
    table = np.column_stack([x, y])
    return Agreement(
        bland_altman=bland_altman(x, y),
        icc_2_1=icc(table, kind="ICC(2,1)"),
        icc_3_1=icc(table, kind="ICC(3,1)"),
        concordance=lin_ccc(x, y),
        mean_reference=float(x.mean()) if x.size else math.nan,
        mean_measured=float(y.mean()) if y.size else math.nan,
    )


# --------------------------------------------------------------------------------------------------------------
# Point matching
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PointMatch:
    """A one-to-one matching of truth points to detected points.

    Attributes
    ----------
    truth_index, detected_index : ndarray of int64
        Matched pairs (same length).
    distance : ndarray of float64
        Distance of each pair, in the units of the coordinates given.
    n_truth, n_detected : int
    """

    truth_index: np.ndarray
    detected_index: np.ndarray
    distance: np.ndarray
    n_truth: int
    n_detected: int

    @property
    def tp(self) -> int:
        return int(self.truth_index.size)


def match_points(truth_xy: Any, detected_xy: Any, *, radius: float) -> PointMatch:
    """Match truth to detected points one-to-one within `radius`: most pairs, then least total distance.

    Candidate pairs closer than `radius` form a bipartite graph; each connected component is solved exactly with
    the Hungarian algorithm (:func:`scipy.optimize.linear_sum_assignment`). A pair beyond the radius costs more than
    any set of admissible pairs, so the matching has the largest possible number of pairs and, among those, the
    smallest total distance. Working per component keeps memory linear in the number of points.

    Parameters
    ----------
    truth_xy, detected_xy : array-like, shape (n, 2) and (m, 2)
        Point coordinates (x, y), in one unit (µm, say).
    radius : float
        Largest distance of a match (inclusive), same unit.

    Returns
    -------
    PointMatch
    """
    if not radius > 0:
        raise CleihcError(f"the matching radius must be positive, got {radius}")
    t = np.asarray(truth_xy, dtype=np.float64).reshape(-1, 2)
    d = np.asarray(detected_xy, dtype=np.float64).reshape(-1, 2)
    n, m = len(t), len(d)
    empty = np.zeros(0, dtype=np.int64)
    if n == 0 or m == 0:
        return PointMatch(empty, empty, np.zeros(0), n, m)
    dist = cKDTree(t).sparse_distance_matrix(cKDTree(d), radius, output_type="coo_matrix")
    if dist.nnz == 0:
        return PointMatch(empty, empty, np.zeros(0), n, m)
    rows, cols, vals = dist.row, dist.col, dist.data
    # Joint graph over truth nodes 0..n-1 and detected nodes n..n+m-1; exact zero distances stay as edges.
    graph = sparse.coo_matrix((np.ones(rows.size), (rows, cols + n)), shape=(n + m, n + m))
    _, label = sparse.csgraph.connected_components(graph, directed=False)
    comp = label[rows]
    order = np.argsort(comp, kind="stable")
    rows, cols, vals, comp = rows[order], cols[order], vals[order], comp[order]
    bounds = np.flatnonzero(np.diff(comp)) + 1
    out_t, out_d, out_dist = [], [], []
    for r, c, v in zip(np.split(rows, bounds), np.split(cols, bounds), np.split(vals, bounds), strict=True):
        ut, it = np.unique(r, return_inverse=True)
        ud, id_ = np.unique(c, return_inverse=True)
        if ut.size == 1 or ud.size == 1:  # a star: the single nearest neighbour is optimal
            j = int(np.argmin(v))
            out_t.append(r[j : j + 1])
            out_d.append(c[j : j + 1])
            out_dist.append(v[j : j + 1])
            continue
        big = radius * (min(ut.size, ud.size) + 1) + 1.0
        cost = np.full((ut.size, ud.size), big)
        cost[it, id_] = v
        ri, ci = optimize.linear_sum_assignment(cost)
        keep = cost[ri, ci] < big
        out_t.append(ut[ri[keep]])
        out_d.append(ud[ci[keep]])
        out_dist.append(cost[ri[keep], ci[keep]])
    ti = np.concatenate(out_t).astype(np.int64)
    di = np.concatenate(out_d).astype(np.int64)
    dd = np.concatenate(out_dist).astype(np.float64)
    order = np.argsort(ti, kind="stable")
    return PointMatch(ti[order], di[order], dd[order], n, m)


@dataclass(frozen=True)
class Detection:
    """Detection scores of one class on one slide (or pooled)."""

    label: str
    n_truth: int
    n_detected: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_distance_um: float


def detection_scores(
    truth_xy_um: Any,
    truth_positive: Any,
    detected_xy_um: Any,
    detected_positive: Any,
    *,
    radius_um: float,
) -> tuple[Detection, Detection, Detection]:
    """Detection F1 for all cells, positive cells and negative cells.

    Parameters
    ----------
    truth_xy_um, detected_xy_um : array-like, shape (n, 2), (m, 2)
        Centroids in µm.
    truth_positive, detected_positive : array-like of bool
        Class of each point.
    radius_um : float
        Largest centre distance of a match.

    Returns
    -------
    (Detection, Detection, Detection)
        ``all`` (classes ignored), ``positive`` (positive truth matched to positive detections only) and
        ``negative`` (likewise), each a one-to-one matching within the radius.
    """
    out = [
        _scores(label, m)
        for label, _, _, m in _class_matches(
            truth_xy_um, truth_positive, detected_xy_um, detected_positive, radius_um=radius_um
        )
    ]
    return out[0], out[1], out[2]


def _class_matches(
    truth_xy_um: Any, truth_positive: Any, detected_xy_um: Any, detected_positive: Any, *, radius_um: float
) -> list[tuple[str, np.ndarray, np.ndarray, PointMatch]]:
    """(label, truth indices, detected indices, matching within those subsets) for all, positive, negative."""
    t = np.asarray(truth_xy_um, dtype=np.float64).reshape(-1, 2)
    d = np.asarray(detected_xy_um, dtype=np.float64).reshape(-1, 2)
    tp_ = np.asarray(truth_positive, dtype=bool).ravel()
    dp_ = np.asarray(detected_positive, dtype=bool).ravel()
    out = []
    for label, ts, ds in (
        ("all", np.ones(len(t), bool), np.ones(len(d), bool)),
        ("positive", tp_, dp_),
        ("negative", ~tp_, ~dp_),
    ):
        ti, di = np.flatnonzero(ts), np.flatnonzero(ds)
        out.append((label, ti, di, match_points(t[ti], d[di], radius=radius_um)))
    return out


def detection_by_region(
    truth_xy_um: Any,
    truth_positive: Any,
    truth_region: Any,
    detected_xy_um: Any,
    detected_positive: Any,
    detected_region: Any,
    *,
    radius_um: float,
) -> pd.DataFrame:
    """Detection scores per region (skin compartment), from one matching over the whole slide.

    The slide is matched once per class (as in :func:`detection_scores`); a true positive and a missed truth point
    count in the truth point's region, an unmatched detection in the detected cell's region. Precision, recall and
    F1 follow per region (``f1 = 2 tp / (2 tp + fp + fn)``).

    Returns
    -------
    pandas.DataFrame
        Columns ``label, region, n_truth, n_detected, tp, fp, fn, precision, recall, f1``; regions with neither
        truth nor detections are left out.
    """
    tr = np.asarray(truth_region, dtype=object).ravel()
    dr = np.asarray(detected_region, dtype=object).ravel()
    rows = []
    for label, ti, di, m in _class_matches(
        truth_xy_um, truth_positive, detected_xy_um, detected_positive, radius_um=radius_um
    ):
        t_reg, d_reg = tr[ti], dr[di]
        matched_t = np.zeros(len(ti), bool)
        matched_t[m.truth_index] = True
        matched_d = np.zeros(len(di), bool)
        matched_d[m.detected_index] = True
        for region in sorted({str(r) for r in t_reg} | {str(r) for r in d_reg}):
            in_t, in_d = t_reg == region, d_reg == region
            tp = int((matched_t & in_t).sum())
            fn = int((~matched_t & in_t).sum())
            fp = int((~matched_d & in_d).sum())
            if tp + fn + fp == 0:
                continue
            rows.append(
                {
                    "label": label,
                    "region": region,
                    "n_truth": tp + fn,
                    "n_detected": tp + fp,
                    "tp": tp,
                    "fp": fp,
                    "fn": fn,
                    "precision": tp / (tp + fp) if tp + fp else math.nan,
                    "recall": tp / (tp + fn) if tp + fn else math.nan,
                    "f1": 2 * tp / (2 * tp + fp + fn),
                }
            )
    cols = ["label", "region", "n_truth", "n_detected", "tp", "fp", "fn", "precision", "recall", "f1"]
    return pd.DataFrame(rows, columns=cols)


def _scores(label: str, m: PointMatch) -> Detection:
    tp = m.tp
    fp, fn = m.n_detected - tp, m.n_truth - tp
    precision = tp / m.n_detected if m.n_detected else math.nan
    recall = tp / m.n_truth if m.n_truth else math.nan
    f1 = 2 * tp / (m.n_truth + m.n_detected) if (m.n_truth + m.n_detected) else math.nan
    mean_d = float(m.distance.mean()) if tp else math.nan
    return Detection(label, m.n_truth, m.n_detected, tp, fp, fn, precision, recall, f1, mean_d)


# --------------------------------------------------------------------------------------------------------------
# Reading truth
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Truth:
    """Reference data for validation.

    Attributes
    ----------
    values : pandas.DataFrame
        Columns ``slide, region, metric, reference`` and where each value was read: ``source`` (the file) and
        ``line`` (its data line in a CSV, counting from 1 below the header; 0 for JSON), so that errors can point
        at it.
    points : pandas.DataFrame
        Columns ``slide, x_px, y_px, x_um, y_um, positive, region`` (level-0 px or µm, the other pair may be NaN;
        region "" when the truth does not say).
    """

    values: pd.DataFrame
    points: pd.DataFrame


_VALUE_COLUMNS = ["slide", "region", "metric", "reference", "source", "line"]
_POINT_COLUMNS = ["slide", "x_px", "y_px", "x_um", "y_um", "positive", "region"]


def _empty_values() -> pd.DataFrame:
    return pd.DataFrame(
        {
            c: pd.Series(dtype={"reference": "float64", "line": "int64"}.get(c, "object"))
            for c in _VALUE_COLUMNS
        }
    )


def _empty_points() -> pd.DataFrame:
    return pd.DataFrame(
        {
            c: pd.Series(
                dtype=bool if c == "positive" else ("object" if c in ("slide", "region") else "float64")
            )
            for c in _POINT_COLUMNS
        }
    )


def _slide_of_file(path: Path) -> str:
    name = path.name
    for suffix in (".truth.json", ".geojson", ".json", ".csv"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _parse_class(values: pd.Series, path: Path) -> np.ndarray:
    if pd.api.types.is_bool_dtype(values):
        return values.to_numpy(bool)
    words = values.astype(str).str.strip().str.lower()
    pos = words.isin(_POSITIVE_WORDS)
    neg = words.isin(_NEGATIVE_WORDS)
    bad = sorted(set(words[~(pos | neg)]))
    if bad:
        raise CleihcError(
            f"unknown point class {bad[0]!r}; use positive/negative (or true/false) in the class column",
            path=path,
        )
    return pos.to_numpy(bool)


def _read_synthetic(path: Path, data: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    slide = _slide_of_file(path)
    rows = []
    # Without a cell marker (CXCL10, mucin) the generator's cells are all "negative": only the nucleus count is a
    # truth about cells, and the positive/negative split is left out.
    marker = bool(data.get("cell_marker", True))
    class_metrics = {"n_positive_cells", "n_negative_cells", "positive_cells_per_mm2"}
    for region, d in (data.get("area_truth") or {}).items():
        for key, metric in SYNTHETIC_METRICS.items():
            v = d.get(key)
            if v is not None and (marker or key not in class_metrics):
                rows.append((slide, region, metric, float(v), str(path), 0))
        if d.get("n_positive_cells") is not None and d.get("n_negative_cells") is not None:
            total = float(d["n_positive_cells"] + d["n_negative_cells"])
            rows.append((slide, region, "cells_total", total, str(path), 0))
    values = pd.DataFrame(rows, columns=_VALUE_COLUMNS) if rows else _empty_values()
    cells = data.get("cells") or []
    if cells and data.get("cell_marker", True):
        mpp = float(data["mpp_um"])
        x = np.array([c["x_px"] for c in cells], dtype=np.float64)
        y = np.array([c["y_px"] for c in cells], dtype=np.float64)
        points = pd.DataFrame(
            {
                "slide": slide,
                "x_px": x,
                "y_px": y,
                "x_um": x * mpp,
                "y_um": y * mpp,
                "positive": np.array([bool(c["positive"]) for c in cells]),
                "region": np.array([str(c.get("region", "")) for c in cells], dtype=object),
            }
        )
    else:  # area stains: the generator's cells carry no marker, so only the area truth is a reference
        points = _empty_points()
    return values, points


def _read_geojson(path: Path, data: dict[str, Any], slide: str) -> pd.DataFrame:
    feats = data.get("features") if isinstance(data, dict) else data
    if not isinstance(feats, list):
        raise CleihcError(
            "not a GeoJSON FeatureCollection of points; export points from QuPath as GeoJSON", path=path
        )
    xs, ys, pos = [], [], []
    for f in feats:
        if not isinstance(f, dict):
            continue
        geom = f.get("geometry") or {}
        props = f.get("properties") or {}
        cls = props.get("classification")
        name = cls.get("name") if isinstance(cls, dict) else (cls if cls is not None else props.get("class"))
        if name is None and "positive" in props:
            name = str(bool(props["positive"]))
        if geom.get("type") == "Point":
            coords = [geom.get("coordinates")]
        elif geom.get("type") == "MultiPoint":
            coords = geom.get("coordinates") or []
        else:
            continue
        if name is None:
            raise CleihcError(
                "a point has no classification; classify points Positive or Negative", path=path
            )
        label = _parse_class(pd.Series([str(name)]), path)[0]
        for c in coords:
            try:
                x, y = float(c[0]), float(c[1])
            except (TypeError, ValueError, IndexError):
                raise CleihcError(
                    f"a point has invalid coordinates {c!r}; expected [x, y]", path=path
                ) from None
            xs.append(x)
            ys.append(y)
            pos.append(label)
    n = len(xs)
    return pd.DataFrame(
        {
            "region": [""] * n,
            "slide": [slide] * n,
            "x_px": xs,
            "y_px": ys,
            "x_um": [math.nan] * n,
            "y_um": [math.nan] * n,
            "positive": pos,
        }
    ).astype({"positive": bool})[_POINT_COLUMNS]


def _pick(columns: list[str], *names: str) -> str | None:
    low = {c.lower(): c for c in columns}
    for n in names:
        if n in low:
            return low[n]
    return None


def _read_csv(path: Path, default_slide: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    try:
        df = read_user_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise CleihcError(
            f"cannot read the truth CSV ({' '.join(str(exc).split())}); save it as UTF-8 CSV", path=path
        ) from None
    cols = list(df.columns)
    slide_col = _pick(cols, "slide", "image", "slide_name")
    slides = (
        _labels(df[slide_col], path, "slide").map(_strip_ext)
        if slide_col
        else pd.Series([default_slide] * len(df))
    )
    xpx, ypx = (
        _pick(cols, "x_px", "x", "centroid_x", "centroid x px"),
        _pick(cols, "y_px", "y", "centroid_y", "centroid y px"),
    )
    xum, yum = (
        _pick(cols, "x_um", "centroid x µm", "centroid_x_um"),
        _pick(cols, "y_um", "centroid y µm", "centroid_y_um"),
    )
    region_col = _pick(cols, "region")
    if (xpx and ypx) or (xum and yum):
        cls_col = _pick(cols, "class", "positive", "label", "classification")
        if cls_col is None:
            raise CleihcError(
                "a points CSV needs a class (positive/negative) or positive (true/false) column", path=path
            )
        n = len(df)

        def coord(col: str | None) -> np.ndarray:
            if col is None:
                return np.full(n, np.nan)
            v = pd.to_numeric(df[col], errors="coerce").to_numpy(float)
            bad = np.flatnonzero(~np.isfinite(v))
            if bad.size:
                raise CleihcError(
                    f"column {col!r} has a missing or non-numeric value on data line {bad[0] + 1}; "
                    "give every point numeric coordinates",
                    path=path,
                )
            return v

        points = pd.DataFrame(
            {
                "slide": slides.to_numpy(object),
                "x_px": coord(xpx if xpx and ypx else None),
                "y_px": coord(ypx if xpx and ypx else None),
                "x_um": coord(xum if xum and yum else None),
                "y_um": coord(yum if xum and yum else None),
                "positive": _parse_class(df[cls_col], path),
                # An empty region is a point whose region the truth does not say, not a region named "nan".
                "region": df[region_col].fillna("").astype(str).str.strip().to_numpy(object)
                if region_col
                else np.full(n, "", object),
            }
        )[_POINT_COLUMNS]
        return _empty_values(), points
    regions = _labels(df[region_col], path, "region") if region_col else pd.Series(["tissue"] * len(df))
    where = {"source": str(path), "line": np.arange(1, len(df) + 1, dtype=np.int64)}
    decimal_comma = _decimal_comma_file(path)
    metric_col, value_col = _pick(cols, "metric"), _pick(cols, "value")
    if metric_col and value_col:
        names = df[metric_col]
        empty = names.isna() | (names.astype(str).str.strip() == "")
        if empty.any():
            raise CleihcError(
                f"column {metric_col!r} is empty on data line {int(np.flatnonzero(empty)[0]) + 1}; "
                "name the metric of every value (as in regions.csv, e.g. cells_positive)",
                path=path,
            )
        values = pd.DataFrame(
            {
                "slide": slides.to_numpy(object),
                "region": regions.to_numpy(object),
                "metric": names.astype(str).str.strip().to_numpy(object),
                "reference": _numbers(df[value_col], value_col, path, decimal_comma=decimal_comma),
                **where,
            }
        )
        return values, _empty_points()
    from cleihc.tables import ID_COLUMNS

    skip = {slide_col, region_col}
    # Study metadata and identifiers are never metrics, numbers or not (a timepoint 0/12 is no count).
    ids = [c for c in cols if c not in skip and str(c).lower() in _IDENTIFIER_COLUMNS | set(ID_COLUMNS)]
    for c in cols:
        if c in skip or c in ids or pd.api.types.is_numeric_dtype(df[c]) or not _named_as_metric(c):
            continue  # numbers already, or not named as a metric (subject IDs, notes)
        # A metric column with text in it would otherwise drop out of the comparison without a word.
        df[c] = _numbers(df[c], c, path, decimal_comma=decimal_comma)
    metric_cols = [c for c in cols if c not in skip and c not in ids and pd.api.types.is_numeric_dtype(df[c])]
    ids += [c for c in cols if c not in skip and c not in ids and c not in metric_cols]  # text: IDs, notes
    if ids:
        log.info(
            "%s: column(s) %s are identifiers, study metadata or notes, not metrics: not compared",
            path,
            ", ".join(map(str, ids)),
        )
    if not metric_cols:
        raise CleihcError(
            "the truth CSV has neither point columns (x_px, y_px, class) nor numeric metric columns "
            "(e.g. cells_positive, positive_area_percent, named as in regions.csv)",
            path=path,
        )
    parts = [
        pd.DataFrame(
            {
                "slide": slides.to_numpy(object),
                "region": regions.to_numpy(object),
                "metric": m,
                "reference": df[m].to_numpy(float),
                **where,
            }
        )
        for m in metric_cols
    ]
    return pd.concat(parts, ignore_index=True), _empty_points()


@functools.cache
def _cleihc_metrics() -> frozenset[str]:
    """Every metric name cleihc writes in ``regions.csv`` (the keys of :func:`cleihc.measure.area_metrics` and
    :func:`cleihc.measure.cell_metrics`), whichever of them a protocol measures."""
    from cleihc.measure import AreaTotals, area_metrics, cell_metrics

    return frozenset(
        {
            *area_metrics(AreaTotals((0, 0, 0, 0), 0.0, 0), pixel_area_um2=1.0),
            *cell_metrics(pd.DataFrame(), region_area_mm2=0.0),
            *SYNTHETIC_METRICS.values(),
        }
    )


def _named_as_metric(name: Any) -> bool:
    """Whether a truth column is named like a cleihc metric (any case): a known metric, or a name with a metric's
    unit in it (``cells_...``, ``..._mm2``, ``..._percent``)."""
    from cleihc.tables import metric_unit

    low = str(name).lower()
    return low in _cleihc_metrics() or bool(metric_unit(low))


def _labels(values: pd.Series, path: Path, what: str) -> pd.Series:
    """A slide or region column as text; an empty cell (or one pandas reads as missing, such as ``NA``) is an error
    naming its data line: it would become a slide or region named "nan"."""
    empty = values.isna().to_numpy(bool) | (values.astype(str).str.strip() == "").to_numpy(bool)
    if empty.any():
        line = int(np.flatnonzero(empty)[0]) + 1
        raise CleihcError(
            f"column {values.name!r} is empty on data line {line}; give the {what} of every row (a {what} named "
            "NA, n/a or null is read as missing: rename it)",
            path=path,
        )
    return values.astype(str).str.strip()


def _decimal_comma_file(path: Path) -> bool:
    """Whether :func:`cleihc.io.read_user_csv` reads `path` as a decimal-comma (``;``-separated) file: its header
    holds a ``;`` and no ``,``."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            header = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return ";" in header and "," not in header


def _numbers(values: pd.Series, column: str, path: Path, *, decimal_comma: bool) -> np.ndarray:
    """A CSV column of reference values as floats: empty cells (and pandas' missing markers such as ``NA``,
    ``n/a``) are NaN, anything else that is not a number is an error naming the column, data line and value.

    A decimal comma (``84,0``) is a number in a ``;``-separated file, as pandas reads that file's numeric columns;
    in a ``,``-separated file it is refused, as ``1,234`` could as well be a thousands separator.
    """
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.to_numpy(float)
    text = pd.Series(["" if pd.isna(v) else str(v).strip() for v in values], dtype=object)
    blank = (text == "").to_numpy(bool)
    if decimal_comma:
        # A column pandas left as text (it holds a word too) still has its decimal commas: read them here.
        text = text.str.replace(r"^([+-]?\d*),(\d+)$", r"\1.\2", regex=True)
    numbers = pd.to_numeric(text.where(~blank), errors="coerce").to_numpy(float)
    bad = np.flatnonzero(~blank & np.isnan(numbers))
    if bad.size:
        value = str(values.iloc[bad[0]])
        hint = (
            f"write {value.strip().replace(',', '.')} with a decimal point, or save the CSV with ';' between "
            "fields as Excel does in decimal-comma locales"
            if re.fullmatch(r"\s*[+-]?\d*,\d+\s*", value)
            else "give a number, or leave the cell empty for a missing value"
        )
        raise CleihcError(
            f"column {column!r} holds {value!r} on data line {bad[0] + 1}, not a number; {hint}", path=path
        )
    return numbers


def _strip_ext(name: str) -> str:
    base = os.path.basename(name.strip())
    return re.sub(r"\.(ome\.tiff?|tiff?|svs|ndpi|mrxs|scn|bif|vsi|dcm|png|jpe?g|czi)$", "", base, flags=re.I)


def read_truth(path: str | os.PathLike[str], *, default_slide: str | None = None) -> Truth:
    """Read reference values and/or points from a file or a folder (see the module docstring for formats).

    Parameters
    ----------
    path : path
        File or folder.
    default_slide : str, optional
        Slide of a file that does not say (a CSV without ``slide`` column, a GeoJSON); by default the file's name
        without its extension.

    Returns
    -------
    Truth
    """
    p = Path(path)
    if not p.exists():
        raise CleihcError("truth file or folder not found; check the --truth path", path=p)
    files = (
        sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
    )
    values, points = [], []
    for f in files:
        name = f.name.lower()
        if not name.endswith((".json", ".geojson", ".csv")):
            continue
        slide = default_slide if (default_slide and not p.is_dir()) else _slide_of_file(f)
        if name.endswith(".csv"):
            v, pts = _read_csv(f, slide)
        else:
            try:
                with open(f, encoding="utf-8") as fh:
                    data = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CleihcError(f"not valid JSON ({exc})", path=f) from None
            if isinstance(data, dict) and "area_truth" in data:
                v, pts = _read_synthetic(f, data)
            else:
                v, pts = _empty_values(), _read_geojson(f, data, slide)
        values.append(v)
        points.append(pts)
    if not values:
        raise CleihcError("no truth files (.csv, .geojson, .json, .truth.json) found", path=p)
    v = pd.concat([x for x in values if len(x)] or [_empty_values()], ignore_index=True)
    pts = pd.concat([x for x in points if len(x)] or [_empty_points()], ignore_index=True)
    if v.empty and pts.empty:
        raise CleihcError("the truth holds no values and no points", path=p)
    return Truth(values=v, points=pts)


# --------------------------------------------------------------------------------------------------------------
# Validation of a results folder
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValidationResult:
    """The outcome of :func:`validate`.

    Attributes
    ----------
    pairs : pandas.DataFrame
        One row per slide × region × metric: ``slide, region, metric, reference, measured, difference``.
    agreement : pandas.DataFrame
        One row per metric × region scope (``all`` pools every region): n, bias, limits of agreement, ICC(2,1)
        with its interval, ICC(3,1), Lin's CCC with its interval, Pearson r.
    detection : pandas.DataFrame
        One row per slide × class (``all``, ``positive``, ``negative``), and pooled rows with slide ``ALL``:
        n_truth, n_detected, tp, fp, fn, precision, recall, f1, mean_distance_um.
    detection_by_region : pandas.DataFrame
        The same per region (:func:`detection_by_region`) when the truth points carry regions (synthetic truth, a
        points CSV with a region column) and the detected cells do; slide ``ALL`` pools the slides.
    radius_um : float
    warnings : tuple of str
    """

    pairs: pd.DataFrame
    agreement: pd.DataFrame
    detection: pd.DataFrame
    detection_by_region: pd.DataFrame
    radius_um: float
    warnings: tuple[str, ...]


def _level0_mpp(record: dict[str, Any]) -> float | None:
    try:
        a = record["provenance"]["analysis"]
        return float(a["mpp_um"][0]) / float(a["downsample"])
    except (KeyError, TypeError, IndexError, ValueError, ZeroDivisionError):
        return None


def validate(
    results_dir: str | os.PathLike[str],
    truth: Truth,
    *,
    radius_um: float = 4.0,
) -> ValidationResult:
    """Compare a results folder with reference data.

    Parameters
    ----------
    results_dir : path
        The ``--out`` folder of ``cleihc quantify``.
    truth : Truth
        From :func:`read_truth`.
    radius_um : float
        Largest distance (µm) between a truth point and a detected cell centroid for a match; about a nucleus
        radius (4 µm for lymphocytes).

    Returns
    -------
    ValidationResult
        Truth values are joined to the results by slide, region (ignoring case, as ``--regions`` names them) and
        metric (ignoring case too); only the results' metrics are compared, never an identifier or study metadata
        (``subject``, ``timepoint``: an info line names them). Truth columns named as no cleihc metric (with the
        closest metric names as a hint), and values of the results' slides that match nothing or whose measured
        value is empty, are named in its `warnings`, each also logged when found, so that an error later in the
        run follows the warnings that explain it.

    Raises
    ------
    CleihcError
        When no truth slide, no truth column named as a metric, or no truth value matches the results, or a
        slide × region × metric has more than one truth value.
    """
    from cleihc.outputs import read_slide_records
    from cleihc.tables import regions_table_with_metadata

    folder = Path(results_dir)
    measured, metadata = regions_table_with_metadata(folder)
    records = {r["slide"]: r for r in read_slide_records(folder)}
    warnings: list[str] = []
    pair_parts = []
    known = set(records)
    truth_slides = set(truth.values["slide"]) | set(truth.points["slide"])
    missing = sorted(truth_slides - known)
    if missing:  # common when one truth folder serves several stains' results: compare what is here
        _warn(
            warnings,
            f"{len(missing)} truth slide(s) have no results in {folder} and are ignored: "
            + ", ".join(missing[:5])
            + (", ..." if len(missing) > 5 else ""),
        )
    if not truth_slides & known:
        raise CleihcError(
            "no truth slide is in these results; truth files must be named after the slides (<slide>.truth.json, "
            "<slide>.geojson) or carry a 'slide' column",
            path=folder,
        )
    region_name = _region_namer(measured["region"] if len(measured) else pd.Series(dtype=object))
    if len(truth.values):
        pair_parts.append(
            _value_pairs(truth.values, measured, metadata, known, region_name, folder, warnings)
        )
    det_rows = []
    region_parts = []
    if len(truth.points):
        points = truth.points[truth.points["slide"].isin(known)]
        points = points.assign(region=points["region"].map(region_name))
        for slide, pts in points.groupby("slide", sort=True):
            rec = records[slide]
            cells_path = folder / "cells" / f"{slide}.parquet"
            if not cells_path.exists():
                _warn(
                    warnings,
                    f"{slide}: no cells table in the results (an area protocol?); points not compared",
                )
                continue
            cells = pd.read_parquet(cells_path)
            # Cells outside the tissue are in no reported number, so they are not detections either.
            if "region" in cells:
                cells = cells[cells["region"].astype(str) != "outside"]
            mpp = _level0_mpp(rec)
            if mpp is None and len(cells) and cells["x_px"].abs().max() > 0:
                mpp = float(
                    (cells["x_um"] / cells["x_px"]).replace([np.inf, -np.inf], np.nan).dropna().median()
                )
            txy = _points_um(pts, mpp, slide)
            dxy = cells[["x_um", "y_um"]].to_numpy(float)
            dpos = cells["positive"].to_numpy(bool)
            if "pigment" in cells:  # pigment-flagged cells are not counted as positive by the pipeline
                dpos = dpos & ~cells["pigment"].to_numpy(bool)
            tpos = pts["positive"].to_numpy(bool)
            for d in detection_scores(txy, tpos, dxy, dpos, radius_um=radius_um):
                det_rows.append({"slide": slide, **d.__dict__})
            treg = pts["region"].fillna("").astype(str).to_numpy(object)
            if "region" in cells and (treg != "").all():
                by_region = detection_by_region(
                    txy,
                    tpos,
                    treg,
                    dxy,
                    dpos,
                    cells["region"].astype(str).to_numpy(object),
                    radius_um=radius_um,
                )
                by_region.insert(0, "slide", slide)
                region_parts.append(by_region)
            n_tp, n_dp = int(tpos.sum()), int(dpos.sum())
            counts = [
                ("points_total", len(tpos), len(dpos)),
                ("points_positive", n_tp, n_dp),
                ("points_negative", len(tpos) - n_tp, len(dpos) - n_dp),
                (
                    "points_positive_percent",
                    100.0 * n_tp / len(tpos) if len(tpos) else math.nan,
                    100.0 * n_dp / len(dpos) if len(dpos) else math.nan,
                ),
            ]
            pair_parts.append(
                pd.DataFrame(
                    [(slide, "points", m, float(r), float(v)) for m, r, v in counts],
                    columns=["slide", "region", "metric", "reference", "measured"],
                )
            )
    pairs = (
        pd.concat([p for p in pair_parts if len(p)], ignore_index=True)
        if any(len(p) for p in pair_parts)
        else pd.DataFrame(columns=["slide", "region", "metric", "reference", "measured"])
    )
    if pairs.empty and not det_rows:
        raise CleihcError(
            "nothing to compare: no truth slide, region and metric matches the results "
            "(check slide names and metric column names against regions.csv)",
            path=folder,
        )
    pairs = pairs.astype({"reference": float, "measured": float})
    pairs["difference"] = pairs["measured"] - pairs["reference"]
    pairs = pairs.sort_values(["metric", "region", "slide"], kind="stable").reset_index(drop=True)
    agree_rows = []
    for metric, g in pairs.groupby("metric", sort=True):
        scopes = [("all", g)] + (
            [(r, gr) for r, gr in g.groupby("region", sort=True)] if g["region"].nunique() > 1 else []
        )
        for scope, gg in scopes:
            a = agreement(gg["reference"].to_numpy(), gg["measured"].to_numpy())
            agree_rows.append({"metric": metric, "region": scope, **a.as_row()})
    agree = pd.DataFrame(agree_rows)
    detection = pd.DataFrame(det_rows)
    if len(detection):
        pooled = []
        for label, g in detection.groupby("label", sort=False):
            tp, nt, nd = int(g["tp"].sum()), int(g["n_truth"].sum()), int(g["n_detected"].sum())
            md = float(np.average(g["mean_distance_um"].fillna(0), weights=g["tp"])) if tp else math.nan
            pooled.append(
                {
                    "slide": "ALL",
                    "label": label,
                    "n_truth": nt,
                    "n_detected": nd,
                    "tp": tp,
                    "fp": nd - tp,
                    "fn": nt - tp,
                    "precision": tp / nd if nd else math.nan,
                    "recall": tp / nt if nt else math.nan,
                    "f1": 2 * tp / (nt + nd) if nt + nd else math.nan,
                    "mean_distance_um": md,
                }
            )
        detection = pd.concat([detection, pd.DataFrame(pooled)], ignore_index=True)
    by_region = pd.concat(region_parts, ignore_index=True) if region_parts else pd.DataFrame()
    if len(by_region):
        sums = by_region.groupby(["label", "region"], sort=False)[
            ["n_truth", "n_detected", "tp", "fp", "fn"]
        ].sum()
        sums = sums.reset_index()
        with np.errstate(divide="ignore", invalid="ignore"):
            sums["precision"] = np.where(sums["n_detected"] > 0, sums["tp"] / sums["n_detected"], np.nan)
            sums["recall"] = np.where(sums["n_truth"] > 0, sums["tp"] / sums["n_truth"], np.nan)
            sums["f1"] = 2 * sums["tp"] / (2 * sums["tp"] + sums["fp"] + sums["fn"])
        sums.insert(0, "slide", "ALL")
        by_region = pd.concat([by_region, sums], ignore_index=True)
    return ValidationResult(
        pairs=pairs,
        agreement=agree,
        detection=detection,
        detection_by_region=by_region,
        radius_um=float(radius_um),
        warnings=tuple(warnings),
    )


_KEY = ["slide", "region", "metric"]


def _warn(warnings: list[str], text: str) -> None:
    """Keep a warning for the result and log it now: an error later in the run must not hide it (a "no truth
    value matches" is explained by the "truth slides have no results" found before it)."""
    warnings.append(text)
    log.warning("%s", text)


def _result_metrics(measured: pd.DataFrame, metadata: list[str]) -> list[str]:
    """The metric columns of the results' regions table, as :func:`cleihc.tables.tidy` tells them: not an
    identifier, not study metadata (a numeric subject or timepoint is no metric), numeric or empty."""
    from cleihc.tables import ID_COLUMNS

    return [
        c
        for c in measured.columns
        if c not in ID_COLUMNS
        and c not in metadata
        and (pd.api.types.is_numeric_dtype(measured[c]) or measured[c].isna().all())
    ]


def _metric_names(
    names: Any, result_metrics: list[str], metadata: list[str]
) -> tuple[dict[str, str], list[str], dict[str, list[str]]]:
    """Sort truth metric names (wide columns, long ``metric`` values) into metrics and the rest.

    Returns
    -------
    (dict, list, dict)
        The metric each metric name stands for (itself, or the one metric whose name differs only in case:
        ``Cells_Positive`` is ``cells_positive``); the names of identifiers and study metadata (the results'
        metadata columns, ``subject``, ``timepoint``, ...); and the other names, none a cleihc metric, each with
        the closest metric names as a hint.
    """
    known = sorted(set(result_metrics) | _cleihc_metrics())
    by_lower: dict[str, list[str]] = {}
    for m in known:
        by_lower.setdefault(m.lower(), []).append(m)
    idents = _IDENTIFIER_COLUMNS | {c.lower() for c in metadata}
    rename, identifiers, unknown = {}, [], {}
    for name in map(str, names):
        low = name.lower()
        same = [m for m in by_lower.get(low, []) if m in result_metrics] or by_lower.get(low, [])
        if name in known:
            rename[name] = name
        elif len(same) == 1:
            rename[name] = same[0]
        elif same:  # the results hold two metrics differing only in case: no single match, left unmatched
            rename[name] = name
        elif low in idents:
            identifiers.append(name)
        else:  # a typo (cels_positive) as much as an identifier (age): a hint tells them apart
            unknown[name] = difflib.get_close_matches(low, [m.lower() for m in known], n=3, cutoff=0.6)
    return rename, identifiers, unknown


def _region_namer(measured_regions: pd.Series) -> Any:
    """A function giving a truth region name the results' name for it: the same name, or the one name that
    differs only in case ("Epidermis" is ``epidermis``, as ``--regions`` takes it); other names unchanged."""
    names = {str(r) for r in measured_regions.dropna().unique()}
    by_lower: dict[str, list[str]] = {}
    for n in sorted(names):
        by_lower.setdefault(n.lower(), []).append(n)

    def name(region: Any) -> Any:
        if not isinstance(region, str) or region in names:
            return region
        same = by_lower.get(region.lower(), [])
        # Results holding two names that differ only in case (two custom regions) leave no single match.
        return same[0] if len(same) == 1 else region

    return name


def _key_text(rows: pd.DataFrame, limit: int = 3) -> str:
    keys = [f"{r.slide}/{r.truth_region}/{r.metric}" for r in rows.head(limit).itertuples()]
    return ", ".join(keys) + (", ..." if len(rows) > limit else "")


def _refuse_duplicates(values: pd.DataFrame) -> None:
    """One truth value per slide × region × metric: a second one (even an equal one) would count twice in n, and
    which of two differing values is the truth is the user's call, not ours."""
    dup = values[values.duplicated(_KEY, keep=False)]
    if dup.empty:
        return
    first = tuple(dup.iloc[0][_KEY])
    rows = dup[(dup[_KEY] == pd.Series(first, index=_KEY)).all(axis=1)]
    n_keys = len(dup.drop_duplicates(_KEY))
    sources = list(dict.fromkeys(rows["source"]))
    if len(sources) == 1 and (rows["line"] > 0).all():
        where = "data lines " + ", ".join(str(int(v)) for v in rows["line"])
    else:
        where = "; ".join(
            f"{r.source} data line {int(r.line)}" if r.line > 0 else str(r.source) for r in rows.itertuples()
        )
    names = list(dict.fromkeys(rows["truth_region"]))
    case = (
        f" (regions {', '.join(map(repr, names))} are one region: names match ignoring case)"
        if len(names) > 1
        else ""
    )
    metric_names = list(dict.fromkeys(rows["truth_metric"])) if "truth_metric" in rows else []
    if len(metric_names) > 1:
        case += f" (metrics {', '.join(map(repr, metric_names))} are one metric: names match ignoring case)"
    more = f"; {n_keys - 1} more slide, region and metric are given twice too" if n_keys > 1 else ""
    raise CleihcError(
        f"slide {first[0]!r}, region {first[1]!r}, metric {first[2]!r} has {len(rows)} truth values "
        f"({where}){case}{more}; keep one row per slide, region and metric (which one is right is your call)",
        path=sources[0] if len(sources) == 1 and sources[0] else None,
    )


def _value_pairs(
    values: pd.DataFrame,
    measured: pd.DataFrame,
    metadata: list[str],
    known: set[str],
    region_name: Any,
    folder: Path,
    warnings: list[str],
) -> pd.DataFrame:
    """Truth values joined to the measured ones by slide, region and metric (both ignoring case).

    Only metrics are compared: truth columns naming an identifier or study metadata (``subject``, the results'
    metadata columns) are left out with an info line, other names that are no cleihc metric with a warning giving
    the closest metric names. Truth values of the results' slides that match no measured value, or match one the
    results leave empty, are named in `warnings`; when none matches, a :class:`CleihcError`. Duplicated keys are
    refused.
    """
    result_metrics = _result_metrics(measured, metadata) if len(measured) else []
    rename, identifiers, unknown = _metric_names(values["metric"].unique(), result_metrics, metadata)
    sources = [s for s in dict.fromkeys(values["source"]) if s] if "source" in values else []
    if identifiers:
        log.info(
            "truth column(s) %s are identifiers or study metadata, not metrics: not compared",
            ", ".join(identifiers),
        )
    if unknown:
        named = [f"{n} (did you mean {' or '.join(h)}?)" if h else n for n, h in unknown.items()]
        _warn(
            warnings,
            f"{len(unknown)} truth column(s) are not named as a cleihc metric and are not compared: "
            f"{', '.join(named)}; metric columns are named as in regions.csv, other columns are taken as "
            "identifiers",
        )
    values = values[values["metric"].isin(rename)]
    if values.empty:
        raise CleihcError(
            f"no truth column is a cleihc metric ({', '.join([*identifiers, *unknown])}); name the metric "
            f"columns as in regions.csv ({', '.join(result_metrics[:6]) or 'cells_positive, ...'})",
            path=sources[0] if len(sources) == 1 else None,
        )
    values = values.assign(
        source=values["source"] if "source" in values else "",
        line=values["line"] if "line" in values else 0,
        truth_region=values["region"],
        region=values["region"].map(region_name),
        truth_metric=values["metric"],
        metric=values["metric"].map(rename),
    )
    _refuse_duplicates(values)
    tv = values[values["slide"].isin(known)]
    metrics = [m for m in tv["metric"].unique() if m in result_metrics]
    long = (
        measured.melt(
            id_vars=["slide", "region"], value_vars=metrics, var_name="metric", value_name="measured"
        )
        if len(measured)
        else pd.DataFrame(columns=["slide", "region", "metric", "measured"])
    )
    merged = tv.merge(long, on=_KEY, how="left", indicator=True)
    matched = (merged["_merge"] == "both").to_numpy(bool)
    given = merged["reference"].notna().to_numpy(bool)  # an empty truth cell is a missing value, not a loss
    lost = merged[~matched & given]
    if len(lost):
        slides_measured = set(measured["slide"]) if len(measured) else set()
        no_slide = ~lost["slide"].isin(slides_measured)
        no_metric = ~no_slide & ~lost["metric"].isin(metrics)
        no_region = ~no_slide & ~no_metric
        parts = []
        if no_slide.any():
            parts.append(
                f"{int(no_slide.sum())} for slide(s) with no rows in the results' regions table "
                f"({', '.join(sorted(set(lost.loc[no_slide, 'slide']))[:5])})"
            )
        if no_metric.any():
            parts.append(
                f"{int(no_metric.sum())} with a metric the results do not have "
                f"({', '.join(sorted(set(lost.loc[no_metric, 'metric']))[:8])}; metrics are named as the "
                "columns of regions.csv)"
            )
        if no_region.any():
            regions = sorted({str(r) for r in measured["region"].dropna().unique()})
            parts.append(
                f"{int(no_region.sum())} with a region the slide's results do not have "
                f"({_key_text(lost[no_region])}; the results' regions are {', '.join(regions)}, matched "
                "ignoring case)"
            )
        if not (matched & given).any():
            sources = [s for s in dict.fromkeys(tv["source"]) if s]
            raise CleihcError(
                f"no truth value matches a value in the results {folder}: " + "; ".join(parts),
                path=sources[0] if len(sources) == 1 else None,
            )
        _warn(
            warnings,
            f"{len(lost)} of {int(given.sum())} truth values match nothing in the results and are not compared: "
            + "; ".join(parts),
        )
    empty = merged[matched & given & merged["measured"].isna().to_numpy(bool)]
    if len(empty):
        _warn(
            warnings,
            f"{len(empty)} truth value(s) have no measured value in the results (an empty cell in regions.csv) "
            f"and are left out of the statistics: {_key_text(empty)}",
        )
    drop = ["_merge", "source", "line", "truth_region", "truth_metric"]
    return merged[matched].drop(columns=drop).reset_index(drop=True)


def _points_um(pts: pd.DataFrame, mpp: float | None, slide: str) -> np.ndarray:
    xum, yum = pts["x_um"].to_numpy(float), pts["y_um"].to_numpy(float)
    need = ~(np.isfinite(xum) & np.isfinite(yum))
    if need.any():
        if mpp is None or not math.isfinite(mpp):
            raise CleihcError(
                f"{slide}: points are in pixels but the slide's µm per pixel is unknown; give x_um, y_um"
            )
        xum = np.where(need, pts["x_px"].to_numpy(float) * mpp, xum)
        yum = np.where(need, pts["y_px"].to_numpy(float) * mpp, yum)
    return np.column_stack([xum, yum])


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------
def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_write(path, mode="w") as f:
        df.to_csv(f, index=False, lineterminator="\n")


def _save_figure(fig: Any, stem: Path) -> list[Path]:
    out = []
    for ext in ("png", "svg"):
        path = stem.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=120 if ext == "png" else None, bbox_inches="tight")
        out.append(path)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_agreement(pairs: pd.DataFrame, metric: str) -> Any:
    """A figure with the measured-against-reference scatter (identity line) and the Bland–Altman plot."""
    from matplotlib.figure import Figure

    g = pairs[pairs["metric"] == metric]
    fig = Figure(figsize=(10, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    regions = sorted(g["region"].unique())
    for region in regions:
        gr = g[g["region"] == region]
        ax1.scatter(gr["reference"], gr["measured"], s=18, label=region, alpha=0.8)
        ax2.scatter((gr["reference"] + gr["measured"]) / 2, gr["difference"], s=18, label=region, alpha=0.8)
    both = np.concatenate([g["reference"].to_numpy(float), g["measured"].to_numpy(float)])
    both = both[np.isfinite(both)]
    if both.size:
        lo, hi = float(both.min()), float(both.max())
        pad = 0.05 * (hi - lo or 1.0)
        ax1.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.4", lw=1, ls="--", label="identity")
    ax1.set_xlabel(f"reference {metric}")
    ax1.set_ylabel(f"automated {metric}")
    a = agreement(g["reference"].to_numpy(), g["measured"].to_numpy())
    ba = a.bland_altman
    ax1.set_title(f"ICC(2,1) = {a.icc_2_1.value:.3f}   CCC = {a.concordance.ccc:.3f}   n = {ba.n}")
    for y, style, text in (
        (ba.bias, "-", "bias"),
        (ba.loa_lower, "--", "−1.96 SD"),
        (ba.loa_upper, "--", "+1.96 SD"),
    ):
        if math.isfinite(y):
            ax2.axhline(y, color="C3", lw=1, ls=style)
            ax2.annotate(
                f"{text} {y:.3g}",
                xy=(1, y),
                xycoords=("axes fraction", "data"),
                ha="right",
                va="bottom",
                fontsize=8,
            )
    ax2.axhline(0, color="0.6", lw=0.8)
    ax2.set_xlabel("mean of reference and automated")
    ax2.set_ylabel("automated − reference")
    ax2.set_title("Bland–Altman")
    if len(regions) > 1:
        ax1.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_detection(detection: pd.DataFrame) -> Any:
    """Precision, recall and F1 per slide for each class."""
    from matplotlib.figure import Figure

    per = detection[detection["slide"] != "ALL"]
    labels = [lab for lab in ("all", "positive", "negative") if lab in set(per["label"])]
    fig = Figure(figsize=(max(5.0, 0.35 * per["slide"].nunique() + 3), 3.2 * len(labels)))
    axes = np.atleast_1d(fig.subplots(len(labels), 1, squeeze=False)[:, 0])
    for ax, lab in zip(axes, labels, strict=True):
        g = per[per["label"] == lab]
        x = np.arange(len(g))
        for k, (col, colour) in enumerate((("precision", "C0"), ("recall", "C1"), ("f1", "C2"))):
            ax.bar(x + (k - 1) * 0.27, g[col].to_numpy(float), width=0.27, color=colour, label=col)
        ax.set_xticks(x, g["slide"].tolist(), rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"detection: {lab} cells")
        ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    return fig


def write_validation(result: ValidationResult, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``pairs.csv``, ``agreement.csv``, ``detection.csv`` and PNG + SVG figures into `out_dir`.

    Returns
    -------
    list of Path
        Every file written.
    """
    out = Path(out_dir)
    written = []
    for name, df in (
        ("pairs", result.pairs),
        ("agreement", result.agreement),
        ("detection", result.detection),
        ("detection_by_region", result.detection_by_region),
    ):
        if len(df):
            _write_csv(df, out / f"{name}.csv")
            written.append(out / f"{name}.csv")
    figs = out / "figures"
    for metric in sorted(result.pairs["metric"].unique()) if len(result.pairs) else []:
        fig = plot_agreement(result.pairs, metric)
        written += _save_figure(fig, figs / f"agreement_{_safe(metric)}")
    if len(result.detection):
        written += _save_figure(plot_detection(result.detection), figs / "detection")
    return written
