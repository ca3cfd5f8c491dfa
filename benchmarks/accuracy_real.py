"""Accuracy of cleihc through the full pipeline (``cleihc.quantify``) on the real annotated data in ../shared/data.

Run from the repo root::

    .venv/bin/python benchmarks/accuracy_real.py            # every tile of every data set
    .venv/bin/python benchmarks/accuracy_real.py bcdata     # one data set (bcdata, deepliif, nuclick, alcian)

Prints, per data set, the figures reported in docs/accuracy.md ("Real data"). tests/test_accuracy_real.py imports
this file and runs the same evaluations on a subset of the images.

None of the images stores its resolution, so the µm per pixel is given to ``quantify`` explicitly:

- BCData Ki67 tiles: 0.25 µm/px (the BCData paper: 40x, 0.2-0.25 µm/px).
- DeepLIIF Ki67 tiles: 0.25 µm/px (40x-equivalent; the test tiles are BCData-derived breast tiles).
- NuClick LYON19 CD3/CD8 crops: 0.12 µm/px (LYON19 slides are 0.24 µm/px at 40x; NuClick's 256 px patches were
  resized 2x to these 512 px crops).
- Alcian blue leaflets: 0.912 µm/px (TIFF XResolution 1.09645 px/µm; also the authors' classifier resolution).

Every data set is read from ../shared/data and nothing derived from it is written anywhere.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from cleihc.errors import NoTissueError
from cleihc.pipeline import quantify
from cleihc.protocol import Protocol, load_protocol
from cleihc.validate import match_points

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

BCDATA_MPP_UM = 0.25
DEEPLIIF_MPP_UM = 0.25
NUCLICK_MPP_UM = 0.12
ALCIAN_MPP_UM = 0.912
#: Matching radius of BCData and DeepLIIF centroids: 12 px = 3 µm at 0.25 µm/px (about a nucleus radius).
MATCH_RADIUS_PX = 12.0
#: NuClick: a positive cell hits an annotated lymphocyte when its centroid is in the mask or this close to it.
NUCLICK_TOLERANCE_PX = 3


# ----------------------------------------------------------------------------------------------------------------
# Protocols (derived from the built-in cd3 protocol)
# ----------------------------------------------------------------------------------------------------------------
def _crop_protocol(name: str, description: str, mpp_um: float) -> dict[str, Any]:
    """cd3 as a dict, set up for a tissue-filled crop: analysed at its own resolution, no skin compartments."""
    d = load_protocol("cd3").to_dict()
    d["protocol"].update(name=name, version="0.1.0", description=description)
    d["analysis"]["mpp_um"] = mpp_um
    d["analysis"]["raster_mpp_um"] = max(2.0, mpp_um)
    d["compartments"]["enabled"] = False  # crops inside tumour or lymphoid tissue: no epidermis to find
    d["regions"]["report"] = ["tissue"]
    # I0 = white: these crops show no glass, and their palest ground (pale tissue, 225-235) is no glass colour.
    d["background"]["mode"] = "fixed"
    # Small crops: the tissue mask works at 2 µm/px, so a 160 µm tile is 80 px rather than 20.
    # Tissue objects down to a few cells: a 0.12 µm/px crop is only 61 µm across.
    d["tissue"].update(mpp_um=2.0, smooth_um=2.0, closing_um=4.0, min_object_um2=200.0, min_hole_um2=400.0)
    return d


def ki67_protocol(mpp_um: float = BCDATA_MPP_UM) -> Protocol:
    """Nuclear DAB (Ki67) cell counting: nuclei found on hematoxylin + DAB, scored by their own mean DAB OD."""
    d = _crop_protocol("ki67_nuclear", "Ki67: nuclear DAB, hematoxylin counterstain", mpp_um)
    d["cells"].update(
        compartment="nucleus",
        measure="mean",
        nucleus_target_weight=0.3,  # DAB-filled nuclei lose hematoxylin; the stroma is DAB-tinted, so not 1.0
        nucleus_threshold_od=0.05,
        # Tuned on the even-numbered BCData tiles (pooled F1 of positives, then negatives): a narrower smoothing
        # and a lower edge fraction keep pale, large tumour nuclei whole; a finer threshold cascade separates
        # packed ones.
        smoothing_sigma_um=1.0,
        nucleus_edge_fraction=0.3,
        split_min_distance_um=4.0,
        threshold_levels=8,
        threshold_step=1.5,
    )
    # I0 is white on these glass-free crops, so DAB-tinted cytoplasm reads about 0.2-0.3: positive nuclei from 0.4.
    d["thresholds"].update(positive_od=0.4, bins_od=[0.4, 0.6, 0.8])
    return Protocol.from_dict(d)


def cd3_crop_protocol(mpp_um: float = NUCLICK_MPP_UM) -> Protocol:
    """Membranous CD3/CD8 on 0.12 µm/px crops: the built-in cd3 cells table with a narrower smoothing."""
    d = _crop_protocol("cd3_crop", "CD3/CD8: membranous DAB on tissue-filled crops", mpp_um)
    d["cells"].update(smoothing_sigma_um=0.6)  # 5 px sigma at 0.12 µm/px keeps neighbouring nuclei apart
    d["thresholds"].update(positive_od=0.1, bins_od=[0.1, 0.3, 0.5])
    return Protocol.from_dict(d)


def alcian_protocol(classifier_json: Path) -> tuple[Protocol, dict[str, Any]]:
    """The authors' QuPath recipe as a cleihc protocol: their stain vectors and BA threshold, I0 = 255.

    Returns the protocol and what was read from the classifier (vectors, threshold, µm/px).
    """
    data = json.loads(Path(classifier_json).read_text())
    transform = data["op"]["colorTransforms"][0]
    st = transform["stains"]
    stains = {st[k]["name"]: [st[k]["r"], st[k]["g"], st[k]["b"]] for k in ("stain1", "stain2", "stain3")}
    residual = [
        n
        for k, n in (
            ("stain1", st["stain1"]["name"]),
            ("stain2", st["stain2"]["name"]),
            ("stain3", st["stain3"]["name"]),
        )
        if st[k]["isResidual"]
    ]
    target_name = st[f"stain{transform['stainNumber']}"]["name"]
    threshold = float(data["op"]["op"]["thresholds"][0])
    mpp = float(data["metadata"]["inputResolution"]["pixelWidth"]["value"])
    background = [float(st["maxRed"]), float(st["maxGreen"]), float(st["maxBlue"])]
    vectors = {
        ("alcian" if n == target_name else "counterstain"): v for n, v in stains.items() if n not in residual
    }
    d = _crop_protocol("alcian_qupath", "Alcian blue: the authors' QuPath deconvolution and BA >= 0.2", mpp)
    d["protocol"].update(measure=["area"], target="alcian", counterstain="counterstain")
    d["stains"] = {"vectors": vectors, "estimate": "fixed"}
    d["background"] = {"mode": "fixed", "rgb": background}
    d["thresholds"] = {"bins_od": [threshold, threshold + 0.2, threshold + 0.4], "positive_od": threshold}
    d["tissue"] = {}  # leaflets on glass: the default tissue detection
    d["analysis"]["raster_mpp_um"] = mpp  # one raster cell per pixel: positive area counts pixels exactly
    d.pop("cells", None)
    info = {"vectors": vectors, "threshold_od": threshold, "mpp_um": mpp, "background_rgb": background}
    return Protocol.from_dict(d), info


# ----------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Counts:
    """Pooled one-to-one matching counts of one class."""

    tp: int = 0
    n_detected: int = 0
    n_truth: int = 0

    def add(self, truth_xy: np.ndarray, detected_xy: np.ndarray, radius: float) -> None:
        m = match_points(truth_xy, detected_xy, radius=radius)
        self.tp += m.tp
        self.n_detected += m.n_detected
        self.n_truth += m.n_truth

    @property
    def precision(self) -> float:
        return self.tp / self.n_detected if self.n_detected else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / self.n_truth if self.n_truth else float("nan")

    @property
    def f1(self) -> float:
        total = self.n_detected + self.n_truth
        return 2 * self.tp / total if total else float("nan")

    def __str__(self) -> str:
        return (
            f"F1 {self.f1:.3f} (precision {self.precision:.3f}, recall {self.recall:.3f}; "
            f"tp {self.tp}, detected {self.n_detected}, truth {self.n_truth})"
        )


@dataclass
class PosNeg:
    positive: Counts = field(default_factory=Counts)
    negative: Counts = field(default_factory=Counts)
    per_image: list[dict[str, Any]] = field(default_factory=list)


def _cells(path: Path, protocol: Protocol, mpp_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Detected cell centroids (x, y) in level-0 px and their positivity, from the full pipeline."""
    result = quantify(path, protocol, mpp=mpp_um)
    cells = result.cells
    on_tissue = cells["region"].to_numpy() != "outside"
    xy = cells[["x_px", "y_px"]].to_numpy(float)[on_tissue]
    return xy, cells["positive"].to_numpy(bool)[on_tissue]


