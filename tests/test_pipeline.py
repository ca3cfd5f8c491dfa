"""The quantification engine end to end: hand-checkable answers, tile invariance, outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import shapely
import tifffile

from cleihc.errors import MissingMppError, NoTissueError
from cleihc.outputs import rebuild_tables, write_slide_outputs
from cleihc.pipeline import quantify, slide_stem
from cleihc.protocol import Protocol, load_protocol
from cleihc.stains import recompose
from cleihc.synthetic import SkinParams, render_skin, write_svs

MPP = 0.5


def _write_tiff(path, rgb, *, mpp_um):
    """A plain tiled TIFF with resolution tags: the simplest slide a user may hand in."""
    tifffile.imwrite(
        path,
        rgb,
        tile=(256, 256),
        photometric="rgb",
        resolution=(1e4 / mpp_um, 1e4 / mpp_um),
        resolutionunit="CENTIMETER",
    )


@pytest.fixture(scope="module")
def block_slide(tmp_path_factory):
    """Glass with a 1200×800 µm tissue block (light hematoxylin) and a DAB square of known size.

    The block spans level-0 px [160, 2560) × [160, 1760): aligned to the 8 µm tissue grid and the 2 µm raster.
    Inside it a 400×200 px DAB patch at OD 0.5 (moderate bin: 0.4 ≤ c < 0.6).
    """
    proto = load_protocol("cxcl10")
    stains = proto.stains.matrix
    h, w = 1920, 2720
    conc = np.zeros((h, w, 3), np.float32)
    ci, ti = stains.index(proto.counterstain), stains.index(proto.target)
    conc[160:1760, 160:2560, ci] = 0.35
    conc[400:600, 800:1200, ti] = 0.5
    rgb = recompose(conc, stains.with_background((255, 255, 255)))
    path = tmp_path_factory.mktemp("block") / "block.tif"
    _write_tiff(path, rgb, mpp_um=MPP)
    return path


def _tissue_polygon_geojson(path, x0, y0, x1, y1, name="tissue"):
    feat = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
        "properties": {"classification": {"name": name}},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feat]}))
    return path


def test_hand_checkable_area(block_slide, tmp_path):
    regions = _tissue_polygon_geojson(tmp_path / "r.geojson", 160, 160, 2560, 1760)
    res = quantify(block_slide, "cxcl10", regions=regions)
    tissue = res.regions.set_index("region").loc["tissue"]
    px_mm2 = (MPP * MPP) / 1e6
    assert tissue["region_area_mm2"] == pytest.approx(2400 * 1600 * px_mm2, rel=1e-12)
    assert tissue["positive_area_mm2"] == pytest.approx(400 * 200 * px_mm2, rel=1e-12)
    assert tissue["moderate_area_percent"] == pytest.approx(100 * 400 * 200 / (2400 * 1600), rel=1e-9)
    assert tissue["weak_area_percent"] == 0 and tissue["strong_area_percent"] == 0
    assert tissue["positive_mean_od"] == pytest.approx(0.5, abs=0.01)
    assert tissue["h_score"] == pytest.approx(2 * tissue["positive_area_percent"], rel=1e-9)


def test_user_region_and_exclusion(block_slide, tmp_path):
    feats = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[800, 400], [1000, 400], [1000, 600], [800, 600], [800, 400]]],
            },
            "properties": {"classification": {"name": "hotspot"}},
        },
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[1000, 400], [1200, 400], [1200, 600], [1000, 600], [1000, 400]]],
            },
            "properties": {"classification": {"name": "Exclude"}},
        },
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[160, 160], [2560, 160], [2560, 1760], [160, 1760], [160, 160]]],
            },
            "properties": {"classification": {"name": "tissue"}},
        },
    ]
    path = tmp_path / "r.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    res = quantify(block_slide, "cxcl10", regions=path)
    rows = res.regions.set_index("region")
    px_mm2 = (MPP * MPP) / 1e6
    assert rows.loc["hotspot", "region_area_mm2"] == pytest.approx(200 * 200 * px_mm2, rel=1e-12)
    assert rows.loc["hotspot", "positive_area_percent"] == pytest.approx(100.0)
    # the excluded half of the patch leaves the tissue and its positive area
    assert rows.loc["tissue", "region_area_mm2"] == pytest.approx(
        (2400 * 1600 - 200 * 200) * px_mm2, rel=1e-12
    )
    assert rows.loc["tissue", "positive_area_mm2"] == pytest.approx(200 * 200 * px_mm2, rel=1e-12)


def test_missing_mpp_is_a_clear_error(tmp_path):
    rgb = np.full((300, 300, 3), 255, np.uint8)
    path = tmp_path / "nompp.png"
    tifffile.imwrite(tmp_path / "x.tif", rgb)
    from PIL import Image

    Image.fromarray(rgb).save(path)
    with pytest.raises(MissingMppError, match="--mpp"):
        quantify(path, "cd3")


def test_blank_slide_has_no_tissue(tmp_path):
    path = tmp_path / "blank.tif"
    _write_tiff(path, np.full((800, 800, 3), 250, np.uint8), mpp_um=MPP)
    with pytest.raises(NoTissueError):
        quantify(path, "cd3")


@pytest.fixture(scope="module")
def cd3_slide(tmp_path_factory):
    syn = render_skin(stain="cd3", width_px=1800, height_px=1300, mpp_um=MPP, seed=7, jpeg_quality=None)
    path = tmp_path_factory.mktemp("cd3") / "S09_pre_cd3.svs"
    write_svs(path, syn.rgb, mpp_um=MPP)
    return path, syn


@pytest.fixture(scope="module")
def cxcl10_slide(tmp_path_factory):
    syn = render_skin(stain="cxcl10", width_px=1800, height_px=1300, mpp_um=MPP, seed=8, jpeg_quality=None)
    path = tmp_path_factory.mktemp("cx") / "S09_pre_cxcl10.svs"
    write_svs(path, syn.rgb, mpp_um=MPP)
    return path, syn


@pytest.mark.parametrize("fixture", ["cd3_slide", "cxcl10_slide"])
def test_results_do_not_depend_on_tiles(fixture, request):
    path, _ = request.getfixturevalue(fixture)
    stain = "cd3" if "cd3" in fixture else "cxcl10"
    base = quantify(path, stain, tile_size=512)
    for kwargs in (
        {"tile_size": 1024},
        {"tile_size": 2048},
        {"tile_size": 512, "tile_origin_px": (137, 291)},
    ):
        other = quantify(path, stain, **kwargs)
        a = base.regions.set_index("region")
        b = other.regions.set_index("region")
        num = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c])]
        count_cols = [c for c in num if c.startswith("cells_")]
        pd.testing.assert_frame_equal(a[count_cols], b[count_cols], check_exact=True)
        np.testing.assert_allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=0, atol=1e-9)
        if len(base.cells):
            pd.testing.assert_frame_equal(base.cells, other.cells, check_exact=False, rtol=0, atol=1e-9)


def test_pigment_is_found_once_per_tile_and_does_not_depend_on_tiles(tmp_path):
    # The tile engine tests pigment once over each tile and its halo (for the area and the cells alike): melanin
    # caps of basal keratinocytes are counted as pigment pixels and in the cells' pigment fractions, the same for
    # every tiling.
    syn = render_skin(
        stain="cd3",
        width_px=1400,
        height_px=900,
        mpp_um=MPP,
        seed=12,
        jpeg_quality=None,
        params=SkinParams(melanin=0.9),
    )
    path = tmp_path / "S10_pre_cd3.svs"
    write_svs(path, syn.rgb, mpp_um=MPP)
    d = load_protocol("cd3").to_dict()
    d["cells"]["exclude_pigment"] = True
    proto = Protocol.from_dict(d)
    base = quantify(path, proto, tile_size=512)
    pigment_px = int(base.raster.pigment_px.sum())
    # The caps are found: at least half their drawn pixels (syn.pigment_mask), and their blurred rims add more
    # (about 4x the drawn pixels here), but not the whole epidermis.
    truth_px = int(syn.pigment_mask.sum())
    assert truth_px / 2 < pigment_px < 6 * truth_px
    assert (base.cells["pigment_fraction"] > 0).sum() >= 5
    for kwargs in ({"tile_size": 2048}, {"tile_size": 384, "tile_origin_px": (101, 57)}):
        other = quantify(path, proto, **kwargs)
        a, b = base.regions.set_index("region"), other.regions.set_index("region")
        num = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c])]
        np.testing.assert_allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=0, atol=1e-9)
        pd.testing.assert_frame_equal(base.cells, other.cells, check_exact=False, rtol=0, atol=1e-9)
        assert int(other.raster.pigment_px.sum()) == pigment_px


#: The columns every regions table has (issue 4's output contract: other tools read them).
CONTRACT_COLUMNS = ("slide", "path", "stain", "protocol", "protocol_sha256", "region", "region_area_mm2")


def test_outputs_follow_the_contract(cd3_slide, tmp_path):
    path, _ = cd3_slide
    res = quantify(path, "cd3")
    write_slide_outputs(res, tmp_path)
    table = rebuild_tables(tmp_path)
    stem = slide_stem(path)
    for col in (
        *CONTRACT_COLUMNS,
        "cells_total",
        "cells_positive",
        "cells_negative",
        "positive_cells_per_mm2",
        "positive_percent",
    ):
        assert col in table.columns, col
    assert set(table["slide"]) == {stem}
    assert "tissue" in set(table["region"])
    cells = pd.read_parquet(tmp_path / "cells" / f"{stem}.parquet")
    for col in (
        "x_px",
        "y_px",
        "x_um",
        "y_um",
        "region",
        "positive",
        "intensity_class",
        "nucleus_area_um2",
        "target_od_mean",
    ):
        assert col in cells.columns, col
    assert cells["positive"].dtype == bool
    assert len(cells) == int(table.set_index("region").loc["tissue", "cells_total"]) + int(
        (cells["region"] == "outside").sum()
    ) + int(table.set_index("region").loc["tissue", "pigment_cells"])
    assert (tmp_path / "qc" / f"{stem}.png").stat().st_size > 1000
    with tifffile.TiffFile(tmp_path / "masks" / f"{stem}.ome.tif") as tf:
        assert tf.is_ome and tf.series[0].shape == res.raster.bin_px.shape[1:]
    assert pd.read_parquet(tmp_path / "regions.parquet").equals(table)
    rec = json.loads((tmp_path / "slides" / f"{stem}.json").read_text())
    assert rec["input_sha256"] == res.provenance["slide"]["sha256"]
    assert rec["provenance"]["stains"]["background_rgb"]
    # The slide's resolved protocol and its hash, named apart from the tables' protocol_sha256 (which differs).
    prov = rec["provenance"]
    assert Protocol.from_dict(prov["protocol"]).sha256 == prov["resolved_protocol_sha256"]
    assert "protocol_sha256" not in prov and rec["protocol_sha256"] == table["protocol_sha256"].iloc[0]


def test_area_outputs_follow_the_contract(tmp_path):
    """Every area column the contract names is in an area protocol's table, `h_score` included: the mucin
    protocols turn the H-score off, which leaves it empty (and out of the long table), never absent, since other
    tools read the column by name."""
    from cleihc.tables import tidy
    from cleihc_testdata import SAMPLE_IMAGES

    path = SAMPLE_IMAGES / "S01_pre_gag-alcian.svs"
    res = quantify(path, "gag-alcian")
    assert load_protocol("gag-alcian").metrics.h_score is False
    write_slide_outputs(res, tmp_path)
    table = rebuild_tables(tmp_path)
    for col in (
        *CONTRACT_COLUMNS,
        "positive_area_mm2",
        "positive_area_percent",
        "weak_area_percent",
        "moderate_area_percent",
        "strong_area_percent",
        "positive_mean_od",
        "h_score",
    ):
        assert col in table.columns, col
    assert table["h_score"].isna().all()
    tissue = table.set_index("region").loc["tissue"]
    assert 0 < tissue["positive_area_percent"] < 100
    long = tidy([tmp_path])
    assert "h_score" not in set(long["metric"]) and "positive_area_percent" in set(long["metric"])
    assert "h_score" not in long.columns  # an empty metric is not study metadata
    # Beside a protocol that gives the H-score (its numbers and the empty ones in one column): still a metric.
    other = tmp_path / "cxcl10"
    write_slide_outputs(quantify(SAMPLE_IMAGES / "S01_pre_cxcl10.svs", "cxcl10"), other)
    both = tidy([tmp_path, other])
    assert "h_score" not in both.columns
    scores = both[both["metric"] == "h_score"]
    assert set(scores["stain"]) == {"cxcl10"} and len(scores) == len(rebuild_tables(other))
    assert list(long.columns) == [
        "slide",
        "stain",
        "region",
        "metric",
        "value",
        "unit",
        "corrected",
        "review",
    ]


def test_user_epidermis_moves_dermis_and_bands(block_slide, tmp_path):
    """Regression (regions helper's request): a drawn epidermis replaces the automatic one and the dermis follows."""
    feats = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[160, 160], [2560, 160], [2560, 360], [160, 360], [160, 160]]],
            },
            "properties": {"classification": {"name": name}},
        }
        for name in ("epidermis",)
    ]
    feats.append(
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[160, 160], [2560, 160], [2560, 1760], [160, 1760], [160, 160]]],
            },
            "properties": {"classification": {"name": "tissue"}},
        }
    )
    path = tmp_path / "epi.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    rows = quantify(block_slide, "cxcl10", regions=path).regions.set_index("region")
    px_mm2 = (MPP * MPP) / 1e6
    assert rows.loc["epidermis", "region_area_mm2"] == pytest.approx(2400 * 200 * px_mm2, rel=1e-12)
    assert rows.loc["dermis", "region_area_mm2"] == pytest.approx(2400 * 1400 * px_mm2, rel=1e-12)
    # papillary band: 0-150 µm = 300 px below the drawn junction at y = 360
    assert rows.loc["papillary_dermis", "region_area_mm2"] == pytest.approx(2400 * 300 * px_mm2, rel=0.02)


