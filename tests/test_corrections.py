"""Corrections: exact metric changes, save/reload, history, and later runs honouring them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from shapely.geometry import box, shape

from cleihc.cli import main
from cleihc.corrections import (
    CellEdit,
    Corrections,
    SlideResults,
    apply_saved_corrections,
    corrections_path,
    read_corrections,
    review_status,
    set_review_status,
    write_corrections,
)
from cleihc.errors import RegionsError
from cleihc.outputs import rebuild_tables, write_slide_outputs
from cleihc.pipeline import quantify
from cleihc.synthetic import render_skin, write_svs

MPP = 0.5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("corr")
    syn = render_skin(stain="cxcl10", width_px=1000, height_px=800, mpp_um=MPP, seed=3, jpeg_quality=None)
    slide = d / "S05_pre_cxcl10.svs"
    write_svs(slide, syn.rgb, mpp_um=MPP)
    out = d / "out"
    res = quantify(slide, "cxcl10")
    write_slide_outputs(res, out)
    rebuild_tables(out)
    return slide, out, res


def _rows(df):
    return df.set_index("region")


def test_no_corrections_reproduces_the_automatic_rows(results):
    _, out, res = results
    rows, cells = SlideResults.load(out, "S05_pre_cxcl10").recompute(Corrections())
    auto = _rows(res.regions)
    num = [c for c in auto.columns if pd.api.types.is_numeric_dtype(auto[c]) and c != "corrected"]
    np.testing.assert_allclose(
        _rows(rows)[num].to_numpy(float), auto[num].to_numpy(float), rtol=0, atol=1e-12
    )
    assert not rows["corrected"].any()
    assert len(cells) == len(res.cells)


def test_deleting_a_positive_cell_lowers_its_region_by_one(results):
    _, out, res = results
    sr = SlideResults.load(out, "S05_pre_cxcl10")
    cell = res.cells[(res.cells["positive"]) & (res.cells["region"] != "outside")].iloc[0]
    rows, cells = sr.recompute(Corrections(cell_edits=(CellEdit("delete", cell.x_px, cell.y_px),)))
    before, after = _rows(res.regions), _rows(rows)
    for region in (cell.region, "tissue"):
        assert after.loc[region, "cells_positive"] == before.loc[region, "cells_positive"] - 1
        assert after.loc[region, "cells_total"] == before.loc[region, "cells_total"] - 1
        assert bool(after.loc[region, "corrected"])
    assert len(cells) == len(res.cells) - 1


def test_adding_and_reclassifying_cells(results):
    _, out, res = results
    sr = SlideResults.load(out, "S05_pre_cxcl10")
    neg = res.cells[
        (~res.cells["positive"]) & (res.cells["region"] != "outside") & ~res.cells["pigment"]
    ].iloc[0]
    edits = (
        CellEdit("reclassify", neg.x_px + 1.0, neg.y_px, positive=True, intensity_class=2),
        CellEdit("add", neg.x_px + 40.0, neg.y_px + 40.0, positive=True, intensity_class=3),
    )
    rows, _ = sr.recompute(Corrections(cell_edits=edits))
    before, after = _rows(res.regions), _rows(rows)
    assert after.loc["tissue", "cells_positive"] == before.loc["tissue", "cells_positive"] + 2
    assert after.loc["tissue", "cells_total"] == before.loc["tissue", "cells_total"] + 1
    assert after.loc["tissue", "cells_3plus"] == before.loc["tissue", "cells_3plus"] + 1


def test_excluding_a_rectangle_removes_exactly_its_area(results):
    _, out, res = results
    sr = SlideResults.load(out, "S05_pre_cxcl10")
    tissue = sr.masks["tissue"]
    ds = sr.raster_downsample
    # a rectangle of whole raster cells that lies entirely on tissue
    ys, xs = np.nonzero(tissue)
    cy, cx = int(np.median(ys)), int(np.median(xs))
    while not tissue[cy - 5 : cy + 5, cx - 5 : cx + 5].all():
        cx += 7
    rect = box((cx - 5) * ds, (cy - 5) * ds, (cx + 5) * ds, (cy + 5) * ds)
    rows, _ = sr.recompute(Corrections(exclusions=(rect,)))
    cell_mm2 = sr.pixel_area_um2 * (ds / res.plan.resolution.downsample) ** 2 / 1e6
    before, after = _rows(res.regions), _rows(rows)
    assert after.loc["tissue", "region_area_mm2"] == pytest.approx(
        before.loc["tissue", "region_area_mm2"] - 100 * cell_mm2, rel=1e-12
    )
    inside = (
        (res.cells.x_px >= rect.bounds[0])
        & (res.cells.x_px < rect.bounds[2])
        & (res.cells.y_px >= rect.bounds[1])
        & (res.cells.y_px < rect.bounds[3])
    )
    counted_inside = int((inside & ~res.cells["pigment"] & (res.cells["region"] != "outside")).sum())
    assert after.loc["tissue", "cells_total"] == before.loc["tissue", "cells_total"] - counted_inside
    assert bool(after.loc["tissue", "corrected"])


def test_save_reload_history_and_cli_honours_corrections(results, tmp_path, capsys):
    slide, out, res = results
    cell = res.cells[res.cells["positive"] & (res.cells["region"] != "outside")].iloc[0]
    corr = Corrections(
        regions={"hotspot": box(100, 100, 300, 260)},
        exclusions=(box(0, 0, 50, 50),),
        cell_edits=(CellEdit("delete", cell.x_px, cell.y_px),),
    )
    path = write_corrections(out, "S05_pre_cxcl10", corr, author="tester")
    back = read_corrections(path)
    assert back.author == "tester" and back.saved_at
    assert back.regions["hotspot"].equals(corr.regions["hotspot"])
    assert back.cell_edits == corr.cell_edits and len(back.exclusions) == 1
    write_corrections(out, "S05_pre_cxcl10", back, author="tester2")
    assert len(list((out / "corrections" / "history").glob("*.geojson"))) == 1
    automatic_cells = pd.read_parquet(out / "cells" / "S05_pre_cxcl10.parquet")
    rows = apply_saved_corrections(out, "S05_pre_cxcl10")
    assert "hotspot" in set(rows["region"]) and rows["corrected"].any()
    # automatic results untouched
    pd.testing.assert_frame_equal(automatic_cells, pd.read_parquet(out / "cells" / "S05_pre_cxcl10.parquet"))
    table = pd.read_csv(out / "regions.csv")
    assert (
        table.set_index("region").loc["tissue", "cells_positive"]
        == _rows(res.regions).loc["tissue", "cells_positive"] - 1
    )
    # a later CLI run (results current) keeps the corrected rows; a changed corrections file is re-applied
    assert main(["quantify", str(slide), "--stain", "cxcl10", "--out", str(out), "--quiet"]) == 0
    pd.testing.assert_frame_equal(table, pd.read_csv(out / "regions.csv"))
    write_corrections(out, "S05_pre_cxcl10", Corrections(), author="tester3")
    # --jobs 2: the slide goes to a Dask worker whole, which re-applies the corrections there
    assert (
        main(["quantify", str(slide), "--stain", "cxcl10", "--out", str(out), "--quiet", "--jobs", "2"]) == 0
    )
    assert not pd.read_csv(out / "regions.csv")["corrected"].any()
    assert (
        "S05_pre_cxcl10: skipped (results are current; corrections re-applied)"
        in (out / "run.log").read_text()
    )


def test_review_status(results):
    _, out, _ = results
    assert review_status(out)["S05_pre_cxcl10"]["status"] == "unreviewed"
    set_review_status(out, "S05_pre_cxcl10", "flagged", note="fold", author="a")
    st = review_status(out)["S05_pre_cxcl10"]
    assert st["status"] == "flagged" and st["note"] == "fold" and st["author"] == "a"
    with pytest.raises(ValueError):
        set_review_status(out, "S05_pre_cxcl10", "done")


def test_malformed_corrections_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "c.geojson"
    path.write_text(
        json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": None}]})
    )
    with pytest.raises(RegionsError) as e:
        read_corrections(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert corrections_path(tmp_path, "x").name == "x.geojson"


def test_corrections_keep_study_metadata_and_the_protocols_metrics(tmp_path):
    """Regression: saving a correction emptied the slide's subject and timepoint (a dtype test that pandas 3's
    text columns fail), so the slide fell out of every paired statistic; and the recomputed rows gained an
    H-score the protocol (Alcian blue) turns off."""
    import shutil

    from cleihc_testdata import SAMPLE_IMAGES

    slide = tmp_path / "101_0_gag-alcian.svs"  # a numeric-looking subject and timepoint
    shutil.copy(SAMPLE_IMAGES / "S01_pre_gag-alcian.svs", slide)
    out = tmp_path / "out"
    args = ["quantify", str(slide), "--stain", "gag-alcian", "--out", str(out), "--quiet"]
    args += ["--name-pattern", "{subject}_{timepoint}_{stain}"]
    assert main(args) == 0
    before = pd.read_csv(out / "regions.csv", dtype={"subject": str, "timepoint": str})
    write_corrections(out, slide.stem, Corrections(exclusions=(box(0, 0, 400, 400),)), author="tester")
    rows = apply_saved_corrections(out, slide.stem, lead_columns=("subject", "timepoint"))
    assert rows["corrected"].any()
    for frame in (rows, pd.read_csv(out / "regions.csv", dtype={"subject": str, "timepoint": str})):
        assert list(frame.columns) == list(before.columns)
        assert (frame["subject"] == "101").all() and (frame["timepoint"] == "0").all()
        assert (frame["stain_label"] == "gag-alcian").all()
        assert frame["h_score"].isna().all() and frame["ppc_positivity"].notna().any()
    tissue = _rows(rows).loc["tissue"]
    assert tissue["region_area_mm2"] < _rows(before).loc["tissue", "region_area_mm2"]
    # a later run keeps them
    assert main(args) == 0
    again = pd.read_csv(out / "regions.csv", dtype={"subject": str, "timepoint": str})
    assert (again["subject"] == "101").all() and again["corrected"].any()


def test_a_redrawn_epidermis_moves_the_dermis_and_its_bands(results):
    """Regression: a thicker epidermis drawn in napari left the dermis where it was, so the two overlapped
    (cells counted twice) unlike the same outline given with --regions. The dermis and the depth bands now
    follow, and epidermis + dermis still partition the tissue."""
    _, out, res = results
    slide = "S05_pre_cxcl10"
    auto = _rows(res.regions)
    assert auto.loc["epidermis", "region_area_mm2"] + auto.loc["dermis", "region_area_mm2"] == pytest.approx(
        auto.loc["tissue", "region_area_mm2"], rel=1e-12
    )
    regions = json.loads((out / "regions" / f"{slide}.geojson").read_text())
    (epi,) = [shape(f["geometry"]) for f in regions["features"] if f["properties"]["name"] == "epidermis"]
    thicker = epi.buffer(40)  # 20 µm at 0.5 µm/px
    rows, _ = SlideResults.load(out, slide).recompute(Corrections(regions={"epidermis": thicker}))
    got = _rows(rows)
    assert got.loc["epidermis", "region_area_mm2"] > auto.loc["epidermis", "region_area_mm2"] + 0.005
    assert got.loc["epidermis", "region_area_mm2"] + got.loc["dermis", "region_area_mm2"] == pytest.approx(
        got.loc["tissue", "region_area_mm2"], rel=1e-12
    )
    for col in ("cells_total", "positive_area_mm2"):
        assert got.loc["epidermis", col] + got.loc["dermis", col] == pytest.approx(got.loc["tissue", col])
    assert got.loc["dermis", "corrected"] and got.loc["papillary_dermis", "corrected"]
    assert got.loc["tissue", "region_area_mm2"] == auto.loc["tissue", "region_area_mm2"]
    # The bands lie below the new junction: the papillary band is no longer where the epidermis now is.
    bands = ("papillary_dermis", "superficial_dermis", "deep_dermis")
    assert sum(got.loc[b, "region_area_mm2"] for b in bands) <= got.loc["dermis", "region_area_mm2"] + 1e-12
    # The same outline given to a run with --regions (compartments found on the overview there, on the totals
    # raster here): the same dermis within a few raster cells of edge.
    from cleihc.regions import Region

    slide_path, _, _ = results
    given = _rows(quantify(slide_path, "cxcl10", regions=[Region("epidermis", thicker, "test")]).regions)
    for name in ("epidermis", "dermis", "papillary_dermis"):
        assert got.loc[name, "region_area_mm2"] == pytest.approx(given.loc[name, "region_area_mm2"], rel=0.01)
    # A dermis the reviewer drew too is theirs, not moved.
    own = box(0, 300, 1000, 800)
    rows, _ = SlideResults.load(out, slide).recompute(
        Corrections(regions={"epidermis": thicker, "dermis": own})
    )
    assert _rows(rows).loc["dermis", "region_area_mm2"] < got.loc["dermis", "region_area_mm2"]


def test_a_recorded_protocol_that_no_longer_loads_still_recomputes(results, caplog):
    """A slide's record from an older cleihc whose protocol today's rules refuse: corrections still apply (the
    dermis then stays where it was), with a warning, rather than failing the review."""
    _, out, _ = results
    loaded = SlideResults.load(out, "S05_pre_cxcl10")
    loaded.record["provenance"]["protocol"]["analysis"]["mpp_um"] = 20.0  # refused for cells today
    rows, _ = loaded.recompute(Corrections(exclusions=(box(400, 300, 500, 400),)))
    assert _rows(rows).loc["tissue", "corrected"]
    assert "its recorded protocol does not load" in caplog.text
