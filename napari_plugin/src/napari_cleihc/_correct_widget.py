"""The Correct dock: edit regions, exclude areas, add/delete/reclassify cells, recompute and save.

Corrections go to ``corrections/<slide>.geojson`` of the results folder (with who and when, earlier versions
kept in ``corrections/history/``); the automatic results are never touched. Metrics are recomputed by
:meth:`cleihc.corrections.SlideResults.recompute` from the saved totals, without reading the slide.

Exclusions are polygons (the ``exclusions`` layer), or painted on one low-resolution Labels layer on the totals
raster (painting on multiscale labels does not work in napari, napari#1587) that is turned into exact polygons
with :func:`cleihc.geometry.mask_to_polygons` when the corrections are built.
"""

from __future__ import annotations

import dataclasses
import getpass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from cleihc.corrections import (
    Corrections,
    SlideResults,
    apply_saved_corrections,
    corrections_path,
    read_corrections,
    write_corrections,
)
from cleihc.errors import CleihcError
from cleihc.geometry import polygonal, region_color
from napari_cleihc._edits import AutomaticResults, build_corrections, corrections_equal, painted_exclusions
from napari_cleihc._layers import (
    CLASS_NAMES,
    EXCLUSION_COLOR,
    META_KEY,
    ResultsSlide,
    exclusions_layer,
    geometries_from_shapes,
    layer_data_px,
    points_px,
    results_folder_layers,
    shape_parts,
)
from napari_cleihc._table import MetricsTable
from napari_cleihc._viewer import (
    add_layer_tuples,
    cleihc_meta,
    current_load_id,
    current_results,
    find_layer,
    remove_layers,
)

__all__ = ["CorrectWidget", "corrections_from_layers", "unsaved_corrections"]

#: The layers a save reloads from the results folder (the slide image and the positive overlay do not change).
_EDITED_ROLES = ("tissue", "regions", "run exclusions", "exclusions", "cells", "exclusion paint")

_COMPARTMENTS = ("epidermis", "dermis", "papillary_dermis", "superficial_dermis", "deep_dermis", "tissue")


