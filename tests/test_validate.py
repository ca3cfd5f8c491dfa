"""Validation statistics and `cleihc validate`: known answers on constructed inputs, synthetic truth, BCData."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cleihc.errors import CleihcError
from cleihc.validate import (
    agreement,
    bland_altman,
    detection_by_region,
    detection_scores,
    icc,
    lin_ccc,
    match_points,
    read_truth,
    validate,
    write_validation,
)
from cleihc_testdata import shared_file

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- statistics
def test_identical_values_agree_perfectly():
    x = np.array([3.0, 10.0, 7.5, 0.0, 42.0])
    a = agreement(x, x.copy())
    assert a.bland_altman.bias == 0
    assert a.bland_altman.sd == 0
    assert a.concordance.ccc == pytest.approx(1.0)
    assert a.icc_2_1.value == pytest.approx(1.0)
    assert a.icc_3_1.value == pytest.approx(1.0)


def test_constant_offset_is_the_bias():
    x = np.array([1.0, 4.0, 9.0, 16.0, 25.0, 36.0])
    ba = bland_altman(x, x + 2.5)
    assert ba.bias == pytest.approx(2.5)
    assert ba.sd == pytest.approx(0.0, abs=1e-12)
    assert ba.loa_lower == pytest.approx(2.5) and ba.loa_upper == pytest.approx(2.5)
    # An offset leaves consistency perfect but lowers absolute agreement.
    table = np.column_stack([x, x + 2.5])
    assert icc(table, kind="ICC(3,1)").value == pytest.approx(1.0)
    assert icc(table, kind="ICC(2,1)").value < 1.0


def test_bland_altman_hand_computed():
    ref = np.array([10.0, 20.0, 30.0, 40.0])
    meas = np.array([12.0, 19.0, 33.0, 40.0])  # differences 2, -1, 3, 0: mean 1, sample sd sqrt(10/3)
    ba = bland_altman(ref, meas)
    sd = math.sqrt(10 / 3)
    assert ba.n == 4
    assert ba.bias == pytest.approx(1.0)
    assert ba.sd == pytest.approx(sd)
    assert ba.loa_lower == pytest.approx(1 - 1.96 * sd)
    assert ba.loa_upper == pytest.approx(1 + 1.96 * sd)
    assert ba.bias_ci_lower < 1 < ba.bias_ci_upper


def test_icc_hand_computed_tiny_table():
    # rows (1,1), (2,4), (3,3): grand mean 7/3; MSR = 8/3, MSC = 2/3, MSE = 2/3 (worked by hand)
    # ICC(3,1) = (MSR - MSE) / (MSR + MSE) = 0.6; ICC(2,1) adds k (MSC - MSE) / n = 0 to the denominator: 0.6.
    t = np.array([[1.0, 1.0], [2.0, 4.0], [3.0, 3.0]])
    assert icc(t, kind="ICC(3,1)").value == pytest.approx(0.6)
    assert icc(t, kind="ICC(2,1)").value == pytest.approx(0.6)


def test_icc_shrout_fleiss_table():
    # Shrout & Fleiss (1979), Table 2: 6 targets, 4 judges; published ICC(2,1) = .29, ICC(3,1) = .71.
    t = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float)
    i2 = icc(t, kind="ICC(2,1)")
    i3 = icc(t, kind="ICC(3,1)")
    assert round(i2.value, 2) == 0.29
    assert round(i3.value, 2) == 0.71
    # 95 % intervals of McGraw & Wong (as R psych::ICC reports for these data): [.02, .76] and [.34, .95]
    assert (round(i2.ci_lower, 2), round(i2.ci_upper, 2)) == (0.02, 0.76)
    assert (round(i3.ci_lower, 2), round(i3.ci_upper, 2)) == (0.34, 0.95)
    with pytest.raises(CleihcError):
        icc(t, kind="ICC(1,1)")


def test_lin_ccc_hand_computed():
    x = np.array([1.0, 2.0, 3.0])
    c = lin_ccc(x, x + 1)  # var 2/3 each, cov 2/3, mean shift 1: 2(2/3) / (4/3 + 1) = 4/7
    assert c.ccc == pytest.approx(4 / 7)
    assert c.pearson_r == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    a = rng.normal(50, 10, 40)
    b = a + rng.normal(0, 3, 40)
    cc = lin_ccc(a, b)
    assert cc.ci_lower < cc.ccc < cc.ci_upper < 1
    assert cc.ccc == pytest.approx(cc.pearson_r * cc.accuracy)


def test_lin_ccc_two_pairs_and_constant_series():
    # Two pairs: x = (1, 3), y = (2, 3): var 1 and 1/4, cov 1/2, mean shift 1/2: 2(1/2) / (1 + 1/4 + 1/4) = 2/3.
    c = lin_ccc([1.0, 3.0], [2.0, 3.0])
    assert c.ccc == pytest.approx(2 / 3) and c.n == 2
    assert math.isnan(c.ci_lower) and math.isnan(c.ci_upper)  # Fisher z variance divides by n - 2
    # Two constant series that differ: 2 s_xy = 0 over a positive mean shift, so no concordance at all.
    c = lin_ccc([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    assert c.ccc == 0.0
    assert math.isnan(c.ci_lower) and math.isnan(c.pearson_r)
    assert lin_ccc([5.0, 5.0], [5.0, 5.0]).ccc == 1.0  # constant and equal: perfect agreement
    assert math.isnan(lin_ccc([1.0], [2.0]).ccc)


def test_nan_pairs_are_dropped():
    ba = bland_altman([1.0, np.nan, 3.0], [2.0, 5.0, 4.0])
    assert ba.n == 2 and ba.bias == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- point matching
def test_match_points_shift_within_and_beyond_radius():
    rng = np.random.default_rng(0)
    # grid 20 µm apart so that each point has one candidate
    t = np.stack(np.meshgrid(np.arange(10) * 20.0, np.arange(8) * 20.0), -1).reshape(-1, 2)
    near = t + np.array([2.0, 1.5]) + rng.uniform(-0.2, 0.2, t.shape)
    m = match_points(t, near, radius=4.0)
    assert m.tp == len(t)
    np.testing.assert_array_equal(m.truth_index, m.detected_index)
    far = t + np.array([6.0, 0.0])
    assert match_points(t, far, radius=4.0).tp == 0
    pos = np.arange(len(t)) % 3 == 0
    all_, p, n = detection_scores(t, pos, near, pos, radius_um=4.0)
    assert all_.f1 == 1.0 and p.f1 == 1.0 and n.f1 == 1.0
    all_, p, n = detection_scores(t, pos, far, pos, radius_um=4.0)
    assert all_.f1 == 0.0 and p.tp == 0 and n.fn == int((~pos).sum())


def test_match_points_is_optimal_not_greedy():
    # Greedy nearest-first pairs truth 0 with detection 0 (distance 1) and leaves truth 1 unmatched;
    # the Hungarian matching finds two pairs (0-1 at 2.5, 1-0 at 2.0).
    t = np.array([[0.0, 0.0], [3.0, 0.0]])
    d = np.array([[1.0, 0.0], [-2.5, 0.0]])
    m = match_points(t, d, radius=3.0)
    assert m.tp == 2
    assert sorted(zip(m.truth_index.tolist(), m.detected_index.tolist(), strict=True)) == [(0, 1), (1, 0)]
    # one-to-one: two detections on one truth point give one match
    m2 = match_points(np.array([[0.0, 0.0]]), np.array([[0.5, 0.0], [0.0, 0.4]]), radius=1.0)
    assert m2.tp == 1 and m2.detected_index.tolist() == [1]


def test_class_scores_hand_computed():
    t = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [30.0, 0.0]])
    tpos = np.array([True, True, False, False])
    d = np.array([[0.5, 0.0], [10.5, 0.0], [20.5, 0.0], [50.0, 0.0]])
    dpos = np.array([True, False, False, True])
    all_, p, n = detection_scores(t, tpos, d, dpos, radius_um=2.0)
    assert (all_.tp, all_.fp, all_.fn) == (3, 1, 1)
    assert (p.tp, p.fp, p.fn) == (1, 1, 1)  # truth 1 was detected negative; detection 3 is far
    assert p.f1 == pytest.approx(0.5)
    assert (n.tp, n.fp, n.fn) == (1, 1, 1)  # truth 3 missed; detection 1 is negative but truth 1 is positive
    assert all_.mean_distance_um == pytest.approx(0.5)


def test_detection_by_region_hand_computed():
    # truth: two in the epidermis (one missed), one in the dermis; detections: two matched, one extra in the dermis
    t = np.array([[0.0, 0.0], [10.0, 0.0], [50.0, 0.0]])
    treg = ["epidermis", "epidermis", "dermis"]
    d = np.array([[0.5, 0.0], [50.5, 0.0], [80.0, 0.0]])
    dreg = ["epidermis", "dermis", "dermis"]
    pos = np.array([True, False, True])
    r = detection_by_region(t, pos, treg, d, np.array([True, True, False]), dreg, radius_um=2.0)
    a = r[r["label"] == "all"].set_index("region")
    assert a.loc["epidermis", ["tp", "fp", "fn"]].tolist() == [1, 0, 1]
    assert a.loc["dermis", ["tp", "fp", "fn"]].tolist() == [1, 1, 0]
    assert a.loc["dermis", "precision"] == 0.5 and a.loc["epidermis", "recall"] == 0.5
    assert a["tp"].sum() == detection_scores(t, pos, d, np.array([True, True, False]), radius_um=2.0)[0].tp
    p = r[r["label"] == "positive"].set_index("region")
    assert p.loc["epidermis", "tp"] == 1 and p.loc["dermis", "tp"] == 1


# ---------------------------------------------------------------------------------------------- truth files
def _results_folder(tmp: Path, slides: dict[str, dict]) -> Path:
    """A results folder with slide records and cells tables, as `cleihc quantify` writes them."""
    out = tmp / "results"
    (out / "slides").mkdir(parents=True)
    (out / "cells").mkdir()
    for name, spec in slides.items():
        meta = spec.get("metadata", {})  # study metadata (--samples) leads each row, as quantify writes it
        rows = [
            {**meta, "slide": name, "stain": "cd3", "protocol": "cd3", "region": r, **vals}
            for r, vals in spec["rows"].items()
        ]
        rec = {
            "slide": name,
            "rows": rows,
            "provenance": {"analysis": {"mpp_um": [0.5, 0.5], "downsample": 2.0}},  # level 0: 0.25 µm/px
            **({"metadata": meta} if meta else {}),
        }
        (out / "slides" / f"{name}.json").write_text(json.dumps(rec))
        if "cells" in spec:
            c = spec["cells"]
            pd.DataFrame(
                {
                    "cell_id": np.arange(len(c)),
                    "x_px": c[:, 0],
                    "y_px": c[:, 1],
                    "x_um": c[:, 0] * 0.25,
                    "y_um": c[:, 1] * 0.25,
                    "positive": c[:, 2].astype(bool),
                    **({"region": spec["cell_regions"]} if "cell_regions" in spec else {}),
                }
            ).to_parquet(out / "cells" / f"{name}.parquet")
    return out


def test_validate_values_csv_and_points_csv(tmp_path):
    rng = np.random.default_rng(3)
    pts = {
        f"s{i}": np.column_stack([rng.uniform(0, 4000, 30), rng.uniform(0, 4000, 30), rng.random(30) < 0.4])
        for i in range(4)
    }
    slides = {
        name: {
            "rows": {
                "epidermis": {"cells_positive": 10.0 + i, "positive_area_percent": 1.0 + i},
                "dermis": {"cells_positive": 30.0 + 2 * i, "positive_area_percent": 5.0 + i},
            },
            "cells": np.column_stack([p[:, :2] + 4.0, p[:, 2]]),  # 4 px = 1 µm from the truth
        }
        for i, (name, p) in enumerate(pts.items())
    }
    out = _results_folder(tmp_path, slides)
    ref = pd.DataFrame(
        [
            {
                "slide": s,
                "region": r,
                "cells_positive": v["cells_positive"] + 3,
                "positive_area_percent": v["positive_area_percent"],
            }
            for s, spec in slides.items()
            for r, v in spec["rows"].items()
        ]
    )
    ref.to_csv(tmp_path / "ref.csv", index=False)
    res = validate(out, read_truth(tmp_path / "ref.csv"), radius_um=3.0)
    a = res.agreement.set_index(["metric", "region"])
    assert a.loc[("cells_positive", "all"), "bias"] == pytest.approx(-3.0)
    assert a.loc[("cells_positive", "all"), "n"] == 8
    assert a.loc[("positive_area_percent", "all"), "bias"] == pytest.approx(0.0)
    assert a.loc[("positive_area_percent", "all"), "ccc"] == pytest.approx(1.0)
    assert a.loc[("positive_area_percent", "dermis"), "icc_2_1"] == pytest.approx(1.0)
    # points CSV in level-0 px with a class column
    rows = [
        {"slide": s, "x_px": x, "y_px": y, "class": "positive" if c else "negative"}
        for s, p in pts.items()
        for x, y, c in p
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "points.csv", index=False)
    res = validate(out, read_truth(tmp_path / "points.csv"), radius_um=3.0)
    d = res.detection.set_index(["slide", "label"])
    assert d.loc[("ALL", "all"), "f1"] == 1.0
    assert d.loc[("ALL", "positive"), "f1"] == 1.0
    assert d.loc[("ALL", "all"), "mean_distance_um"] == pytest.approx(math.sqrt(2))
    res = validate(out, read_truth(tmp_path / "points.csv"), radius_um=1.0)  # 1.41 µm away: no match
    assert res.detection.set_index(["slide", "label"]).loc[("ALL", "all"), "tp"] == 0
    written = write_validation(res, tmp_path / "val")
    names = {p.name for p in written}
    assert {"pairs.csv", "agreement.csv", "detection.csv", "detection.png", "detection.svg"} <= names
    assert "agreement_points_positive.svg" in names


def test_read_truth_geojson_and_errors(tmp_path):
    fc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [10, 20]},
                "properties": {"classification": {"name": "Positive"}},
            },
            {
                "type": "Feature",
                "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
                "properties": {"classification": {"name": "Negative"}},
            },
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
                "properties": {},
            },
        ],
    }
    (tmp_path / "slideA.geojson").write_text(json.dumps(fc))
    t = read_truth(tmp_path / "slideA.geojson")
    assert t.points["slide"].tolist() == ["slideA"] * 3
    assert t.points["positive"].tolist() == [True, False, False]
    assert t.points[["x_px", "y_px"]].to_numpy().tolist() == [[10, 20], [1, 2], [3, 4]]
    with pytest.raises(CleihcError, match="not found"):
        read_truth(tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("slide,x_px,y_px,class\na,1,2,maybe\n")
    with pytest.raises(CleihcError, match="maybe"):
        read_truth(tmp_path / "bad.csv")
    (tmp_path / "badxy.csv").write_text("slide,x_px,y_px,class\na,1,2,positive\na,oops,2,negative\n")
    with pytest.raises(CleihcError, match="line 2"):
        read_truth(tmp_path / "badxy.csv")
    # A metric column with a stray word would drop out of the comparison without a word; other text is fine.
    (tmp_path / "mixed.csv").write_text(
        "slide,region,subject,cells_positive\na,tissue,1,12\nb,tissue,P2,lost\n"
    )
    with pytest.raises(
        CleihcError, match=r"column 'cells_positive' holds 'lost' on data line 2, not a number"
    ):
        read_truth(tmp_path / "mixed.csv")
    (tmp_path / "ids.csv").write_text("slide,region,subject,cells_positive\na,tissue,1,12\nb,tissue,P2,\n")
    assert read_truth(tmp_path / "ids.csv").values["metric"].tolist() == ["cells_positive"] * 2
    bad_point = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": ["a"]},
                "properties": {"classification": {"name": "Positive"}},
            }
        ],
    }
    (tmp_path / "badpt.geojson").write_text(json.dumps(bad_point))
    with pytest.raises(CleihcError, match="invalid coordinates"):
        read_truth(tmp_path / "badpt.geojson")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CleihcError, match="JSON"):
        read_truth(tmp_path / "bad.json")


def test_synthetic_truth_against_itself(tmp_path):
    """A results folder whose numbers equal the synthetic truth agrees perfectly with it."""
    from cleihc.synthetic import render_skin

    truths = {}
    for seed in (1, 2, 3):
        s = render_skin(
            stain="cd3", width_px=600, height_px=500, mpp_um=0.5, seed=seed, regions_geojson=False
        )
        truths[f"syn{seed}"] = s.truth
    tdir = tmp_path / "truth"
    tdir.mkdir()
    slides = {}
    for name, tr in truths.items():
        (tdir / f"{name}.truth.json").write_text(json.dumps(tr))
        rows = {
            r: {
                "region_area_mm2": d["region_area_mm2"],
                "positive_area_percent": d["positive_area_percent"],
                "cells_positive": float(d["n_positive_cells"]),
                "cells_negative": float(d["n_negative_cells"]),
                "cells_total": float(d["n_positive_cells"] + d["n_negative_cells"]),
            }
            for r, d in tr["area_truth"].items()
        }
        cells = np.array(
            [[c["x_px"] * 2, c["y_px"] * 2, c["positive"]] for c in tr["cells"]], float
        )  # 0.25 µm/px
        slides[name] = {"rows": rows, "cells": cells, "cell_regions": [c["region"] for c in tr["cells"]]}
    out = _results_folder(tmp_path, slides)
    res = validate(out, read_truth(tdir), radius_um=2.0)
    a = res.agreement[res.agreement["region"] == "all"].set_index("metric")
    for metric in ("region_area_mm2", "cells_positive", "cells_total", "positive_area_percent"):
        assert a.loc[metric, "bias"] == pytest.approx(0.0, abs=1e-9)
        assert a.loc[metric, "ccc"] == pytest.approx(1.0)
    d = res.detection.set_index(["slide", "label"])
    assert d.loc[("ALL", "all"), "f1"] == 1.0
    assert d.loc[("ALL", "positive"), "n_truth"] == sum(
        c["positive"] for t in truths.values() for c in t["cells"]
    )
    r = res.detection_by_region
    pooled = r[(r["slide"] == "ALL") & (r["label"] == "all")].set_index("region")
    assert set(pooled.index) <= {"epidermis", "papillary_dermis", "superficial_dermis", "deep_dermis"}
    assert (pooled["f1"] == 1.0).all()
    assert pooled["n_truth"].sum() == d.loc[("ALL", "all"), "n_truth"]


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_validate(tmp_path):
    slides = {f"s{i}": {"rows": {"tissue": {"positive_area_percent": float(i)}}} for i in range(3)}
    out = _results_folder(tmp_path, slides)
    pd.DataFrame(
        {"slide": list(slides), "region": "tissue", "positive_area_percent": [0.5, 1.5, 2.5]}
    ).to_csv(tmp_path / "ref.csv", index=False)
    from cleihc.cli import main

    assert (
        main(["validate", str(out), "--truth", str(tmp_path / "ref.csv"), "--out", str(tmp_path / "v")]) == 0
    )
    agree = pd.read_csv(tmp_path / "v" / "agreement.csv")
    assert agree.loc[0, "bias"] == pytest.approx(-0.5)
    assert (tmp_path / "v" / "figures" / "agreement_positive_area_percent.png").exists()
    assert main(["validate", str(out), "--truth", str(tmp_path / "missing.csv")]) == 1
    pd.DataFrame({"slide": ["other"], "region": "tissue", "positive_area_percent": [1.0]}).to_csv(
        tmp_path / "other.csv", index=False
    )
    with pytest.raises(CleihcError, match="no truth slide is in these results"):
        validate(out, read_truth(tmp_path / "other.csv"))


# ---------------------------------------------------------------------------------------------- real data
def _bcdata_protocol(tmp_path: Path) -> Path:
    """A nuclear-DAB cell protocol derived from the built-in cd3 protocol (Ki67 is nuclear)."""
    from cleihc.protocol import find_protocol

    src = Path(find_protocol("cd3")).read_text(encoding="utf-8")
    assert 'compartment = "membrane"' in src and 'name = "cd3"' in src
    src = src.replace('compartment = "membrane"', 'compartment = "nucleus"').replace(
        'name = "cd3"', 'name = "ki67-nuclear"'
    )
    # BCData tiles are all tissue: no glass to estimate the background from, so use the fixed white I0.
    src = src.replace('mode = "estimate"', 'mode = "fixed"')
    path = tmp_path / "ki67_nuclear.toml"
    path.write_text(src, encoding="utf-8")
    return path


def test_bcdata_ki67_points(tmp_path):
    img_dir = shared_file("bcdata_ki67_sample", "1.images", "test")
    json_dir = shared_file("bcdata_ki67_sample", "3.data_processed_json")
    pytest.importorskip("cleihc.protocol", reason="cleihc.protocol not available yet")
    ids = ["0", "1", "2"]
    slides_dir = tmp_path / "img"
    slides_dir.mkdir()
    rows = []
    for i in ids:
        shutil.copy(
            img_dir / f"{i}.png", slides_dir / f"bc{i}.png"
        )  # copied to tmp only, never into the repo
        for p in json.loads((json_dir / f"{i}.json").read_text()):
            rows.append(
                {
                    "slide": f"bc{i}",
                    "x_px": p["x"],
                    "y_px": p["y"],
                    "class": "positive" if p["label_id"] == 1 else "negative",
                }
            )
    pd.DataFrame(rows).to_csv(tmp_path / "points.csv", index=False)
    protocol = _bcdata_protocol(tmp_path)
    out = tmp_path / "res"
    from cleihc.cli import main

    status = main(
        [
            "quantify",
            str(slides_dir),
            "--protocol",
            str(protocol),
            "--mpp",
            "0.25",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert status == 0, (out / "failures.csv").read_text() if (out / "failures.csv").exists() else status
    res = validate(out, read_truth(tmp_path / "points.csv"), radius_um=4.0)
    d = res.detection.set_index(["slide", "label"])
    assert d.loc[("ALL", "all"), "n_truth"] == len(rows)
    # Ki67 nuclei found by a CD3-derived nuclear protocol: a floor that still catches broken matching or units
    # (measured: F1 0.62 over all nuclei at 4 µm on tiles 0-2).
    assert d.loc[("ALL", "all"), "f1"] > 0.5
    # Positive detections are counted as the pipeline counts them (pigment-flagged cells are not positive).
    regions = pd.read_csv(out / "regions.csv")
    tissue = regions[regions["region"] == "tissue"].set_index("slide")
    pairs = res.pairs[res.pairs["metric"] == "points_positive"].set_index("slide")
    for slide in ("bc0", "bc1", "bc2"):
        assert pairs.loc[slide, "measured"] == tissue.loc[slide, "cells_positive"]
        assert pairs.loc[slide, "reference"] == sum(
            r["class"] == "positive" for r in rows if r["slide"] == slide
        )


def test_synthetic_truth_without_cell_marker(tmp_path):
    """CXCL10 truth: area and nucleus counts are references; the generator's cells carry no marker."""
    from cleihc.synthetic import render_skin

    s = render_skin(stain="cxcl10", width_px=300, height_px=300, mpp_um=0.5, seed=5, regions_geojson=False)
    (tmp_path / "x.truth.json").write_text(json.dumps(s.truth))
    t = read_truth(tmp_path / "x.truth.json")
    assert t.points.empty
    metrics = set(t.values["metric"])
    assert {"positive_area_percent", "region_area_mm2", "cells_total"} <= metrics
    assert not metrics & {"cells_positive", "cells_negative", "positive_cells_per_mm2"}
    tissue = t.values[(t.values["region"] == "tissue") & (t.values["metric"] == "positive_area_percent")]
    assert tissue["reference"].item() == pytest.approx(
        s.truth["area_truth"]["tissue"]["positive_area_percent"]
    )


