"""The Quantify dock: run a cleihc protocol on the slide, a drawn region or the visible field; preview thresholds.

Measuring is :func:`cleihc.quantify`'s job; this widget chooses what to measure, runs it in a worker thread with
progress and cancel, shows the results as layers and a table, and previews a positivity threshold on the
visible field (stain concentration computed once per field, thresholded on every slider move).
"""

from __future__ import annotations

import inspect
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import shapely
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from cleihc.errors import CleihcError
from cleihc.protocol import Protocol, list_protocols, load_protocol
from cleihc.slide import Slide, open_slide
from cleihc.stains import concentration
from napari_cleihc._correct_widget import unsaved_corrections
from napari_cleihc._layers import (
    META_KEY,
    ResultsSlide,
    geometries_from_shapes,
    layer_data_px,
    preview_layer,
    result_layers,
    results_folder_layers,
    visible_rect_px,
)
from napari_cleihc._table import MetricsTable
from napari_cleihc._viewer import (
    RESULT_ROLES,
    add_layer_tuples,
    cleihc_meta,
    find_layer,
    remove_layers,
    viewer_camera,
)

__all__ = ["SCOPES", "QuantifyCancelled", "QuantifyWidget", "protocol_with_threshold"]

log = logging.getLogger(__name__)

#: What a run measures.
SCOPES = ("whole slide", "drawn region", "visible field")

#: Largest side of the field read for the threshold preview, in pixels.
PREVIEW_PX = 1024

_OD_STEPS = 100  # slider steps per OD unit


class QuantifyCancelled(Exception):
    """Raised from quantify's progress callback to stop a run; the worker catches it and ends normally."""


class _Signals(QObject):
    progress = Signal(int, int)


def protocol_with_threshold(protocol: Protocol, positive_od: float) -> Protocol:
    """A copy of `protocol` whose positivity threshold (and weak bin) is `positive_od`.

    Raises ProtocolError when it would not stay below the moderate bin.
    """
    data = protocol.to_dict()
    bins = list(data["thresholds"]["bins_od"])
    if not positive_od < bins[1]:
        raise CleihcError(
            f"a positivity threshold of {positive_od:.2f} OD is not below the protocol's moderate bin "
            f"({bins[1]:g} OD): choose a lower one, or edit the protocol's [thresholds] bins_od"
        )
    bins[0] = round(float(positive_od), 6)
    data["thresholds"]["bins_od"] = bins
    data["thresholds"]["positive_od"] = bins[0]
    return Protocol.from_dict(data, source=protocol.source)


