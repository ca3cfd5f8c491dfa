"""A read-only table of region metrics (one row per region), with manually corrected rows highlighted."""

from __future__ import annotations

import math

import pandas as pd
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem

__all__ = ["MetricsTable"]

#: Identifier columns repeated on every row of a slide: not shown.
_HIDDEN = ("slide", "path", "stain", "protocol", "protocol_sha256")
_CORRECTED_BG = QColor(255, 236, 179)


class MetricsTable(QTableWidget):
    """Region metrics as a table; rows whose ``corrected`` is true are tinted and say so."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setAlternatingRowColors(True)
        self.frame = pd.DataFrame()

    def set_frame(self, frame: pd.DataFrame) -> None:
        """Show a region table (the columns cleihc writes to ``regions.csv``)."""
        self.frame = frame.reset_index(drop=True)
        cols = [c for c in self.frame.columns if c not in _HIDDEN]
        if "region" in cols:
            cols.remove("region")
            cols.insert(0, "region")
        self.clear()
        self.setColumnCount(len(cols))
        self.setRowCount(len(self.frame))
        self.setHorizontalHeaderLabels(cols)
        corrected = self.frame["corrected"].astype(bool) if "corrected" in self.frame else None
        for i in range(len(self.frame)):
            for j, col in enumerate(cols):
                item = QTableWidgetItem(_format(self.frame.at[i, col]))
                if corrected is not None and corrected.iat[i]:
                    item.setBackground(_CORRECTED_BG)
                    item.setToolTip("includes manual corrections")
                self.setItem(i, j, item)
        self.resizeColumnsToContents()


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value == int(value) and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.4g}"
    return "" if value is None else str(value)