def test_truth_csv_as_a_decimal_comma_spreadsheet_saves_it(tmp_path):
    """Excel in locales with a decimal comma saves "CSV" as `a;b` with `12,5`: read as such."""
    (tmp_path / "semi.csv").write_text("slide;region;positive_cells_per_mm2\nS1;tissue;450,5\nS2;dermis;3\n")
    values = read_truth(tmp_path / "semi.csv").values
    assert values[["slide", "region", "metric"]].to_numpy().tolist() == [
        ["S1", "tissue", "positive_cells_per_mm2"],
        ["S2", "dermis", "positive_cells_per_mm2"],
    ]
    assert values["reference"].tolist() == [450.5, 3.0]


# ---------------------------------------------------------------------------------------------- truth matching
def _two_region_results(tmp_path: Path, **extra: dict) -> Path:
    slides = {
        f"s{i}": {
            "rows": {
                "epidermis": {"cells_positive": 10.0 + i, "positive_area_percent": 1.0 + i},
                "dermis": {"cells_positive": 30.0 + 2 * i, "positive_area_percent": 5.0 + i},
            }
        }
        for i in range(3)
    }
    slides.update(extra)
    return _results_folder(tmp_path, slides)


def test_truth_region_names_match_ignoring_case(tmp_path):
    """QuPath and pathologists write "Epidermis"; the results say epidermis (as --regions takes it)."""
    out = _two_region_results(
        tmp_path,
        s9={
            "rows": {"epidermis": {"cells_positive": 1.0}},
            "cells": np.array([[100.0, 100.0, 1.0], [400.0, 400.0, 0.0]]),
            "cell_regions": ["epidermis", "epidermis"],
        },
    )
    (tmp_path / "t.csv").write_text(
        "slide,region,cells_positive\ns0,Epidermis,11\ns0,DERMIS,31\ns1,epidermis,12\ns2,Dermis,35\n"
    )
    res = validate(out, read_truth(tmp_path / "t.csv"))
    assert res.warnings == ()
    pairs = res.pairs.set_index(["slide", "region"])
    assert len(pairs) == 4  # not 1 (only the lower-case row) as before
    assert pairs.loc[("s0", "epidermis"), ["reference", "measured"]].tolist() == [11.0, 10.0]
    assert pairs.loc[("s2", "dermis"), ["reference", "measured"]].tolist() == [35.0, 34.0]
    a = res.agreement.set_index(["metric", "region"])
    assert a.loc[("cells_positive", "all"), "n"] == 4
    assert a.loc[("cells_positive", "all"), "bias"] == pytest.approx(-1.0)
    # Points in a region named "Epidermis" are scored in the results' epidermis, not in a region of their own.
    (tmp_path / "p.csv").write_text("slide,x_px,y_px,class,region\ns9,100,100,positive,Epidermis\n")
    r = validate(out, read_truth(tmp_path / "p.csv")).detection_by_region
    assert set(r["region"]) == {"epidermis"}
    assert r[(r["slide"] == "s9") & (r["label"] == "all")][["tp", "fp", "fn"]].values.tolist() == [[1, 1, 0]]


