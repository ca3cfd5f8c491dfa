"""cleihc.regions: reading annotation files (QuPath GeoJSON, ImageScope XML, ASAP XML), safely."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from cleihc.errors import RegionsError
from cleihc.regions import (
    Region,
    merge_regions,
    rasterize,
    read_regions,
    regions_file_for_slide,
    regions_for_slide,
    regions_to_geojson,
    write_geojson,
)

RECT = [[10, 20], [110, 20], [110, 80], [10, 80], [10, 20]]
HOLE = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]


def _feature(geometry, *, cls=None, name=None, object_type="annotation"):
    props = {"objectType": object_type}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [255, 0, 0]}
    if name is not None:
        props["name"] = name
    return {"type": "Feature", "id": "x", "geometry": geometry, "properties": props}


def _write(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif isinstance(content, str):
        p.write_text(content, encoding="utf-8")
    else:
        p.write_text(json.dumps(content), encoding="utf-8")
    return p


# --- GeoJSON ----------------------------------------------------------------------------------------------------
def test_qupath_geojson_polygon_with_hole_area_and_pixels(tmp_path):
    fc = {
        "type": "FeatureCollection",
        "features": [_feature({"type": "Polygon", "coordinates": [RECT, HOLE]}, cls="epidermis", name="E1")],
    }
    (r,) = read_regions(_write(tmp_path, "a.geojson", fc))
    assert r.name == "epidermis"  # classification wins over name
    assert r.geometry.area == 5600.0
    assert r.source == str(tmp_path / "a.geojson")
    assert rasterize(r.geometry, shape=(130, 100)).sum() == 5600


def test_same_name_features_are_unioned_and_multipolygon_read(tmp_path):
    feats = [
        _feature({"type": "Polygon", "coordinates": [RECT]}, cls="tumor"),
        _feature(
            {"type": "Polygon", "coordinates": [[[100, 20], [150, 20], [150, 80], [100, 80], [100, 20]]]},
            cls="tumor",
        ),
        _feature(
            {
                "type": "MultiPolygon",
                "coordinates": [
                    [[[0, 200], [10, 200], [10, 210], [0, 210], [0, 200]]],
                    [[[50, 200], [70, 200], [70, 230], [50, 230], [50, 200]]],
                ],
            },
            name="vessels",
        ),
        _feature({"type": "Polygon", "coordinates": [[[0, 300], [4, 300], [4, 304], [0, 300]]]}),
    ]
    regions = read_regions(_write(tmp_path, "b.json", feats))  # a bare list of features
    by = {r.name: r for r in regions}
    assert [r.name for r in regions] == ["tumor", "vessels", "annotation"]
    assert by["tumor"].geometry.area == 100 * 60 + 40 * 60  # overlap of 10 px counted once
    assert by["tumor"].properties["n_shapes"] == 2
    assert by["vessels"].geometry.area == 100 + 600
    assert by["annotation"].geometry.area == 8.0


def test_single_feature_or_bare_geometry(tmp_path):
    (r,) = read_regions(_write(tmp_path, "c.geojson", _feature({"type": "Polygon", "coordinates": [RECT]})))
    assert r.name == "annotation" and r.geometry.area == 6000
    (g,) = read_regions(_write(tmp_path, "d.geojson", {"type": "Polygon", "coordinates": [RECT, HOLE]}))
    assert g.geometry.area == 5600


def test_points_lines_and_detections_are_skipped_with_a_warning(tmp_path, caplog):
    feats = [
        _feature({"type": "Polygon", "coordinates": [RECT]}, cls="dermis"),
        _feature({"type": "Point", "coordinates": [5, 5]}, cls="dermis"),
        _feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, cls="ruler"),
        _feature({"type": "Polygon", "coordinates": [HOLE]}, cls="Positive", object_type="detection"),
        _feature(None, cls="empty"),
    ]
    with caplog.at_level(logging.WARNING, logger="cleihc.regions"):
        regions = read_regions(_write(tmp_path, "e.geojson", feats))
    assert [r.name for r in regions] == ["dermis"]
    assert "skipped 4" in caplog.text


def test_self_intersecting_polygon_is_repaired_and_logged(tmp_path, caplog):
    bowtie = [[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]
    with caplog.at_level(logging.WARNING, logger="cleihc.regions"):
        (r,) = read_regions(
            _write(tmp_path, "f.geojson", _feature({"type": "Polygon", "coordinates": [bowtie]}))
        )
    assert r.geometry.is_valid and r.geometry.area == pytest.approx(50.0)
    assert "make_valid" in caplog.text


def test_written_geojson_reads_back_identically(tmp_path):
    regions = [
        Region("tissue", box(0, 0, 200, 100), "auto"),
        Region("epidermis", Polygon(RECT, [HOLE]), "auto", {"mpp_um": 2.0}),
    ]
    out = tmp_path / "out" / "regions.geojson"
    write_geojson(regions, out)
    fc = json.loads(out.read_text())
    assert fc["type"] == "FeatureCollection"
    assert fc["features"][1]["properties"]["classification"]["name"] == "epidermis"
    assert fc["features"][1]["properties"]["source"] == "auto"
    back = read_regions(out)
    assert [r.name for r in back] == ["tissue", "epidermis"]
    for a, b in zip(regions, back, strict=True):
        assert a.geometry.equals(b.geometry)
    assert regions_to_geojson(regions) == fc
    assert not list(out.parent.glob("*.partial"))


# --- ImageScope XML ---------------------------------------------------------------------------------------------
IMAGESCOPE = """<?xml version="1.0" encoding="utf-8"?>
<Annotations MicronsPerPixel="0.2527">
  <Annotation Id="1" Name="" ReadOnly="0" LineColor="65280">
    <Attributes><Attribute Name="Tumor" Id="0" Value=""/></Attributes>
    <Regions>
      <RegionAttributeHeaders/>
      <Region Id="1" Type="0" NegativeROA="0" Zoom="0.5">
        <Vertices>
          <Vertex X="10" Y="20" Z="0"/><Vertex X="110" Y="20" Z="0"/>
          <Vertex X="110" Y="80" Z="0"/><Vertex X="10" Y="80" Z="0"/>
        </Vertices>
      </Region>
      <Region Id="2" Type="1" NegativeROA="1">
        <Vertices>
          <Vertex X="40" Y="40"/><Vertex X="60" Y="40"/><Vertex X="60" Y="60"/><Vertex X="40" Y="60"/>
        </Vertices>
      </Region>
    </Regions>
  </Annotation>
  <Annotation Id="2" Name="ellipse region">
    <Regions>
      <Region Id="3" Type="2" NegativeROA="0">
        <Vertices><Vertex X="200" Y="300"/><Vertex X="400" Y="400"/></Vertices>
      </Region>
      <Region Id="4" Type="4" NegativeROA="0">
        <Vertices><Vertex X="0" Y="0"/><Vertex X="9" Y="9"/></Vertices>
      </Region>
    </Regions>
  </Annotation>
  <Annotation Id="7">
    <Regions>
      <Region Id="5" Type="1" NegativeROA="0">
        <Vertices><Vertex X="1000" Y="1000"/><Vertex X="1010" Y="1020"/></Vertices>
      </Region>
    </Regions>
  </Annotation>