class QuantifyWidget(QWidget):
    """Dock widget: choose a protocol and a scope, run, preview the threshold, see the region metrics."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker: Any = None
        self.result: Any = None
        self._cancel = threading.Event()
        self._signals = _Signals()
        self._signals.progress.connect(self._on_progress)
        self._protocols: dict[str, Protocol] = {}
        self._slides: dict[tuple[str, Any], Slide] = {}
        self._stains: dict[tuple[Any, ...], Any] = {}
        self._field: tuple[Any, ...] | None = None  # (key, rect_px, wpp, concentration)

        self.protocol_combo = QComboBox()
        for info in list_protocols():
            self.protocol_combo.addItem(f"{info.name} ({info.version})", str(info.path))
            self.protocol_combo.setItemData(
                self.protocol_combo.count() - 1, info.description, Qt.ItemDataRole.ToolTipRole
            )
        browse_protocol = QPushButton("File…")
        browse_protocol.clicked.connect(self._browse_protocol)
        self.protocol_combo.currentIndexChanged.connect(self._on_protocol_changed)

        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        self.scope_combo.currentTextChanged.connect(self._on_scope_changed)

        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setRange(0.0, 50.0)
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setSpecialValueText("from the file")
        self.mpp_spin.setToolTip(
            "Microns per pixel of the slide, for a file that does not record it (as cleihc quantify --mpp); "
            "cleihc never guesses it"
        )
        set_mpp = QPushButton("Set")
        set_mpp.clicked.connect(self.apply_mpp)
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("results folder (optional: whole-slide runs are saved there)")
        browse_out = QPushButton("…")
        browse_out.clicked.connect(self._browse_out)

        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        self.preview_check = QCheckBox("Preview the threshold on the visible field")
        self.preview_check.toggled.connect(self._on_preview_toggled)
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(1, 3 * _OD_STEPS)
        self.threshold_slider.valueChanged.connect(self._on_threshold_changed)
        self.threshold_label = QLabel("")
        self.use_threshold_check = QCheckBox("Run with this threshold")
        self._camera_timer = QTimer(self)
        self._camera_timer.setSingleShot(True)
        self._camera_timer.setInterval(250)
        self._camera_timer.timeout.connect(self.refresh_preview)
        camera = viewer_camera(self.viewer)
        camera.events.center.connect(self._on_camera)
        camera.events.zoom.connect(self._on_camera)

        self.table = MetricsTable()

        form = QFormLayout()
        row = QHBoxLayout()
        row.addWidget(self.protocol_combo, 1)
        row.addWidget(browse_protocol)
        form.addRow("Protocol", row)
        form.addRow("Measure", self.scope_combo)
        row = QHBoxLayout()
        row.addWidget(self.mpp_spin, 1)
        row.addWidget(set_mpp)
        form.addRow("µm/px", row)
        row = QHBoxLayout()
        row.addWidget(self.out_edit, 1)
        row.addWidget(browse_out)
        form.addRow("Save to", row)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        preview = QGroupBox("Threshold (OD)")
        pl = QVBoxLayout(preview)
        pl.addWidget(self.preview_check)
        srow = QHBoxLayout()
        srow.addWidget(self.threshold_slider, 1)
        srow.addWidget(self.threshold_label)
        pl.addLayout(srow)
        pl.addWidget(self.use_threshold_check)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addWidget(preview)
        layout.addWidget(QLabel("Region metrics"))
        layout.addWidget(self.table, 1)
        self._on_protocol_changed()

    # -- protocol -----------------------------------------------------------------------------------------
    def _browse_protocol(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Protocol file", "", "cleihc protocol (*.toml)")
        if path:
            self.set_protocol_file(path)

    def set_protocol_file(self, path: str) -> None:
        """Add a protocol file to the list and select it."""
        self.protocol_combo.addItem(Path(path).name, str(path))
        self.protocol_combo.setCurrentIndex(self.protocol_combo.count() - 1)

    def select_protocol(self, name: str) -> None:
        """Select a built-in protocol by name (``"cd3"``, ...)."""
        for i in range(self.protocol_combo.count()):
            if Path(self.protocol_combo.itemData(i)).stem == name:
                self.protocol_combo.setCurrentIndex(i)
                return
        raise ValueError(f"no protocol named {name!r}")

    def protocol(self) -> Protocol:
        """The chosen protocol (loaded once per file)."""
        key = self.protocol_combo.currentData()
        if key is None:
            raise CleihcError("no protocol: choose a built-in protocol or a .toml file")
        if key not in self._protocols:
            self._protocols[key] = load_protocol(key)
        return self._protocols[key]

    def _on_protocol_changed(self, *_: Any) -> None:
        try:
            proto = self.protocol()
        except (CleihcError, OSError) as exc:
            self.status.setText(str(exc))
            return
        self._field = None
        self.threshold_slider.blockSignals(True)
        self.threshold_slider.setValue(round(proto.thresholds.positive_od * _OD_STEPS))
        self.threshold_slider.blockSignals(False)
        self._on_threshold_changed(self.threshold_slider.value())

    def threshold_od(self) -> float:
        """The slider's threshold in OD units."""
        return self.threshold_slider.value() / _OD_STEPS

    def run_protocol(self) -> Protocol:
        """The protocol a run uses: the chosen one, with the slider's threshold if asked."""
        proto = self.protocol()
        if self.use_threshold_check.isChecked() and not np.isclose(
            self.threshold_od(), proto.thresholds.positive_od
        ):
            proto = protocol_with_threshold(proto, self.threshold_od())
        return proto

    # -- slide and scope ----------------------------------------------------------------------------------
    def slide_layer(self) -> Any:
        """The slide to measure: the selected slide layer, else the top one."""
        layer = find_layer(self.viewer, "slide")
        if layer is None:
            raise CleihcError("no slide open: open a slide (File > Open) with the cleihc reader first")
        return layer

    def apply_mpp(self) -> None:
        """Give the selected slide the µm/px of the box (0: the file's own); its layer is rescaled to µm."""
        layer = self.slide_layer()
        meta = cleihc_meta(layer)
        value = float(self.mpp_spin.value())
        if value <= 0:
            self.status.setText("Type the slide's microns per pixel (the scanner's value), then Set.")
            return
        meta["mpp_override"] = (value, value)
        meta["world_per_px"] = (value, value)  # (y, x) µm per level-0 pixel
        layer.scale = (value, value)
        self._field = None
        self.viewer.reset_view()
        self.status.setText(f"{meta['slide']}: {value:g} µm per pixel (given here, not from the file).")

    def _slide(self, layer: Any) -> Slide:
        meta = cleihc_meta(layer)
        key = (meta["slide_path"], meta.get("mpp_override"))
        if key not in self._slides:
            self._slides[key] = open_slide(meta["slide_path"], mpp=meta.get("mpp_override"))
        return self._slides[key]

    def _on_scope_changed(self, scope: str) -> None:
        if scope == "drawn region":
            roi = self.roi_layer(create=True)
            self.viewer.layers.selection.active = roi
            roi.mode = "add_polygon"
            self.status.setText("Draw the region on the 'ROI' layer, then Run.")

    def roi_layer(self, *, create: bool = False) -> Any:
        """The 'ROI' Shapes layer (level-0 px data) of the current slide, created on request."""
        # Only this slide's: a region drawn on another slide is in that slide's pixels.
        slide_layer = self.slide_layer()
        layer = find_layer(self.viewer, "roi", slide=cleihc_meta(slide_layer).get("slide"))
        if layer is None and create:
            meta = cleihc_meta(slide_layer)
            wpp = tuple(meta["world_per_px"])
            layer = self.viewer.add_shapes(
                name="ROI",
                ndim=2,
                scale=wpp,
                edge_color="#00e5ff",
                face_color="transparent",
                edge_width=max(2.0, max(meta["dimensions"]) / 600.0),
                metadata={META_KEY: {"role": "roi", "slide": meta["slide"], "world_per_px": wpp}},
            )
        return layer

    def roi(self, scope: str | None = None) -> Any:
        """The analysis area as a shapely geometry in level-0 px, or None for the whole slide."""
        scope = scope or self.scope_combo.currentText()
        if scope == "whole slide":
            return None
        layer = self.slide_layer()
        if scope == "visible field":
            rect = self.visible_rect(layer)
            if rect is None:
                raise CleihcError("the visible field shows no part of the slide: pan or zoom onto it")
            x, y, w, h = rect
            return shapely.box(x, y, x + w, y + h)
        roi = self.roi_layer()
        if roi is None or len(roi.data) == 0:
            raise CleihcError("no drawn region: draw a polygon on the 'ROI' layer first")

        geoms = geometries_from_shapes(
            layer_data_px(roi), roi.shape_type, ["roi"] * len(roi.data), [-1] * len(roi.data)
        )
        if not geoms:
            raise CleihcError("the drawn region has no area: draw a polygon, rectangle or ellipse")
        return shapely.union_all(list(geoms.values()))

    def visible_rect(self, layer: Any | None = None) -> tuple[int, int, int, int] | None:
        """The level-0 rectangle ``(x, y, w, h)`` of the slide the canvas shows."""
        layer = layer or self.slide_layer()
        meta = cleihc_meta(layer)
        camera = viewer_camera(self.viewer)
        return visible_rect_px(
            camera.center,
            camera.zoom,
            self.viewer.canvas.size,
            world_per_px=tuple(meta["world_per_px"]),
            dimensions=tuple(meta["dimensions"]),
        )

    # -- run ----------------------------------------------------------------------------------------------
    def _browse_out(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Results folder")
        if path:
            self.out_edit.setText(path)

    def run(self) -> Any:
        """Start quantifying in a worker thread; returns the worker (None when the inputs are wrong)."""
        from napari.qt.threading import thread_worker

        from cleihc import quantify

        if self.worker is not None:
            return self.worker
        try:
            layer = self.slide_layer()
            meta = cleihc_meta(layer)
            scope = self.scope_combo.currentText()
            roi = self.roi(scope)
            protocol = self.run_protocol()
        except (CleihcError, OSError, ValueError) as exc:
            self.status.setText(str(exc))
            return None
        # The new results replace the slide's layers: corrections not saved there would be lost.
        pending = unsaved_corrections(self.viewer, slide=meta.get("slide"))
        if pending is not None:
            self.status.setText(
                f"{pending} has corrections that are not saved: save them in the Correct dock (or reopen the "
                "slide to drop them) before quantifying it again."
            )
            return None
        kwargs: dict[str, Any] = {"mpp": meta.get("mpp_override")}
        if roi is not None:
            if "roi" not in inspect.signature(quantify).parameters:
                self.status.setText("this cleihc cannot restrict a run to a region (no roi=): update cleihc")
                return None
            kwargs["roi"] = roi
        out_dir = self.out_edit.text().strip() or None
        if scope != "whole slide":
            out_dir = None  # region runs are exploratory: the results folder holds whole-slide results only
        if out_dir is not None:
            from cleihc.outputs import check_results_folder

            try:  # another protocol's results there would be overwritten
                check_results_folder(out_dir, protocol)
            except CleihcError as exc:
                self.status.setText(str(exc))
                return None
        self._cancel.clear()
        cancel, signals = self._cancel, self._signals
        path = meta["slide_path"]

        def work() -> Any:
            def progress(done: int, total: int) -> None:
                if cancel.is_set():
                    raise QuantifyCancelled
                signals.progress.emit(done, total)

            # Every outcome is returned, none raised: the worker always ends through `returned` and
            # `finished`, and a cancel is not reported as an error.
            try:
                result = quantify(path, protocol, progress=progress, **kwargs)
                if cancel.is_set():  # pressed after the last tile: still before anything is written or shown
                    raise QuantifyCancelled
                if out_dir is not None:
                    from cleihc.corrections import apply_saved_corrections, corrections_path
                    from cleihc.outputs import rebuild_tables, results_folder_lock, write_slide_outputs

                    with results_folder_lock(out_dir):  # not while a batch writes the same folder
                        write_slide_outputs(result, out_dir)
                        if corrections_path(out_dir, result.slide).exists():
                            apply_saved_corrections(out_dir, result.slide)  # as the CLI does: honour a review
                        else:
                            rebuild_tables(out_dir)
            except QuantifyCancelled:
                return ("cancelled", None, None)
            except Exception as exc:  # shown in the dock; unexpected ones are logged with their traceback
                return ("error", exc, None)
            return ("done", result, out_dir)

        worker = thread_worker(work, start_thread=False)()
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setRange(0, 0)  # busy until the first tile reports
        self.status.setText(f"Quantifying {meta['slide']} with {protocol.name} ({scope})…")
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running quantify to stop at its next tile."""
        if self.worker is not None:
            self._cancel.set()
            self.status.setText("Cancelling…")

    def _on_progress(self, done: int, total: int) -> None:
        self.progress_bar.setRange(0, max(1, total))
        self.progress_bar.setValue(done)

    def _on_returned(self, value: tuple[str, Any, str | None]) -> None:
        outcome, result, out_dir = value
        if outcome == "cancelled":
            self.status.setText("Cancelled.")
            return
        if outcome == "error":
            self.status.setText(f"Failed: {result}")
            if not isinstance(result, CleihcError):
                log.error("quantify failed", exc_info=result)
            return
        self.result = result
        remove_layers(self.viewer, RESULT_ROLES, slide=result.slide)
        if out_dir is not None:
            layers = results_folder_layers(out_dir, result.slide, include_slide=False)
        else:
            layers = result_layers(result)
        add_layer_tuples(self.viewer, layers)
        if out_dir is not None:  # the saved rows, with any earlier corrections applied
            self.table.set_frame(pd.DataFrame(ResultsSlide.load(out_dir, result.slide).record["rows"]))
        else:
            self.table.set_frame(result.regions)
        # The plan's warnings (a slide stained otherwise, no epidermis found...) are what a reviewer must see.
        warnings = "".join(f"\nWarning: {w}" for w in result.provenance.get("warnings", ()))
        self.status.setText(
            f"Done: {result.slide}, {len(result.regions)} regions, {len(result.cells)} cells"
            + (f"; saved in {out_dir}" if out_dir else "")
            + warnings
        )

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)

    # -- threshold preview --------------------------------------------------------------------------------
    def _on_preview_toggled(self, on: bool) -> None:
        if on:
            self.refresh_preview()
        else:
            remove_layers(self.viewer, ["preview"])

    def _on_camera(self, *_: Any) -> None:
        if self.preview_check.isChecked():
            self._camera_timer.start()

    def _on_threshold_changed(self, value: int) -> None:
        self.threshold_label.setText(f"{value / _OD_STEPS:.2f}")
        if self.preview_check.isChecked():
            self._show_preview()

    def field_concentration(self) -> tuple[tuple[int, int, int, int], tuple[float, float], np.ndarray]:
        """The visible field's target-stain concentration (OD), read at a coarse resolution; cached per field."""
        layer = self.slide_layer()
        meta = cleihc_meta(layer)
        rect = self.visible_rect(layer)
        if rect is None:
            raise CleihcError("the visible field shows no part of the slide: pan or zoom onto it")
        proto = self.protocol()
        key = (meta["slide_path"], rect, proto.sha256)
        if self._field is not None and self._field[0] == key:
            return self._field[1], self._field[2], self._field[3]
        slide = self._slide(layer)
        if not slide.has_mpp:
            raise CleihcError(
                "the slide has no microns-per-pixel: type the scanner's value in µm/px and press Set"
            )
        mx, my = slide.mpp
        x, y, w, h = rect
        mpp_um = max(proto.analysis.mpp_um, max(w * mx, h * my) / PREVIEW_PX)
        rgb = slide.read_at_mpp((x, y), (w, h), mpp_um=mpp_um)
        conc = concentration(rgb, self._run_stains(meta, proto), stain=proto.target)
        wpp = tuple(meta["world_per_px"])
        self._field = (key, rect, wpp, conc)
        return rect, wpp, conc

    def _run_stains(self, meta: dict[str, Any], proto: Protocol) -> Any:
        """The stains a run of this slide uses (I0 from its glass, its own vectors if the protocol estimates
        them): the plan's, so the preview's positive pixels are the run's. Cached per slide and protocol."""
        from cleihc.pipeline import plan_slide

        key = (meta["slide_path"], meta.get("mpp_override"), proto.sha256)
        if key not in self._stains:
            self._stains[key] = plan_slide(meta["slide_path"], proto, mpp=meta.get("mpp_override")).stains
        return self._stains[key]

    def refresh_preview(self) -> None:
        """Re-read the visible field (if it changed) and redraw the preview."""
        if not self.preview_check.isChecked():
            return
        try:
            self.field_concentration()
        except (CleihcError, OSError) as exc:
            self.status.setText(str(exc))
            return
        self._show_preview()

    def _show_preview(self) -> None:
        if self._field is None:
            self.refresh_preview()
            return
        _, rect, wpp, conc = self._field
        positive = conc >= self.threshold_od()
        existing = find_layer(self.viewer, "preview")
        if (
            existing is not None
            and cleihc_meta(existing).get("rect_px") == rect
            and existing.data.shape == conc.shape
        ):
            existing.data = positive.astype(np.uint8)
            return
        if existing is not None:
            self.viewer.layers.remove(existing)
        data, kwargs, _ = preview_layer(positive, rect_px=rect, world_per_px=wpp)
        self.viewer.add_image(data, **kwargs)

    def closeEvent(self, event: Any) -> None:
        self.cancel()
        for slide in self._slides.values():
            slide.close()
        super().closeEvent(event)
