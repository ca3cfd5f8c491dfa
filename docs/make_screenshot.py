"""Make docs/images/napari_plugin.png: the napari-cleihc plugin on a sample slide.

Run from the repository root (needs a display; on a headless machine use Xvfb)::

    xvfb-run -a .venv/bin/python docs/make_screenshot.py

It measures ``sample_images/S01_pre_cd3.svs`` with the built-in ``cd3`` protocol into a temporary results
folder, opens that folder with the plugin's reader, docks the Quantify, Correct and Review queue widgets, and
saves a screenshot of the whole window (scaled to 1000 px, 192 colours, to keep it small).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", default=str(REPO / "sample_images" / "S01_pre_cd3.svs"))
    parser.add_argument("--out", default=str(REPO / "docs" / "images" / "napari_plugin.png"))
    parser.add_argument("--size", default="1400x860", help="window size, WIDTHxHEIGHT")
    parser.add_argument("--width", type=int, default=1000, help="width of the saved image in pixels")
    args = parser.parse_args(argv)

    import napari
    import numpy as np
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from cleihc import quantify
    from cleihc.outputs import rebuild_tables, write_slide_outputs

    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "results"
        result = quantify(args.slide, "cd3")
        write_slide_outputs(result, out_dir)
        rebuild_tables(out_dir)

        viewer = napari.Viewer(title="napari-cleihc", show=True)
        viewer.window._qt_window.resize(width, height)
        viewer.open(str(out_dir), plugin="napari-cleihc")
        _, quantify_dock = viewer.window.add_plugin_dock_widget("napari-cleihc", "Quantify")
        correct_dock, _ = viewer.window.add_plugin_dock_widget("napari-cleihc", "Correct")
        review_dock, review = viewer.window.add_plugin_dock_widget("napari-cleihc", "Review queue")
        viewer.window._qt_window.tabifyDockWidget(correct_dock, review_dock)
        correct_dock.raise_()
        review.set_folder(out_dir, open_first=False)
        quantify_dock.select_protocol("cd3")
        quantify_dock.table.set_frame(result.regions)
        # Zoom onto the epidermis and upper dermis, where the T cells are.
        viewer.reset_view()
        cells = result.cells
        if len(cells):
            dense = cells.loc[cells["positive"]]
            cy, cx = float(dense["y_um"].median()), float(dense["x_um"].median())
            viewer.camera.center = (cy, cx)
            viewer.camera.zoom *= 1.6
        for _ in range(20):  # let napari load the visible tiles and draw
            QApplication.processEvents()
        shot = viewer.screenshot(canvas_only=False, flash=False)
        viewer.close()

    rgb = np.ascontiguousarray(shot[..., :3])
    img = Image.fromarray(rgb)
    if img.width > args.width:
        img = img.resize((args.width, round(img.height * args.width / img.width)), Image.Resampling.LANCZOS)
    img = img.quantize(colors=192, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, optimize=True)
    print(f"{out}: {img.width}x{img.height}, {out.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
