"""The statistics scripts in examples/: known answers on constructed study tables, and a run end to end on a
tidy table made by `cleihc.tables.tidy` from constructed results folders."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

pytest.importorskip("statsmodels", reason="the example scripts use statsmodels (pip install cleihc[stats])")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    # the scripts import their shared module examples/study.py, found beside them as when run as scripts
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


paired = _load("paired_pre_post")
responders = _load("responders")
correlate = _load("correlate_stains")


def _study(values: dict[tuple[str, str, str, str], float], metric_of: dict[str, str]) -> pd.DataFrame:
    """A tidy table from {(subject, timepoint, stain, region): value}."""
    rows = [
        {
            "subject": s,
            "timepoint": t,
            "slide": f"{s}_{t}_{st}",
            "stain": st,
            "region": r,
            "metric": metric_of[st],
            "value": v,
            "unit": "",
        }
        for (s, t, st, r), v in values.items()
    ]
    return pd.DataFrame(rows)


def test_paired_constant_decrease_known_answer():
    pre = [100.0, 120, 90, 150, 80, 110, 130, 95]
    vals = {}
    for i, v in enumerate(pre):
        vals[(f"S{i}", "pre", "cd8", "dermis")] = v
        vals[(f"S{i}", "post", "cd8", "dermis")] = v - 10
    res = paired.compare_pre_post(_study(vals, {"cd8": "positive_cells_per_mm2"}))
    row = res.iloc[0]
    assert row["n_pairs"] == 8
    assert row["median_change"] == -10
    assert row["rank_biserial_r"] == -1.0  # every subject decreased
    assert row["p_value"] == pytest.approx(
        2 / 2**8
    )  # only all-negative and all-positive signs are as extreme
    assert row["statistic_w"] == 0


def test_signed_rank_exact_p_hand_computed():
    # changes 1, 2, 3, -4: R+ = 6, R- = 4, r = 0.2; of the 16 sign patterns only the two with R+ = 5 are less
    # extreme than |R+ - 5| = 1, so p = 14/16.
    out = paired.wilcoxon_paired(np.zeros(4), np.array([1.0, 2, 3, -4]))
    assert out["rank_biserial_r"] == pytest.approx(0.2)
    assert out["p_value"] == pytest.approx(14 / 16)
    assert out["p_value"] == pytest.approx(stats.wilcoxon([1.0, 2, 3, -4], method="exact").pvalue)
    # ties and zeros: changes 0, 5, 5, -5 -> zero dropped, midranks 2, 2, 2; R+ = 4, R- = 2, r = 1/3
    out = paired.wilcoxon_paired(np.zeros(4), np.array([0.0, 5, 5, -5]))
    assert out["n_nonzero"] == 3
    assert out["rank_biserial_r"] == pytest.approx(1 / 3)
    assert (
        out["p_value"] == 1.0
    )  # R+ can only be 0, 2, 4 or 6: every sign pattern is at least 1 from the mean 3
    # no change at all
    assert paired.wilcoxon_paired(np.ones(3), np.ones(3))["p_value"] == 1.0


def test_paired_headline_metric_and_fdr():
    vals = {}
    rng = np.random.default_rng(0)
    for i in range(6):
        for region in ("epidermis", "dermis"):
            base = 50 + 10 * i
            vals[(f"S{i}", "pre", "cxcl10", region)] = base
            vals[(f"S{i}", "post", "cxcl10", region)] = base + rng.normal(0, 5)
    study = _study(vals, {"cxcl10": "positive_area_percent"})
    extra = study.assign(
        metric="positive_cells_per_mm2", value=1.0
    )  # CXCL10 measures both: area is the headline
    res = paired.compare_pre_post(pd.concat([study, extra], ignore_index=True))
    assert set(res["metric"]) == {"positive_area_percent"}
    assert len(res) == 2
    assert (res["q_value"] >= res["p_value"] - 1e-12).all()
    p_sorted = np.sort(res["p_value"].to_numpy())
    assert res["q_value"].max() == pytest.approx(p_sorted[-1])  # BH: the largest p-value is its own q-value


def test_responders_known_answer(tmp_path):
    vals = {}
    for i, ch in enumerate([-10.0, -20, -30]):  # responders: CXCL10 falls
        vals[(f"R{i}", "pre", "cxcl10", "dermis")] = 50
        vals[(f"R{i}", "post", "cxcl10", "dermis")] = 50 + ch
    for i, ch in enumerate([5.0, 10, 15]):
        vals[(f"N{i}", "pre", "cxcl10", "dermis")] = 50
        vals[(f"N{i}", "post", "cxcl10", "dermis")] = 50 + ch
    study = _study(vals, {"cxcl10": "positive_area_percent"})
    status = pd.Series(
        [s.startswith("R") for s in ["R0", "R1", "R2", "N0", "N1", "N2"]],
        index=["R0", "R1", "R2", "N0", "N1", "N2"],
    )
    res = responders.compare_responders(study, status)
    row = res.iloc[0]
    assert row["u_responders"] == 0
    assert row["rank_biserial_r"] == -1.0  # every responder's change is below every non-responder's
    assert row["p_value"] == pytest.approx(2 / math.comb(6, 3))  # exact: 2 of the 20 splits are this extreme
    assert row["median_change_responders"] == -20 and row["median_change_non_responders"] == 10
    # the same status from a CSV, and through main()
    pd.DataFrame({"subject": status.index, "responder": np.where(status, "yes", "no")}).to_csv(
        tmp_path / "r.csv", index=False
    )
    study.to_csv(tmp_path / "study.csv", index=False)
    assert (
        responders.main(
            [
                str(tmp_path / "study.csv"),
                "--responders",
                str(tmp_path / "r.csv"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    out = pd.read_csv(tmp_path / "o" / "responders.csv")
    assert out.loc[0, "rank_biserial_r"] == -1.0


def test_responder_rule():
    vals = {}
    # CD8 dermis: S0 falls 60 %, S1 falls 50 % (responder: <= -50), S2 falls 20 %, S3 rises
    for s, (pre, post) in {"S0": (100, 40), "S1": (100, 50), "S2": (100, 80), "S3": (100, 130)}.items():
        vals[(s, "pre", "cd8", "dermis")] = pre
        vals[(s, "post", "cd8", "dermis")] = post
        vals[(s, "pre", "cxcl10", "dermis")] = 10
        vals[(s, "post", "cxcl10", "dermis")] = 10 + (post - pre) / 10
    study = _study(vals, {"cd8": "positive_cells_per_mm2", "cxcl10": "positive_area_percent"})
    status = responders.responders_from_rule(study, "cd8:dermis:positive_cells_per_mm2:-50")
    assert status.to_dict() == {"S0": True, "S1": True, "S2": False, "S3": False}
    res = responders.compare_responders(study, status, exclude=("cd8", "dermis"))
    assert res["stain"].tolist() == ["cxcl10"]


def test_spearman_known_answers():
    vals = {}
    cd8 = [10.0, 20, 35, 50, 80, 120]
    for i, v in enumerate(cd8):
        for tp in ("pre", "post"):
            vals[(f"S{i}", tp, "cd8", "dermis")] = v
            vals[(f"S{i}", tp, "cxcl10", "dermis")] = (
                math.exp(v / 20) if tp == "pre" else -v
            )  # monotone up / down
    study = _study(vals, {"cd8": "positive_cells_per_mm2", "cxcl10": "positive_area_percent"})
    res = correlate.correlate(study).set_index("timepoint")
    assert res.loc["pre", "spearman_rho"] == pytest.approx(1.0)
    assert res.loc["post", "spearman_rho"] == pytest.approx(-1.0)
    assert res.loc["pre", "n"] == 6
    assert res.loc["pre", "stain_x"] == "cd8" and res.loc["pre", "metric_y"] == "positive_area_percent"
    pooled = correlate.correlate(study, x="cd8", y="cxcl10", pool=True)
    assert len(pooled) == 1 and pooled.loc[0, "n"] == 6  # one subject-timepoint key per subject when pooled


def _results_folder(root: Path, stain: str, values: dict[tuple[str, str], float], metric: str) -> Path:
    out = root / stain
    (out / "slides").mkdir(parents=True)
    for (subj, tp), v in values.items():
        slide = f"{subj}_{tp}_{stain}"
        rows = [
            {
                "subject": subj,
                "timepoint": tp,
                "slide": slide,
                "path": f"{slide}.svs",
                "stain": stain,
                "protocol": f"{stain}@1.0.0",
                "protocol_sha256": "0" * 64,
                "region": region,
                "region_area_mm2": 1.0,
                metric: v * (k + 1),
            }
            for k, region in enumerate(("tissue", "dermis"))
        ]
        (out / "slides" / f"{slide}.json").write_text(json.dumps({"slide": slide, "rows": rows}))
    return out


def test_scripts_end_to_end_on_tidy_table(tmp_path, capsys):
    from cleihc.tables import tidy

    subjects = [f"P{i:02d}" for i in range(7)]
    cd8 = {
        (s, tp): 100.0 + 20 * i - (30 if tp == "post" else 0)
        for i, s in enumerate(subjects)
        for tp in ("pre", "post")
    }
    cx = {
        (s, tp): 2.0 + i - (1 if tp == "post" else 0)
        for i, s in enumerate(subjects)
        for tp in ("pre", "post")
    }
    folders = [
        _results_folder(tmp_path, "cd8", cd8, "positive_cells_per_mm2"),
        _results_folder(tmp_path, "cxcl10", cx, "positive_area_percent"),
    ]
    tidy(folders).to_csv(tmp_path / "study.csv", index=False)
    out = tmp_path / "stats"
    assert paired.main([str(tmp_path / "study.csv"), "--out", str(out)]) == 0
    res = pd.read_csv(out / "paired_pre_post.csv")
    assert len(res) == 4  # 2 stains x 2 regions
    assert (res["rank_biserial_r"] == -1).all()
    assert res["p_value"].to_numpy() == pytest.approx(np.full(4, 2 / 2**7))
    assert (
        correlate.main([str(tmp_path / "study.csv"), "--out", str(out), "--x", "cd8", "--y", "cxcl10"]) == 0
    )
    cor = pd.read_csv(out / "stain_correlations.csv")
    assert cor["spearman_rho"].to_numpy() == pytest.approx(np.ones(4))
    assert (
        responders.main(
            [
                str(tmp_path / "study.csv"),
                "--out",
                str(out),
                "--rule",
                "cd8:tissue:positive_cells_per_mm2:-25",
            ]
        )
        == 0
    )
    status = pd.read_csv(out / "responder_status.csv")
    # a 30-point fall is -30 % for P00 (100 -> 70) and less for the others (120 -> 90 is -25 %: a responder)
    assert status.set_index("subject")["responder"].to_dict() == {
        "P00": True,
        "P01": True,
        **{s: False for s in subjects[2:]},
    }
    assert "rank_biserial_r" in capsys.readouterr().out
    # A slide flagged in review (napari's review queue) is left out, and said so; --keep-flagged keeps it.
    from cleihc.corrections import set_review_status

    set_review_status(folders[0], "P03_post_cd8", "flagged", note="fold")
    tidy(folders).to_csv(tmp_path / "study.csv", index=False)
    assert paired.main([str(tmp_path / "study.csv"), "--out", str(out)]) == 0
    assert "left out 1 slide(s) flagged in review (P03_post_cd8)" in capsys.readouterr().err
    res = pd.read_csv(out / "paired_pre_post.csv").set_index("stain")
    assert res.loc["cd8", "p_value"].to_numpy() == pytest.approx([2 / 2**6] * 2)  # six pairs left for CD8
    assert res.loc["cxcl10", "p_value"].to_numpy() == pytest.approx([2 / 2**7] * 2)
    assert paired.main([str(tmp_path / "study.csv"), "--out", str(out), "--keep-flagged"]) == 0
    assert pd.read_csv(out / "paired_pre_post.csv")["p_value"].to_numpy() == pytest.approx(
        np.full(4, 2 / 2**7)
    )


def test_mixed_model_balanced_change_equals_mean_difference():
    mixed = _load("mixed_model")
    rng = np.random.default_rng(4)
    vals = {}
    level = rng.normal(100, 30, 10)
    for i in range(10):
        vals[(f"S{i}", "pre", "cd8", "dermis")] = level[i] + rng.normal(0, 5)
        vals[(f"S{i}", "w12", "cd8", "dermis")] = level[i] - 20 + rng.normal(0, 5)
        vals[(f"S{i}", "w24", "cd8", "dermis")] = level[i] - 35 + rng.normal(0, 5)
    study = _study(vals, {"cd8": "positive_cells_per_mm2"})
    res = mixed.change_over_time(study, baseline="pre").set_index("timepoint")
    for tp in ("w12", "w24"):
        diffs = [
            vals[(f"S{i}", tp, "cd8", "dermis")] - vals[(f"S{i}", "pre", "cd8", "dermis")] for i in range(10)
        ]
        # balanced, complete design: the mixed-model change from baseline is the mean paired difference
        assert res.loc[tp, "change"] == pytest.approx(np.mean(diffs), rel=1e-6)
        assert res.loc[tp, "ci_lower"] < res.loc[tp, "change"] < res.loc[tp, "ci_upper"]
    assert res.loc["w24", "p_value"] < 1e-6
    # a subject missing a biopsy is kept, not dropped
    partial = study[~((study["subject"] == "S0") & (study["timepoint"] == "w24"))]
    res2 = mixed.change_over_time(partial, baseline="pre")
    assert set(res2["n_subjects"]) == {10} and set(res2["n_biopsies"]) == {29}


@pytest.mark.slow
def test_on_sample_results(tmp_path):
    """The whole study path on real outputs: quantify sample slides, tables, every script, report, validate."""
    from cleihc.cli import main
    from cleihc_testdata import SAMPLE_IMAGES

    slides = {s: [SAMPLE_IMAGES / f"S01_{t}_{s}.svs" for t in ("pre", "post")] for s in ("cd3", "cxcl10")}
    if not all(p.exists() for ps in slides.values() for p in ps):
        pytest.skip(f"sample slides absent from {SAMPLE_IMAGES} (python scripts/make_sample_images.py)")
    folders = []
    for stain, paths in slides.items():
        out = tmp_path / stain
        args = [
            "quantify",
            *map(str, paths),
            "--stain",
            stain,
            "--name-pattern",
            "{subject}_{timepoint}_{stain}",
        ]
        assert main([*args, "--out", str(out), "--quiet"]) == 0
        folders.append(out)
    study = tmp_path / "study.csv"
    assert main(["tables", *map(str, folders), "--out", str(study)]) == 0
    stats_dir = tmp_path / "stats"
    assert paired.main([str(study), "--out", str(stats_dir)]) == 0
    res = pd.read_csv(stats_dir / "paired_pre_post.csv")
    assert set(res["stain"]) == {"cd3", "cxcl10"}
    tissue = res[res["region"] == "tissue"].set_index("stain")
    # the sample set renders less disease after treatment: fewer CD3 cells and less CXCL10 area in S01
    assert tissue.loc["cd3", "median_change"] < 0 and tissue.loc["cxcl10", "median_change"] < 0
    assert tissue.loc["cd3", "metric"] == "positive_cells_per_mm2"
    assert tissue.loc["cxcl10", "metric"] == "positive_area_percent"
    assert correlate.main([str(study), "--out", str(stats_dir), "--x", "cd3", "--y", "cxcl10"]) == 0
    assert pd.read_csv(stats_dir / "stain_correlations.csv")["n"].max() == 1  # one subject: no coefficient
    assert main(["report", *map(str, folders), "--out", str(tmp_path / "report.html")]) == 0
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    for ps in slides.values():
        for p in ps:
            assert f'id="slide-{p.stem}"' in text
    from cleihc.validate import read_truth, validate

    det = validate(folders[0], read_truth(SAMPLE_IMAGES)).detection.set_index(["slide", "label"])
    # measured on the sample slides: F1 of all nuclei 0.99 at 4 µm; positive cells 0.88
    assert det.loc[("ALL", "all"), "f1"] > 0.9
    assert det.loc[("ALL", "positive"), "f1"] > 0.7


def test_two_timepoints_are_found():
    t = pd.DataFrame({"timepoint": ["week12", "baseline", "week12"]})
    assert paired.two_timepoints(t, None, None) == ("baseline", "week12")
    assert responders.two_timepoints(pd.DataFrame({"timepoint": ["post", "pre", "w4"]}), None, None) == (
        "pre",
        "post",
    )
    with pytest.raises(SystemExit, match="choose two"):
        paired.two_timepoints(pd.DataFrame({"timepoint": ["a", "b", "c"]}), None, None)


def _paired_rows(subjects: list[str], pre: str, post: str, change: float) -> dict:
    """{(subject, timepoint, 'cd8', 'dermis'): value} with post = pre + change for every subject."""
    vals = {}
    for i, s in enumerate(subjects):
        vals[(s, pre, "cd8", "dermis")] = 100.0 + 10 * i
        vals[(s, post, "cd8", "dermis")] = 100.0 + 10 * i + change
    return vals


def test_identifiers_are_read_as_written(tmp_path, capsys):
    # subjects 001..006 at weeks 0 and 12, and a slide quantified without metadata (empty subject and timepoint):
    # read as numbers, 001 became 1 and, beside the empty cells, 12 became 12.0, so nothing matched
    subjects = [f"{i:03d}" for i in range(1, 7)]
    study = _study(_paired_rows(subjects, "0", "12", -10.0), {"cd8": "positive_cells_per_mm2"})
    orphan = study.iloc[[0]].assign(subject=None, timepoint=None, slide="S09_cd3", stain="cd3", value=5.0)
    pd.concat([study, orphan], ignore_index=True).to_csv(tmp_path / "study.csv", index=False)
    read = paired.read_study(tmp_path / "study.csv")
    assert set(read["subject"].dropna()) == set(subjects)
    assert set(read["timepoint"].dropna()) == {"0", "12"}
    assert read["subject"].isna().sum() == 1  # the empty cell stays missing, not the text "nan"
    assert read["value"].dtype == float
    out = tmp_path / "o"
    assert paired.main([str(tmp_path / "study.csv"), "--pre", "0", "--post", "12", "--out", str(out)]) == 0
    res = pd.read_csv(out / "paired_pre_post.csv", dtype={"baseline": str, "follow_up": str})
    assert res.loc[0, "n_pairs"] == 6 and res.loc[0, "median_change"] == -10
    assert (res.loc[0, "baseline"], res.loc[0, "follow_up"]) == ("0", "12")
    # the outcome file is read the same way: 001 is subject 001
    pd.DataFrame({"subject": subjects, "responder": ["yes"] * 3 + ["no"] * 3}).to_csv(
        tmp_path / "outcome.csv", index=False
    )
    argv = [str(tmp_path / "study.csv"), "--responders", str(tmp_path / "outcome.csv"), "--out", str(out)]
    assert responders.main([*argv, "--pre", "0", "--post", "12"]) == 0
    res = pd.read_csv(out / "responders.csv")
    assert (res.loc[0, "n_responders"], res.loc[0, "n_non_responders"]) == (3, 3)
    mixed = _load("mixed_model")
    assert mixed.main([str(tmp_path / "study.csv"), "--baseline", "0", "--out", str(out)]) == 0
    res = pd.read_csv(out / "mixed_model.csv")
    assert res.loc[0, "change"] == pytest.approx(-10.0)
    capsys.readouterr()
    # bad input: one line naming the file, no traceback
    with pytest.raises(SystemExit, match=r"outcome\.csv: no such file"):
        responders.responders_from_csv(tmp_path / "missing" / "outcome.csv")
    pd.concat([study.astype({"value": object}), study.iloc[[0]].assign(value="n.d.")]).to_csv(
        tmp_path / "bad.csv", index=False
    )
    with pytest.raises(
        SystemExit, match=r"bad\.csv: column 'value' holds 'n\.d\.' \(line 14\), not a number"
    ):
        paired.read_study(tmp_path / "bad.csv")


def test_identifiers_from_parquet_are_text(tmp_path):
    pytest.importorskip("pyarrow")
    # a parquet table stores subject 101 as the float 101.0 when another row is empty
    study = _study(_paired_rows(["101", "102"], "0", "12", 5.0), {"cd8": "positive_cells_per_mm2"})
    study["subject"] = [101.0, 101.0, 102.0, 102.0]
    study.loc[len(study)] = {**study.iloc[0].to_dict(), "subject": np.nan, "timepoint": "0"}
    study.to_parquet(tmp_path / "study.parquet")
    read = paired.read_study(tmp_path / "study.parquet")
    assert read["subject"].tolist()[:4] == ["101", "101", "102", "102"]
    assert read["subject"].isna().sum() == 1


def test_two_timepoints_order_as_the_report(tmp_path, capsys):
    from cleihc.report import order_timepoints

    def order(labels):
        return paired.two_timepoints(pd.DataFrame({"timepoint": labels}), None, None)

    # words the report knows and the examples did not: the change was computed backwards (pre − post)
    assert order(["posttreatment", "pretreatment"]) == ("pretreatment", "posttreatment")
    assert order(["followup", "baseline"]) == ("baseline", "followup")
    assert order(["eot", "screening"]) == ("screening", "eot")
    for labels in (["posttreatment", "pretreatment"], ["w12", "w4"], ["12", "0"], ["pre-treatment", "w6"]):
        assert list(order(labels)) == order_timepoints(labels)
    assert capsys.readouterr().err.count("natural order") == 2  # w4/w12 and 0/12 only
    # natural order, not alphabetical (w12 < w4), and said to be a guess
    assert order(["w12", "w4"]) == ("w4", "w12")
    err = capsys.readouterr().err
    assert "'w4' is taken as the baseline" in err and "--pre and --post" in err
    assert order(["screening", "baseline"]) == ("baseline", "screening")
    assert "both are baseline words" in capsys.readouterr().err
    # one label given: the other is the table's other timepoint
    t = pd.DataFrame({"timepoint": ["a", "b"]})
    assert paired.two_timepoints(t, "b", None) == ("b", "a")
    assert paired.two_timepoints(t, None, "a") == ("b", "a")
    assert capsys.readouterr().err == ""  # a label given is no guess
    # end to end: every subject fell by 10 from pretreatment to posttreatment; the output names the baseline
    vals = _paired_rows([f"S{i}" for i in range(6)], "pretreatment", "posttreatment", -10.0)
    _study(vals, {"cd8": "positive_cells_per_mm2"}).to_csv(tmp_path / "study.csv", index=False)
    assert paired.main([str(tmp_path / "study.csv"), "--out", str(tmp_path / "o")]) == 0
    res = pd.read_csv(tmp_path / "o" / "paired_pre_post.csv")
    assert res.loc[0, "median_change"] == -10 and res.loc[0, "rank_biserial_r"] == -1
    assert (res.loc[0, "baseline"], res.loc[0, "follow_up"]) == ("pretreatment", "posttreatment")
    values = pd.read_csv(tmp_path / "o" / "paired_values.csv")
    assert set(values["baseline"]) == {"pretreatment"} and (values["post"] - values["pre"] == -10).all()
    # unknown labels: the guess is on stderr and the written table says which label was the baseline
    vals = _paired_rows([f"S{i}" for i in range(6)], "v2", "v10", -10.0)
    _study(vals, {"cd8": "positive_cells_per_mm2"}).to_csv(tmp_path / "study.csv", index=False)
    assert paired.main([str(tmp_path / "study.csv"), "--out", str(tmp_path / "o")]) == 0
    assert "'v2' is taken as the baseline" in capsys.readouterr().err
    res = pd.read_csv(tmp_path / "o" / "paired_pre_post.csv")
    assert (res.loc[0, "baseline"], res.loc[0, "follow_up"], res.loc[0, "median_change"]) == (
        "v2",
        "v10",
        -10,
    )


def _mixed_study(n_subjects: int, stain: str, change: float, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Pre and post for n subjects (levels differ, noise 5): the table and the paired differences post − pre."""
    rng = np.random.default_rng(seed)
    vals, diffs = {}, []
    for i, level in enumerate(rng.normal(100, 30, n_subjects)):
        pre, post = level + rng.normal(0, 5), level + change + rng.normal(0, 5)
        vals[(f"{stain}{i}", "pre", stain, "dermis")] = pre
        vals[(f"{stain}{i}", "post", stain, "dermis")] = post
        diffs.append(post - pre)
    return _study(vals, {stain: "positive_cells_per_mm2"}), np.array(diffs)


