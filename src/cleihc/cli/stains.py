"""``cleihc stains {estimate, presets}``: measure a slide's stain vectors and glass colour; list the built-ins.

``cleihc stains estimate SLIDE [--protocol NAME] [--regions FILE] [--mpp X] [--write FILE]`` reads the slide at
about 2 µm per pixel, finds the tissue and the glass, and estimates I0 (the glass RGB) and the stain vectors: by
Macenko's method on the tissue (or inside the regions of ``--regions``) read at the protocol's analysis
resolution, or, when every region in the file is named after one of the protocol's stains, from those
single-stain regions ("From ROI", as in Colour Deconvolution 2). A third stain of the protocol keeps its
reference vector. It prints the vectors with their angle to the protocol's reference and, with ``--write``, saves
a copy of the protocol that uses them (refused when a vector is beyond the protocol's drift tolerance, unless
``--force-vectors``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import logging
import math
import re
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
    est.add_argument(
        "--force-vectors",
        action="store_true",
        help="with --write, save the vectors even when one is beyond the protocol's drift_tolerance_deg "
        "(refused otherwise)",
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

    Tissue and I0 are found on the whole slide at about 2 µm/px; Macenko's method then runs on the tissue (or
    region) pixels read at the protocol's analysis resolution (``[analysis] mpp_um``, at most about 4 M pixels,
    see :func:`cleihc.stains.tissue_pixels`), where thin stains such as a membrane ring are not mixed with the
    counterstain. Without a µm/px the whole image is used as read (up to 4096 px on a side).

    Returns
    -------
    dict
        ``protocol`` (the loaded Protocol), ``stains`` (estimated StainMatrix with I0, with every stain of the
        protocol), ``background_rgb``, ``method`` ("macenko" or "regions"), ``angles_deg`` (per estimated
        stain, to the reference), ``kept`` (names of stains whose reference vector was kept, not estimated,
        with the reason), ``pixels`` (number used), ``mpp_um`` (of the pixels the vectors were estimated on,
        or None).
    """
    from cleihc.protocol import load_protocol
    from cleihc.slide import open_slide
    from cleihc.stains import (
        drift_angles,
        estimate_background,
        estimate_from_regions,
        estimate_macenko,
        tissue_pixels,
    )
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
        kept: dict[str, str] = {}
        if masks and set(masks) <= stain_names and len(masks) >= 2:
            # Means of single-stain pixels: mixing at 2 µm/px only adds a little of the other stain to a mean.
            pixels = {name: image[masks[name]] for name in reference.stain_names if name in masks}
            used = sum(len(v) for v in pixels.values())
            estimated = estimate_from_regions(pixels, background=background)
            kept = {n: "no region named after it" for n in reference.stain_names if n not in masks}
            estimated = _complete(estimated, reference)
            method = "regions"
            est_mpp = mpp_um
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
            if mpp_um is not None:
                # Not on the 2 µm/px working image: there a CD3 ring shares each pixel with its nucleus.
                sample = tissue_pixels(slide, where, mask_downsample=ds, mpp_um=proto.analysis.mpp_um)
                est_mpp = float(sum(slide.analysis_resolution(proto.analysis.mpp_um).mpp_um)) / 2.0
            else:
                sample = image[where]
                est_mpp = None
            used = len(sample)
            estimated = estimate_macenko(sample, background=background, reference=reference)
            if len(reference.stain_names) == 3:
                kept = {reference.stain_names[2]: "Macenko's method estimates two stains"}
            method = "macenko"
    return {
        "protocol": proto,
        "stains": estimated,
        "background_rgb": tuple(float(v) for v in background),
        "method": method,
        "angles_deg": {n: a for n, a in drift_angles(estimated, reference).items() if n not in kept},
        "kept": kept,
        "pixels": used,
        "mpp_um": est_mpp,
    }


def _complete(estimated: Any, reference: Any) -> Any:
    """The estimated matrix with the reference's stains in its order; a stain not estimated keeps the
    reference's vector."""
    from cleihc.stains import StainMatrix

    names = reference.stain_names
    vecs = [estimated.vector(n) if n in estimated.names else reference.vector(n) for n in names]
    return StainMatrix(names, np.vstack(vecs), estimated.background_rgb)


