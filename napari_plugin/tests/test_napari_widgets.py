"""The docks in a real napari viewer (Qt and OpenGL under Xvfb): quantify, preview, correct, save, review."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cleihc.corrections import SlideResults, corrections_path, read_corrections, review_status
from napari_cleihc import _quantify_widget
from napari_cleihc._correct_widget import CorrectWidget
from napari_cleihc._edits import corrections_equal
from napari_cleihc._quantify_widget import QuantifyWidget
from napari_cleihc._review_widget import ReviewWidget
from napari_cleihc._viewer import current_load_id, find_layer, layers_with_role, viewer_camera

PLUGIN = "napari-cleihc"


def _slide_name(results_dir: Path) -> str:
    return next(p.stem for p in (results_dir / "slides").glob("*.json"))


def _wait_worker(qtbot, widget, timeout=120_000):
    worker = widget.worker
    assert worker is not None, widget.status.text()
    with qtbot.waitSignal(worker.finished, timeout=timeout):
        pass
    qtbot.waitUntil(lambda: widget.worker is None, timeout=5000)


def test_quantify_widget_runs_a_protocol(make_napari_viewer, qtbot, sample_slide, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(sample_slide), plugin=PLUGIN)
    widget = QuantifyWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.select_protocol("cd3")
    widget.out_edit.setText(str(tmp_path / "out"))
    seen = []
    widget._signals.progress.connect(lambda d, t: seen.append((d, t)))
    widget.run()
    _wait_worker(qtbot, widget)
    result = widget.result
    assert result is not None, widget.status.text()
    cells = find_layer(viewer, "cells")
    assert len(cells.data) == len(result.cells) > 0
    assert cells.features["class"].astype(str).isin(["negative", "1+", "2+", "3+"]).all()
    assert (cells.features["class"] != "negative").sum() == int(result.cells["positive"].sum())
    assert widget.table.rowCount() == len(result.regions)
    positive = find_layer(viewer, "positive")
    level0 = positive.data[0] if positive.multiscale else positive.data
    assert np.asarray(level0).shape == result.raster.positive_fraction().shape
    assert len(find_layer(viewer, "tissue").data) >= 1
    assert seen and seen[-1][0] == seen[-1][1] == len(result.plan.tiles)
    # Saved: the results folder is a complete cleihc folder for this slide, and the layers point at it.
    assert (tmp_path / "out" / "slides" / f"{result.slide}.json").is_file()
    assert (tmp_path / "out" / "regions.csv").is_file()
    assert cells.metadata["cleihc"]["out_dir"] == str(tmp_path / "out")
    assert widget.status.text().startswith(f"Done: {result.slide}") and "stains:" not in widget.status.text()


def test_quantify_widget_shows_the_plans_warnings(make_napari_viewer, qtbot):
    slide = Path(__file__).resolve().parents[2] / "sample_images" / "S01_pre_gag-alcian.svs"
    viewer = make_napari_viewer()
    viewer.open(str(slide), plugin=PLUGIN)
    widget = QuantifyWidget(viewer)
    widget.select_protocol("cd3")  # an Alcian blue slide measured as hematoxylin + DAB
    widget.run()
    _wait_worker(qtbot, widget)
    assert widget.result is not None, widget.status.text()
    lines = widget.status.text().splitlines()
    assert lines[0].startswith("Done: S01_pre_gag-alcian")
    assert any(line.startswith("Warning: stains: ") for line in lines[1:])


def test_quantify_cancel_ends_the_worker_cleanly(make_napari_viewer, qtbot, sample_slide):
    viewer = make_napari_viewer()
    viewer.open(str(sample_slide), plugin=PLUGIN)
    widget = QuantifyWidget(viewer)
    widget.select_protocol("cd3")
    worker = widget.run()
    widget.cancel()
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    assert widget.status.text() == "Cancelled."
    assert widget.result is None and widget.worker is None
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert not layers_with_role(viewer, "cells")


def test_quantify_a_drawn_region_and_the_visible_field(make_napari_viewer, qtbot, sample_slide):
    viewer = make_napari_viewer()
    viewer.open(str(sample_slide), plugin=PLUGIN)
    widget = QuantifyWidget(viewer)
    widget.select_protocol("cd3")
    slide = find_layer(viewer, "slide")
    w, h = slide.metadata["cleihc"]["dimensions"]
    mpp_y, mpp_x = slide.metadata["cleihc"]["world_per_px"]
    # The visible field: the camera's extent as a level-0 box.
    camera = viewer_camera(viewer)
    camera.center = (0, h / 2 * mpp_y, w / 4 * mpp_x)
    camera.zoom = viewer.canvas.size[1] / (w / 2 * mpp_x)  # half the slide's width across the canvas
    field = widget.roi("visible field")
    x0, y0, x1, y1 = field.bounds
    assert x0 == 0 and x1 == pytest.approx(w / 2, abs=2)
    assert 0 <= y0 < h / 2 < y1 <= h
    # A drawn region: a rectangle on the ROI layer (level-0 px data), measured alone.
    widget.scope_combo.setCurrentText("drawn region")
    roi_layer = find_layer(viewer, "roi")
    assert roi_layer is not None and roi_layer.mode == "add_polygon"
    box = np.array([[0.0, w * 0.25], [h * 1.0, w * 0.25], [h * 1.0, w * 0.6], [0.0, w * 0.6]])  # (y, x)
    roi_layer.add_polygons([box])
    assert widget.roi().bounds == pytest.approx((w * 0.25, 0.0, w * 0.6, h * 1.0))
    widget.run()
    _wait_worker(qtbot, widget)
    result = widget.result
    assert result is not None, widget.status.text()
    cells = find_layer(viewer, "cells")
    assert len(cells.data) == len(result.cells) > 0
    counted = result.cells.loc[result.cells["region"] != "outside"]
    assert len(counted) > 0 and counted["x_px"].between(w * 0.25, w * 0.6).all()
    tissue_area = result.regions.set_index("region").loc["tissue", "region_area_mm2"]
    assert 0 < tissue_area <= (w * 0.35 * mpp_x) * (h * mpp_y) / 1e6


def test_threshold_preview_reads_the_field_once(make_napari_viewer, sample_slide, monkeypatch):
    calls = []
    real = _quantify_widget.concentration

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_quantify_widget, "concentration", counting)
    viewer = make_napari_viewer()
    viewer.open(str(sample_slide), plugin=PLUGIN)
    viewer.reset_view()
    widget = QuantifyWidget(viewer)
    widget.select_protocol("cd3")
    widget.preview_check.setChecked(True)
    layer = find_layer(viewer, "preview")
    assert layer is not None
    rect, _, conc = widget.field_concentration()
    counts = []
    for value in (10, 20, 40, 80):
        widget.threshold_slider.setValue(value)
        counts.append(int(np.asarray(layer.data).sum()))
        np.testing.assert_array_equal(np.asarray(layer.data), conc >= value / 100)
    assert len(calls) == 1  # one deconvolution per field, none per slider move
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    # The preview covers the field it was read from.
    assert layer.metadata["cleihc"]["rect_px"] == rect


def _open_results(viewer, results_dir):
    viewer.open(str(results_dir), plugin=PLUGIN)
    widget = CorrectWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.bound == (str(results_dir), _slide_name(results_dir))
    return widget


def _row(rows: pd.DataFrame, region: str) -> pd.Series:
    return rows.set_index("region").loc[region]


def test_deleting_a_positive_cell_lowers_its_region_by_one(make_napari_viewer, results_dir):
    viewer = make_napari_viewer()
    widget = _open_results(viewer, results_dir)
    before = widget.recompute()
    cells = find_layer(viewer, "cells")
    feats = cells.features
    i = int(np.flatnonzero((feats["class"] != "negative") & (feats["region"] != "outside"))[0])
    region = feats["region"].iat[i]
    cells.selected_data = {i}
    widget.delete_selected_cells()
    after = widget.recompute()
    for name in {region, "tissue"}:
        assert _row(after, name)["cells_positive"] == _row(before, name)["cells_positive"] - 1
        assert _row(after, name)["cells_total"] == _row(before, name)["cells_total"] - 1
        assert bool(_row(after, name)["corrected"])
    # The table marks the corrected rows.
    row = list(widget.table.frame["region"]).index(region)
    assert widget.table.item(row, 0).toolTip() == "includes manual corrections"
    untouched = [
        r for r in after["region"] if r not in {region, "tissue"} and _row(before, r)["cells_total"] > 0
    ]
    for name in untouched:
        if not bool(_row(after, name)["corrected"]):
            assert _row(after, name)["cells_positive"] == _row(before, name)["cells_positive"]


def _interior_block(mask: np.ndarray, bin_total: np.ndarray, full: int, size: int) -> tuple[int, int]:
    """Top-left (i, j) of a size x size block of raster cells fully inside tissue and fully measured."""
    ok = mask & (bin_total == full)
    h, w = ok.shape
    for i in range(h // 3, h - size):
        for j in range(w // 3, w - size):
            if ok[i : i + size, j : j + size].all():
                return i, j
    raise AssertionError("no interior block of tissue")


def test_excluding_a_rectangle_removes_exactly_its_area(make_napari_viewer, results_dir):
    viewer = make_napari_viewer()
    widget = _open_results(viewer, results_dir)
    res = SlideResults.load(results_dir, widget.bound[1])
    r = res.raster_downsample
    factor = res.raster.raster_factor
    size = 6
    i, j = _interior_block(res.masks["tissue"], res.raster.bin_px.sum(axis=0), factor * factor, size)
    before = widget.recompute()
    excl = find_layer(viewer, "exclusions")
    # A rectangle on raster-cell edges (level-0 px, (y, x)); the layer's data are level-0 px.
    y0, x0, y1, x1 = i * r, j * r, (i + size) * r, (j + size) * r
    excl.add_rectangles(np.array([[y0, x0], [y1, x1]]))
    after = widget.recompute()
    rect_mm2 = (size * r) ** 2 * res.pixel_area_um2 / (res.raster_downsample / factor) ** 2 / 1e6
    drop = _row(before, "tissue")["region_area_mm2"] - _row(after, "tissue")["region_area_mm2"]
    assert drop == pytest.approx(rect_mm2, rel=1e-9)
    # The cells in the rectangle are gone from the counts.
    cells = res.cells
    inside = (
        (cells["x_px"] >= x0) & (cells["x_px"] < x1) & (cells["y_px"] >= y0) & (cells["y_px"] < y1)
    ).sum()
    assert _row(before, "tissue")["cells_total"] - _row(after, "tissue")["cells_total"] == inside
    assert bool(_row(after, "tissue")["corrected"])


def _hashes(folder: Path, slide: str) -> dict[str, str]:
    files = [
        f"cells/{slide}.parquet",
        f"regions/{slide}.geojson",
        f"totals/{slide}.npz",
        f"masks/{slide}.ome.tif",
    ]
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in files}


def test_save_and_reload_round_trip(make_napari_viewer, results_dir):
    viewer = make_napari_viewer()
    widget = _open_results(viewer, results_dir)
    slide = widget.bound[1]
    auto_files = _hashes(results_dir, slide)
    res = SlideResults.load(results_dir, slide)
    r = res.raster_downsample
    # Cells: delete one, reclassify one, add one.
    cells = find_layer(viewer, "cells")
    cells.selected_data = {0}
    widget.delete_selected_cells()
    cells.selected_data = {1}
    widget.class_combo.setCurrentText("3+")
    widget.reclassify_selected()
    reclassified_yx = cells.data[1].copy()
    assert cells.features["class"].iat[1] == "3+"
    widget.class_combo.setCurrentText("2+")
    widget.add_cells()
    y, x = cells.data[5] + 12.0
    cells.add(np.array([[y, x]]))
    # Exclusions: a drawn polygon and a painted block.
    i, j = _interior_block(res.masks["tissue"], res.raster.bin_px.sum(axis=0), res.raster.raster_factor**2, 4)
    find_layer(viewer, "exclusions").add_polygons(
        [np.array([[i * r, j * r], [i * r, (j + 3) * r], [(i + 2) * r, j * r]])]
    )
    widget.paint_exclusion()
    paint = find_layer(viewer, "exclusion paint")
    data = np.asarray(paint.data).copy()
    data[i + 2 : i + 4, j + 2 : j + 4] = 1
    paint.data = data
    # A region redrawn: the epidermis becomes a rectangle.
    regions = find_layer(viewer, "regions")
    keep = [k for k, name in enumerate(regions.features["region"]) if name != "epidermis"]
    regions.selected_data = set(range(len(regions.data))) - set(keep)
    regions.remove_selected()
    widget.region_combo.setCurrentText("epidermis")
    widget.draw_region()
    regions.add_polygons([np.array([[0.0, 0.0], [0.0, 40 * r], [10 * r, 40 * r], [10 * r, 0.0]])])
    widget.author_edit.setText("reviewer-1")
    made = widget.corrections()
    assert [e.action for e in made.cell_edits] == ["delete", "reclassify", "add"]
    assert (made.cell_edits[1].y_px, made.cell_edits[1].x_px) == tuple(reclassified_yx)
    assert (made.cell_edits[1].positive, made.cell_edits[1].intensity_class) == (True, 3)
    assert (made.cell_edits[2].positive, made.cell_edits[2].intensity_class) == (True, 2)
    assert len(made.exclusions) == 2 and list(made.regions) == ["epidermis"]
    path = widget.save()
    assert path == corrections_path(results_dir, slide)
    saved = read_corrections(path)
    assert corrections_equal(saved, made)
    assert saved.author == "reviewer-1" and saved.saved_at
    assert _hashes(results_dir, slide) == auto_files  # automatic results untouched
    record = json.loads((results_dir / "slides" / f"{slide}.json").read_text())
    assert "automatic_rows" in record and any(row["corrected"] for row in record["rows"])
    table = pd.read_csv(results_dir / "regions.csv")
    assert table["corrected"].any()
    rows_saved = widget.rows
    # After saving, the layers hold what the file holds: the painting has become polygons on the exclusions
    # layer, the cells under the exclusions are gone from the cells layer, the header says so.
    assert find_layer(viewer, "exclusion paint") is None
    assert len(find_layer(viewer, "exclusions").data) == 2
    _, corrected_cells = SlideResults.load(results_dir, slide).recompute(saved)
    assert len(find_layer(viewer, "cells").data) == len(corrected_cells) < len(cells.features) + 1
    assert "(corrections saved)" in widget.slide_label.text()
    assert corrections_equal(widget.corrections(), saved)
    # Reload from disk: the layers show the corrections, and rebuild the same corrections.
    viewer.layers.clear()
    widget2 = _open_results(viewer, results_dir)
    assert corrections_equal(widget2.corrections(), saved)
    pd.testing.assert_frame_equal(
        widget2.recompute().reset_index(drop=True), rows_saved.reset_index(drop=True)
    )
    # Saving again unchanged keeps the previous file in history and the same content.
    widget2.save()
    assert corrections_equal(read_corrections(path), saved)
    assert len(list((results_dir / "corrections" / "history").glob("*.geojson"))) == 1


def _two_slide_folder(results_dir: Path) -> list[str]:
    slide = _slide_name(results_dir)
    other = f"{slide}_copy"
    for sub, ext in (
        ("cells", ".parquet"),
        ("regions", ".geojson"),
        ("totals", ".npz"),
        ("masks", ".ome.tif"),
    ):
        shutil.copy(results_dir / sub / f"{slide}{ext}", results_dir / sub / f"{other}{ext}")
    record = json.loads((results_dir / "slides" / f"{slide}.json").read_text())
    record["slide"] = other
    (results_dir / "slides" / f"{other}.json").write_text(json.dumps(record))
    return sorted([slide, other])


def test_review_queue(make_napari_viewer, qtbot, results_dir):
    from qtpy.QtCore import Qt

    slides = _two_slide_folder(results_dir)
    viewer = make_napari_viewer(show=True)
    widget = ReviewWidget(viewer)
    viewer.window.add_dock_widget(widget)
    correct = CorrectWidget(viewer)
    viewer.window.add_dock_widget(correct)
    widget.set_folder(results_dir)
    assert widget.current_slide() == slides[0] and widget.table.rowCount() == 2
    assert find_layer(viewer, "cells").metadata["cleihc"]["slide"] == slides[0]
    widget.note_edit.setText("fold at the top")
    widget.author_edit.setText("reviewer-2")
    widget.mark("flagged", advance=True)
    assert widget.current_slide() == slides[1]
    assert find_layer(viewer, "cells").metadata["cleihc"]["slide"] == slides[1]
    assert len(layers_with_role(viewer, "cells")) == 1 and len(layers_with_role(viewer, "slide")) == 1
    # The Correct dock follows the queue, and with nothing edited no row is marked corrected.
    qtbot.waitUntil(lambda: correct.bound == (str(results_dir), slides[1]), timeout=10_000)
    assert correct.rows is not None and not correct.rows["corrected"].any()
    assert len(correct.rows) == len(SlideResults.load(results_dir, slides[1]).record["rows"])
    status = review_status(results_dir)
    assert status[slides[0]]["status"] == "flagged" and status[slides[0]]["note"] == "fold at the top"
    assert status[slides[0]]["author"] == "reviewer-2" and status[slides[1]]["status"] == "unreviewed"
    # Keyboard: Alt+Left goes back, Alt+1 marks reviewed (and moves on).
    viewer.window._qt_window.activateWindow()
    qtbot.waitUntil(lambda: viewer.window._qt_window.isActiveWindow(), timeout=5000)
    qtbot.keyClick(viewer.window._qt_window, Qt.Key.Key_Left, Qt.KeyboardModifier.AltModifier)
    assert widget.current_slide() == slides[0]
    qtbot.keyClick(viewer.window._qt_window, Qt.Key.Key_1, Qt.KeyboardModifier.AltModifier)
    assert review_status(results_dir)[slides[0]]["status"] == "reviewed"
    assert widget.current_slide() == slides[1]
    assert widget.table.item(0, 1).text() == "reviewed"


def test_screenshot_of_the_shown_viewer_is_not_blank(make_napari_viewer, results_dir):
    viewer = make_napari_viewer(show=True)
    viewer.open(str(results_dir), plugin=PLUGIN)
    viewer.reset_view()
    # The manifest's widgets dock by their display names.
    docked = [
        viewer.window.add_plugin_dock_widget(PLUGIN, name)[1]
        for name in ("Quantify", "Correct", "Review queue")
    ]
    assert [type(w) for w in docked] == [QuantifyWidget, CorrectWidget, ReviewWidget]
    shot = viewer.screenshot(canvas_only=True, flash=False)
    rgb = shot[..., :3].astype(float)
    assert rgb.std() > 10
    assert (rgb.sum(axis=2) > 30).mean() > 0.5  # mostly not black
    # The cells and the positive overlay are drawn: red-ish pixels exist where a white slide would have none.
    red = (rgb[..., 0] > rgb[..., 2] + 60) & (rgb[..., 0] > rgb[..., 1] + 60)
    assert red.sum() > 20


def test_npe2_manifest_validates():
    npe2 = Path(sys.executable).with_name("npe2")
    out = subprocess.run([str(npe2), "validate", PLUGIN], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_quantify_widget_refuses_another_protocols_folder(make_napari_viewer, sample_slide, results_dir):
    viewer = make_napari_viewer()
    viewer.open(str(sample_slide), plugin=PLUGIN)
    widget = QuantifyWidget(viewer)
    widget.select_protocol("cd8")  # the results folder holds cd3 results
    widget.out_edit.setText(str(results_dir))
    assert widget.run() is None and widget.worker is None
    assert "holds results of protocol 'cd3'" in widget.status.text()


def _tissue_row(out: Path, slide: str) -> pd.Series:
    table = pd.read_csv(out / "regions.csv")
    return table[table["slide"] == slide].set_index("region").loc["tissue"]


def test_exclusions_take_and_give_back_cells_as_the_numbers_do(make_napari_viewer, results_dir):
    """Regressions: after a reopen, removing a saved exclusion deleted the cells it had covered for good (the
    layer had been built without them, so they counted as deleted); and a cell just outside an exclusion's
    outline, on a raster cell the outline covers (the recomputation removes it with that cell), became a
    'deleted' cell on the next save."""
    from shapely.geometry import box

    viewer = make_napari_viewer()
    widget = _open_results(viewer, results_dir)
    slide = widget.bound[1]
    res = SlideResults.load(results_dir, slide)
    r = res.raster_downsample
    before = _tissue_row(results_dir, slide)
    # A cell well off the centre of its raster cell, and a tiny outline around that centre alone.
    cells = res.cells[res.cells["region"] != "outside"]
    off = (np.abs(cells["x_px"] / r % 1 - 0.5) > 0.2) & (np.abs(cells["y_px"] / r % 1 - 0.5) > 0.2)
    cell = cells[off].iloc[len(cells[off]) // 2]
    cx, cy = (np.floor(cell.x_px / r) + 0.5) * r, (np.floor(cell.y_px / r) + 0.5) * r
    tiny = box(cx - 0.1 * r, cy - 0.1 * r, cx + 0.1 * r, cy + 0.1 * r)
    assert not tiny.contains(box(cell.x_px, cell.y_px, cell.x_px, cell.y_px).centroid)
    # And a block over several cells.
    other = cells.iloc[len(cells) // 3]
    block = box(other.x_px - 40, other.y_px - 40, other.x_px + 40, other.y_px + 40)
    layer = find_layer(viewer, "exclusions")
    layer.add_polygons([np.asarray(g.exterior.coords)[:-1, ::-1] for g in (tiny, block)])
    saved = read_corrections(widget.save())
    assert len(saved.exclusions) == 2 and saved.cell_edits == ()  # excluded, not deleted
    excluded = _tissue_row(results_dir, slide)
    assert excluded["cells_total"] < before["cells_total"] - 1
    # Reopened and saved unchanged: the same file (no cell becomes a deletion).
    viewer.layers.clear()
    widget = _open_results(viewer, results_dir)
    assert corrections_equal(widget.corrections(), saved)
    # The exclusions removed: every cell and every pixel counts again.
    layer = find_layer(viewer, "exclusions")
    layer.selected_data = set(range(len(layer.data)))
    layer.remove_selected()
    again = read_corrections(widget.save())
    assert again.is_empty, again
    after = _tissue_row(results_dir, slide)
    for col in ("cells_total", "cells_positive", "region_area_mm2"):
        assert after[col] == before[col], col
    assert len(find_layer(viewer, "cells").data) == len(res.cells)


def test_unsaved_corrections_are_never_dropped(make_napari_viewer, qtbot, results_dir):
    """Regressions: the review queue's Next/Reviewed and a Quantify re-run replaced the slide's layers and
    silently dropped corrections not yet saved; after a re-run the Correct dock kept the old automatic cells and
    saved spurious edits."""
    slides = _two_slide_folder(results_dir)
    viewer = make_napari_viewer()
    queue = ReviewWidget(viewer)
    viewer.window.add_dock_widget(queue)
    correct = CorrectWidget(viewer)
    viewer.window.add_dock_widget(correct)
    queue.set_folder(results_dir)
    assert queue.current_slide() == slides[0]
    qtbot.waitUntil(lambda: correct.bound == (str(results_dir), slides[0]), timeout=10_000)
    cells = find_layer(viewer, "cells")
    n = len(cells.data)
    cells.selected_data = {0}
    correct.delete_selected_cells()
    for action in (queue.next, lambda: queue.mark("reviewed", advance=True)):
        action()
        assert queue.current_slide() == slides[0] and len(find_layer(viewer, "cells").data) == n - 1
        assert "has corrections that are not saved" in queue.message.text()
    assert review_status(results_dir)[slides[0]]["status"] == "unreviewed"
    # A re-run of the slide into its folder is refused too.
    quant = QuantifyWidget(viewer)
    viewer.window.add_dock_widget(quant)
    quant.select_protocol("cd3")
    quant.out_edit.setText(str(results_dir))
    assert find_layer(viewer, "slide") is not None  # the image, which a re-run reads
    assert quant.run() is None and quant.worker is None
    assert "not saved" in quant.status.text()
    # Discarded: the slide as saved, and the queue moves on.
    queue.open_slide(queue.index, discard=True)
    assert len(find_layer(viewer, "cells").data) == n
    queue.next()
    assert queue.current_slide() == slides[1]
    # A re-run into the folder (another threshold) rebinds the Correct dock to the new automatic cells.
    queue.previous()
    qtbot.waitUntil(lambda: correct.load_id == current_load_id(viewer), timeout=10_000)
    assert correct.bound == (str(results_dir), slides[0])
    first_load = correct.load_id
    quant.use_threshold_check.setChecked(True)
    quant.threshold_slider.setValue(quant.threshold_slider.value() + 10)
    quant.run()
    _wait_worker(qtbot, quant)
    assert quant.result is not None, quant.status.text()
    qtbot.waitUntil(lambda: correct.load_id == current_load_id(viewer) != first_load, timeout=10_000)
    assert correct.corrections().is_empty
    assert not correct.recompute()["corrected"].any()


def test_the_runs_own_exclusions_are_not_regions(make_napari_viewer, sample_slide, tmp_path):
    """Regression: an `exclude` area of the run's --regions file was drawn as a region; saving then made an
    `exclude` row. It is shown on its own locked layer and left out of the corrections."""
    from shapely.geometry import box

    from cleihc import quantify
    from cleihc.outputs import rebuild_tables, write_slide_outputs
    from cleihc.regions import Region

    out = tmp_path / "out"
    write_slide_outputs(
        quantify(sample_slide, "cd3", regions=[Region("Exclude", box(200, 200, 400, 400), "t")]), out
    )
    rebuild_tables(out)
    viewer = make_napari_viewer()
    widget = _open_results(viewer, out)
    assert "exclude" not in [n.lower() for n in find_layer(viewer, "regions").features["region"]]
    (locked,) = layers_with_role(viewer, "run exclusions")
    assert len(locked.data) == 1 and len(find_layer(viewer, "exclusions").data) == 0
    assert widget.corrections().is_empty
    widget.save()
    assert "Exclude" not in set(pd.read_csv(out / "regions.csv")["region"])
    assert widget.region_combo.findText("Exclude") < 0


def test_a_relative_slide_path_is_not_taken_for_another_file(tmp_path, monkeypatch, results_dir):
    """Regression: a record's relative path, read from another working folder, showed whatever slide had that
    name there under this slide's results. The recorded absolute path comes first; a relative path must have
    the recorded size."""
    from napari_cleihc._layers import ResultsSlide

    slide = _slide_name(results_dir)
    record = json.loads((results_dir / "slides" / f"{slide}.json").read_text())
    real = Path(record["provenance"]["slide"]["absolute_path"])
    record["path"] = f"slides/{real.name}"
    (results_dir / "slides" / f"{slide}.json").write_text(json.dumps(record))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "slides").mkdir(parents=True)
    (elsewhere / "slides" / real.name).write_bytes(b"another slide")
    monkeypatch.chdir(elsewhere)
    assert ResultsSlide.load(results_dir, slide).slide_path == real
    record["provenance"]["slide"]["absolute_path"] = str(tmp_path / "gone" / real.name)
    (results_dir / "slides" / f"{slide}.json").write_text(json.dumps(record))
    rs = ResultsSlide.load(results_dir, slide)
    assert not rs.slide_found
    shutil.copy(real, elsewhere / "slides" / real.name)  # the same file, moved with the results: found
    assert rs.slide_found and rs.slide_path == Path(f"slides/{real.name}")


def test_a_slide_without_mpp_is_measured_with_the_one_given(make_napari_viewer, qtbot, tmp_path):
    """Regression: a file without µm/px could not be measured or previewed from napari at all (the reader takes
    no MPP and the dock had no field for one)."""
    from PIL import Image

    from cleihc import quantify
    from cleihc.slide import open_slide

    sample = Path(__file__).resolve().parents[2] / "sample_images" / "S01_pre_cd3.svs"
    with open_slide(sample) as s:
        rgb = s.read_level_rect(0, (0, 0), s.dimensions)
    png = tmp_path / "S09_pre_cd3.png"
    Image.fromarray(rgb).save(png)
    viewer = make_napari_viewer()
    viewer.open(str(png), plugin=PLUGIN)
    widget = QuantifyWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.select_protocol("cd3")
    widget.run()
    _wait_worker(qtbot, widget)
    assert widget.result is None and "microns-per-pixel" in widget.status.text()
    widget.mpp_spin.setValue(0.5)
    widget.apply_mpp()
    assert tuple(find_layer(viewer, "slide").scale) == (0.5, 0.5)
    widget.run()
    _wait_worker(qtbot, widget)
    assert widget.result is not None, widget.status.text()
    expected = quantify(png, "cd3", mpp=0.5)
    assert len(widget.result.cells) == len(expected.cells) > 0
    cells = find_layer(viewer, "cells")
    assert tuple(cells.scale) == (0.5, 0.5)  # drawn over the slide, in µm


def test_the_threshold_preview_uses_the_runs_stains(make_napari_viewer, sample_slide):
    """Regression: the preview computed OD against white while the run estimates I0 from the slide's glass
    (242, 240, 245 on the sample): 455 of 14,789 preview pixels at 0.35 OD disagreed with the run."""
    from cleihc.pipeline import plan_slide
    from cleihc.stains import concentration

    viewer = make_napari_viewer()
    viewer.open(str(sample_slide), plugin=PLUGIN)
    viewer.reset_view()
    widget = QuantifyWidget(viewer)
    widget.select_protocol("cd3")
    rect, _, conc = widget.field_concentration()
    proto = widget.protocol()
    plan = plan_slide(sample_slide, proto)
    assert plan.stains.background_rgb != (255.0, 255.0, 255.0)
    slide = widget._slide(widget.slide_layer())
    x, y, w, h = rect
    mpp_um = max(proto.analysis.mpp_um, max(w * slide.mpp[0], h * slide.mpp[1]) / _quantify_widget.PREVIEW_PX)
    rgb = slide.read_at_mpp((x, y), (w, h), mpp_um=mpp_um)
    np.testing.assert_array_equal(conc, concentration(rgb, plan.stains, stain=proto.target))


def test_a_region_drawn_on_one_slide_is_not_used_on_another(make_napari_viewer, sample_slide, tmp_path):
    """Regression: with two slides open, the ROI drawn on one was measured, in its pixel numbers, on the other."""
    other = tmp_path / "S02_pre_cd3.svs"
    shutil.copy(sample_slide, other)
    viewer = make_napari_viewer()
    viewer.open(str(sample_slide), plugin=PLUGIN)
    widget = QuantifyWidget(viewer)
    widget.select_protocol("cd3")
    roi = widget.roi_layer(create=True)
    roi.add_rectangles(np.array([[0.0, 0.0], [300.0, 300.0]]))
    assert widget.roi("drawn region").area > 0
    viewer.open(str(other), plugin=PLUGIN)  # now the top slide
    viewer.layers.selection.active = viewer.layers[-1]
    with pytest.raises(Exception, match="no drawn region"):
        widget.roi("drawn region")


def test_a_threshold_above_the_moderate_bin_is_named_as_such():
    from cleihc.errors import CleihcError
    from cleihc.protocol import load_protocol

    with pytest.raises(CleihcError, match=r"0\.50 OD is not below the protocol's moderate bin \(0\.4 OD\)"):
        _quantify_widget.protocol_with_threshold(load_protocol("cd3"), 0.5)


def test_cancel_after_the_last_tile_still_cancels(
    make_napari_viewer, qtbot, sample_slide, tmp_path, monkeypatch
):
    """Regression: Cancel pressed once the last tile was measured was ignored: results written, layers replaced."""
    import cleihc

    viewer = make_napari_viewer()
    viewer.open(str(sample_slide), plugin=PLUGIN)
    widget = QuantifyWidget(viewer)
    widget.select_protocol("cd3")
    widget.out_edit.setText(str(tmp_path / "out"))
    real = cleihc.quantify

    def measured_then_cancelled(*args, **kwargs):
        result = real(*args, **kwargs)
        widget._cancel.set()  # as the button does, after every tile is done
        return result

    monkeypatch.setattr(cleihc, "quantify", measured_then_cancelled)
    widget.run()
    _wait_worker(qtbot, widget)
    assert widget.status.text() == "Cancelled." and widget.result is None
    assert not (tmp_path / "out" / "slides").exists() and not layers_with_role(viewer, "cells")


def test_a_tissue_outline_beyond_the_detected_tissue_is_named(make_napari_viewer, results_dir):
    """A drawn tissue only restricts the detected tissue (as with --regions): an enlarged outline changed nothing
    and said nothing; the status now names the area it adds in vain."""
    viewer = make_napari_viewer()
    widget = _open_results(viewer, results_dir)
    tissue = find_layer(viewer, "tissue")
    tissue.selected_data = set(range(len(tissue.data)))
    tissue.remove_selected()
    widget.region_combo.setCurrentText("tissue")
    widget.draw_region()
    h, w = SlideResults.load(results_dir, widget.bound[1]).masks["tissue"].shape
    r = widget.automatic.raster_downsample
    tissue.add_polygons([np.array([[0.0, 0.0], [0.0, w * r], [h * r, w * r], [h * r, 0.0]])])
    rows = widget.recompute()
    assert not _row(rows, "tissue")["corrected"]  # the whole slide holds all of the detected tissue
    assert "beyond the detected tissue" in widget.status.text()