def test_mixed_model_gives_no_number_it_cannot_support(tmp_path, monkeypatch):
    mixed = _load("mixed_model")
    few, _ = _mixed_study(2, "cd3", -20.0, seed=1)
    enough, diffs = _mixed_study(8, "cd8", -20.0, seed=2)
    res = mixed.change_over_time(pd.concat([few, enough], ignore_index=True)).set_index("stain")
    # 8 subjects, complete and balanced: the change is the mean paired difference (the known effect, -20, give or
    # take the noise) and its standard error that of the paired differences
    assert res.loc["cd8", "change"] == pytest.approx(diffs.mean(), rel=1e-6)
    assert abs(diffs.mean() + 20) < 5
    # (the interval is that of the paired t-test: test_mixed_model_two_visits_is_the_paired_t_test)
    half = stats.t.ppf(0.975, 7) * diffs.std(ddof=1) / np.sqrt(8)
    assert res.loc["cd8", ["ci_lower", "ci_upper"]].tolist() == pytest.approx(
        [diffs.mean() - half, diffs.mean() + half], rel=1e-6
    )
    assert res["converged"].dtype == "boolean"
    assert res.loc["cd8", "note"] == "" and res.loc["cd8", "converged"]
    # 2 subjects: no estimate (it gave p = 5e-7), a note, and no part in the q-values
    row = res.loc["cd3"]
    assert all(np.isnan(row[c]) for c in ("change", "ci_lower", "ci_upper", "p_value", "q_value"))
    assert row["note"] == "2 subject(s), fewer than 5: no estimate"
    # no model fitted: converged (and df) are missing, not None, False or a number
    assert row["converged"] is pd.NA and row["df"] is pd.NA
    assert res.loc["cd8", "q_value"] == pytest.approx(res.loc["cd8", "p_value"])  # a family of one test
    # the threshold is an option
    assert mixed.change_over_time(few, min_subjects=2)["change"].notna().all()
    with pytest.raises(SystemExit):
        mixed.main([str(tmp_path / "x.csv"), "--min-subjects", "1"])
    # a fit that did not converge (one optimizer iteration allowed) gives no number either
    from statsmodels.regression.mixed_linear_model import MixedLM

    fit = MixedLM.fit
    monkeypatch.setattr(MixedLM, "fit", lambda self, *a, **k: fit(self, *a, **{**k, "maxiter": 1}))
    res = mixed.change_over_time(enough)
    assert res["change"].isna().all() and res["q_value"].isna().all() and not res.loc[0, "converged"]
    assert res.loc[0, "note"] == "the model did not converge: no estimate"
    monkeypatch.undo()
    # statsmodels' warning of a Hessian that is not positive definite (unreliable errors) is a failure too;
    # its warning of a subject variance "on the boundary" is not

    class Fit:
        converged = True

    def warned(text):
        return [warnings.WarningMessage(text, UserWarning, "f.py", 1)]

    assert "Hessian" in mixed._failed_fit(
        warned("The Hessian matrix at the estimated parameter values is x"), Fit
    )
    assert mixed._failed_fit(warned("The MLE may be on the boundary of the parameter space."), Fit) is None


