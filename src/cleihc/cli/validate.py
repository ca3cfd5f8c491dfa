"""``cleihc validate``: agreement of automated results with reference counts, areas or point annotations."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


def register(sub: Any) -> None:
    p = sub.add_parser(
        "validate",
        help="compare results with reference counts, areas or point annotations",
        description=(
            "Compare a results folder with reference data: a CSV of values per slide and region (metric columns "
            "named as in regions.csv), a CSV or GeoJSON of classified cell points, synthetic <slide>.truth.json "
            "files, or a folder of <slide>.<ext> files. Writes agreement.csv (Bland-Altman bias and limits of "
            "agreement, ICC(2,1) absolute agreement after Shrout & Fleiss 1979 / McGraw & Wong 1996, ICC(3,1), "
            "Lin's CCC), pairs.csv, detection.csv (precision, recall, F1 per class after Hungarian matching) and "
            "PNG + SVG figures."
        ),
    )
    p.add_argument("folder", type=Path, metavar="DIR", help="results folder of `cleihc quantify`")
    p.add_argument("--truth", type=Path, required=True, metavar="PATH", help="reference file or folder")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default DIR/validation)")
    p.add_argument(
        "--radius-um",
        type=float,
        default=4.0,
        metavar="UM",
        help="largest truth-to-detection distance of a match (µm, default 4)",
    )
    p.set_defaults(func=run)


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def run(args: argparse.Namespace) -> int:
    from cleihc.validate import read_truth, validate, write_validation

    if not args.radius_um > 0:
        print(
            "cleihc validate: error: --radius-um must be a positive number of microns, e.g. 4",
            file=sys.stderr,
        )
        return EXIT_USAGE
    truth = read_truth(args.truth)
    result = validate(args.folder, truth, radius_um=args.radius_um)
    out = args.out or (args.folder / "validation")
    written = write_validation(result, out)  # result.warnings were logged (console) as they were found
    a = result.agreement
    if len(a):
        print("metric (region): n, bias [95% limits of agreement], ICC(2,1), CCC")
        for row in a[a["region"] == "all"].itertuples():
            print(
                f"  {row.metric}: n={row.n}, bias {_fmt(row.bias)} [{_fmt(row.loa_lower)}, {_fmt(row.loa_upper)}], "
                f"ICC(2,1) {_fmt(row.icc_2_1)}, CCC {_fmt(row.ccc)}"
            )
    d = result.detection
    if len(d):
        print(f"detection within {args.radius_um:g} µm (all slides): precision, recall, F1")
        for row in d[d["slide"] == "ALL"].itertuples():
            print(
                f"  {row.label}: {_fmt(row.precision)}, {_fmt(row.recall)}, {_fmt(row.f1)} (truth {row.n_truth}, detected {row.n_detected})"
            )
    print(f"{len(written)} files written to {out}")
    return 0
