"""`cleihc report`: a self-contained HTML report over constructed results folders."""

from __future__ import annotations

import base64
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cleihc.errors import CleihcError
from cleihc.report import build_report, key_metric, load_results, order_timepoints, stain_drift
from cleihc.stains import preset

REGIONS = ("tissue", "epidermis", "dermis")


def _rotated(v: np.ndarray, deg: float) -> np.ndarray:
    """`v` turned by `deg` degrees towards an orthogonal direction."""
    v = v / np.linalg.norm(v)
    o = np.cross(v, [0.0, 0.0, 1.0])
    o /= np.linalg.norm(o)
    a = math.radians(deg)
    return math.cos(a) * v + math.sin(a) * o


def make_folder(
    root: Path, stain: str, *, subjects=("S01", "S02", "S03"), drift_deg=0.0, failures=(), corrected=()
) -> Path:
    """A results folder as `cleihc quantify` writes it: records with rows, QC PNGs, failures.csv."""
    out = root / stain
    (out / "slides").mkdir(parents=True)
    (out / "qc").mkdir()
    ref = preset("hdab")
    cell = stain in ("cd3", "cd8")
    for i, subj in enumerate(subjects):
        for tp in ("pre", "post"):
            slide = f"{subj}_{tp}_{stain}"
            rows = []
            for k, region in enumerate(REGIONS):
                value = 100.0 * (i + 1) + 10 * k - (10.0 if tp == "post" else 0.0)
                row = {
                    "subject": subj,
                    "timepoint": tp,
                    "stain_label": stain,
                    "slide": slide,
                    "path": f"/data/{slide}.svs",
                    "stain": stain,
                    "protocol": f"{stain}@1.0.0",
                    "protocol_sha256": "ab" * 32,
                    "region": region,
                    "region_area_mm2": 0.5 + k,
                }
                if cell:
                    row.update(
                        {
                            "cells_total": 500.0,
                            "cells_positive": value,
                            "positive_cells_per_mm2": value / (0.5 + k),
                        }
                    )
                else:
                    row.update({"positive_area_mm2": 0.01, "positive_area_percent": value / 50})
                if corrected:
                    row["corrected"] = (slide, region) in corrected
                rows.append(row)
            vectors = ref.od_vectors.copy()
            vectors[1] = _rotated(vectors[1], drift_deg * (i + 1))  # the DAB vector drifts slide by slide
            rec = {
                "slide": slide,
                "path": f"/data/{slide}.svs",
                "protocol_sha256": "ab" * 32,
                "cleihc_version": "0.1.0",
                "rows": rows,
                "metadata": {"subject": subj, "timepoint": tp},
                "provenance": {
                    "stains": {
                        "names": list(ref.names),
                        "od_vectors": vectors.tolist(),
                        "background_rgb": [250.0, 248.0 - i, 252.0],
                    },
                    "warnings": [f"{slide}: stain drift"] if drift_deg else [],
                },
            }
            (out / "slides" / f"{slide}.json").write_text(json.dumps(rec))
            img = np.full((300, 400, 3), 240, np.uint8)
            img[50:250, 60:340] = (180, 120, 160)
            img[100:110, 100:110] = (200, 0, 0)
            Image.fromarray(img).save(out / "qc" / f"{slide}.png")
    lines = ["slide,path,reason"] + [f"{s},/data/{s}.svs,cannot open: truncated file" for s in failures]
    (out / "failures.csv").write_text("\n".join(lines) + "\n")
    return out


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if "src" in a:
            self.srcs.append(a["src"])
        if "href" in a:
            self.hrefs.append(a["href"])

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_self_contained(tmp_path):
    cd3 = make_folder(
        tmp_path, "cd3", drift_deg=2.0, failures=("S09_pre_cd3",), corrected={("S01_pre_cd3", "dermis")}
    )
    cx = make_folder(tmp_path, "cxcl10")
    from cleihc.corrections import set_review_status

    set_review_status(cd3, "S02_post_cd3", "flagged", author="ana", note="fold across the dermis")
    set_review_status(cd3, "S01_pre_cd3", "reviewed", author="ana")
    summary = build_report([cd3, cx], tmp_path / "out" / "report.html")
    text = summary.html_path.read_text(encoding="utf-8")
    p = _Collector()
    p.feed(text)
    p.close()
    assert "script" not in p.tags and "link" not in p.tags  # no scripts, no external stylesheets
    assert all(s.startswith("data:image/") for s in p.srcs)
    assert all(h.startswith("#") for h in p.hrefs)
    assert "http://" not in text and "https://" not in text
    for uri in p.srcs:  # every embedded image decodes
        Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).verify()
    body = "".join(p.text)
    slides = [
        f"{s}_{t}_{st}" for st in ("cd3", "cxcl10") for s in ("S01", "S02", "S03") for t in ("pre", "post")
    ]
    for slide in slides:
        assert f'id="slide-{slide}"' in text
    assert summary.n_slides == 12 and summary.n_failures == 1 and summary.n_corrected_rows == 1
    assert "S09_pre_cd3" in body and "truncated file" in body
    assert text.count('<tr class="corrected">') == 1
    # 12 QC thumbnails + per stain (paired, regions) + drift
    assert len(p.srcs) == 12 + 2 * 2 + 1
    figs = {f.name for f in summary.figures}
    assert {"cd3_paired.png", "cd3_paired.svg", "cxcl10_regions.svg", "stain_drift_background.png"} <= figs
    assert all(
        f.parent == tmp_path / "out" / "report_figures" and f.stat().st_size > 0 for f in summary.figures
    )
    assert "stain drift" in body  # the warnings are listed
    # Review states on the QC cards: a flagged slide says so with who and why.
    assert '<p class="bad">flagged in review by ana: fold across the dermis</p>' in text
    assert '<p class="ok">reviewed by ana</p>' in text
    assert text.count("flagged in review") == 1