def test_roi_restricts_measurement_but_not_compartments(cd3_slide):
    """A region of interest limits areas and cells to it, and never changes what counts as epidermis."""
    from shapely.geometry import box

    path, _ = cd3_slide
    whole = quantify(path, "cd3")
    roi = box(400, 0, 900, 1300)
    part = quantify(path, "cd3", roi=roi)
    assert len(part.cells) and part.cells["x_px"].between(400, 900).all()
    w, p = whole.regions.set_index("region"), part.regions.set_index("region")
    assert 0 < p.loc["tissue", "region_area_mm2"] < w.loc["tissue", "region_area_mm2"]
    assert p.loc["epidermis", "region_area_mm2"] > 0
    # the ROI's epidermis is the whole run's epidermis clipped to the ROI: same raster cells
    np.testing.assert_array_equal(
        part.region_masks["epidermis"], whole.region_masks["epidermis"] & part.region_masks["tissue"]
    )


def test_large_slides_use_a_bounded_grid(block_slide, tmp_path, monkeypatch):
    """Whole-slide grids never exceed MAX_GRID_CELLS: a big scan is measured on a coarser raster, and says so."""
    import cleihc.pipeline as pipeline

    monkeypatch.setattr(pipeline, "MAX_GRID_CELLS", 100_000)
    regions = _tissue_polygon_geojson(tmp_path / "r.geojson", 160, 160, 2560, 1760)
    res = quantify(block_slide, "cxcl10", regions=regions)
    w, h = res.raster.shape_r
    assert w * h <= 100_000 * 1.2
    assert any("large slide" in m for m in res.provenance["warnings"])
    tissue = res.regions.set_index("region").loc["tissue"]
    px_mm2 = (MPP * MPP) / 1e6
    assert tissue["region_area_mm2"] == pytest.approx(2400 * 1600 * px_mm2, rel=0.02)
    assert tissue["positive_area_mm2"] == pytest.approx(400 * 200 * px_mm2, rel=1e-12)  # pixels, not cells