def _score_points(
    out: PosNeg, name: str, xy: np.ndarray, pos: np.ndarray, truth_pos: np.ndarray, truth_neg: np.ndarray
) -> None:
    out.positive.add(truth_pos, xy[pos], MATCH_RADIUS_PX)
    out.negative.add(truth_neg, xy[~pos], MATCH_RADIUS_PX)
    out.per_image.append(
        {
            "image": name,
            "truth_pos": len(truth_pos),
            "truth_neg": len(truth_neg),
            "detected_pos": int(pos.sum()),
            "detected_neg": int((~pos).sum()),
        }
    )


def evaluate_bcdata(
    root: Path, names: Sequence[str] | None = None, protocol: Protocol | None = None
) -> PosNeg:
    """BCData Ki67: positive and negative F1 within 12 px, pooled over the tiles (all 26 by default)."""
    protocol = protocol or ki67_protocol()
    images = sorted((root / "1.images" / "test").glob("*.png"), key=lambda p: int(p.stem))
    if names is not None:
        images = [p for p in images if p.stem in set(names)]
    out = PosNeg()
    for path in images:
        points = json.loads((root / "3.data_processed_json" / f"{path.stem}.json").read_text())
        truth = {
            k: np.array([[p["x"], p["y"]] for p in points if p["label_id"] == k], float).reshape(-1, 2)
            for k in (1, 2)
        }
        xy, pos = _cells(path, protocol, BCDATA_MPP_UM)
        _score_points(out, path.stem, xy, pos, truth[1], truth[2])
    return out