def test_stain_drift_angles_and_background(tmp_path):
    pytest.importorskip("cleihc.protocol")
    cd3 = make_folder(tmp_path, "cd3", drift_deg=1.5)
    drift = stain_drift(load_results([cd3]).records)
    dab = drift[drift["stain_name"] == "dab"].set_index("slide")
    hem = drift[drift["stain_name"] == "hematoxylin"].set_index("slide")
    # the built-in cd3 protocol uses the hdab preset, so hematoxylin has no drift and DAB drifts by construction
    for i, subj in enumerate(("S01", "S02", "S03")):
        assert dab.loc[f"{subj}_pre_cd3", "drift_deg"] == pytest.approx(1.5 * (i + 1), abs=1e-6)
        assert hem.loc[f"{subj}_post_cd3", "drift_deg"] == pytest.approx(0.0, abs=1e-6)
        assert dab.loc[f"{subj}_pre_cd3", "background_g"] == 248.0 - i
    assert set(drift["stain_name"]) == {"hematoxylin", "dab"}


def test_helpers():
    assert order_timepoints(["post", "w12", "pre", "w2", None]) == ["pre", "w2", "w12", "post"]
    assert order_timepoints(["baseline", "Week 4", "week 10"]) == ["baseline", "Week 4", "week 10"]
    both = pd.DataFrame({"positive_cells_per_mm2": [1.0], "positive_area_percent": [2.0]})
    assert key_metric(both) == "positive_area_percent"
    cells_only = pd.DataFrame({"positive_cells_per_mm2": [1.0], "positive_area_percent": [np.nan]})
    assert key_metric(cells_only) == "positive_cells_per_mm2"
    assert key_metric(pd.DataFrame({"x": [1]})) is None


def test_report_errors_and_cli(tmp_path):
    with pytest.raises(CleihcError, match="not a cleihc results folder"):
        build_report([tmp_path], tmp_path / "r.html")
    with pytest.raises(CleihcError):
        build_report([], tmp_path / "r.html")
    from cleihc.cli import main

    cd8 = make_folder(tmp_path, "cd8", subjects=("A",))
    (cd8 / "validation").mkdir()
    pd.DataFrame(
        {
            "metric": ["cells_positive"],
            "region": ["all"],
            "n": [4],
            "bias": [-2.5],
            "icc_2_1": [0.93],
            "ccc": [0.9],
        }
    ).to_csv(cd8 / "validation" / "agreement.csv", index=False)
    assert (
        main(["report", str(cd8), "--out", str(tmp_path / "r.html"), "--figures", str(tmp_path / "figs")])
        == 0
    )
    html_text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="validation"' in html_text and "-2.5" in html_text
    assert (tmp_path / "figs" / "cd8_regions.svg").exists()
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r2.html")]) == 1