def test_fixed_white_background_still_finds_grey_glass(tmp_path):
    # Regression: a protocol fixing I0 = white for its stain arithmetic (as the Alcian blue authors' QuPath
    # recipe does) made tissue detection measure grey glass (RGB 228) against white too, so every pixel was
    # tissue. Tissue must come out as the 1200 x 800 px block, whatever the stain I0.
    proto_d = load_protocol("cxcl10").to_dict()
    proto_d["background"] = {"mode": "fixed", "rgb": [255.0, 255.0, 255.0]}
    proto = Protocol.from_dict(proto_d)
    stains = proto.stains.matrix
    h, w = 1600, 2400
    conc = np.zeros((h, w, 3), np.float32)
    conc[400:1200, 600:1800, stains.index(proto.counterstain)] = 0.35
    rgb = recompose(conc, stains.with_background((228, 229, 231)))
    path = tmp_path / "grey_glass.tif"
    _write_tiff(path, rgb, mpp_um=MPP)
    res = quantify(path, proto)
    tissue_mm2 = res.regions.set_index("region").loc["tissue", "region_area_mm2"]
    assert tissue_mm2 == pytest.approx(1200 * 800 * MPP * MPP / 1e6, rel=0.03)


def test_slide_stained_otherwise_is_reported(caplog):
    """An Alcian blue slide measured as CD3 (hematoxylin + DAB): its blue reads as "DAB"; the plan says so in a
    warning and in provenance. The CD3 slide itself and the Alcian blue slide with its own protocol do not warn."""
    from cleihc.pipeline import plan_slide, provenance
    from cleihc_testdata import SAMPLE_IMAGES

    alcian = SAMPLE_IMAGES / "S01_pre_gag-alcian.svs"
    with caplog.at_level("WARNING", logger="cleihc.pipeline"):
        plan = plan_slide(alcian, "cd3")
    assert not plan.stain_fit.explained and plan.stain_fit.off_plane_fraction > 0.3
    (message,) = [w for w in plan.warnings if w.startswith("stains:")]
    assert "dab-positive tissue has colours that hematoxylin and dab do not make" in message
    assert message in caplog.text
    record = provenance(plan, {})["stain_fit"]
    assert record == {
        "positive_px": plan.stain_fit.positive_px,
        "off_plane_px": plan.stain_fit.off_plane_px,
        "angle_deg": 15.0,
        "explained": False,
    }
    for path, protocol in ((alcian, "gag-alcian"), (SAMPLE_IMAGES / "S01_pre_cd3.svs", "cd3")):
        plan = plan_slide(path, protocol)
        assert plan.stain_fit.explained and plan.stain_fit.positive_px > 500
        assert plan.stain_fit.off_plane_px == 0
        assert not [w for w in plan.warnings if w.startswith("stains:")]