</Annotations>
"""


def test_imagescope_names_negative_roa_rectangles_and_ellipses(tmp_path):
    regions = read_regions(_write(tmp_path, "slide.xml", IMAGESCOPE))
    by = {r.name: r for r in regions}
    assert list(by) == ["Tumor", "ellipse region", "Annotation 7"]
    assert by["Tumor"].geometry.area == 5600.0  # NegativeROA rectangle subtracted
    assert rasterize(by["Tumor"].geometry, shape=(130, 100)).sum() == 5600
    ellipse = by["ellipse region"].geometry
    assert ellipse.bounds == pytest.approx((200, 300, 400, 400), abs=0.1)
    assert ellipse.area == pytest.approx(math.pi * 100 * 50, rel=1e-3)
    assert by["Annotation 7"].geometry.area == 200.0  # two-corner rectangle


# --- ASAP XML ---------------------------------------------------------------------------------------------------
ASAP = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="tumor" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="110" Y="80"/><Coordinate Order="0" X="10" Y="20"/>
        <Coordinate Order="1" X="110" Y="20"/><Coordinate Order="3" X="10" Y="80"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="box" Type="Rectangle" PartOfGroup="None" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="0" Y="100"/><Coordinate Order="1" X="50" Y="100"/>
        <Coordinate Order="2" X="50" Y="120"/><Coordinate Order="3" X="0" Y="120"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="dot" Type="Dot" PartOfGroup="None"><Coordinates><Coordinate Order="0" X="1" Y="1"/></Coordinates></Annotation>
  </Annotations>
  <AnnotationGroups><Group Name="tumor" PartOfGroup="None" Color="#64FE2E"><Attributes/></Group></AnnotationGroups>
</ASAP_Annotations>
"""