def test_mixed_model_two_visits_is_the_paired_t_test():
    mixed = _load("mixed_model")
    # with the normal distribution p was ~1e-13 for 8 subjects where the paired t-test gives 1.6e-4
    for n, change, seed in ((8, -20.0, 2), (8, -3.0, 5), (12, 2.0, 7), (30, -4.0, 11)):
        table, _ = _mixed_study(n, "cd8", change, seed=seed)
        wide = table.pivot_table(index="subject", columns="timepoint", values="value")
        paired_t = stats.ttest_rel(wide["post"], wide["pre"])
        diffs = wide["post"] - wide["pre"]
        lo, hi = stats.t.interval(0.95, n - 1, loc=diffs.mean(), scale=stats.sem(diffs))
        row = mixed.change_over_time(table).iloc[0]
        assert (row["baseline"], row["timepoint"], row["df"]) == ("pre", "post", n - 1)
        assert row["change"] == pytest.approx(diffs.mean(), rel=1e-6)
        assert row["p_value"] == pytest.approx(paired_t.pvalue, rel=1e-6)
        assert [row["ci_lower"], row["ci_upper"]] == pytest.approx([lo, hi], rel=1e-6)
    # a subject without its post biopsy adds nothing to the within-subject error: df is that of the complete pairs
    partial = table[~((table["subject"] == "cd80") & (table["timepoint"] == "post"))]
    assert mixed.change_over_time(partial).loc[0, "df"] == 30 - 2
    # --log: the interval of the ratio is exp of the t-interval on log(value + 1)
    wide_log = np.log1p(wide)
    d_log = wide_log["post"] - wide_log["pre"]
    lo, hi = stats.t.interval(0.95, 29, loc=d_log.mean(), scale=stats.sem(d_log))
    row = mixed.change_over_time(table, log=True).iloc[0]
    assert [row["ratio"], row["ci_lower"], row["ci_upper"]] == pytest.approx(
        np.exp([d_log.mean(), lo, hi]), rel=1e-6
    )
    assert row["p_value"] == pytest.approx(
        stats.ttest_rel(wide_log["post"], wide_log["pre"]).pvalue, rel=1e-6
    )
    # no subject with two biopsies: nothing to estimate the error from
    lone = table[table["subject"].isin([f"cd8{i}" for i in range(6)]) & (table["timepoint"] == "pre")]
    lone = pd.concat(
        [
            lone,
            table[table["subject"].isin([f"cd8{i}" for i in range(6, 12)]) & (table["timepoint"] == "post")],
        ]
    )
    row = mixed.change_over_time(lone).iloc[0]
    assert (
        np.isnan(row["p_value"])
        and row["note"] == "no subject has biopsies at two visits (df = 0): no estimate"
    )