def test_annotations_off_the_slide_are_reported():
    """Annotations in the wrong frame (exported from a downsampled image) would give zero or partial regions
    silently: a region mostly off the slide is named in a warning with the slide's and its own extent."""
    import shapely

    from cleihc.pipeline import plan_slide
    from cleihc.regions import Region
    from cleihc_testdata import SAMPLE_IMAGES

    regions = [
        Region("far", shapely.box(5000, 5000, 6000, 6000), "test"),
        Region("half", shapely.box(1000, 1000, 3000, 3000), "test"),  # 400 x 700 of its 2000 x 2000 px on it
        Region("edge", shapely.box(1000, 1000, 1600, 1400), "test"),  # 2/3 on it: drawn over the edge, fine
    ]
    plan = plan_slide(SAMPLE_IMAGES / "S01_pre_cd3.svs", "cd3", regions=regions)
    notes = [w for w in plan.warnings if w.startswith("regions:")]
    assert notes == [
        "regions: 'far' lies 100% outside the slide (1400 x 1700 px; the region spans x 5000..6000, "
        "y 5000..6000): annotation coordinates must be level-0 pixels of this slide",
        "regions: 'half' lies 93% outside the slide (1400 x 1700 px; the region spans x 1000..3000, "
        "y 1000..3000): annotation coordinates must be level-0 pixels of this slide",
    ]


