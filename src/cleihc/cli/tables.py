"""``cleihc tables``: merge results folders into one long tidy table for statistics."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tables",
        help="merge results folders into one tidy table",
        description="Merge the results of several runs (e.g. one per stain) into one long table with columns "
        "subject, timepoint, group, slide, stain, region, metric, value, unit.",
    )
    p.add_argument(
        "folders", nargs="+", type=Path, metavar="DIR", help="results folders of `cleihc quantify`"
    )
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="output .csv or .parquet")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cleihc.io import atomic_path, atomic_write
    from cleihc.tables import tidy

    table = tidy(args.folders)
    if args.out.suffix.lower() == ".parquet":
        with atomic_path(args.out) as tmp:
            table.to_parquet(tmp, index=False)
    else:
        with atomic_write(args.out, mode="w") as f:
            table.to_csv(f, index=False, lineterminator="\n")
    print(f"{len(table)} rows ({table['slide'].nunique() if len(table) else 0} slides) written to {args.out}")
    return 0