def test_truth_values_that_match_nothing_are_reported(tmp_path):
    out = _two_region_results(tmp_path)
    (tmp_path / "t.csv").write_text(
        "slide,region,metric,value\n"
        "s0,epidermis,cells_positive,11\n"
        "s1,epidermis,cells_positive,12\n"
        "s0,papilary_dermis,cells_positive,63\n"  # a typo
        "s1,lesion,cells_positive,40\n"  # a region these results do not have
        "s2,dermis,cells_total,90\n"  # a metric they do not have
        "s2,dermis,cells_positive,\n"  # empty: a missing value, not a lost one
    )
    res = validate(out, read_truth(tmp_path / "t.csv"))
    assert res.agreement.set_index(["metric", "region"]).loc[("cells_positive", "all"), "n"] == 2
    (w,) = res.warnings
    assert w.startswith("3 of 5 truth values match nothing in the results and are not compared: ")
    assert "1 with a metric the results do not have (cells_total;" in w
    assert "2 with a region the slide's results do not have (s0/papilary_dermis/cells_positive, " in w
    assert "s1/lesion/cells_positive; the results' regions are dermis, epidermis" in w
    # Nothing matches at all: an error, not an empty comparison.
    (tmp_path / "none.csv").write_text("slide,region,cells_positive\ns0,lesion,1\ns1,Lesion,2\n")
    with pytest.raises(
        CleihcError, match=r"none\.csv: no truth value matches a value in the results .*2 with a"
    ):
        validate(out, read_truth(tmp_path / "none.csv"))


