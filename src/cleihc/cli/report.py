"""``cleihc report``: one self-contained HTML study report over results folders."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="write a self-contained HTML study report",
        description=(
            "Write one HTML file (no network needed to view it) with QC thumbnails, per-stain plots, stain drift "
            "and background per slide, warnings, failures and the table of all metrics (manual corrections "
            "marked). Every figure is also written as PNG and SVG into REPORT_figures/ beside the report."
        ),
    )
    p.add_argument(
        "folders", nargs="+", type=Path, metavar="DIR", help="results folders of `cleihc quantify`"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("report.html"),
        metavar="FILE",
        help="report file (default report.html)",
    )
    p.add_argument(
        "--figures", type=Path, metavar="DIR", help="figure folder (default <report name>_figures beside it)"
    )
    p.add_argument("--title", default="cleihc study report", help="report title")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cleihc.report import build_report

    s = build_report(args.folders, args.out, figures_dir=args.figures, title=args.title)
    print(
        f"report of {s.n_slides} slides ({s.n_failures} failures, {s.n_corrected_rows} corrected rows) written to "
        f"{s.html_path}; {len(s.figures)} figure files beside it"
    )
    return 0
