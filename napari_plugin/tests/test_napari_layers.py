"""Reader and layer builders, without a viewer: lazy levels, scales, results layers, shapes round trips."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import shapely
import tifffile
from shapely.geometry import MultiPolygon, Polygon, box

from cleihc import open_slide
from napari_cleihc._edits import AutomaticResults, cell_edits, painted_exclusions, region_corrections
from napari_cleihc._layers import (
    CLASS_NAMES,
    ResultsSlide,
    cell_classes,
    class_fields,
    geometries_from_shapes,
    shape_parts,
    shapes_layer,
    slide_levels,
    visible_rect_px,
)
from napari_cleihc._reader import get_results_reader, get_slide_reader


def test_slide_reader_is_lazy_multiscale_in_um(sample_slide):
    reader = get_slide_reader(str(sample_slide))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(sample_slide))
    assert kind == "image" and kwargs["rgb"] is True
    with open_slide(sample_slide) as s:
        dims, mpp = s.level_dimensions, s.mpp
        levels = data if kwargs["multiscale"] else [data]
        assert all(isinstance(a, da.Array) for a in levels)
        assert [a.shape for a in levels[: len(dims)]] == [(h, w, 3) for w, h in dims]
        assert all(max(a.chunksize[:2]) <= 1024 for a in levels)
        assert kwargs["scale"] == pytest.approx((mpp[1], mpp[0]))
        # A block read through dask equals the slide's own read of that rectangle.
        last = len(dims) - 1
        block = levels[last][10:130, 20:220].compute()
        np.testing.assert_array_equal(block, s.read_level_rect(last, (20, 10), (200, 120)))


def test_readers_decline_what_they_do_not_take(tmp_path, sample_slide):
    text = tmp_path / "notes.tif"
    text.write_text("not an image")
    assert get_slide_reader(str(text)) is None
    assert get_slide_reader([str(sample_slide), str(sample_slide)]) is None
    assert get_results_reader(str(tmp_path)) is None
    assert get_results_reader(str(sample_slide)) is None


def test_binned_levels_for_a_single_level_giant(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (900, 5000, 3), dtype=np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(256, 256))
    with open_slide(path, mpp=0.5) as s:
        levels = slide_levels(s, chunk_px=512, smallest_px=2048)
        assert [a.shape[:2] for a in levels] == [(900, 5000), (450, 2500), (225, 1250)]
        # Level 1 is the exact 2x2 mean (rounded half up) of level 0.
        ref = (img[:200, :200].reshape(100, 2, 100, 2, 3).astype(np.uint32).sum(axis=(1, 3)) * 2 + 4) // 8
        np.testing.assert_array_equal(levels[1][:100, :100].compute(), ref.astype(np.uint8))


def test_results_reader_layers(results_dir):
    reader = get_results_reader(str(results_dir))
    assert reader is not None
    layers = {kw["name"]: (d, kw, kind) for d, kw, kind in reader(str(results_dir))}
    assert {"tissue", "regions", "exclusions", "positive", "cells"} <= set(layers)
    slide = next(p.stem for p in (results_dir / "slides").glob("*.json"))
    cells = pd.read_parquet(results_dir / "cells" / f"{slide}.parquet")
    pts, kw, kind = layers["cells"]
    assert kind == "points" and pts.shape == (len(cells), 2)
    np.testing.assert_array_equal(pts[:, 1], cells["x_px"].to_numpy())
    np.testing.assert_array_equal(
        kw["features"]["class"].astype(str).to_numpy(),
        cell_classes(cells["positive"].to_numpy(), cells["intensity_class"].to_numpy()),
    )
    mask = tifffile.imread(results_dir / "masks" / f"{slide}.ome.tif")
    pos, kw, _ = layers["positive"]
    pos0 = pos[0] if isinstance(pos, list) else pos
    np.testing.assert_array_equal(np.asarray(pos0), mask)
    auto = AutomaticResults.load(results_dir, slide)
    r = auto.raster_downsample
    wpp = layers["cells"][1]["scale"]
    assert kw["scale"] == pytest.approx((wpp[0] * r, wpp[1] * r))
    # The tissue shapes give back the tissue polygons of regions/<slide>.geojson.
    data, kw, _ = layers["tissue"]
    geoms = geometries_from_shapes(
        data, ["polygon"] * len(data), kw["features"]["region"], kw["features"]["part"]
    )
    assert shapely.area(shapely.symmetric_difference(geoms["tissue"], auto.regions["tissue"])) < 1e-6
    # The reader also opens the slide itself, aligned: pixel centres at (p + 0.5) * mpp.
    img = next(v for v in layers.values() if v[1]["metadata"]["cleihc"]["role"] == "slide")
    assert img[1]["translate"] == pytest.approx((0.5 * wpp[0], 0.5 * wpp[1]))


def test_shapes_round_trip_keeps_holes_and_unions_parts():
    donut = Polygon([(0, 0), (100, 0), (100, 100), (0, 100)], [[(30, 30), (60, 30), (60, 60), (30, 60)]])
    island = box(40, 40, 50, 50)  # inside the hole
    other = box(200, 0, 260, 40)
    data, kw, _ = shapes_layer(
        [("epidermis", MultiPolygon([donut, island])), ("dermis", other)],
        world_per_px=(0.5, 0.5),
        name="regions",
        role="regions",
    )
    f = kw["features"]
    back = geometries_from_shapes(data, ["polygon"] * len(data), f["region"], f["part"])
    assert back["epidermis"].area == pytest.approx(donut.area + island.area)
    assert back["epidermis"].symmetric_difference(MultiPolygon([donut, island])).area == pytest.approx(0)
    assert back["dermis"].equals(MultiPolygon([other]))
    # A polygon drawn by hand (part -1) overlapping a region adds to it (union), it does not punch a hole.
    extra = np.array([[0.0, 90.0], [0.0, 150.0], [50.0, 150.0], [50.0, 90.0]])  # (y, x)
    back = geometries_from_shapes(
        [*data, extra], ["polygon"] * (len(data) + 1), [*f["region"], "epidermis"], [*f["part"], -1]
    )
    assert back["epidermis"].area == pytest.approx(donut.area + island.area + 50 * 50)
    # Rectangles and ellipses count; a line does not.
    parts = shape_parts(
        [
            np.array([[0, 0], [0, 10], [10, 10], [10, 0]]),
            np.array([[0, 0], [0, 20], [10, 20], [10, 0]]),
            np.array([[0, 0], [5, 5]]),
        ],
        ["rectangle", "ellipse", "line"],
        ["a", "b", "c"],
        [-1, -1, -1],
    )
    assert [n for n, _ in parts] == ["a", "b"]
    assert parts[1][1].area == pytest.approx(np.pi * 10 * 5, rel=2e-3)


def test_cell_classes_round_trip():
    labels = cell_classes(np.array([False, True, True, True, True]), np.array([0, 1, 2, 3, 0]))
    assert list(labels) == ["negative", "1+", "2+", "3+", "1+"]
    assert [class_fields(c) for c in CLASS_NAMES] == [(False, 0), (True, 1), (True, 2), (True, 3)]
    with pytest.raises(ValueError):
        class_fields("4+")


def test_cell_edits_against_automatic_cells():
    auto = pd.DataFrame(
        {
            "cell_id": [0, 1, 2, 3],
            "x_px": [10.0, 20.0, 30.0, 400.0],
            "y_px": [5.0, 5.0, 5.0, 400.0],
            "positive": [True, False, True, False],
            "intensity_class": [2, 0, 1, 0],
        }
    )
    # Shown: cell 0 deleted, cell 1 made 3+, cell 2 moved, cell 3 gone under an exclusion, one added.
    pts = np.array([[5.0, 20.0], [50.0, 30.0], [7.0, 8.0]])
    feats = pd.DataFrame({"cell_id": [1, 2, -1], "class": ["3+", "1+", "negative"]})
    edits = cell_edits(auto, pts, feats, excluded=np.array([False, False, False, True]))
    got = [(e.action, e.x_px, e.y_px, e.positive, e.intensity_class) for e in edits]
    assert got == [
        ("delete", 10.0, 5.0, False, 0),
        ("delete", 30.0, 5.0, False, 0),
        ("reclassify", 20.0, 5.0, True, 3),
        ("add", 30.0, 50.0, True, 1),
        ("add", 8.0, 7.0, False, 0),
    ]
    # `excluded` goes with the rows of `automatic` in their order, whatever the order of the cell ids.
    shuffled = auto.iloc[[3, 1, 0, 2]]
    again = cell_edits(shuffled, pts, feats, excluded=np.array([True, False, False, False]))
    assert [(e.action, e.x_px, e.y_px, e.positive, e.intensity_class) for e in again] == got
    # Unchanged cells give no edits.
    same = pd.DataFrame(
        {"cell_id": [0, 1, 2, 3], "class": cell_classes(auto["positive"], auto["intensity_class"])}
    )
    assert cell_edits(auto, auto[["y_px", "x_px"]].to_numpy(), same) == ()


def test_region_corrections_only_changed_regions():
    auto = {"tissue": box(0, 0, 100, 100), "epidermis": box(0, 0, 100, 10), "dermis": box(0, 10, 100, 100)}
    current = {"tissue": box(0, 0, 100, 100), "epidermis": box(0, 0, 100, 20), "dermis": box(0, 10, 100, 100)}
    out = region_corrections(auto, current)
    assert list(out) == ["epidermis"] and out["epidermis"].area == 2000
    gone = region_corrections(auto, {k: v for k, v in auto.items() if k != "dermis"})
    assert list(gone) == ["dermis"] and gone["dermis"].is_empty


def test_painted_exclusions_are_exact_raster_polygons():
    labels = np.zeros((20, 30), np.uint8)
    labels[2:5, 3:9] = 1
    labels[10:12, 20:21] = 3
    polys = painted_exclusions(labels, raster_downsample=4.0)
    assert sorted(p.area for p in polys) == [2 * 1 * 16.0, 3 * 6 * 16.0]
    assert polys[0].bounds == (12.0, 8.0, 36.0, 20.0)


def test_visible_rect_px():
    # Canvas 600x800 screen px at zoom 2 (screen px per µm), centred at (y, x) = (100, 200) µm, 0.5 µm/px.
    rect = visible_rect_px(
        (0, 100.0, 200.0), 2.0, (600, 800), world_per_px=(0.5, 0.5), dimensions=(10000, 10000)
    )
    assert rect == (0, 0, 800, 500)
    rect = visible_rect_px(
        (1000.0, 1000.0), 4.0, (400, 400), world_per_px=(0.5, 0.5), dimensions=(10000, 10000)
    )
    assert rect == (1900, 1900, 200, 200)
    assert (
        visible_rect_px((-500.0, -500.0), 4.0, (400, 400), world_per_px=(0.5, 0.5), dimensions=(100, 100))
        is None
    )


def test_slide_without_mpp_is_in_pixels(tmp_path):
    from PIL import Image

    from napari_cleihc._layers import slide_layer

    path = tmp_path / "plain.png"
    Image.fromarray(np.full((300, 400, 3), 200, np.uint8)).save(path)
    data, kwargs, kind = slide_layer(path)
    assert kind == "image" and not kwargs["multiscale"] and data.shape == (300, 400, 3)
    assert kwargs["scale"] == (1.0, 1.0) and kwargs["metadata"]["cleihc"]["mpp_um"] is None
    data, kwargs, _ = slide_layer(path, mpp=0.25)
    assert kwargs["scale"] == (0.25, 0.25) and kwargs["metadata"]["cleihc"]["mpp_override"] == (0.25, 0.25)


def test_protocol_with_threshold():
    from cleihc.errors import CleihcError
    from cleihc.protocol import load_protocol
    from napari_cleihc._quantify_widget import protocol_with_threshold

    cd3 = load_protocol("cd3")
    lower = protocol_with_threshold(cd3, cd3.thresholds.positive_od - 0.05)
    assert lower.thresholds.positive_od == pytest.approx(cd3.thresholds.positive_od - 0.05)
    assert lower.thresholds.bins_od[1:] == cd3.thresholds.bins_od[1:]
    assert lower.sha256 != cd3.sha256 and lower.stains.matrix == cd3.stains.matrix
    with pytest.raises(CleihcError):
        protocol_with_threshold(cd3, cd3.thresholds.bins_od[1] + 0.1)  # not below the moderate bin


def test_results_of_a_run_given_a_relative_path_open_from_anywhere(sample_slide, tmp_path, monkeypatch):
    """`cleihc quantify S01.svs` run in the slides' folder records the path as given (relative); a reviewer who
    opens the results from another folder still gets the slide image, through the absolute path recorded."""
    from cleihc.cli import main

    monkeypatch.chdir(sample_slide.parent)
    out = tmp_path / "out"
    assert main(["quantify", sample_slide.name, "--stain", "cd3", "--out", str(out), "--quiet"]) == 0
    monkeypatch.chdir(tmp_path)
    rs = ResultsSlide.load(out, sample_slide.stem)
    assert rs.record["path"] == sample_slide.name and not Path(rs.record["path"]).exists()
    assert rs.slide_path == sample_slide.resolve()
    roles = [kw["metadata"]["cleihc"]["role"] for _, kw, _ in get_results_reader(str(out))(str(out))]
    assert "slide" in roles


def test_a_damaged_tile_is_drawn_white_not_raised(caplog):
    """Regression: a tile that cannot be decoded raised from napari's paint loop (a 90-line traceback per draw)."""
    from cleihc.errors import CorruptSlideError
    from cleihc.slide import AnalysisResolution
    from napari_cleihc._layers import _level_array

    class Damaged:
        path = "damaged.svs"
        dimensions = (1000, 600)

        def read_analysis_rect(self, res, location, size):
            if location[0] >= 512:
                raise CorruptSlideError("cannot decode tile data", path=self.path)
            return np.full((size[1], size[0], 3), 7, dtype=np.uint8)

    res = AnalysisResolution(level=0, factor=1, mpp_um=(0.5, 0.5), downsample=1.0, dimensions_a=(1000, 600))
    data = np.asarray(_level_array(Damaged(), res, 512))
    assert data.shape == (600, 1000, 3)
    assert (data[:, :512] == 7).all() and (data[:, 512:] == 255).all()
    assert caplog.text.count("part of the image cannot be shown") == 1