def mask_components(mask_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (x, y) of the red (positive) and blue (negative) nuclei of a DeepLIIF mask (8-connected)."""
    r, g, b = (mask_rgb[..., i].astype(int) for i in range(3))
    out = []
    for sel in ((r > 127) & (g < 128) & (b < 128), (b > 127) & (r < 128) & (g < 128)):
        labels, n = ndimage.label(sel, structure=np.ones((3, 3)))
        if n == 0:
            out.append(np.zeros((0, 2)))
            continue
        cy_cx = np.array(ndimage.center_of_mass(sel, labels, np.arange(1, n + 1)), float).reshape(-1, 2)
        out.append(cy_cx[:, ::-1] + 0.5)  # pixel centres, as cleihc's x_px/y_px
    return out[0], out[1]


def evaluate_deepliif(
    root: Path, names: Sequence[str] | None = None, protocol: Protocol | None = None
) -> PosNeg:
    """DeepLIIF: counts and centroid F1 against the mask components, on test/ (with test_groundtruth/) and val/.

    Each file holds the IHC tile in its first 512 columns; the val/ files hold their mask in the last 512. The
    IHC tile is written to a temporary PNG (outside the repo) and quantified.
    """
    protocol = protocol or ki67_protocol(DEEPLIIF_MPP_UM)
    jobs = [(p, root / "test_groundtruth" / p.name) for p in sorted((root / "test").glob("*.png"))]
    jobs += [(p, None) for p in sorted((root / "val").glob("*.png"))]
    if names is not None:
        jobs = [j for j in jobs if j[0].stem in set(names)]
    out = PosNeg()
    with tempfile.TemporaryDirectory(prefix="cleihc_deepliif_") as tmp:
        for path, gt in jobs:
            strip = np.asarray(Image.open(path).convert("RGB"))
            ihc = strip[:, :512]
            mask = np.asarray(Image.open(gt).convert("RGB")) if gt is not None else strip[:, -512:]
            tile = Path(tmp) / f"{path.parent.name}_{path.stem}.png"
            Image.fromarray(ihc).save(tile)
            truth_pos, truth_neg = mask_components(mask)
            xy, pos = _cells(tile, protocol, DEEPLIIF_MPP_UM)
            _score_points(out, f"{path.parent.name}/{path.stem}", xy, pos, truth_pos, truth_neg)
    return out


@dataclass
class Recall:
    found: int = 0
    total: int = 0
    per_image: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.found / self.total if self.total else float("nan")


def evaluate_nuclick(
    root: Path, names: Sequence[str] | None = None, protocol: Protocol | None = None
) -> Recall:
    """NuClick LYON19 CD3/CD8: recall of annotated lymphocytes (mask components) by positive detected cells."""
    from skimage.segmentation import expand_labels

    protocol = protocol or cd3_crop_protocol()
    out = Recall()
    for path in sorted((root / "images").glob("*.jpg")):
        if names is not None and path.stem not in set(names):
            continue
        mask = np.asarray(Image.open(root / "masks" / path.name).convert("L")) > 127
        components, n = ndimage.label(mask)
        if n == 0:
            continue
        components = expand_labels(components, NUCLICK_TOLERANCE_PX)
        try:
            xy, pos = _cells(path, protocol, NUCLICK_MPP_UM)
        except NoTissueError:  # counted as missed: every annotated cell of the crop is lost
            xy, pos = np.zeros((0, 2)), np.zeros(0, bool)
        h, w = mask.shape
        # Level-0 centroid coordinates: pixel i spans [i, i + 1).
        ix = np.clip(np.floor(xy[pos, 0]).astype(int), 0, w - 1)
        iy = np.clip(np.floor(xy[pos, 1]).astype(int), 0, h - 1)
        hit = np.unique(components[iy, ix])
        found = int((hit > 0).sum())
        out.found += found
        out.total += n
        out.per_image.append((path.stem, found, n))
    return out


@dataclass(frozen=True)
class AlcianResult:
    image: str
    positive_px: float
    reference_px: float
    tissue_px: float
    difference_pp: float
    info: dict[str, Any]


def evaluate_alcian(root: Path) -> AlcianResult:
    """Alcian blue: BA-positive pixels of the KI_POST 315-50 image vs the authors' profile (sum of storeBAraw)."""
    ref_dir = root / "reference_analysis"
    protocol, info = alcian_protocol(ref_dir / "ThresholdBA_qupath_pixel_classifier.json")
    profile = next(ref_dir.glob("*AbsoluteBA.csv"))
    image = root / "images" / profile.name.removesuffix("AbsoluteBA.csv")
    rows = np.genfromtxt(profile, delimiter=",", names=True)
    reference = float(np.sum(rows["storeBAraw"]))
    result = quantify(image, protocol, mpp=info["mpp_um"])
    row = result.regions.set_index("region").loc["tissue"]
    pixel_area_um2 = result.plan.pixel_area_um2
    tissue_px = float(row["region_area_mm2"]) * 1e6 / pixel_area_um2
    positive_px = float(row["positive_area_percent"]) / 100.0 * tissue_px
    diff_pp = 100.0 * (positive_px - reference) / tissue_px
    return AlcianResult(image.name, positive_px, reference, tissue_px, diff_pp, info)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def _report_posneg(title: str, r: PosNeg) -> None:
    print(f"{title}")
    print(f"  positive: {r.positive}")
    print(f"  negative: {r.negative}")
    for row in r.per_image:
        print(
            f"    {row['image']:>14s}: truth +{row['truth_pos']:4d} / -{row['truth_neg']:4d}   "
            f"detected +{row['detected_pos']:4d} / -{row['detected_neg']:4d}"
        )


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not SHARED_DATA.is_dir():
        print(f"real data not found at {SHARED_DATA}; nothing to measure")
        return 1
    which = set(argv) or {"bcdata", "deepliif", "nuclick", "alcian"}
    if "bcdata" in which:
        t0 = time.perf_counter()
        r = evaluate_bcdata(SHARED_DATA / "bcdata_ki67_sample")
        _report_posneg(
            f"BCData Ki67, 26 test tiles at {BCDATA_MPP_UM} µm/px, match within {MATCH_RADIUS_PX:g} px "
            f"({time.perf_counter() - t0:.0f} s)",
            r,
        )
    if "deepliif" in which:
        t0 = time.perf_counter()
        r = evaluate_deepliif(SHARED_DATA / "deepliif_ki67_sample")
        _report_posneg(
            f"DeepLIIF Ki67, test/ + val/ at {DEEPLIIF_MPP_UM} µm/px, mask components, match within "
            f"{MATCH_RADIUS_PX:g} px ({time.perf_counter() - t0:.0f} s)",
            r,
        )
    if "nuclick" in which:
        t0 = time.perf_counter()
        n = evaluate_nuclick(SHARED_DATA / "nuclick_ihc_lyon19_minitest")
        print(
            f"NuClick LYON19 CD3/CD8 at {NUCLICK_MPP_UM} µm/px: recall {n.recall:.3f} ({n.found}/{n.total} "
            f"annotated lymphocytes hit by a positive cell within {NUCLICK_TOLERANCE_PX} px) "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    if "alcian" in which:
        a = evaluate_alcian(SHARED_DATA / "alcian_blue_mouse_mitral_valve")
        print(
            f"Alcian blue ({a.image}) at {a.info['mpp_um']:.4f} µm/px, BA >= {a.info['threshold_od']}: "
            f"{a.positive_px:.0f} px vs the authors' {a.reference_px:.0f} px "
            f"({100 * (a.positive_px / a.reference_px - 1):+.1f}%), tissue {a.tissue_px:.0f} px, "
            f"difference {a.difference_pp:+.2f} pp of tissue area"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
