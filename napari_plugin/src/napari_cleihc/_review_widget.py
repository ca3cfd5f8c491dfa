"""The Review queue dock: the slides of a results folder with their review status, one at a time.

Status (unreviewed, reviewed, flagged), who and when are kept by :func:`cleihc.corrections.set_review_status` in
``review/status.json``. Keyboard shortcuts work anywhere in the napari window:

=============  ==========================
Alt+Right      next slide
Alt+Left       previous slide
Alt+1          mark reviewed, go to next
Alt+2          flag, go to next
Alt+0          mark unreviewed
=============  ==========================

Corrections not yet saved are never dropped: leaving the slide or marking it is refused until they are saved
(Correct dock) or discarded ("Discard edits").
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QKeySequence, QShortcut
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from cleihc.corrections import REVIEW_STATES, review_status, set_review_status
from cleihc.errors import CleihcError
from napari_cleihc._correct_widget import unsaved_corrections
from napari_cleihc._layers import ResultsSlide, results_folder_layers, results_slides
from napari_cleihc._viewer import RESULT_ROLES, add_layer_tuples, remove_layers

__all__ = ["SHORTCUTS", "ReviewWidget"]

#: Key sequence per action (Qt's portable text form).
SHORTCUTS = {
    "next": "Alt+Right",
    "previous": "Alt+Left",
    "reviewed": "Alt+1",
    "flagged": "Alt+2",
    "unreviewed": "Alt+0",
}

_STATUS_COLORS = {
    "reviewed": QColor(200, 240, 200),
    "flagged": QColor(255, 205, 200),
    "unreviewed": QColor(0, 0, 0, 0),
}
_COLUMNS = ("slide", "status", "author", "time", "note")


class ReviewWidget(QWidget):
    """Dock widget: a results folder's slides, their status, next/previous, mark reviewed or flagged."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.out_dir: Path | None = None
        self.slides: list[str] = []
        self.index = -1
        self.status: dict[str, dict[str, str]] = {}

        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("cleihc results folder")
        self.folder_edit.returnPressed.connect(lambda: self.set_folder(self.folder_edit.text()))
        browse = QPushButton("…")
        browse.clicked.connect(self._browse)
        self.table = QTableWidget(0, len(_COLUMNS))
        self.table.setHorizontalHeaderLabels(_COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.cellDoubleClicked.connect(lambda row, _col: self.open_slide(row))
        self.note_edit = QLineEdit()
        self.note_edit.setPlaceholderText("note (saved with the status)")
        self.author_edit = QLineEdit(_user())
        self.message = QLabel("")
        self.message.setWordWrap(True)

        buttons = {
            "previous": QPushButton("◀ Previous"),
            "next": QPushButton("Next ▶"),
            "reviewed": QPushButton("Reviewed"),
            "flagged": QPushButton("Flag"),
            "unreviewed": QPushButton("Unreviewed"),
        }
        actions = {
            "previous": self.previous,
            "next": self.next,
            "reviewed": lambda: self.mark("reviewed", advance=True),
            "flagged": lambda: self.mark("flagged", advance=True),
            "unreviewed": lambda: self.mark("unreviewed"),
        }
        discard = QPushButton("Discard edits")
        discard.setToolTip("Reload the slide's results as saved, dropping corrections not saved")
        discard.clicked.connect(lambda: self.open_slide(self.index, discard=True))
        self.shortcuts: dict[str, QShortcut] = {}
        for key, button in buttons.items():
            button.setToolTip(f"{SHORTCUTS[key]}")
            button.clicked.connect(actions[key])
            sc = QShortcut(QKeySequence(SHORTCUTS[key]), self)
            sc.setContext(Qt.ShortcutContext.ApplicationShortcut)
            sc.activated.connect(actions[key])
            self.shortcuts[key] = sc

        row = QHBoxLayout()
        row.addWidget(self.folder_edit, 1)
        row.addWidget(browse)
        grid = QGridLayout()
        grid.addWidget(buttons["previous"], 0, 0)
        grid.addWidget(buttons["next"], 0, 1)
        grid.addWidget(buttons["reviewed"], 1, 0)
        grid.addWidget(buttons["flagged"], 1, 1)
        grid.addWidget(buttons["unreviewed"], 2, 0)
        grid.addWidget(discard, 2, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.note_edit)
        author_row = QHBoxLayout()
        author_row.addWidget(QLabel("Reviewer"))
        author_row.addWidget(self.author_edit, 1)
        layout.addLayout(author_row)
        layout.addLayout(grid)
        layout.addWidget(self.message)

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "cleihc results folder")
        if path:
            self.set_folder(path)

    def set_folder(self, path: str | Path, *, open_first: bool = True) -> None:
        """List the slides of a results folder and open the first one not yet reviewed."""
        out = Path(path)
        slides = results_slides(out)
        if not slides:
            self.message.setText(
                f"{out}: no slides/<slide>.json records; run `cleihc quantify ... --out {out}` first"
            )
            return
        self.out_dir, self.slides = out, slides
        self.folder_edit.setText(str(out))
        self.index = -1
        self.refresh()
        if open_first:
            todo = [i for i, s in enumerate(slides) if self.status[s]["status"] == "unreviewed"]
            self.open_slide(todo[0] if todo else 0)

    def refresh(self) -> None:
        """Re-read the statuses and redraw the list."""
        if self.out_dir is None:
            return
        try:
            self.status = review_status(self.out_dir)
        except CleihcError as exc:
            self.message.setText(str(exc))
            return
        self.table.setRowCount(len(self.slides))
        for i, slide in enumerate(self.slides):
            st = self.status.get(slide, {"status": "unreviewed", "author": "", "time": "", "note": ""})
            for j, col in enumerate(_COLUMNS):
                item = QTableWidgetItem(slide if col == "slide" else str(st.get(col, "")))
                item.setBackground(_STATUS_COLORS.get(st["status"], QColor(0, 0, 0, 0)))
                self.table.setItem(i, j, item)
        self.table.resizeColumnsToContents()
        if 0 <= self.index < len(self.slides):
            self.table.selectRow(self.index)

    def current_slide(self) -> str | None:
        return self.slides[self.index] if 0 <= self.index < len(self.slides) else None

    def _refuse_if_unsaved(self) -> bool:
        pending = unsaved_corrections(self.viewer)
        if pending is None:
            return False
        self.message.setText(
            f"{pending} has corrections that are not saved: save them in the Correct dock, or press "
            "'Discard edits' to drop them."
        )
        return True

    def open_slide(self, index: int, *, discard: bool = False) -> None:
        """Show slide `index` of the queue (its image and results replace the previous slide's layers).

        Refused while the slide shown holds corrections that are not saved, unless `discard`.
        """
        if not self.slides or index < 0:
            return
        if not discard and self._refuse_if_unsaved():
            return
        index = max(0, min(int(index), len(self.slides) - 1))
        slide = self.slides[index]
        try:
            layers = results_folder_layers(self.out_dir, slide)
            rs = ResultsSlide.load(self.out_dir, slide)
        except (OSError, ValueError, KeyError, CleihcError) as exc:
            self.message.setText(f"{slide}: cannot open its results ({exc})")
            return
        remove_layers(self.viewer, ("slide", *RESULT_ROLES))
        add_layer_tuples(self.viewer, layers)
        self.viewer.reset_view()
        self.index = index
        self.note_edit.setText(self.status.get(slide, {}).get("note", ""))
        self.table.selectRow(index)
        text = f"{index + 1} / {len(self.slides)}: {slide}"
        if not rs.slide_found:  # moved or on a drive not mounted: the overlays alone are shown
            text += (
                f"\nSlide image not found at {rs.slide_path}; its results are shown without it (run "
                "`cleihc quantify` on the slide's new location to record it)."
            )
        self.message.setText(text)

    def next(self) -> None:
        if self.slides and self.index < len(self.slides) - 1:
            self.open_slide(self.index + 1)

    def previous(self) -> None:
        if self.slides and self.index > 0:
            self.open_slide(self.index - 1)

    def mark(self, status: str, *, advance: bool = False) -> None:
        """Record the current slide's status (with the note, reviewer and time); optionally go to the next."""
        if status not in REVIEW_STATES:
            raise ValueError(f"status must be one of {REVIEW_STATES}, got {status!r}")
        slide = self.current_slide()
        if slide is None or self._refuse_if_unsaved():
            return
        set_review_status(
            self.out_dir,
            slide,
            status,
            note=self.note_edit.text().strip(),
            author=self.author_edit.text().strip() or None,
        )
        self.refresh()
        if advance:
            self.next()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""