def test_asap_groups_order_and_rectangles(tmp_path):
    regions = read_regions(_write(tmp_path, "s.xml", ASAP))
    assert [r.name for r in regions] == ["tumor", "box"]
    assert regions[0].geometry.area == 6000.0  # coordinates sorted by Order
    assert regions[1].geometry.area == 1000.0


# --- hostile and malformed files --------------------------------------------------------------------------------
BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<Annotations><Annotation Name="&lol4;"/></Annotations>
"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE foo [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<Annotations><Annotation Name="&xxe;"/></Annotations>
"""


def _one_line_error(path):
    with pytest.raises(RegionsError) as e:
        read_regions(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


@pytest.mark.parametrize(
    ("name", "content", "expect"),
    [
        ("laughs.xml", BILLION_LAUGHS, "DTD"),
        ("xxe.xml", EXTERNAL_ENTITY, "DTD"),
        ("bad.json", '{"type": "FeatureCollection", "features": [', "invalid JSON"),
        ("nan.json", '{"type": "Polygon", "coordinates": [[[0, 0], [NaN, 0], [1, 1], [0, 0]]]}', "NaN"),
        ("inf.json", '{"type": "Polygon", "coordinates": [[[0, 0], [1e999, 0], [1, 1], [0, 0]]]}', "finite"),
        (
            "str.json",
            '{"type": "Polygon", "coordinates": [[[0, 0], ["a", 0], [1, 1], [0, 0]]]}',
            "not a number",
        ),
        ("empty.json", '{"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]}', "fewer than 3"),
        ("norings.json", '{"type": "Polygon", "coordinates": []}', "no rings"),
        ("structure.json", '{"type": "FeatureCollection", "features": {"a": 1}}', "features"),
        ("list.json", "[1, 2, 3]", "not a GeoJSON Feature"),
        ("unknown.json", '{"type": "Circle", "coordinates": [0, 0]}', "unknown geometry type"),
        ("points.json", '{"type": "Point", "coordinates": [0, 0]}', "no polygon"),
        ("deep.json", "[" * 100000 + "]" * 100000, "nested too deeply"),
        ("text.txt", "hello", "not a GeoJSON or XML"),
        ("empty.xml", "", "not a GeoJSON or XML"),
        ("broken.xml", "<Annotations><Annotation>", "malformed XML"),
        ("other.xml", "<svg/>", "neither ImageScope"),
        (
            "vertex.xml",
            '<Annotations><Annotation Name="a"><Regions><Region Type="0"><Vertices>'
            '<Vertex X="1" Y="x"/></Vertices></Region></Regions></Annotation></Annotations>',
            "not a number",
        ),
        (
            "nanxml.xml",
            '<Annotations><Annotation Name="a"><Regions><Region Type="0"><Vertices>'
            '<Vertex X="nan" Y="1"/><Vertex X="2" Y="1"/><Vertex X="2" Y="3"/></Vertices></Region></Regions>'
            "</Annotation></Annotations>",
            "not finite",
        ),
        (
            "cover.xml",
            '<Annotations><Annotation Name="a"><Regions>'
            '<Region Type="1" NegativeROA="0"><Vertices><Vertex X="0" Y="0"/><Vertex X="5" Y="5"/></Vertices></Region>'
            '<Region Type="1" NegativeROA="1"><Vertices><Vertex X="-1" Y="-1"/><Vertex X="6" Y="6"/></Vertices></Region>'
            "</Regions></Annotation></Annotations>",
            "zero area",
        ),
        (
            "asapbad.xml",
            '<ASAP_Annotations><Annotations><Annotation Name="a" Type="Blob"><Coordinates>'
            "</Coordinates></Annotation></Annotations></ASAP_Annotations>",
            "unknown Type",
        ),
    ],
)
def test_malformed_or_hostile_files_give_one_line_regions_error(tmp_path, name, content, expect):
    msg = _one_line_error(_write(tmp_path, name, content))
    assert expect in msg


def test_missing_and_oversized_files(tmp_path, monkeypatch):
    msg = _one_line_error(tmp_path / "nope.geojson")
    assert "not found" in msg
    p = _write(tmp_path, "big.geojson", {"type": "Polygon", "coordinates": [RECT]})
    monkeypatch.setattr("cleihc.regions.MAX_FILE_BYTES", 10)
    assert "limit" in _one_line_error(p)


# --- regions_for_slide ------------------------------------------------------------------------------------------
def test_regions_for_slide_file_folder_and_ome_stem(tmp_path, caplog):
    fc = {"type": "Polygon", "coordinates": [RECT]}
    single = _write(tmp_path, "one.geojson", fc)
    assert regions_for_slide(single, tmp_path / "whatever.svs")[0].geometry.area == 6000
    folder = tmp_path / "ann"
    folder.mkdir()
    _write(folder, "S1.geojson", fc)
    _write(folder, "S2.xml", IMAGESCOPE)
    _write(folder, "S3.JSON", fc)
    assert regions_for_slide(folder, "/slides/S1.svs")[0].geometry.area == 6000
    assert regions_for_slide(folder, "/slides/S2.ome.tif")[0].name == "Tumor"
    assert regions_for_slide(folder, "/slides/S3.ndpi")[0].geometry.area == 6000  # case-insensitive
    with caplog.at_level(logging.WARNING, logger="cleihc.regions"):
        assert regions_for_slide(folder, "/slides/S4.svs") == []
    assert [r.levelname for r in caplog.records if "no annotation file" in r.getMessage()] == ["WARNING"]
    _write(folder, "S1.xml", IMAGESCOPE)
    with pytest.raises(RegionsError, match="several annotation files"):
        regions_for_slide(folder, "S1.svs")
    with pytest.raises(RegionsError, match="not found"):
        regions_for_slide(tmp_path / "missing", "S1.svs")
    # QuPath scripts export `<image name>.geojson`, the image name keeping its extension.
    _write(folder, "S5.svs.geojson", fc)
    _write(folder, "S6.ome.tif.GeoJSON", fc)
    assert regions_for_slide(folder, "/slides/S5.svs")[0].geometry.area == 6000
    assert regions_file_for_slide(folder, "/slides/S6.ome.tif") == folder / "S6.ome.tif.GeoJSON"
    assert regions_file_for_slide(folder, "/slides/S5.ndpi") is None  # another slide's file name
    _write(folder, "S5.geojson", fc)
    with pytest.raises(RegionsError, match="several annotation files for slide 'S5'"):
        regions_for_slide(folder, "/slides/S5.svs")


# --- merge_regions ----------------------------------------------------------------------------------------------
def test_merge_user_replaces_automatic_by_name_and_keeps_order():
    auto = [
        Region("epidermis", box(0, 0, 1, 1), "auto"),
        Region("tissue", box(0, 0, 9, 9), "auto"),
        Region("dermis", box(0, 1, 1, 2), "auto"),
    ]
    user = [Region("lesion", box(5, 5, 6, 6), "u.geojson"), Region("epidermis", box(0, 0, 2, 2), "u.geojson")]
    merged = merge_regions(auto, user)
    assert [r.name for r in merged] == ["tissue", "epidermis", "dermis", "lesion"]
    assert merged[1].source == "u.geojson" and merged[1].geometry.area == 4
    assert merge_regions(auto, []) == sorted(auto, key=lambda r: r.name != "tissue")
    assert [r.name for r in merge_regions([], user)] == ["lesion", "epidermis"]


def test_region_geometry_rasterises_like_pixel_mask():
    # hand-checkable: a 100 x 60 rectangle with a 20 x 20 hole at downsample 2 covers 1400 mask pixels
    r = Region("x", Polygon(RECT, [HOLE]), "auto")
    m = rasterize(r.geometry, shape=(65, 50), downsample=2.0)
    assert m.sum() == 5600 // 4
    assert np.array_equal(m, rasterize(r.geometry, shape=(130, 100))[::2, ::2])


HALO = """<Annotations>
  <Annotation LineColor="65280" Name="Layer 1" Visible="True">
    <Regions>
      <Region Type="Polygon" HasEndcaps="0" NegativeROA="0">
        <Vertices><V X="10" Y="20"/><V X="110" Y="20"/><V X="110" Y="80"/><V X="10" Y="80"/></Vertices>
      </Region>
      <Region Type="Rectangle" HasEndcaps="0" NegativeROA="1">
        <Vertices><V X="40" Y="40"/><V X="60" Y="60"/></Vertices>
      </Region>
      <Region Type="Ellipse" NegativeROA="0"><Vertices><V X="200" Y="0"/><V X="220" Y="20"/></Vertices></Region>
      <Region Type="Pin" NegativeROA="0"><Vertices><V X="5" Y="5"/></Vertices></Region>
    </Regions>
  </Annotation>
