"""``cleihc stains {estimate, presets}``: measure a slide's stain vectors and glass colour; list the built-ins.

``cleihc stains estimate SLIDE [--protocol NAME] [--regions FILE] [--mpp X] [--write FILE]`` reads the slide at
about 2 µm per pixel, finds the tissue and the glass, and estimates I0 (the glass RGB) and the two stain vectors:
by Macenko's method on the tissue (or inside the regions of ``--regions``), or, when every region in the file is
named after one of the protocol's stains, from those single-stain regions ("From ROI", as in Colour
Deconvolution 2). It prints the vectors with their angle to the protocol's reference and, with ``--write``, saves
a copy of the protocol that uses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cleihc.errors import CleihcError

__all__ = ["estimate_for_slide", "register", "run"]

logger = logging.getLogger(__name__)

ESTIMATE_MPP_UM = 2.0  # fine enough to separate nuclei from stroma, small enough to hold a biopsy in memory
MAX_SIDE_PX = 8192  # cap on the working image's side (very large slides are read coarser)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``stains`` subcommand."""
    p = subparsers.add_parser(
        "stains",
        help="estimate a slide's stain vectors and glass colour, or list the built-in stain presets",
        description="'estimate SLIDE': estimate I0 and the stain vectors of a slide (Macenko on the tissue, or "
        "from single-stain regions) and compare them with a protocol's; '--write FILE' saves a protocol using "
        "them. 'presets': the built-in stain vectors and their sources.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    est = sub.add_parser("estimate", help="estimate a slide's stain vectors and I0")
    est.add_argument("slide", metavar="SLIDE", help="slide or image file")
    est.add_argument(
        "--protocol",
        default="cd3",
        metavar="NAME",
        help="protocol giving the reference stains and tissue settings (default: cd3, hematoxylin + DAB)",
    )
    est.add_argument(
        "--regions",
        metavar="FILE",
        default=None,
        help="annotation file (GeoJSON/ImageScope/ASAP): estimate inside its regions; regions named after the "
        "protocol's stains (e.g. 'dab', 'hematoxylin') give single-stain 'From ROI' vectors",
    )
    est.add_argument("--mpp", type=float, metavar="UM", default=None, help="microns per pixel of level 0")
    est.add_argument(
        "--write", metavar="FILE", default=None, help="save a protocol that uses the estimated vectors"
    )
    est.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --write file (the old one is kept beside it, as FILE.<time>.bak)",
    )
    sub.add_parser("presets", help="list the built-in stain presets and their vectors")
    p.set_defaults(func=run)


def _working_image(slide: Any) -> tuple[np.ndarray, float, float | None]:
    """The whole slide at about ESTIMATE_MPP_UM (capped at MAX_SIDE_PX): image, downsample, µm per pixel."""
    w0, h0 = slide.dimensions
    if slide.has_mpp:
        mpp0 = float(sum(slide.mpp)) / 2.0
        ds = max(1.0, ESTIMATE_MPP_UM / mpp0, max(w0, h0) / MAX_SIDE_PX)
    else:
        mpp0 = None
        ds = max(1.0, max(w0, h0) / 4096)
    tw, th = max(1, round(w0 / ds)), max(1, round(h0 / ds))
    image = slide.get_thumbnail((tw, th))
    ds_eff = w0 / image.shape[1]
    return image, ds_eff, None if mpp0 is None else mpp0 * ds_eff


def _region_masks(path: str, shape_hw: tuple[int, int], downsample: float) -> dict[str, np.ndarray]:
    from cleihc.geometry import rasterize
    from cleihc.regions import read_regions

    masks = {}
    for region in read_regions(path):
        masks[region.name] = rasterize(
            region.geometry, shape=(shape_hw[1], shape_hw[0]), downsample=downsample
        )
    return masks