def test_truth_value_without_a_measured_value_is_reported(tmp_path):
    out = _two_region_results(tmp_path, s9={"rows": {"dermis": {"cells_positive": None}}})
    (tmp_path / "t.csv").write_text("slide,region,cells_positive\ns0,dermis,30\ns1,dermis,32\ns9,dermis,7\n")
    res = validate(out, read_truth(tmp_path / "t.csv"))
    assert res.agreement.set_index(["metric", "region"]).loc[("cells_positive", "all"), "n"] == 2
    assert res.warnings == (
        "1 truth value(s) have no measured value in the results (an empty cell in regions.csv) and are left out "
        "of the statistics: s9/dermis/cells_positive",
    )


def test_duplicated_truth_values_are_refused(tmp_path):
    out = _two_region_results(tmp_path)
    # Equal values too: n would count the pair twice.
    (tmp_path / "dup.csv").write_text(
        "slide,region,cells_positive\ns0,dermis,30\ns1,dermis,32\ns0,dermis,30\n"
    )
    with pytest.raises(
        CleihcError,
        match=r"dup\.csv: slide 's0', region 'dermis', metric 'cells_positive' has 2 truth values "
        r"\(data lines 1, 3\); keep one row",
    ):
        validate(out, read_truth(tmp_path / "dup.csv"))
    # Names that differ only in case are one region, so two values for it.
    (tmp_path / "case.csv").write_text(
        "slide,region,metric,value\ns0,Dermis,cells_positive,30\ns0,dermis,cells_positive,31\n"
    )
    with pytest.raises(CleihcError, match=r"regions 'Dermis', 'dermis' are one region"):
        validate(out, read_truth(tmp_path / "case.csv"))
    # Two files of a truth folder giving the same value: both are named.
    folder = tmp_path / "truth"
    folder.mkdir()
    (folder / "a.csv").write_text("slide,region,cells_positive\ns0,dermis,30\n")
    (folder / "b.csv").write_text("slide,region,cells_positive\ns1,dermis,32\ns0,dermis,29\n")
    with pytest.raises(CleihcError, match=r"2 truth values \(.*a\.csv data line 1; .*b\.csv data line 2\)"):
        validate(out, read_truth(folder))