</Annotations>
"""


def test_halo_xml_shares_the_imagescope_reader(tmp_path):
    (r,) = read_regions(_write(tmp_path, "halo.xml", HALO))
    assert r.name == "Layer 1"
    assert r.geometry.area == pytest.approx(5600.0 + math.pi * 100, rel=1e-3)
    assert rasterize(r.geometry, shape=(130, 100)).sum() == 5600


def test_qupath_derived_class_names(tmp_path):
    feat = _feature({"type": "Polygon", "coordinates": [RECT]})
    feat["properties"]["classification"] = {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}
    (r,) = read_regions(_write(tmp_path, "derived.geojson", [feat]))
    assert r.name == "Tumor: Positive"


def test_utf16_imagescope_xml(tmp_path):
    text = IMAGESCOPE.replace('encoding="utf-8"', 'encoding="utf-16"')
    regions = read_regions(_write(tmp_path, "u16.xml", text.encode("utf-16")))
    assert regions[0].name == "Tumor" and regions[0].geometry.area == 5600.0


def _raw_feature(geometry, props=None, **extra):
    return {"type": "Feature", "geometry": geometry, "properties": props or {}, **extra}


def _square(x0, y0, size):
    return {
        "type": "Polygon",
        "coordinates": [[[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size], [x0, y0]]],
    }


def test_qupath_detections_of_every_export_vintage_are_not_regions(tmp_path, caplog):
    """Regression: QuPath 0.2 wrote the object type as the feature's `id` (PathCellObject...), and later
    versions accept `type`/`object_type` too; such cells, detections and tiles became regions named after their
    class ("Positive", "Negative")."""
    feats = [
        _raw_feature(
            _square(0, 0, 100),
            {"classification": {"name": "Tumor", "colorRGB": -65536}},
            id="PathAnnotationObject",
        ),
        _raw_feature(
            _square(10, 10, 5), {"classification": {"name": "Positive", "colorRGB": -1}}, id="PathCellObject"
        ),
        _raw_feature(_square(20, 20, 5), {"classification": {"name": "Tumor"}}, id="PathDetectionObject"),
        _raw_feature(_square(30, 30, 5), {}, id="PathTileObject"),
        _raw_feature(_square(40, 40, 5), {"type": "detection", "classification": {"name": "Negative"}}),
        _raw_feature(_square(50, 50, 5), {"object_type": "cell", "classification": {"name": "Epidermis"}}),
        _raw_feature(_square(200, 0, 10), {"objectType": "Annotation", "classification": {"name": "Stroma"}}),
    ]
    path = _write(
        tmp_path, "q.geojson", json.dumps({"type": "FeatureCollection", "features": feats}).encode()
    )
    regions = read_regions(path)
    assert [(r.name, r.geometry.area) for r in regions] == [("Tumor", 10000.0), ("Stroma", 100.0)]
    assert "skipped 5 non-area shape(s)" in caplog.text and "a QuPath cell object" in caplog.text


def test_imagescope_layers_are_named_by_their_label_not_the_column_header(tmp_path):
    """Regression: ImageScope's default attribute column is named "Description"; every unnamed layer was called
    "Description" and all were merged into one region. The label is the attribute's Value."""

    def layer(k, value, x0):
        return (
            f'<Annotation Id="{k}" Name=""><Attributes><Attribute Name="Description" Id="0" Value="{value}"/>'
            f'</Attributes><Regions><Region Id="{k}" Type="1" NegativeROA="0"><Vertices>'
            f'<Vertex X="{x0}" Y="0"/><Vertex X="{x0 + 100}" Y="0"/><Vertex X="{x0 + 100}" Y="50"/>'
            f'<Vertex X="{x0}" Y="50"/></Vertices></Region></Regions></Annotation>'
        )

    xml = f"<Annotations>{layer(1, '', 0)}{layer(2, '', 200)}{layer(3, 'Lesion', 400)}</Annotations>"
    regions = read_regions(_write(tmp_path, "is.xml", xml.encode()))
    assert [(r.name, r.geometry.area) for r in regions] == [
        ("Annotation 1", 5000.0),
        ("Annotation 2", 5000.0),
        ("Lesion", 5000.0),
    ]


