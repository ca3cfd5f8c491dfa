"""Per-slide output files: the totals archive is plain numpy data, read back exactly."""

from __future__ import annotations

import zipfile

import numpy as np

from cleihc.outputs import write_qc_png, write_totals
from cleihc.pipeline import quantify
from cleihc_testdata import SAMPLE_IMAGES


def test_totals_archive_round_trips_exactly(tmp_path):
    res = quantify(SAMPLE_IMAGES / "S01_pre_cd3.svs", "cd3")
    path = tmp_path / "totals" / "S01_pre_cd3.npz"
    path.parent.mkdir()
    write_totals(res, path)
    with zipfile.ZipFile(path) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    with np.load(path, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["bin_px"], res.raster.bin_px)
        assert z["bin_px"].dtype == np.uint16 and z["positive_od_sum"].dtype == np.float64
        np.testing.assert_array_equal(z["positive_od_sum"], res.raster.positive_od_sum)
        np.testing.assert_array_equal(z["pigment_px"], res.raster.pigment_px)
        names = [str(n) for n in z["region_names"]]
        assert names == list(res.region_masks)
        for name, mask in zip(names, z["region_masks"], strict=True):
            np.testing.assert_array_equal(mask, res.region_masks[name])
        assert float(z["raster_downsample"]) == res.plan.raster_downsample
        assert int(z["raster_factor"]) == res.raster.raster_factor
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["S01_pre_cd3.npz"]  # no temporary left

    qc = tmp_path / "qc.png"
    write_qc_png(res, qc, max_size_px=400)
    from PIL import Image

    with Image.open(qc) as img:
        assert img.format == "PNG" and max(img.size) == 400
        pixels = np.asarray(img.convert("RGB"))
    # every cell is a dot at its place: positives red, negatives blue unless a positive dot lies over them
    from cleihc.slide import open_slide

    with open_slide(res.plan.slide_path) as slide:
        scale = pixels.shape[1] / slide.dimensions[0]
    cx = np.floor(res.cells["x_px"].to_numpy() * scale).astype(int)
    cy = np.floor(res.cells["y_px"].to_numpy() * scale).astype(int)
    positive = res.cells["positive"].to_numpy(dtype=bool)
    assert positive.sum() > 20 and (~positive).sum() > 20
    colours = pixels[cy, cx]
    assert np.all(colours[positive] == (200, 0, 0))
    red_near = np.zeros(pixels.shape[:2], bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            red_near[np.clip(cy[positive] + dy, 0, None), np.clip(cx[positive] + dx, 0, None)] = True
    alone = ~positive & ~red_near[cy, cx]
    assert alone.sum() > 20 and np.all(colours[alone] == (0, 60, 200))
