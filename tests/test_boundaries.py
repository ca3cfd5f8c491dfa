"""The core stays a library: no GUI toolkit is imported, and it never prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "src" / "cleihc"


def test_core_imports_no_gui_toolkit():
    """Importing every core module (CLI included) in a fresh process loads no Qt, napari, magicgui or vispy."""
    code = (
        "import importlib, pkgutil, sys, cleihc\n"
        "for m in pkgutil.walk_packages(cleihc.__path__, 'cleihc.'):\n"
        "    if m.name.endswith('__main__'): continue\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in "
        "{'napari', 'magicgui', 'vispy', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'superqt'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"GUI modules imported by the core: {out.stdout.strip()}"


def test_library_modules_do_not_print():
    """Only the CLI writes to the terminal; the library logs."""
    offenders = [
        str(p.relative_to(CORE))
        for p in CORE.rglob("*.py")
        if "cli" not in p.relative_to(CORE).parts and "print(" in p.read_text(encoding="utf-8")
    ]
    assert offenders == []