@pytest.mark.parametrize(
    "name, ring, area",
    [
        # an outline traced twice (even-odd repair left a sliver)
        (
            "twice",
            [[0, 0], [400, 0], [400, 400], [0, 400], [0, 0], [400, 0], [400, 400], [0, 400], [0, 0]],
            160000.0,
        ),
        # a hand going round twice, the second time a little inside the first (even-odd: a 10-px sliver)
        (
            "spiral",
            [
                [100, 100],
                [500, 100],
                [500, 500],
                [100, 500],
                [100, 110],
                [490, 110],
                [490, 490],
                [110, 490],
                [110, 100],
                [100, 100],
            ],
            159900.0,
        ),
        # a bow-tie: two triangles
        ("bowtie", [[0, 0], [200, 200], [200, 0], [0, 200], [0, 0]], 20000.0),
    ],
)
def test_self_intersecting_outlines_keep_the_area_they_enclose(tmp_path, name, ring, area):
    geom = {"type": "Polygon", "coordinates": [ring]}
    path = _write(tmp_path, f"{name}.geojson", json.dumps(_raw_feature(geom, {"name": "lesion"})).encode())
    (region,) = read_regions(path)
    assert region.geometry.is_valid and region.geometry.area == pytest.approx(area, rel=1e-3)