def test_user_regions_named_like_known_regions_but_for_case_replace_them():
    """QuPath classes are usually capitalised: an "Epidermis" annotation replaces the automatic epidermis (one
    row, the dermis and bands follow it) rather than adding a second region; two such shapes are one region."""
    import shapely

    from cleihc.pipeline import plan_slide, region_masks_on_raster
    from cleihc.regions import Region
    from cleihc_testdata import SAMPLE_IMAGES

    top, second = shapely.box(0, 0, 1400, 192), shapely.box(0, 192, 704, 304)  # on the 8-px overview grid
    regions = [
        Region("Epidermis", top, "test"),
        Region("EPIDERMIS", second, "test"),
        Region("Lesion", shapely.box(100, 400, 500, 800), "test"),
    ]
    plan = plan_slide(SAMPLE_IMAGES / "S01_pre_cd3.svs", "cd3", regions=regions)
    names = [r.name for r in plan.regions]
    assert names.count("epidermis") == 1 and "Epidermis" not in names and "EPIDERMIS" not in names
    assert "Lesion" in names  # not a known region: kept as written
    (epi,) = [r for r in plan.regions if r.name == "epidermis"]
    assert epi.source == "test" and epi.geometry.equals(shapely.union_all([top, second]))
    # The dermis follows the given epidermis: it starts where the epidermis ends (no overlap).
    masks = region_masks_on_raster(plan)
    assert masks["epidermis"].any() and masks["dermis"].any()
    assert not (masks["dermis"] & masks["epidermis"]).any()


