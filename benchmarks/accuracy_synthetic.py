"""Accuracy of cleihc on its own synthetic slides, whose answers are known exactly (issue 4 §6).

For every slide in ``sample_images/`` (or a folder given with ``--slides``), two runs through the whole pipeline:

- **detection** — the truth's region polygons given as ``--regions`` (they replace the automatic compartments),
  so the figures measure cell detection and pixel classification alone;
- **end to end** — the automatic tissue and skin compartments, as a user would run it.

Each run is compared with the truth by :func:`cleihc.validate.validate`: cell detection F1 (a match within 4 µm,
positive and negative), positive-cell count error per region, and positive-area-fraction error per region.

    .venv/bin/python benchmarks/accuracy_synthetic.py            # prints the tables used in docs/accuracy.md
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import pandas as pd

from cleihc.batch import run_batch
from cleihc.protocol import load_protocol
from cleihc.validate import read_truth, validate

STAINS = ("cd3", "cd4", "cd8", "cxcl10", "gag-alcian", "gag-colloidal-iron")


def slides_by_stain(folder: Path) -> dict[str, list[Path]]:
    """Sample slides grouped by the protocol named at the end of their stem."""
    out: dict[str, list[Path]] = {}
    for truth in sorted(folder.glob("*.truth.json")):
        stem = truth.name[: -len(".truth.json")]
        stain = next((s for s in STAINS if stem.endswith(f"_{s}")), None)
        slide = next((p for p in (folder / f"{stem}.svs", folder / f"{stem}.ome.tif") if p.exists()), None)
        if stain and slide:
            out.setdefault(stain, []).append(slide)
    return out


def truth_regions(folder: Path, work: Path) -> Path:
    """The truth's region polygons as one GeoJSON per slide (``<stem>.geojson``), for ``--regions``."""
    out = work / "truth_regions"
    out.mkdir(parents=True, exist_ok=True)
    for truth in folder.glob("*.truth.json"):
        data = json.loads(truth.read_text())
        (out / f"{truth.name[: -len('.truth.json')]}.geojson").write_text(json.dumps(data["regions"]))
    return out


def evaluate(
    slides_folder: Path, work: Path, *, use_truth_regions: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per stain: detection rows (pooled over slides) and per-region error rows."""
    regions = truth_regions(slides_folder, work) if use_truth_regions else None
    truth = read_truth(slides_folder)
    det_rows, err_rows = [], []
    for stain, slides in slides_by_stain(slides_folder).items():
        out = work / ("truth-regions" if use_truth_regions else "auto") / stain
        run_batch([str(s) for s in slides], load_protocol(stain), out_dir=out, regions=regions)
        res = validate(out, truth)
        if len(res.detection):  # stains whose truth has no marker cells (CXCL10, mucin) have no points
            det_rows.append(res.detection[res.detection["slide"] == "ALL"].assign(stain=stain))
        pairs = res.pairs.assign(stain=stain)
        err_rows.append(pairs[pairs["metric"].isin(["cells_positive", "positive_area_percent"])])
    det = pd.concat(det_rows, ignore_index=True) if det_rows else pd.DataFrame()
    return det, pd.concat(err_rows, ignore_index=True)


def summarise(det: pd.DataFrame, err: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for stain in dict.fromkeys(err["stain"]):
        d = det[det["stain"] == stain].set_index("label") if len(det) else pd.DataFrame(index=[])
        row = {"stain": stain}
        for cls in ("positive", "negative"):
            if cls in d.index and d.loc[cls, "n_truth"] > 0:
                row[f"{cls}_f1"] = round(float(d.loc[cls, "f1"]), 3)
        e = err[err["stain"] == stain]
        cp = e[e["metric"] == "cells_positive"]
        if len(cp):
            tissue = cp[cp["region"] == "tissue"]
            row["count_error_tissue_max_percent"] = round(
                float((100 * tissue["difference"].abs() / tissue["reference"]).max()), 2
            )
            big = cp[cp["reference"] >= 30]
            row["count_error_regions_ge30_max_percent"] = round(
                float((100 * big["difference"].abs() / big["reference"]).max()), 2
            )
        ap = e[e["metric"] == "positive_area_percent"]
        if len(ap):
            row["area_error_max_pp"] = round(float(ap["difference"].abs().max()), 3)
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=Path, default=Path(__file__).resolve().parents[1] / "sample_images")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    pd.set_option("display.width", 200)
    with tempfile.TemporaryDirectory() as tmp:
        for label, use in (
            ("detection (truth regions)", True),
            ("end to end (automatic compartments)", False),
        ):
            det, err = evaluate(args.slides, Path(tmp), use_truth_regions=use)
            print(f"\n## {label}\n")
            print(summarise(det, err).to_string(index=False))


if __name__ == "__main__":
    main()