def test_holes_are_subtracted_even_when_drawn_badly(tmp_path):
    """Regression: a hole drawn outside its outline was added as area, and two overlapping holes removed the
    outline's area twice over their overlap (even-odd)."""
    shell = [[0, 0], [500, 0], [500, 500], [0, 500], [0, 0]]
    outside = [[600, 0], [700, 0], [700, 100], [600, 100], [600, 0]]
    a = [[100, 100], [300, 100], [300, 300], [100, 300], [100, 100]]
    b = [[200, 200], [400, 200], [400, 400], [200, 400], [200, 200]]
    for holes, area in (([outside], 250000.0), ([a, b], 250000.0 - 70000.0)):
        geom = {"type": "Polygon", "coordinates": [shell, *holes]}
        (region,) = read_regions(_write(tmp_path, "h.geojson", json.dumps(_raw_feature(geom)).encode()))
        assert region.geometry.area == pytest.approx(area)


@pytest.mark.parametrize(
    "x, why",
    [("9" * 400, "is not a number"), ("1e154", "not a level-0 pixel coordinate")],
)
def test_absurd_coordinates_are_one_line_errors(tmp_path, x, why):
    """Regression: a 400-digit integer raised OverflowError (a traceback); 1e154 gave an infinite area."""
    text = '{"type": "Polygon", "coordinates": [[[0, 0], [X, 0], [X, 10], [0, 10], [0, 0]]]}'.replace("X", x)
    with pytest.raises(RegionsError) as err:
        read_regions(_write(tmp_path, "big.geojson", text.encode()))
    message = str(err.value)
    assert why in message and "\n" not in message and len(message) < 300


def test_utf16_geojson_and_empty_geometries(tmp_path, caplog):
    """Regression: UTF-16 GeoJSON (a Windows editor's 'Unicode') was read as XML; an annotation with an empty
    MultiPolygon vanished without a word."""
    feats = [
        _raw_feature(_square(0, 0, 10), {"name": "lesion"}),
        _raw_feature({"type": "MultiPolygon", "coordinates": []}, {"name": "empty one"}),
    ]
    text = json.dumps({"type": "FeatureCollection", "features": feats})
    (region,) = read_regions(_write(tmp_path, "u16.geojson", text.encode("utf-16")))
    assert region.name == "lesion" and region.geometry.area == 100.0
    assert "'empty one': an empty geometry" in caplog.text