def test_mpp_override_that_contradicts_the_file_is_reported():
    """--mpp given for a whole batch also reaches slides with their own value: a contradiction is a warning."""
    from cleihc.pipeline import plan_slide
    from cleihc.slide import open_slide
    from cleihc_testdata import SAMPLE_IMAGES

    path = SAMPLE_IMAGES / "S01_pre_cd3.svs"
    with open_slide(path, mpp=0.25) as slide:
        assert slide.file_mpp == (0.5, 0.5) and slide.mpp == (0.25, 0.25)
    plan = plan_slide(path, "cd3", mpp=0.25)
    assert (
        "--mpp 0.25 overrides the file's 0.5 um/px: lengths scale by 0.5, areas and densities by its square"
        in plan.warnings
    )
    assert not [w for w in plan_slide(path, "cd3", mpp=0.501).warnings if w.startswith("--mpp")]  # within 2 %
    # A scan coarser than the protocol's resolution is measured as it is, and said so.
    coarse = plan_slide(path, "cd3", mpp=1.0)
    assert coarse.resolution.mpp_um == (1.0, 1.0)
    assert (
        "measured at 1 um/px, the scan's own resolution, coarser than the protocol's 0.5 um/px: nuclei and thin "
        "structures are found less reliably" in coarse.warnings
    )
    assert not [w for w in plan.warnings if w.startswith("measured at")]


def test_the_protocols_region_list_is_what_is_reported_in_its_order(tmp_path):
    """Regression: `[regions] report = ["dermis", "tissue"]` still reported every automatic compartment, tissue
    first; a misspelt name gave an empty row without a word."""
    import dataclasses

    from cleihc.protocol import RegionsParams
    from cleihc.regions import Region
    from cleihc_testdata import SAMPLE_IMAGES

    path = SAMPLE_IMAGES / "S01_pre_cd3.svs"
    full = quantify(path, "cd3").regions.set_index("region")
    cd3 = load_protocol("cd3")
    only = dataclasses.replace(cd3, regions=RegionsParams(report=("dermis", "tissue")))
    lesion = Region("lesion", shapely.box(100, 100, 600, 600), "test")
    res = quantify(path, only, regions=[lesion])
    assert list(res.regions["region"]) == [
        "dermis",
        "tissue",
        "lesion",
    ]  # the user's own region is reported too
    got = res.regions.set_index("region")
    for name in ("dermis", "tissue"):
        assert got.loc[name, "cells_total"] == full.loc[name, "cells_total"]
        assert got.loc[name, "region_area_mm2"] == full.loc[name, "region_area_mm2"]
    typo = dataclasses.replace(cd3, regions=RegionsParams(report=("tissue", "papilary_dermis")))
    res = quantify(path, typo)
    assert list(res.regions["region"]) == ["tissue", "papilary_dermis"]
    assert res.regions.set_index("region").loc["papilary_dermis", "region_area_mm2"] == 0
    (warning,) = [w for w in res.provenance["warnings"] if "papilary_dermis" in w]
    assert "did you mean 'papillary_dermis'?" in warning


def test_a_slides_own_vectors_are_estimated_at_the_analysis_resolution():
    """With `[stains] estimate = "macenko"` the plan estimated on the 4 µm/px overview, where a CD3 membrane ring
    shares each pixel with its nucleus: DAB came out 16-18 degrees off on the sample slides, rendered with the
    hdab vectors exactly. Estimated on tissue pixels at the analysis resolution, both are within a few degrees."""
    import dataclasses

    from cleihc.pipeline import plan_slide
    from cleihc.stains import angle_deg, preset
    from cleihc_testdata import SAMPLE_IMAGES

    cd3 = load_protocol("cd3")
    mac = dataclasses.replace(cd3, stains=dataclasses.replace(cd3.stains, estimate="macenko"))
    plan = plan_slide(SAMPLE_IMAGES / "S01_pre_cd3.svs", mac)
    truth = preset("hdab")
    for name in ("hematoxylin", "dab"):
        assert angle_deg(plan.stains.vector(name), truth.vector(name)) < 5.0, name