def _bump_minor(version: str) -> str:
    core = version.split("+")[0].split("-")[0]
    major, minor, _ = (int(x) for x in core.split("."))
    return f"{major}.{minor + 1}.0"


_NOTE = re.compile(r"\s*\[stain vectors estimated from [^\]]*\]")


def _with_note(description: str, note: str) -> str:
    """`description` with its estimation note replaced by `note` (never one note per run appended)."""
    return f"{_NOTE.sub('', description).strip()} {note}".strip()


def _backup(path: Path) -> Path:
    """Copy `path` beside itself as ``path.<time to the microsecond>[-k].bak``, never replacing a file."""
    stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")
    for k in range(1000):
        bak = path.with_name(f"{path.name}.{stamp}{'' if k == 0 else f'-{k}'}.bak")
        try:
            with open(path, "rb") as src, open(bak, "xb") as dst:  # "x": fails rather than overwrite
                shutil.copyfileobj(src, dst)
        except FileExistsError:
            continue
        shutil.copystat(path, bak)
        return bak
    raise CleihcError(f"cannot find a free backup name for {path}: remove old {path.name}.*.bak files")


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
    print(f"slide:       {args.slide}")
    print(f"protocol:    {proto.name} {proto.version} ({proto.source})")
    print(f"method:      {result['method']} on {result['pixels']} pixels at {mpp_txt}")
    print("background:  I0 = RGB " + " ".join(f"{v:.1f}" for v in result["background_rgb"]))
    tol = proto.stains.drift_tolerance_deg
    beyond = []
    for name in ref.stain_names:
        if name in result["kept"]:
            print(
                f"{name:<18} reference {_fmt(ref.vector(name))} kept, not estimated ({result['kept'][name]})"
            )
            continue
        angle = result["angles_deg"].get(name, math.nan)
        ok = angle <= tol
        if not ok:
            beyond.append(f"{name} {angle:.1f} deg")
        flag = "ok" if ok else f"BEYOND the protocol's {tol:g} deg tolerance"
        print(
            f"{name:<18} estimated {_fmt(est.vector(name))}  reference {_fmt(ref.vector(name))}  "
            f"angle {angle:5.2f} deg  {flag}"
        )
    if args.write:
        from cleihc.io import atomic_write

        if beyond and not args.force_vectors:
            # Vectors this command itself calls suspect are not saved as a protocol unless asked for.
            print(
                f"cleihc stains: error: not writing {args.write}: {', '.join(beyond)} beyond the protocol's "
                f"{tol:g} deg tolerance (wrong slide, stain or protocol?); give --force-vectors to write them "
                "anyway",
                file=sys.stderr,
            )
            return 1
        resolved = proto.resolved(stains=est)
        same = dataclasses.replace(
            resolved,
            version=proto.version,
            description=proto.description,
            background=dataclasses.replace(proto.background, rgb=result["background_rgb"]),
        )
        if same.sha256 == proto.sha256:
            out = same  # the protocol already holds these vectors and I0: nothing to version
        else:
            # No date in the note: the same slide and protocol always give the same file and sha256.
            note = f"[stain vectors estimated from {Path(args.slide).name} ({result['method']})]"
            out = dataclasses.replace(
                same, version=_bump_minor(proto.version), description=_with_note(proto.description, note)
            )
        target = Path(args.write)
        if target.stem != out.name and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", target.stem):
            # Named after its file: `--stain my-cd3` finds it, and its results go to their own folder rather than
            # beside the built-in protocol's (a results folder holds one protocol's results).
            out = dataclasses.replace(out, name=target.stem)
            print(f"named:       {out.name} (after its file; it was {proto.name})")
        text = out.to_toml()
        if target.exists() and target.read_text(encoding="utf-8") == text:
            print(
                f"unchanged:   {args.write} (protocol {out.name} {out.version}, sha256 {out.sha256[:12]}...)"
            )
            return 0
        if target.exists():  # --force: the replaced file stays beside the new one
            bak = _backup(target)
            print(f"kept:        {bak}")
        with atomic_write(args.write, mode="w") as f:
            f.write(text)
        print(f"wrote:       {args.write} (protocol {out.name} {out.version}, sha256 {out.sha256[:12]}...)")
    return 0
