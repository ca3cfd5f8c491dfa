"""Positive cell detection on real IHC images from ../shared/data (skipped where absent).

Neither data set stores its resolution, so the microns per pixel are chosen here and said: BCData tiles are
40x breast Ki67 (the paper gives 0.2-0.25 µm/px; 0.25 is used), the LYON19 NuClick crops are 256 px patches of
0.24 µm/px slides resized 2x (0.12 µm/px). Glass brightness I0 is estimated once per image (the per-slide step).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.segmentation import expand_labels

from cleihc import stains
from cleihc.cells import CellParams, detect_cells
from cleihc_testdata import shared_file

HDAB = stains.preset("hdab")


def _matched(px, py, tx, ty, radius):
    if len(px) == 0 or len(tx) == 0:
        return 0
    d = np.hypot(px[:, None] - tx[None], py[:, None] - ty[None])
    cost = np.where(d <= radius, d, 1e6)
    a, b = linear_sum_assignment(cost)
    return int(np.sum(cost[a, b] <= radius))


def _detect(rgb, params, mpp_um, positive_od, *, estimate_background=True):
    background = stains.estimate_background(rgb, fallback=(255, 255, 255)) if estimate_background else None
    conc = stains.deconvolve(rgb, HDAB, background=background)
    return detect_cells(
        conc,
        names=HDAB.names,
        counterstain="hematoxylin",
        target="dab",
        mpp_um=mpp_um,
        params=params,
        positive_od=positive_od,
        bins_od=(positive_od, positive_od + 0.2, positive_od + 0.4),
    ).table


@pytest.mark.shared_data
def test_bcdata_ki67_positive_and_negative_f1():
    """Nuclear Ki67: Hungarian matching of detections to annotated centroids within 12 px (3 µm), 26 tiles.

    Measured: positive F1 0.708, negative F1 0.454 (the pale, large tumour nuclei on a DAB-tinted stroma are the
    weak point: many are found only in part or merged). Target for positives was 0.80: not reached.
    """
    root = shared_file("bcdata_ki67_sample")
    params = CellParams(
        compartment="nucleus",
        nucleus_target_weight=0.3,  # DAB-filled nuclei lose hematoxylin; the stroma is DAB-tinted, so not 1.0
        nucleus_threshold_od=0.05,
        smoothing_sigma_um=1.5,
        split_min_distance_um=4.0,
        threshold_levels=5,
        threshold_step=2.0,
    )
    sums = np.zeros(6, dtype=np.int64)  # tp+, pred+, true+, tp-, pred-, true-
    images = sorted((root / "1.images" / "test").glob("*.png"))
    assert len(images) == 26
    for path in images:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        points = json.loads((root / "3.data_processed_json" / f"{path.stem}.json").read_text())
        truth = {
            k: np.array([[p["x"], p["y"]] for p in points if p["label_id"] == k]).reshape(-1, 2)
            for k in (1, 2)
        }
        t = _detect(rgb, params, 0.25, 0.3)
        pos = t["positive"]
        for offset, pred, true in ((0, pos, truth[1]), (3, ~pos, truth[2])):
            tp = _matched(t["x_a"][pred], t["y_a"][pred], true[:, 0], true[:, 1], 12.0)
            sums[offset : offset + 3] += (tp, int(pred.sum()), len(true))
    assert sums[2] == 1371 and sums[5] == 1648
    f1_pos = 2 * sums[0] / (sums[1] + sums[2])
    f1_neg = 2 * sums[3] / (sums[4] + sums[5])
    assert f1_pos >= 0.68, (f1_pos, sums)
    assert f1_neg >= 0.42, (f1_neg, sums)


@pytest.mark.shared_data
def test_nuclick_lyon19_cd3_cd8_recall():
    """Membranous CD3/CD8: an annotated lymphocyte (mask component) counts as found when a positive detected
    cell's centroid lies in it or within 3 px. Masks are not exhaustive, so only recall is meaningful.

    Measured: 106/124 = 0.855 at 0.12 µm/px (target 0.85). Misses are lymphocytes inside dense, dark clusters.
    """
    root = shared_file("nuclick_ihc_lyon19_minitest")
    params = CellParams(smoothing_sigma_um=0.6)  # a 0.12 µm/px image: 5 px sigma keeps nuclei apart
    found = total = 0
    for path in sorted((root / "images").glob("*.jpg")):
        mask = np.asarray(Image.open(root / "masks" / path.name).convert("L")) > 127
        components, n = ndimage.label(mask)
        if n == 0:
            continue
        components = expand_labels(components, 3)
        rgb = np.asarray(Image.open(path).convert("RGB"))
        t = _detect(rgb, params, 0.12, 0.1, estimate_background=False)
        pos = t["positive"]
        h, w = mask.shape
        ix = np.clip(np.round(t["x_a"][pos]).astype(int), 0, w - 1)
        iy = np.clip(np.round(t["y_a"][pos]).astype(int), 0, h - 1)
        hit = np.unique(components[iy, ix])
        found += int((hit > 0).sum())
        total += n
    assert total == 124
    assert found / total >= 0.83, (found, total)