class CorrectWidget(QWidget):
    """Dock widget correcting the results of the slide shown (layers opened from a results folder)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.bound: tuple[str, str] | None = None
        self.load_id: str | None = None  # which loading of the bound slide's layers the dock works on
        self.automatic: AutomaticResults | None = None
        self.results: SlideResults | None = None
        self.rows = None

        self.slide_label = QLabel("Open a cleihc results folder (or run Quantify with a results folder).")
        self.slide_label.setWordWrap(True)

        self.region_combo = QComboBox()
        self.region_combo.setEditable(True)
        self.region_combo.addItems(_COMPARTMENTS)
        draw_region = QPushButton("Draw region")
        draw_region.setToolTip("Add a polygon to the chosen region on the 'regions' layer")
        draw_region.clicked.connect(self.draw_region)
        edit_shapes = QPushButton("Edit outlines")
        edit_shapes.setToolTip("Select and move vertices of the regions")
        edit_shapes.clicked.connect(self.edit_regions)
        delete_shapes = QPushButton("Delete selected")
        delete_shapes.clicked.connect(self.delete_selected_shapes)

        draw_excl = QPushButton("Draw exclusion")
        draw_excl.clicked.connect(self.draw_exclusion)
        paint_excl = QPushButton("Paint")
        paint_excl.clicked.connect(self.paint_exclusion)
        erase_excl = QPushButton("Erase")
        erase_excl.clicked.connect(self.erase_exclusion)

        self.class_combo = QComboBox()
        self.class_combo.addItems(CLASS_NAMES)
        self.class_combo.setCurrentText("1+")
        self.class_combo.currentTextChanged.connect(self._on_class_changed)
        add_cells = QPushButton("Add cells")
        add_cells.clicked.connect(self.add_cells)
        select_cells = QPushButton("Select cells")
        select_cells.clicked.connect(self.select_cells)
        reclass = QPushButton("Reclassify selected")
        reclass.clicked.connect(self.reclassify_selected)
        delete_cells = QPushButton("Delete selected")
        delete_cells.clicked.connect(self.delete_selected_cells)

        self.author_edit = QLineEdit(_user())
        recompute = QPushButton("Recompute")
        recompute.clicked.connect(self.recompute)
        save = QPushButton("Save corrections")
        save.clicked.connect(self.save)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.table = MetricsTable()

        regions_box = QGroupBox("Regions")
        g = QGridLayout(regions_box)
        g.addWidget(self.region_combo, 0, 0, 1, 3)
        g.addWidget(draw_region, 1, 0)
        g.addWidget(edit_shapes, 1, 1)
        g.addWidget(delete_shapes, 1, 2)
        excl_box = QGroupBox("Exclusions")
        g = QGridLayout(excl_box)
        g.addWidget(draw_excl, 0, 0)
        g.addWidget(paint_excl, 0, 1)
        g.addWidget(erase_excl, 0, 2)
        cells_box = QGroupBox("Cells")
        g = QGridLayout(cells_box)
        g.addWidget(self.class_combo, 0, 0, 1, 2)
        g.addWidget(add_cells, 1, 0)
        g.addWidget(select_cells, 1, 1)
        g.addWidget(reclass, 2, 0)
        g.addWidget(delete_cells, 2, 1)
        form = QFormLayout()
        form.addRow("Reviewer", self.author_edit)
        layout = QVBoxLayout(self)
        layout.addWidget(self.slide_label)
        layout.addWidget(regions_box)
        layout.addWidget(excl_box)
        layout.addWidget(cells_box)
        layout.addLayout(form)
        buttons = QGridLayout()
        buttons.addWidget(recompute, 0, 0)
        buttons.addWidget(save, 0, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.table, 1)

        # Layers come and go one at a time when a slide is (re)opened: bind once they have all arrived.
        self._bind_timer = QTimer(self)
        self._bind_timer.setSingleShot(True)
        self._bind_timer.setInterval(0)
        self._bind_timer.timeout.connect(self._on_layers_changed)
        self.viewer.layers.events.inserted.connect(lambda *_: self._bind_timer.start())
        self.viewer.layers.events.removed.connect(lambda *_: self._bind_timer.start())
        self._on_layers_changed()

    # -- binding to the slide shown -----------------------------------------------------------------------
    def _on_layers_changed(self, *_: Any) -> None:
        found = current_results(self.viewer)
        load_id = current_load_id(self.viewer)
        # The same slide loaded again (a re-run into the folder, a save) has new automatic results: rebind.
        if found == self.bound and load_id == self.load_id:
            return
        self.bound = found
        self.load_id = load_id
        self.automatic = self.results = None
        if found is None:
            self.slide_label.setText("Open a cleihc results folder (or run Quantify with a results folder).")
            self.table.set_frame(pd.DataFrame())
            return
        out_dir, slide = found
        try:
            self.automatic = AutomaticResults.load(out_dir, slide)
            self.results = SlideResults.load(out_dir, slide)
        except (OSError, ValueError, KeyError, CleihcError) as exc:
            self.slide_label.setText(f"{slide}: cannot load its results ({exc})")
            return
        names = [n for n in self.automatic.regions if n != "tissue"]
        current = self.region_combo.currentText()
        self.region_combo.clear()
        self.region_combo.addItems(list(dict.fromkeys([*names, *_COMPARTMENTS])))
        if current:
            self.region_combo.setCurrentText(current)
        saved = corrections_path(out_dir, slide)
        self.slide_label.setText(
            f"<b>{slide}</b> in {out_dir}" + (" (corrections saved)" if saved.exists() else "")
        )
        self.recompute()

    def _require(self) -> tuple[str, str]:
        if self.bound is None or self.automatic is None:
            raise CleihcError("no results shown: open a results folder first")
        return self.bound

    def _layer(self, role: str) -> Any:
        return find_layer(self.viewer, role, slide=self.bound[1] if self.bound else None)

    # -- regions ------------------------------------------------------------------------------------------
    def draw_region(self) -> None:
        """Draw polygons of the chosen region (on the tissue layer for 'tissue')."""
        name = self.region_combo.currentText().strip()
        if not name:
            return
        layer = self._layer("tissue" if name == "tissue" else "regions")
        if layer is None:
            return
        layer.feature_defaults = {"region": name, "part": -1}
        layer.current_edge_color = _hex(region_color(name))
        self.viewer.layers.selection.active = layer
        layer.mode = "add_polygon"

    def edit_regions(self) -> None:
        layer = self._layer("regions")
        if layer is not None:
            self.viewer.layers.selection.active = layer
            layer.mode = "direct"

    def delete_selected_shapes(self) -> None:
        layer = self.viewer.layers.selection.active
        if layer is not None and cleihc_meta(layer).get("role") in ("regions", "tissue", "exclusions"):
            layer.remove_selected()

    # -- exclusions ---------------------------------------------------------------------------------------
    def _exclusions(self) -> Any:
        layer = self._layer("exclusions")
        if layer is None and self.bound is not None:
            out_dir, slide = self.bound
            rs = ResultsSlide.load(out_dir, slide)
            data, kwargs, _ = exclusions_layer([], world_per_px=rs.world_per_px, meta=self._meta(rs))
            layer = self.viewer.add_shapes(data, **kwargs)
        return layer

    def _meta(self, rs: ResultsSlide) -> dict[str, Any]:
        return {**rs.meta, "load_id": self.load_id}

    def draw_exclusion(self) -> None:
        layer = self._exclusions()
        if layer is not None:
            self.viewer.layers.selection.active = layer
            layer.feature_defaults = {"region": "exclude", "part": -1}
            layer.current_edge_color = EXCLUSION_COLOR
            layer.mode = "add_polygon"

    def paint_layer(self, *, create: bool = True) -> Any:
        """The low-resolution Labels layer (one label per totals-raster cell) for painting exclusions."""
        layer = self._layer("exclusion paint")
        if layer is None and create and self.results is not None:
            out_dir, slide = self.bound
            rs = ResultsSlide.load(out_dir, slide)
            shape = self.results.masks["tissue"].shape
            r = rs.raster_downsample
            sy, sx = rs.world_per_px[0] * r, rs.world_per_px[1] * r
            layer = self.viewer.add_labels(
                np.zeros(shape, dtype=np.uint8),
                name="exclusion paint",
                scale=(sy, sx),
                translate=(0.5 * sy, 0.5 * sx),
                opacity=0.5,
                metadata={
                    META_KEY: {"role": "exclusion paint", **self._meta(rs), "world_per_px": rs.world_per_px}
                },
            )
            layer.brush_size = 10
        return layer

    def paint_exclusion(self) -> None:
        layer = self.paint_layer()
        if layer is not None:
            self.viewer.layers.selection.active = layer
            layer.selected_label = 1
            layer.mode = "paint"

    def erase_exclusion(self) -> None:
        layer = self.paint_layer(create=False)
        if layer is not None:
            self.viewer.layers.selection.active = layer
            layer.mode = "erase"

    # -- cells --------------------------------------------------------------------------------------------
    def _on_class_changed(self, label: str) -> None:
        layer = self._layer("cells")
        if layer is not None:
            layer.feature_defaults = {"cell_id": -1, "class": label, "region": "", "manual": True}

    def add_cells(self) -> None:
        layer = self._layer("cells")
        if layer is not None:
            self._on_class_changed(self.class_combo.currentText())
            self.viewer.layers.selection.active = layer
            layer.mode = "add"

    def select_cells(self) -> None:
        layer = self._layer("cells")
        if layer is not None:
            self.viewer.layers.selection.active = layer
            layer.mode = "select"

    def reclassify_selected(self) -> None:
        """Give the selected cells the chosen class."""
        layer = self._layer("cells")
        if layer is None or not layer.selected_data:
            return
        idx = np.fromiter(layer.selected_data, dtype=np.int64)
        features = layer.features.copy()
        # Positions, not labels: the selection is by position whatever the table's index became.
        features.iloc[idx, features.columns.get_loc("class")] = self.class_combo.currentText()
        features.iloc[idx, features.columns.get_loc("manual")] = True
        layer.features = features
        layer.refresh_colors(update_color_mapping=False)

    def delete_selected_cells(self) -> None:
        layer = self._layer("cells")
        if layer is not None and layer.selected_data:
            layer.remove_selected()

    # -- corrections --------------------------------------------------------------------------------------
    def corrections(self) -> Corrections:
        """The corrections the layers now hold, relative to the automatic results."""
        _, slide = self._require()
        return corrections_from_layers(
            self.viewer, self.automatic, slide=slide, author=self.author_edit.text().strip()
        )

    def recompute(self) -> Any:
        """Recompute the region metrics with the current (unsaved) corrections; returns the rows."""
        try:
            self._require()
            rows, _ = self.results.recompute(self.corrections())
        except (CleihcError, ValueError) as exc:
            self.status.setText(str(exc))
            return None
        self.rows = rows
        self.table.set_frame(rows)
        n = int(rows["corrected"].sum()) if "corrected" in rows else 0
        self.status.setText(
            f"Recomputed: {n} of {len(rows)} regions include manual corrections." + self._tissue_notice()
        )
        return rows

    def _tissue_notice(self) -> str:
        # A tissue outline only restricts the detected tissue (as with --regions): say so when it reaches out.
        layer = self._layer("tissue")
        if layer is None or self.automatic is None or "tissue" not in self.automatic.regions:
            return ""
        drawn = geometries_from_shapes(
            layer_data_px(layer), layer.shape_type, _col(layer, "region"), _col(layer, "part", -1)
        ).get("tissue")
        if drawn is None:
            return ""
        outside_px2 = float(polygonal(drawn).difference(polygonal(self.automatic.regions["tissue"])).area)
        out_dir, slide = self.bound
        mpp = ResultsSlide(Path(out_dir), slide, self.results.record).mpp_um  # the record already loaded
        outside_mm2 = outside_px2 * mpp[0] * mpp[1] / 1e6
        if outside_mm2 < 1e-4:
            return ""
        return (
            f" The tissue outline reaches {outside_mm2:.3g} mm² beyond the detected tissue: a drawn tissue only "
            "restricts it (that area is not measured)."
        )

    def save(self) -> Any:
        """Write the corrections (who, when) and update the slide's record and the folder's tables."""
        try:
            out_dir, slide = self._require()
            corr = self.corrections()
            path = write_corrections(out_dir, slide, corr, author=self.author_edit.text().strip() or None)
            rows = apply_saved_corrections(out_dir, slide)
        except (CleihcError, OSError, ValueError) as exc:
            self.status.setText(f"Not saved: {exc}")
            return None
        self._reload_edited_layers()
        self.rows = rows
        self.table.set_frame(rows)
        self.status.setText(
            f"Saved {path.name} ({len(corr.cell_edits)} cell edits, {len(corr.exclusions)} exclusions)."
        )
        return path

    def _reload_edited_layers(self) -> None:
        # After a save the layers show exactly what the file holds: cells under a new exclusion go, painting
        # becomes polygons, the header says corrections are saved.
        out_dir, slide = self.bound
        tuples = [
            t
            for t in results_folder_layers(out_dir, slide, include_slide=False)
            if t[1]["metadata"][META_KEY].get("role") in _EDITED_ROLES
        ]
        remove_layers(self.viewer, _EDITED_ROLES, slide=slide)
        add_layer_tuples(self.viewer, tuples)
        self._on_layers_changed()


def corrections_from_layers(
    viewer: Any, automatic: AutomaticResults, *, slide: str, author: str = ""
) -> Corrections:
    """The corrections the viewer's layers of `slide` hold, relative to its automatic results.

    A region is compared with its automatic outline only when the layer that shows it is there.
    """

    def layer_of(role: str) -> Any:
        return find_layer(viewer, role, slide=slide)

    regions: dict[str, Any] = {}
    shown: dict[str, Any] = {}
    for role in ("tissue", "regions"):
        layer = layer_of(role)
        if layer is None:
            continue
        for name, geom in automatic.regions.items():
            if (name == "tissue") == (role == "tissue"):
                shown[name] = geom
        regions.update(
            geometries_from_shapes(
                layer_data_px(layer), layer.shape_type, _col(layer, "region"), _col(layer, "part", -1)
            )
        )
    exclusions = []
    layer = layer_of("exclusions")
    if layer is not None and len(layer.data):
        exclusions += [
            g
            for _, g in shape_parts(
                layer_data_px(layer), layer.shape_type, _col(layer, "region"), _col(layer, "part", -1)
            )
        ]
    paint = layer_of("exclusion paint")
    if paint is not None:
        exclusions += painted_exclusions(
            np.asarray(paint.data), raster_downsample=automatic.raster_downsample
        )
    cells = layer_of("cells")
    return build_corrections(
        dataclasses.replace(automatic, regions=shown),
        regions=regions,
        exclusions=exclusions,
        points_yx=None if cells is None else points_px(cells),
        point_features=None if cells is None else cells.features,
        hidden_cell_ids=() if cells is None else cleihc_meta(cells).get("hidden_cell_ids", ()),
        author=author,
    )


def unsaved_corrections(viewer: Any, *, slide: str | None = None) -> str | None:
    """The slide (of the results shown, or `slide`) whose layers hold corrections that are not saved, else None.

    Whoever replaces a slide's layers (the review queue, a re-run) asks first: they would be lost.
    """
    found = current_results(viewer)
    if found is None or (slide is not None and found[1] != slide):
        return None
    out_dir, shown = found
    try:
        automatic = AutomaticResults.load(out_dir, shown)
        now = corrections_from_layers(viewer, automatic, slide=shown)
        saved = read_corrections(corrections_path(out_dir, shown))
    except (OSError, ValueError, KeyError, CleihcError):
        return None  # results that cannot be read hold nothing a reviewer could lose
    return None if corrections_equal(now, saved) else shown


def _col(layer: Any, name: str, default: Any = "") -> list[Any]:
    feats = layer.features
    if name in feats:
        return feats[name].tolist()
    return [default] * len(layer.data)


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""
