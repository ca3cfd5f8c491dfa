"""The whole `cleihc quantify` command on a folder of slides: wall time and peak memory (issue 5; not a test).

`bench_throughput.py` times `quantify` alone; a study also hashes every slide, plans it and writes its files
(tables, cells, totals archive, mask pyramid, outlines, QC image), and the batch plans the next slide while the
current one is measured. Here the command itself runs on a folder of links to one benchmark slide, serially and
with ``--jobs 2`` in the same run, under a sampler that adds up the resident memory of the command and every
process it starts (Dask's workers included) every 50 ms: the peak of what was held at once.

    .venv/bin/python benchmarks/bench_batch.py --slides 4 --width 10000 --height 10000 --stain gag-alcian
    .venv/bin/python benchmarks/bench_batch.py --slides 1 --width 40000 --height 30000 --stain cd3 --jobs 2
    .venv/bin/python benchmarks/bench_batch.py --slides 4 --stain cd3 --jobs 2 --tile-tasks

``--tile-tasks`` also runs the batch with every slide split into tile tasks (the engine's own entry points with
``DaskRunner(whole_slide_max_px=0)``; the command hands small slides to workers whole), to compare the two.

Slides are cached in ``--workdir`` as by bench_throughput.py (rendering a 40k slide takes about 9 minutes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def run_command(cmd: list[str]) -> tuple[int, float, float]:
    """(exit status, wall seconds, peak simultaneous RSS in MB of the process tree)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
        except psutil.Error:  # a process ended between listing and reading
            pass
        time.sleep(0.05)
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{stderr}")
    return proc.returncode, time.perf_counter() - t0, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=4, help="links to the benchmark slide in the folder")
    ap.add_argument("--width", type=int, default=10000)
    ap.add_argument("--height", type=int, default=10000)
    ap.add_argument("--stain", default="gag-alcian", choices=("gag-alcian", "cd3"))
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cleihc-bench"))
    ap.add_argument("--tile-tasks", action="store_true", help="also run with tile tasks only (jobs > 1)")
    ap.add_argument(
        "--run-tile-tasks", nargs=4, metavar=("FOLDER", "STAIN", "OUT", "JOBS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.run_tile_tasks:
        run_tile_tasks(*args.run_tile_tasks)
        return

    from cleihc.synthetic import write_large_synthetic_svs

    args.workdir.mkdir(parents=True, exist_ok=True)
    slide = args.workdir / f"bench_{args.stain}_{args.width}x{args.height}.svs"
    if not slide.exists():
        t0 = time.perf_counter()
        write_large_synthetic_svs(slide, width_px=args.width, height_px=args.height, stain=args.stain, seed=1)
        print(f"rendered {slide.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="cleihc-bench-batch-") as tmp:
        folder = Path(tmp) / "slides"
        folder.mkdir()
        for k in range(args.slides):
            (folder / f"S{k + 1:02d}_{args.stain}.svs").symlink_to(slide)
        print(f"{args.slides} x {slide.name}, `cleihc quantify {folder} --stain {args.stain}`", flush=True)
        rows = []
        for jobs in args.jobs:
            out = Path(tmp) / f"out-{jobs}"
            cmd = [sys.executable, "-m", "cleihc.cli", "quantify", str(folder), "--stain", args.stain]
            cmd += ["--out", str(out), "--jobs", str(jobs), "--quiet"]
            _, seconds, peak_mb = run_command(cmd)
            rows.append((jobs, seconds, peak_mb))
            print(
                f"  --jobs {jobs}: {seconds:6.1f} s ({seconds / args.slides:.1f} s a slide, start-up included), "
                f"peak RSS of the process tree {peak_mb:.0f} MB",
                flush=True,
            )
            if args.tile_tasks and jobs > 1:
                out = Path(tmp) / f"tiles-{jobs}"
                cmd = [
                    sys.executable,
                    __file__,
                    "--run-tile-tasks",
                    str(folder),
                    args.stain,
                    str(out),
                    str(jobs),
                ]
                _, seconds, peak_mb = run_command(cmd)
                print(
                    f"  --jobs {jobs}, tile tasks only: {seconds:6.1f} s, peak RSS of the process tree {peak_mb:.0f} MB",
                    flush=True,
                )
        if len(rows) > 1:
            print(f"  --jobs {rows[-1][0]} / --jobs {rows[0][0]}: {rows[0][1] / rows[-1][1]:.2f}x")


def run_tile_tasks(folder: str, stain: str, out: str, jobs: str) -> None:
    """What `cleihc quantify FOLDER --stain STAIN --jobs N` does, with no slide handed to a worker whole."""
    from cleihc._malloc import one_heap_for_all_threads
    from cleihc.batch import run_batch
    from cleihc.parallel import DaskRunner
    from cleihc.protocol import load_protocol

    one_heap_for_all_threads()
    with DaskRunner(jobs=int(jobs), whole_slide_max_px=0) as runner:
        summary = run_batch([folder], load_protocol(stain), out_dir=out, runner=runner)
    if summary.failed:
        raise SystemExit(f"failed: {summary.failed}")


if __name__ == "__main__":
    main()