def estimate_for_slide(
    slide_path: str | Path,
    *,
    protocol: str | Path = "cd3",
    regions: str | Path | None = None,
    mpp: float | None = None,
) -> dict[str, Any]:
    """Estimate I0 and stain vectors of a slide against a protocol's reference (the work behind the command).

    Returns
    -------
    dict
        ``protocol`` (the loaded Protocol), ``stains`` (estimated StainMatrix with I0), ``background_rgb``,
        ``method`` ("macenko" or "regions"), ``angles_deg`` (per stain, to the reference), ``pixels`` (number
        used), ``mpp_um`` (of the working image, or None).
    """
    from cleihc.protocol import load_protocol
    from cleihc.slide import open_slide
    from cleihc.stains import drift_angles, estimate_background, estimate_from_regions, estimate_macenko
    from cleihc.tissue import detect_tissue

    proto = load_protocol(protocol)
    reference = proto.stains.matrix
    with open_slide(slide_path, mpp=mpp) as slide:
        image, ds, mpp_um = _working_image(slide)
        vendor_bg = slide.background_rgb
    tissue = None
    if mpp_um is not None:
        tm = detect_tissue(image, mpp_um=mpp_um, params=proto.tissue, fill_rgb=vendor_bg, downsample=ds)
        if tm.mask.shape == image.shape[:2] and tm.mask.any():
            tissue = np.asarray(tm.mask)
    else:
        logger.warning(
            "%s: no microns per pixel (give --mpp); using the whole image without tissue detection",
            slide_path,
        )
    background = estimate_background(image, tissue_mask=tissue, fallback=proto.background.rgb)
    masks = _region_masks(str(regions), image.shape[:2], ds) if regions is not None else {}
    stain_names = set(reference.stain_names)
    if masks and set(masks) <= stain_names and len(masks) >= 2:
        pixels = {name: image[masks[name]] for name in reference.stain_names if name in masks}
        used = sum(len(v) for v in pixels.values())
        estimated = estimate_from_regions(pixels, background=background)
        if len(pixels) == 2 and len(reference.stain_names) == 2:
            estimated = _reorder(estimated, reference)
        method = "regions"
    else:
        if masks:
            where = np.zeros(image.shape[:2], bool)
            for m in masks.values():
                where |= m
        elif tissue is not None:
            where = tissue
        else:
            where = np.ones(image.shape[:2], bool)
        if not where.any():
            raise CleihcError(
                "the regions cover no pixel of the slide; check the annotation file", path=regions
            )
        used = int(where.sum())
        estimated = estimate_macenko(image[where], background=background, reference=reference)
        method = "macenko"
    return {
        "protocol": proto,
        "stains": estimated,
        "background_rgb": tuple(float(v) for v in background),
        "method": method,
        "angles_deg": drift_angles(estimated, reference),
        "pixels": used,
        "mpp_um": mpp_um,
    }


def _reorder(estimated: Any, reference: Any) -> Any:
    """The estimated matrix with its stains in the reference's order."""
    from cleihc.stains import StainMatrix

    names = reference.stain_names
    return StainMatrix(names, np.vstack([estimated.vector(n) for n in names]), estimated.background_rgb)


def _bump_minor(version: str) -> str:
    core = version.split("+")[0].split("-")[0]
    major, minor, _ = (int(x) for x in core.split("."))
    return f"{major}.{minor + 1}.0"


def _fmt(v: Any) -> str:
    return "[" + ", ".join(f"{x:.4f}" for x in v) + "]"


def run(args: argparse.Namespace) -> int:
    """Run ``stains estimate`` or ``stains presets``."""
    if args.action == "presets":
        from cleihc.stains import available_presets, preset

        for name in available_presets():
            m = preset(name)
            vecs = "  ".join(f"{n} {_fmt(m.vector(n))}" for n in m.stain_names)
            print(f"{name:<20} {vecs}")
        print("sources: see STAIN_VECTORS in cleihc.stains and docs/stains.md")
        return 0

    if args.write and Path(args.write).exists() and not args.force:
        # Likely a protocol someone edited by hand: never replaced without being asked.
        print(
            f"cleihc stains: error: {args.write} exists; give another --write file, or --force to replace it "
            f"(the old one is kept beside it as {Path(args.write).name}.<time>.bak)",
            file=sys.stderr,
        )
        return 2
    result = estimate_for_slide(args.slide, protocol=args.protocol, regions=args.regions, mpp=args.mpp)
    proto = result["protocol"]
    est = result["stains"]
    ref = proto.stains.matrix
    mpp_txt = "unknown µm/px" if result["mpp_um"] is None else f"{result['mpp_um']:.3g} µm/px"
    print(f"slide:       {args.slide} (read at {mpp_txt})")
    print(f"protocol:    {proto.name} {proto.version} ({proto.source})")
    print(f"method:      {result['method']} on {result['pixels']} pixels")
    print("background:  I0 = RGB " + " ".join(f"{v:.1f}" for v in result["background_rgb"]))
    tol = proto.stains.drift_tolerance_deg
    for name in ref.stain_names:
        angle = result["angles_deg"].get(name, math.nan)
        flag = "ok" if angle <= tol else f"BEYOND the protocol's {tol:g} deg tolerance"
        print(
            f"{name:<18} estimated {_fmt(est.vector(name))}  reference {_fmt(ref.vector(name))}  "
            f"angle {angle:5.2f} deg  {flag}"
        )
    if args.write:
        from cleihc.io import atomic_write

        resolved = proto.resolved(stains=est)
        today = _dt.date.today().isoformat()
        out = dataclasses.replace(
            resolved,
            version=_bump_minor(proto.version),
            description=f"{proto.description} [stain vectors estimated from {Path(args.slide).name} "
            f"({result['method']}) on {today}]".strip(),
            background=dataclasses.replace(proto.background, rgb=result["background_rgb"]),
        )
        if Path(args.write).exists():  # --force: the replaced file stays beside the new one
            stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
            shutil.copy2(args.write, f"{args.write}.{stamp}.bak")
        with atomic_write(args.write, mode="w") as f:
            f.write(out.to_toml())
        print(f"wrote:       {args.write} (protocol {out.name} {out.version}, sha256 {out.sha256[:12]}...)")
    return 0
