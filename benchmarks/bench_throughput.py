"""Whole-slide throughput and peak memory of `cleihc quantify` (issue 5's benchmark; not a test).

For a synthetic slide (default 40,000 x 30,000 px at 0.5 µm/px, rendered tile by tile into an SVS), in one run:

- the physical floor: decoding every JPEG tile of the tissue (the same tiles the engine reads), one core;
- an area protocol (gag-alcian) serial, and with ``--jobs 2``;
- a cell protocol (cd3) serial, and with ``--jobs 2``;

each as megapixels of tissue per second at analysis resolution, and the peak resident memory of the process
(measured in a child process with ``resource.getrusage``). Run at two sizes to show memory does not grow with the
slide::

    .venv/bin/python benchmarks/bench_throughput.py --width 10000 --height 10000
    .venv/bin/python benchmarks/bench_throughput.py --width 40000 --height 30000

Slides are cached in ``--workdir`` (default /tmp/cleihc-bench) so reruns skip the rendering.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RUNNER = r"""
import json, resource, sys, time
from cleihc.pipeline import quantify
from cleihc.parallel import make_runner
path, stain, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
with make_runner(jobs=jobs) as runner:
    res = quantify(path, stain, runner=runner if jobs > 1 else None)
    seconds = time.perf_counter() - t0
tissue_px = float(res.regions.set_index("region").loc["tissue", "region_area_mm2"]) * 1e6 / res.plan.pixel_area_um2
tiles_s = res.provenance["timings_s"]["tiles_s"]
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": seconds, "tiles_s": tiles_s, "tissue_mp": tissue_px / 1e6, "peak_rss_mb": rss / 1024,
                  "cells": int(len(res.cells))}))
"""

DECODE = r"""
import json, resource, sys, time
import numpy as np
from cleihc.pipeline import plan_slide
from cleihc.slide import open_slide
path = sys.argv[1]
plan = plan_slide(path, "gag-alcian")
t0 = time.perf_counter()
n = 0
with open_slide(path) as s:
    for t in plan.tiles:
        x, y, w, h = t.core_a
        n += s.read_analysis_rect(plan.resolution, (x, y), (w, h)).shape[0] * w
seconds = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "read_mp": n / 1e6, "peak_rss_mb": rss / 1024}))
"""


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"benchmark step failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=40000)
    ap.add_argument("--height", type=int, default=30000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cleihc-bench"))
    ap.add_argument("--skip-cells", action="store_true", help="skip the cell protocol (slow on big slides)")
    args = ap.parse_args()

    from cleihc.synthetic import write_large_synthetic_svs

    args.workdir.mkdir(parents=True, exist_ok=True)
    slides = {}
    for stain in ("gag-alcian",) if args.skip_cells else ("gag-alcian", "cd3"):
        path = args.workdir / f"bench_{stain}_{args.width}x{args.height}.svs"
        if not path.exists():
            t0 = time.perf_counter()
            write_large_synthetic_svs(path, width_px=args.width, height_px=args.height, stain=stain, seed=1)
            print(f"rendered {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        slides[stain] = path

    decode = _child(DECODE, str(slides["gag-alcian"]))
    floor_mps = decode["read_mp"] / decode["seconds"]
    print(f"decode only (tissue tiles, one core): {floor_mps:.0f} MP/s, peak RSS {decode['peak_rss_mb']:.0f} MB")
    rows = []
    for stain in ("gag-alcian", "cd3"):
        if stain == "cd3" and args.skip_cells:
            continue
        for jobs in (1, 2):
            r = _child(RUNNER, str(slides[stain]), stain, str(jobs))
            mps = r["tissue_mp"] / r["tiles_s"]
            rows.append((stain, jobs, mps, r["seconds"], r["peak_rss_mb"]))
            print(
                f"{stain:<11} jobs={jobs}: {mps:7.1f} MP/s of tissue (tiles), {r['seconds']:.1f} s total, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB (process + workers)",
                flush=True,
            )
    print("\nsummary")
    print(f"  slide {args.width} x {args.height} px at 0.5 um/px; decode floor {floor_mps:.0f} MP/s per core")
    for stain, jobs, mps, _, rss in rows:
        ratio = mps / floor_mps
        print(f"  {stain:<11} jobs={jobs}: {mps:7.1f} MP/s = {ratio:.2f} x decode floor; peak RSS {rss:.0f} MB")
    for stain in ("gag-alcian", "cd3"):
        pair = [r for r in rows if r[0] == stain]
        if len(pair) == 2:
            print(f"  {stain}: 2 jobs / 1 job = {pair[1][2] / pair[0][2]:.2f}x")


if __name__ == "__main__":
    main()
