"""Whole-slide throughput and peak memory of `cleihc quantify` (issue 5's benchmark; not a test).

For a synthetic slide (default 40,000 x 30,000 px at 0.5 µm/px, rendered tile by tile into an SVS), in one run:

- the physical floor: decoding, with imagecodecs and nothing else, every JPEG tile under the tiles the engine
  reads (each once), one core;
- an area protocol (gag-alcian) serial, and with ``--jobs 2``;
- a cell protocol (cd3) serial, and with ``--jobs 2``;

each as megapixels of tissue per second at analysis resolution, and the peak resident memory of the process
and its Dask workers together (the sum of each process's own peak, VmHWM: an upper bound). Run at two sizes to
compare memory as the slide grows::

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
import json, os, sys, time
import psutil
from cleihc.pipeline import quantify
from cleihc._malloc import restore_adaptive_mmap
from cleihc.parallel import _warm_up, make_runner


def peak_mb(pid):
    # VmHWM: the process's own peak resident set (Linux), read before the process exits.
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def main():
    path, stain, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if jobs == 1:  # compiled kernels loaded (or compiled, after an edit) before the clock, as in the workers;
        _warm_up()  # with Dask, this process only plans and folds, as in `cleihc quantify --jobs N`
        restore_adaptive_mmap()  # as `cleihc quantify` sets it for its serial tiles
    t0 = time.perf_counter()
    with make_runner(jobs=jobs) as runner:
        if jobs > 1:  # the workers' imports and kernels, as _warm_up above: not in the tiles' time
            runner.ready()
        res = quantify(path, stain, runner=runner if jobs > 1 else None)
        seconds = time.perf_counter() - t0
        # Sum of every process's own peak (this one, Dask's nannies and workers): an upper bound of the memory
        # the run held at once (getrusage would report only the largest child).
        peak = 0.0
        for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            try:
                peak += peak_mb(p.pid)
            except (OSError, StopIteration, psutil.Error):
                pass
    tissue_px = float(res.regions.set_index("region").loc["tissue", "region_area_mm2"]) * 1e6 / res.plan.pixel_area_um2
    tiles_s = res.provenance["timings_s"]["tiles_s"]
    print(json.dumps({"seconds": seconds, "tiles_s": tiles_s, "tissue_mp": tissue_px / 1e6,
                      "peak_rss_mb": peak, "cells": int(len(res.cells))}))


if __name__ == "__main__":
    main()
"""

DECODE = r"""
import json, resource, sys, time
import tifffile
from cleihc.pipeline import plan_slide
path, stain = sys.argv[1], sys.argv[2]
plan = plan_slide(path, stain)
f, level = int(plan.resolution.factor), plan.resolution.level
with tifffile.TiffFile(path) as tf:
    page = tf.series[0].levels[level].pages[0]
    th, tw = page.tilelength, page.tilewidth
    nx = -(-page.imagewidth // tw)
    # every JPEG tile under the tiles the engine reads (halos included), each once
    wanted = set()
    for t in plan.tiles:
        x, y, w, h = (v * f for v in t.halo_a)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, page.imagewidth), min(y + h, page.imagelength)
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                wanted.add(ty * nx + tx)
    fh = tf.filehandle
    data = []
    for i in sorted(wanted):
        fh.seek(page.dataoffsets[i])
        data.append((i, fh.read(page.databytecounts[i])))
    decode = page.decode
    t0 = time.perf_counter()
    for i, d in data:
        decode(d, i, jpegtables=page.jpegtables)
    seconds = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "tiles": len(data), "read_mp": len(data) * th * tw / f**2 / 1e6,
                  "peak_rss_mb": rss / 1024}))
"""


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False
    )
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

    floors = {}
    rows = []
    for stain in slides:
        d = _child(DECODE, str(slides[stain]), stain)
        floors[stain] = d
        print(
            f"decode only, {stain} slide: {d['tiles']} JPEG tiles ({d['read_mp']:.0f} MP at analysis resolution) "
            f"in {d['seconds']:.1f} s, one core",
            flush=True,
        )
        for jobs in (1, 2):
            r = _child(RUNNER, str(slides[stain]), stain, str(jobs))
            mps = r["tissue_mp"] / r["tiles_s"]
            floor_mps = r["tissue_mp"] / d["seconds"]
            rows.append((stain, jobs, mps, floor_mps, r["peak_rss_mb"]))
            print(
                f"{stain:<11} jobs={jobs}: {mps:7.1f} MP/s of tissue (tiles), {r['seconds']:.1f} s total, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB (process + workers)",
                flush=True,
            )
    print(
        "\nsummary (MP of tissue per second at analysis resolution; the floor is the time to decode the same"
    )
    print("JPEG tiles alone, expressed for the same tissue)")
    print(f"  slide {args.width} x {args.height} px at 0.5 um/px")
    for stain, jobs, mps, floor_mps, rss in rows:
        per_core = mps / jobs
        print(
            f"  {stain:<11} jobs={jobs}: {mps:7.1f} MP/s ({per_core:.1f} per core) = {mps / floor_mps:.2f} x the "
            f"decode floor ({floor_mps:.0f} MP/s); peak RSS {rss:.0f} MB"
        )
    for stain in slides:
        pair = [r for r in rows if r[0] == stain]
        if len(pair) == 2:
            print(f"  {stain}: 2 jobs / 1 job = {pair[1][2] / pair[0][2]:.2f}x")


if __name__ == "__main__":
    main()