def test_mixed_model_three_visits_t_with_between_within_df():
    mixed = _load("mixed_model")
    rng = np.random.default_rng(4)
    n, visits = 10, ["pre", "w12", "w24"]
    y = rng.normal(100, 30, n)[:, None] + np.array([0.0, -5.0, -8.0]) + rng.normal(0, 5, (n, 3))
    vals = {(f"S{i}", t, "cd8", "dermis"): y[i, k] for i in range(n) for k, t in enumerate(visits)}
    res = mixed.change_over_time(_study(vals, {"cd8": "positive_cells_per_mm2"})).set_index("timepoint")
    # complete and balanced: REML gives the two-way ANOVA error variance (subject + visit, no interaction), on
    # (n - 1)(visits - 1) degrees of freedom, and the change's standard error is sqrt(2 MSE / n)
    resid = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + y.mean()
    df = (n - 1) * (3 - 1)
    se = np.sqrt(2 * (resid**2).sum() / df / n)
    for k, tp in ((1, "w12"), (2, "w24")):
        change = (y[:, k] - y[:, 0]).mean()
        assert res.loc[tp, "df"] == df
        assert res.loc[tp, "p_value"] == pytest.approx(2 * stats.t.sf(abs(change / se), df), rel=1e-6)
        assert res.loc[tp, "ci_upper"] - res.loc[tp, "ci_lower"] == pytest.approx(
            2 * stats.t.ppf(0.975, df) * se, rel=1e-6
        )
    # the q-values are Benjamini-Hochberg of these p-values
    p = res["p_value"].to_numpy()
    assert res["q_value"].to_numpy() == pytest.approx(
        np.minimum.accumulate((p * 2 / stats.rankdata(p))[np.argsort(-p)])[np.argsort(np.argsort(-p))]
    )