def test_long_truth_values_are_read_as_the_wide_ones(tmp_path):
    """Text in a value column is an error naming column, line and value in both layouts, not a silent NaN."""
    (tmp_path / "long.csv").write_text(
        "slide,region,metric,value\ns0,tissue,cells_positive,219\ns1,tissue,cells_positive,lost\n"
    )
    with pytest.raises(
        CleihcError, match=r"long\.csv: column 'value' holds 'lost' on data line 2, not a number"
    ):
        read_truth(tmp_path / "long.csv")
    # A decimal comma in a comma-separated file is ambiguous (1,234): refused with the way out, as in wide.
    for name, text in (
        ("long_comma.csv", 'slide,region,metric,value\ns0,tissue,cells_positive,"84,5"\n'),
        ("wide_comma.csv", 'slide,region,cells_positive\ns0,tissue,"84,5"\n'),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(
            CleihcError, match=r"holds '84,5' on data line 1, not a number; write 84\.5 with a"
        ):
            read_truth(tmp_path / name)
    # Empty cells are missing values; in a decimal-comma (;) file 450,5 is a number even beside a word.
    (tmp_path / "semi.csv").write_text(
        "slide;region;metric;value\ns0;tissue;cells_positive;450,5\ns1;tissue;cells_positive;\n"
        "s2;tissue;cells_positive;3\n"
    )
    v = read_truth(tmp_path / "semi.csv").values
    assert v["reference"].tolist()[0] == 450.5 and math.isnan(v["reference"].tolist()[1])
    assert v["line"].tolist() == [1, 2, 3]
    (tmp_path / "semi_word.csv").write_text(
        "slide;region;metric;value\ns0;tissue;cells_positive;450,5\ns1;tissue;cells_positive;lost\n"
    )
    with pytest.raises(CleihcError, match=r"holds 'lost' on data line 2"):
        read_truth(tmp_path / "semi_word.csv")
    # A metric column holding only text was dropped from a wide table without a word.
    (tmp_path / "wide_text.csv").write_text(
        'slide,region,cells_total,cells_positive\ns0,tissue,700,"84,5"\ns1,tissue,650,"90,0"\n'
    )
    with pytest.raises(CleihcError, match=r"column 'cells_positive' holds '84,5' on data line 1"):
        read_truth(tmp_path / "wide_text.csv")


# ---------------------------------------------------------------------------------------------- truth columns
def test_identifier_and_metadata_columns_are_never_compared(tmp_path, caplog):
    """A numeric subject or timepoint is no metric: it was compared with the results' own subject column."""
    out = _results_folder(
        tmp_path,
        {
            f"s{i}": {
                "metadata": {"subject": i + 1, "timepoint": 12},
                "rows": {"dermis": {"cells_positive": 30.0 + 2 * i, "positive_area_percent": 5.0 + i}},
            }
            for i in range(3)
        },
    )
    (tmp_path / "t.csv").write_text(
        "slide,region,subject,timepoint,group,age,cells_positive\n"
        "s0,dermis,1,0,1,54,31\ns1,dermis,2,0,1,61,33\ns2,dermis,3,0,2,47,36\n"
    )
    with caplog.at_level("INFO", logger="cleihc.validate"):
        truth = read_truth(tmp_path / "t.csv")
        res = validate(out, truth)
    # subject, timepoint and group are study metadata by name; age is a number and a candidate until validate.
    assert sorted(truth.values["metric"].unique()) == ["age", "cells_positive"]
    assert res.pairs["metric"].unique().tolist() == ["cells_positive"]
    assert res.pairs["reference"].tolist() == [31.0, 33.0, 36.0]
    assert res.pairs["measured"].tolist() == [30.0, 32.0, 34.0]
    a = res.agreement.set_index(["metric", "region"])
    assert a.loc[("cells_positive", "all"), "n"] == 3
    assert a.loc[("cells_positive", "all"), "bias"] == pytest.approx(-4 / 3)
    # age is named (a warning, not an error), subject & co. are not warned about but said at info level.
    assert res.warnings == (
        "1 truth column(s) are not named as a cleihc metric and are not compared: age; metric columns are named "
        "as in regions.csv, other columns are taken as identifiers",
    )
    assert "column(s) subject, timepoint, group are identifiers" in caplog.text
    # Long format: a 'subject' metric is the results' metadata, not a metric, so it is never paired either.
    (tmp_path / "long.csv").write_text(
        "slide,region,metric,value\ns0,dermis,subject,1\ns0,dermis,cells_positive,31\ns1,dermis,cells_positive,33\n"
    )
    res = validate(out, read_truth(tmp_path / "long.csv"))
    assert res.pairs["metric"].tolist() == ["cells_positive"] * 2 and res.warnings == ()
    # No metric left (subject was put aside when read): an error naming the rest and the metrics to use.
    (tmp_path / "ids.csv").write_text("slide,region,subject,age\ns0,dermis,1,54\n")
    with pytest.raises(
        CleihcError,
        match=r"ids\.csv: no truth column is a cleihc metric \(age\); name the metric columns as in "
        r"regions\.csv \(cells_positive, positive_area_percent\)",
    ):
        validate(out, read_truth(tmp_path / "ids.csv"))


def test_metric_names_match_ignoring_case_and_misnamed_ones_get_a_hint(tmp_path):
    out = _two_region_results(tmp_path)
    (tmp_path / "t.csv").write_text(
        "slide,region,Cells_Positive,Positive_Area_Percnt,cels_total\n"
        "s0,dermis,31,5,40\ns1,dermis,33,6,41\ns2,Dermis,36,7,42\n"
    )
    res = validate(out, read_truth(tmp_path / "t.csv"))
    assert res.pairs["metric"].unique().tolist() == ["cells_positive"]  # was: unmatched, then an error
    assert res.pairs["reference"].tolist() == [31.0, 33.0, 36.0]
    assert res.pairs["measured"].tolist() == [30.0, 32.0, 34.0]
    (w,) = res.warnings
    assert w.startswith("2 truth column(s) are not named as a cleihc metric and are not compared: ")
    assert "Positive_Area_Percnt (did you mean positive_area_percent or positive_percent or " in w
    assert "cels_total (did you mean cells_total?)" in w  # named like a metric, yet none: a hint too
    # cells_positive and Cells_Positive are one metric: two values for one slide, region and metric.
    (tmp_path / "both.csv").write_text("slide,region,cells_positive,Cells_Positive\ns0,dermis,31,31\n")
    with pytest.raises(CleihcError, match=r"metrics 'cells_positive', 'Cells_Positive' are one metric"):
        validate(out, read_truth(tmp_path / "both.csv"))


def test_warnings_are_logged_before_an_error_stops_the_run(tmp_path, caplog):
    """The "no truth value matches" error is explained by the warning before it: it must reach the console."""
    out = _two_region_results(tmp_path)
    (tmp_path / "t.csv").write_text(
        "slide,region,cells_positive\nS0_pre,dermis,31\ns1,lesion,33\n"  # S0_pre: a slide not in the results
    )
    with (
        caplog.at_level("WARNING", logger="cleihc.validate"),
        pytest.raises(CleihcError, match="no truth value"),
    ):
        validate(out, read_truth(tmp_path / "t.csv"))
    assert [r.getMessage() for r in caplog.records] == [
        f"1 truth slide(s) have no results in {out} and are ignored: S0_pre"
    ]
    # A run that ends well logs each warning once (they were logged again at the end).
    caplog.clear()
    (tmp_path / "ok.csv").write_text("slide,region,cells_positive\nS0_pre,dermis,31\ns1,dermis,33\n")
    with caplog.at_level("WARNING", logger="cleihc.validate"):
        res = validate(out, read_truth(tmp_path / "ok.csv"))
    assert [r.getMessage() for r in caplog.records] == list(res.warnings) and len(res.warnings) == 1


def test_missing_value_words_are_missing_in_wide_and_long_truth(tmp_path):
    """R writes NA: pandas' missing-value words are missing values (left out of n), not text errors."""
    out = _two_region_results(tmp_path)
    (tmp_path / "wide.csv").write_text(
        "slide,region,cells_positive\ns0,dermis,NA\ns1,dermis,n/a\ns2,dermis,#N/A\ns0,epidermis,null\n"
        "s1,epidermis,12\ns2,epidermis,14\n"
    )
    (tmp_path / "long.csv").write_text(
        "slide,region,metric,value\ns0,dermis,cells_positive,NA\ns1,dermis,cells_positive,n/a\n"
        "s2,dermis,cells_positive,#N/A\ns0,epidermis,cells_positive,null\ns1,epidermis,cells_positive,12\n"
        "s2,epidermis,cells_positive,14\n"
    )
    for name in ("wide.csv", "long.csv"):
        truth = read_truth(tmp_path / name)
        assert truth.values["reference"].isna().tolist() == [True] * 4 + [False] * 2
        res = validate(out, truth)
        assert res.warnings == ()
        a = res.agreement.set_index(["metric", "region"])
        assert a.loc[("cells_positive", "all"), "n"] == 2
        assert a.loc[("cells_positive", "all"), "bias"] == pytest.approx(-1.5)  # (11 - 12 + 12 - 14) / 2


def test_missing_slide_or_region_is_an_error_not_a_slide_named_nan(tmp_path):
    """An all-NA slide column raised an AttributeError traceback; an empty region became a region "nan"."""
    (tmp_path / "na.csv").write_text("slide,region,cells_positive\nNA,dermis,3\n")
    with pytest.raises(
        CleihcError, match=r"na\.csv: column 'slide' is empty on data line 1; give the slide of every row"
    ):
        read_truth(tmp_path / "na.csv")
    (tmp_path / "noregion.csv").write_text(
        "slide,region,metric,value\ns0,dermis,cells_positive,3\ns1,,cells_positive,4\n"
    )
    with pytest.raises(CleihcError, match=r"column 'region' is empty on data line 2; give the region"):
        read_truth(tmp_path / "noregion.csv")
    # Points: an empty region is one the truth does not say (no by-region scores), not a region "nan".
    (tmp_path / "pts.csv").write_text(
        "slide,x_px,y_px,class,region\ns0,1,2,positive,dermis\ns0,3,4,negative,\n"
    )
    assert read_truth(tmp_path / "pts.csv").points["region"].tolist() == ["dermis", ""]
