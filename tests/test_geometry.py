"""cleihc.geometry: exact mask ↔ polygon conversions and GeoJSON helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from scipy import ndimage as ndi
from shapely.geometry import MultiPolygon, Point, Polygon, box

from cleihc.geometry import (
    feature_collection,
    mask_to_polygons,
    polygonal,
    rasterize,
    region_color,
    to_feature,
)


def _rect_with_hole() -> Polygon:
    return Polygon(
        [(10, 20), (110, 20), (110, 80), (10, 80)],
        [[(40, 40), (60, 40), (60, 60), (40, 60)]],
    )


def test_rectangle_with_hole_rasterises_to_hand_count():
    poly = _rect_with_hole()
    assert poly.area == 100 * 60 - 20 * 20
    m = rasterize(poly, shape=(130, 100))
    assert m.shape == (100, 130)
    assert m.sum() == 5600
    assert m[20, 10] and m[79, 109] and not m[80, 109] and not m[20, 110]
    assert not m[50, 50] and m[39, 50] and not m[40, 50]


def test_mask_to_polygons_rectangle_with_hole_is_exact():
    m = np.zeros((100, 130), bool)
    m[20:80, 10:110] = True
    m[40:60, 40:60] = False
    mp = mask_to_polygons(m)
    assert isinstance(mp, MultiPolygon) and mp.is_valid
    assert len(mp.geoms) == 1
    p = mp.geoms[0]
    assert len(p.interiors) == 1
    assert p.area == 5600.0
    # Collinear pixel edges are merged: a rectangle has 4 corners (5 with the closing point).
    assert len(p.exterior.coords) == 5 and len(p.interiors[0].coords) == 5
    assert p.equals(_rect_with_hole())


def test_downsample_and_origin_map_to_level0():
    m = np.zeros((4, 5), bool)
    m[1:3, 2:4] = True
    mp = mask_to_polygons(m, downsample=4.0, origin_px=(100.0, 200.0))
    assert mp.equals(box(108, 204, 116, 212))
    assert mp.area == m.sum() * 16
    back = rasterize(mp, shape=(5, 4), downsample=4.0, origin_px=(100.0, 200.0))
    np.testing.assert_array_equal(back, m)


def test_nested_islands_and_saddles_are_valid():
    m = np.zeros((40, 40), bool)
    m[2:38, 2:38] = True
    m[8:32, 8:32] = False  # hole
    m[14:26, 14:26] = True  # island in the hole
    m[18:22, 18:22] = False  # hole in the island
    # pinch: a diagonal-only contact between the frame and an extra pixel, and a checkerboard patch
    m[1, 1] = True
    m[0:4:2, 30:36:2] = True
    mp = mask_to_polygons(m)
    assert mp.is_valid, shapely.is_valid_reason(mp)
    assert mp.area == m.sum()
    big = max(mp.geoms, key=lambda p: p.area)
    assert len(big.interiors) == 1
    np.testing.assert_array_equal(rasterize(mp, shape=(40, 40)), m)


def test_pinched_ring_makes_hole_touching_shell():
    # A ring of pixels whose only closure is a diagonal contact: the enclosed background leaks out through the
    # corner, so the traced outline passes the saddle twice and must be split into shell + touching hole.
    m = np.zeros((7, 7), bool)
    m[1, 1:6] = True
    m[1:6, 5] = True
    m[5, 2:6] = True
    m[2:5, 1] = True  # left side stops at row 4; (5, 1) empty, so (4, 1) touches (5, 2) only diagonally
    mp = mask_to_polygons(m)
    assert mp.is_valid, shapely.is_valid_reason(mp)
    assert mp.area == m.sum()
    np.testing.assert_array_equal(rasterize(mp, shape=(7, 7)), m)


@pytest.mark.parametrize("seed", range(6))
def test_random_masks_round_trip_exactly(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        h, w = rng.integers(1, 40, 2)
        m = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        ds = float(rng.choice([0.5, 1.0, 2.0, 8.0]))
        origin = (float(rng.integers(-50, 50)), float(rng.integers(-50, 50)))
        mp = mask_to_polygons(m, downsample=ds, origin_px=origin)
        assert mp.is_valid, shapely.is_valid_reason(mp)
        assert mp.area == m.sum() * ds * ds
        back = rasterize(mp, shape=(w, h), downsample=ds, origin_px=origin)
        np.testing.assert_array_equal(back, m)


def test_empty_mask_gives_empty_multipolygon():
    mp = mask_to_polygons(np.zeros((5, 5), bool))
    assert isinstance(mp, MultiPolygon) and mp.is_empty
    assert not rasterize(mp, shape=(5, 5)).any()
    assert not rasterize(None, shape=(5, 5)).any()


def test_rasterize_matches_contains_xy_on_pixel_centres():
    rng = np.random.default_rng(3)
    for _ in range(10):
        pts = rng.uniform(0.13, 97.77, (12, 2))
        geom = shapely.make_valid(Polygon(pts).buffer(0)).union(Point(rng.uniform(20, 80, 2)).buffer(9.31))
        geom = polygonal(geom)
        shapely.prepare(geom)
        ds, origin = 1.5, (-3.25, 2.75)
        m = rasterize(geom, shape=(70, 66), downsample=ds, origin_px=origin)
        jj, ii = np.meshgrid(np.arange(70), np.arange(66))
        ref = shapely.contains_xy(geom, origin[0] + (jj + 0.5) * ds, origin[1] + (ii + 0.5) * ds)
        np.testing.assert_array_equal(m, ref)


def test_rasterize_window_equals_window_of_whole():
    geom = Point(61.3, 47.9).buffer(40.2).difference(box(50, 40, 70, 55)).union(box(0, 90, 300, 97.5))
    ds = 2.0
    whole = rasterize(geom, shape=(80, 60), downsample=ds, origin_px=(0.0, 0.0))
    assert whole.sum() > 100
    for j0, i0, w, h in [(0, 0, 80, 60), (13, 7, 21, 30), (40, 25, 40, 35), (79, 59, 1, 1), (5, 44, 60, 16)]:
        win = rasterize(geom, shape=(w, h), downsample=ds, origin_px=(j0 * ds, i0 * ds))
        np.testing.assert_array_equal(win, whole[i0 : i0 + h, j0 : j0 + w])


def test_shared_edge_claims_each_pixel_once():
    left, right = box(0, 0, 10.5, 10), box(10.5, 0, 20, 10)  # the edge passes through pixel centres
    a = rasterize(left, shape=(20, 10))
    b = rasterize(right, shape=(20, 10))
    assert not (a & b).any()
    assert (a | b).all()


def test_simplify_reduces_vertices_and_keeps_validity():
    yy, xx = np.mgrid[:200, :200]
    m = (xx - 100) ** 2 + (yy - 100) ** 2 < 80**2
    exact = mask_to_polygons(m)
    simple = mask_to_polygons(m, simplify_px=1.0)
    assert simple.is_valid
    assert len(shapely.get_coordinates(simple)) < len(shapely.get_coordinates(exact)) / 2
    assert abs(simple.area - exact.area) / exact.area < 0.01


def test_polygonal_drops_points_and_lines():
    gc = shapely.GeometryCollection([box(0, 0, 1, 1), Point(5, 5), shapely.LineString([(0, 0), (3, 3)])])
    p = polygonal(gc)
    assert isinstance(p, MultiPolygon) and p.area == 1.0


def test_to_feature_is_qupath_style_and_json_round_trips():
    feat = to_feature(_rect_with_hole(), name="epidermis", classification="epidermis", properties={"a": 1})
    assert feat["type"] == "Feature"
    props = feat["properties"]
    assert props["objectType"] == "annotation" and props["name"] == "epidermis" and props["a"] == 1
    assert props["classification"] == {"name": "epidermis", "color": list(region_color("epidermis"))}
    assert feat["geometry"]["type"] == "Polygon"
    assert len(feat["geometry"]["coordinates"]) == 2
    fc = feature_collection([feat])
    back = json.loads(json.dumps(fc))
    assert back["type"] == "FeatureCollection" and len(back["features"]) == 1
    assert shapely.geometry.shape(back["features"][0]["geometry"]).area == 5600.0


def test_region_color_is_stable_rgb():
    c = region_color("my custom region")
    assert c == region_color("my custom region")
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in c)
    assert region_color("a") != region_color("b")


def test_label_sizes_equals_bincount_across_chunks(monkeypatch):
    from cleihc import geometry

    monkeypatch.setattr(geometry, "_LABEL_CHUNK_PX", 1000)  # several chunks, the last one partial
    labels, n = ndi.label(np.random.default_rng(5).random((97, 89)) < 0.4)
    sizes = geometry.label_sizes(labels, n)
    np.testing.assert_array_equal(sizes, np.bincount(labels.ravel(), minlength=n + 1))
    assert sizes.dtype == np.int64 and sizes.sum() == labels.size
    np.testing.assert_array_equal(geometry.label_sizes(np.zeros((3, 4), np.int32), 2), [12, 0, 0])


def test_outline_does_not_depend_on_empty_margins():
    # Traced inside the mask's bounding box: the same polygons, vertex for vertex, with any empty margin.
    rng = np.random.default_rng(9)
    m = ndi.binary_opening(rng.random((60, 70)) < 0.6)
    framed = np.zeros((60 + 37, 70 + 11), bool)
    framed[30:90, 4:74] = m
    a = mask_to_polygons(m, downsample=3.0, origin_px=(12.0 + 4 * 3.0, -6.0 + 30 * 3.0))
    b = mask_to_polygons(framed, downsample=3.0, origin_px=(12.0, -6.0))
    assert a.area == m.sum() * 9.0 and len(a.geoms) > 1
    assert shapely.equals_exact(a, b, tolerance=0.0)
    np.testing.assert_array_equal(shapely.get_coordinates(a), shapely.get_coordinates(b))
