"""``cleihc info PATH... [--json] [--mpp X]``: what cleihc sees in each slide (format, levels, MPP, ...)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cleihc.errors import CleihcError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``info`` subcommand."""
    p = subparsers.add_parser(
        "info",
        help="describe slides: format, backend, size, levels, microns per pixel, associated images",
        description="Describe each slide: format, vendor, backend, dimensions, pyramid levels, microns per pixel "
        "and where it came from, objective, associated images, background colour.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="slide or image files")
    p.add_argument("--json", action="store_true", help="print a JSON list (one object per readable file)")
    p.add_argument(
        "--mpp",
        type=float,
        metavar="UM",
        default=None,
        help="microns per pixel of level 0, overriding the file's value (source 'user')",
    )
    p.set_defaults(func=run)


def _text(info: dict[str, Any]) -> str:
    lines = [info["path"]]
    w, h = info["dimensions"]
    lines.append(f"  format:       {info['format']} (vendor {info['vendor']}, read by {info['backend']})")
    lines.append(f"  dimensions:   {w} x {h} px")
    levels = ", ".join(f"{lv['width']}x{lv['height']} (/{lv['downsample']:.4g})" for lv in info["levels"])
    lines.append(f"  levels:       {len(info['levels'])}: {levels}")
    if info["mpp_x"] is None:
        lines.append("  mpp:          unknown (pass --mpp to set it)")
    else:
        lines.append(
            f"  mpp:          {info['mpp_x']:.6g} x {info['mpp_y']:.6g} um/px ({info['mpp_source']})"
        )
    obj = info["objective_power"]
    lines.append(f"  objective:    {'unknown' if obj is None else f'{obj:g}x'}")
    assoc = ", ".join(f"{a['name']} {a['width']}x{a['height']}" for a in info["associated_images"])
    lines.append(f"  associated:   {assoc or 'none'}")
    bg = info["background_rgb"]
    lines.append(f"  background:   {'not recorded' if bg is None else 'RGB ' + ' '.join(map(str, bg))}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Describe each path; exit 0 if all were read, 1 if any failed (one line each on stderr)."""
    from cleihc.slide import open_slide

    infos: list[dict[str, Any]] = []
    failed = 0
    for path in args.paths:
        try:
            with open_slide(path, mpp=args.mpp) as slide:
                info = slide.info()
        except CleihcError as exc:
            failed += 1
            reason = exc.reason if exc.path else str(exc)
            print(f"cleihc info: error: {path}: {reason}", file=sys.stderr)
            continue
        except Exception as exc:  # a bug or an unforeseen file defect: still one line, never a traceback
            failed += 1
            detail = " ".join(str(exc).split())
            print(
                f"cleihc info: error: {path}: unexpected {type(exc).__name__}: {detail}; please report it",
                file=sys.stderr,
            )
            continue
        infos.append(info)
        if not args.json:
            print(_text(info))
    if args.json:
        print(json.dumps(infos, indent=2))
    return 1 if failed else 0