def test_mixed_model_baseline_is_the_earliest_timepoint(tmp_path, capsys):
    mixed = _load("mixed_model")
    from cleihc.report import order_timepoints

    def table(labels, change=-10.0):
        vals = {}
        for i, level in enumerate(np.random.default_rng(3).normal(100, 30, 6)):
            for k, t in enumerate(labels):
                vals[(f"S{i}", t, "cd8", "dermis")] = level + k * change + (i % 3) - (k * i % 2)
        return _study(vals, {"cd8": "positive_cells_per_mm2"})

    # a table labelled baseline/w12 needed --baseline baseline by hand (the default was pre: no estimate)
    tab = table(["baseline", "w12"])
    tab.to_csv(tmp_path / "study.csv", index=False)
    assert mixed.main([str(tmp_path / "study.csv"), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    res = pd.read_csv(tmp_path / "o" / "mixed_model.csv", dtype={"baseline": str, "timepoint": str})
    wide = tab.pivot_table(index="subject", columns="timepoint", values="value")
    assert (res.loc[0, "baseline"], res.loc[0, "timepoint"]) == ("baseline", "w12")
    assert res.loc[0, "change"] == pytest.approx((wide["w12"] - wide["baseline"]).mean(), rel=1e-6)
    assert err == ""  # a baseline word decides it: no guess to report
    # an explicit --baseline still wins, and is no guess either
    assert mixed.main([str(tmp_path / "study.csv"), "--baseline", "w12", "--out", str(tmp_path / "o")]) == 0
    res = pd.read_csv(tmp_path / "o" / "mixed_model.csv")
    assert (res.loc[0, "baseline"], res.loc[0, "timepoint"]) == ("w12", "baseline")
    assert res.loc[0, "change"] == pytest.approx((wide["baseline"] - wide["w12"]).mean(), rel=1e-6)
    assert capsys.readouterr().err == ""
    # the earliest in the report's order; a natural-order guess (no baseline word, or two) is said on stderr
    for labels, guess in (
        (["w12", "pre", "w4"], None),
        (["post", "w4", "pretreatment"], None),
        (["w12", "w4", "w24"], "neither 'w4' nor 'w12' is a word such as pre or baseline"),
        (["v10", "v2"], "neither 'v2' nor 'v10'"),
        (["w12", "screening", "baseline"], "'baseline' and 'screening' are both baseline words"),
        (["post", "followup"], "both follow-up words"),
    ):
        assert mixed.default_baseline(labels) == order_timepoints(labels)[0]
        err = capsys.readouterr().err
        if guess is None:
            assert err == ""
        else:
            assert guess in err and f"{order_timepoints(labels)[0]!r} is taken as the baseline" in err
            assert "give --baseline" in err and err.count("\n") == 1
    tab = table(["w12", "w4", "w24"])
    res = mixed.change_over_time(tab).set_index("timepoint")
    assert list(res.index) == ["w12", "w24"] and set(res["baseline"]) == {"w4"}
    wide = tab.pivot_table(index="subject", columns="timepoint", values="value")
    assert res.loc["w12", "change"] == pytest.approx((wide["w12"] - wide["w4"]).mean(), rel=1e-6)
    assert "'w4' is taken as the baseline" in capsys.readouterr().err


def test_mixed_model_converged_is_empty_when_nothing_was_fitted(tmp_path, capsys):
    mixed = _load("mixed_model")
    few, _ = _mixed_study(3, "cd3", -20.0, seed=1)
    enough, _ = _mixed_study(8, "cd8", -20.0, seed=2)
    pd.concat([few, enough]).to_csv(tmp_path / "study.csv", index=False)
    assert mixed.main([str(tmp_path / "study.csv"), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "None" not in printed and "<NA>" not in printed and "NaN" not in printed
    cd3 = next(line for line in printed.splitlines() if line.startswith("  cd3") or line.startswith("cd3"))
    assert cd3.split().count("NA") == 7  # change, interval, p, df, converged and q: missing, shown alike
    # the cells as written: empty, not "None", "NA" or "<NA>"
    cells = pd.read_csv(tmp_path / "o" / "mixed_model.csv", dtype=str, keep_default_na=False).set_index(
        "stain"
    )
    assert cells.loc["cd3", "converged"] == "" and cells.loc["cd3", "df"] == ""
    assert cells.loc["cd8", "converged"] == "True" and cells.loc["cd8", "df"] == "7"
