"""Accuracy through the full pipeline (``cleihc.quantify``) on the real annotated data in ../shared/data.

The evaluations live in benchmarks/accuracy_real.py (which prints every figure of docs/accuracy.md, "Real data");
these tests run them and hold the measured values. Where a target is met the target is asserted; where it is not,
the measured value less a small margin is asserted as a regression floor and the docstring says so.

Resolutions (none of the files stores one): BCData and DeepLIIF 0.25 µm/px (40x), NuClick LYON19 crops
0.12 µm/px (0.24 µm/px slides, patches resized 2x), Alcian blue 0.912 µm/px (the TIFF's and the authors' value).
Each data set skips with a clear reason when ../shared/data is absent.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cleihc.protocol import Protocol, load_protocol
from cleihc_testdata import REPO, shared_file

pytestmark = pytest.mark.shared_data


def _load_benchmark():
    name = "cleihc_accuracy_real_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "accuracy_real.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


acc = _load_benchmark()


def _as_toml_file(proto: Protocol, folder: Path) -> Protocol:
    """The protocol written as a TOML file and loaded back (what a user would run with ``--protocol``)."""
    path = folder / f"{proto.name}.toml"
    path.write_text(proto.to_toml(), encoding="utf-8")
    again = load_protocol(path)
    assert again.sha256 == proto.sha256
    return again


def test_derived_protocols():
    ki67 = acc.ki67_protocol()
    assert ki67.cells.compartment == "nucleus" and ki67.thresholds.positive_od == 0.4
    assert ki67.background.mode == "fixed" and not ki67.compartments.enabled
    assert ki67.analysis.mpp_um == acc.BCDATA_MPP_UM  # analysed at the tiles' own resolution
    cd3 = acc.cd3_crop_protocol()
    assert cd3.cells.compartment == "membrane" and cd3.analysis.mpp_um == acc.NUCLICK_MPP_UM


def test_bcdata_ki67_f1_through_quantify(tmp_path: Path):
    """BCData Ki67, all 26 test tiles, 12 px (3 µm) matching of positive and negative centroids.

    Target: positive F1 >= 0.80. NOT MET: measured 0.741 (precision 0.803, recall 0.688), negative F1 0.550
    (negative precision is capped since stromal nuclei are not annotated). Floors below the measured values.
    Every tile must now get through the pipeline (16 of 26 used to fail with "no tissue found").
    """
    root = shared_file("bcdata_ki67_sample")
    r = acc.evaluate_bcdata(root, protocol=_as_toml_file(acc.ki67_protocol(), tmp_path))
    assert len(r.per_image) == 26
    assert r.positive.n_truth == 1371 and r.negative.n_truth == 1648
    assert r.positive.f1 >= 0.73, r.positive
    assert r.positive.precision >= 0.79, r.positive
    assert r.negative.f1 >= 0.54, r.negative


def test_deepliif_ki67_counts_and_f1():
    """DeepLIIF test/ (4 BCData-derived tiles, test_groundtruth masks) and val/ (Lung1, Bladder1) at 0.25 µm/px.

    Truth = 8-connected components of the red (positive) and blue (negative) mask nuclei. Measured: positive F1
    0.732, negative F1 0.645; 84 positive cells detected for 80 annotated. No target was set: floors.
    """
    root = shared_file("deepliif_ki67_sample")
    r = acc.evaluate_deepliif(root)
    truth = {row["image"]: (row["truth_pos"], row["truth_neg"]) for row in r.per_image}
    # The component counts the README states (boundary-touching nuclei split): the truth is read as documented.
    assert truth == {
        "test/22_2": (10, 126),
        "test/34_3": (21, 79),
        "test/6_2": (22, 24),
        "test/799_2": (1, 63),
        "val/Bladder1": (15, 172),
        "val/Lung1": (11, 50),
    }
    assert r.positive.f1 >= 0.70, r.positive
    assert r.negative.f1 >= 0.62, r.negative
    detected = sum(row["detected_pos"] for row in r.per_image)
    assert abs(detected - r.positive.n_truth) <= 0.15 * r.positive.n_truth


def test_deepliif_mask_components_on_a_drawn_mask():
    # Two red discs (one touching the border) and one blue square: centroids at pixel centres.
    mask = np.zeros((20, 30, 3), np.uint8)
    yy, xx = np.mgrid[0:20, 0:30]
    mask[(yy - 5) ** 2 + (xx - 5) ** 2 <= 4] = (255, 0, 0)
    mask[(yy - 19) ** 2 + (xx - 20) ** 2 <= 4] = (255, 0, 0)
    mask[10:14, 24:28] = (0, 0, 255)
    pos, neg = acc.mask_components(mask)
    assert len(pos) == 2 and len(neg) == 1
    np.testing.assert_allclose(neg, [[26.0, 12.0]])
    np.testing.assert_allclose(pos[0], [5.5, 5.5])


def test_nuclick_lyon19_cd3_cd8_recall(tmp_path: Path):
    """NuClick LYON19 CD3/CD8 (masks not exhaustive): an annotated lymphocyte is found when a positive cell's
    centroid lies in its mask component or within 3 px. Target recall >= 0.85: met, 106/124 = 0.855. (The run-length
    split lost the raster-last clump of an image when it held two nuclei, ROI_343_2's second cell among them:
    105/124 until that was fixed.)"""
    root = shared_file("nuclick_ihc_lyon19_minitest")
    r = acc.evaluate_nuclick(root, protocol=_as_toml_file(acc.cd3_crop_protocol(), tmp_path))
    assert r.total == 124
    assert r.recall >= 0.85, (r.found, r.total)


def test_alcian_blue_matches_the_authors_qupath_recipe():
    """The authors' QuPath pixel classifier (their vectors, BA >= 0.2, I0 = 255, 0.912 µm/px) as a cleihc protocol
    through quantify: BA-positive pixels of the KI_POST 315-50 image vs the sum of their storeBAraw profile
    (15493 px). Target: within 1 percentage point of the tissue area. Met: 15163 px, -0.28 pp of 117045 px of tissue
    (the leaflets, 22 % of the image: the grey glass is not tissue although the recipe fixes I0 at white)."""
    root = shared_file("alcian_blue_mouse_mitral_valve")
    classifier = json.loads(
        (root / "reference_analysis" / "ThresholdBA_qupath_pixel_classifier.json").read_text(encoding="utf-8")
    )
    a = acc.evaluate_alcian(root)
    # The protocol carries the classifier's own numbers (read from its JSON, not typed in).
    st = classifier["op"]["colorTransforms"][0]["stains"]
    np.testing.assert_allclose(a.info["vectors"]["alcian"], [st["stain2"][c] for c in "rgb"])
    np.testing.assert_allclose(a.info["vectors"]["counterstain"], [st["stain1"][c] for c in "rgb"])
    assert a.info["threshold_od"] == classifier["op"]["op"]["thresholds"][0] == 0.2
    assert a.reference_px == 15493
    assert abs(a.difference_pp) <= 1.0, a
    assert abs(a.positive_px / a.reference_px - 1) <= 0.05, a
    assert 0.15 <= a.tissue_px / (1088 * 496) <= 0.30, a
