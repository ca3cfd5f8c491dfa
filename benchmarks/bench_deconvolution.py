"""Colour deconvolution speed on one core: cleihc vs scikit-image vs HistomicsTK, and the cost of one copy.

Run (one core, as the pipeline runs one tile per core):

    NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/bench_deconvolution.py [--size 4096] [--repeat 5]

The tile is the scikit-image IHC sample (../shared/data/skimage_ihc/ihc.png) repeated to the size, or, without
it, a synthetic hematoxylin-DAB image. Every method gets the same uint8 tile; times are the best of `--repeat`
runs after one warm-up (numba compilation excluded). HistomicsTK is optional
(``pip install --no-deps histomicstk large-image cachetools ctk_cli girder-slicer-cli-web``); without it that
row is skipped with a message. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cleihc import stains

REPO = Path(__file__).resolve().parents[1]
IHC = REPO.parent / "shared" / "data" / "skimage_ihc" / "ihc.png"


def make_tile(size: int) -> tuple[np.ndarray, str]:
    if IHC.is_file():
        from skimage import io

        base = io.imread(IHC)[..., :3]
        reps = (-(-size // base.shape[0]), -(-size // base.shape[1]), 1)
        return np.ascontiguousarray(np.tile(base, reps)[:size, :size]), f"{IHC.name} tiled"
    rng = np.random.default_rng(0)
    conc = np.zeros((size, size, 3), np.float32)
    conc[..., 0] = rng.uniform(0, 0.8, (size, size))
    conc[..., 1] = rng.uniform(0, 1.2, (size, size)) * (rng.random((size, size)) < 0.3)
    return stains.recompose(conc, stains.preset("hdab")), "synthetic H-DAB"


def best_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: compilation, page faults of first allocation
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="tile side in pixels (default 4096)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per method; the best is reported")
    args = ap.parse_args(argv)

    rgb, source = make_tile(args.size)
    mpx = rgb.shape[0] * rgb.shape[1] / 1e6
    m = stains.preset("hdab")
    out = np.empty(rgb.shape, np.float32)
    out1 = np.empty(rgb.shape[:2], np.float32)
    bits = np.ones(rgb.shape[:2], np.uint32)

    rows: list[tuple[str, float]] = []
    rows.append(("np.copy of the uint8 tile", best_time(lambda: np.copy(rgb), args.repeat)))
    rows.append(("np.copy of a float32 (H, W, 3) array", best_time(lambda: np.copy(out), args.repeat)))
    rows.append(
        (
            "cleihc deconvolve (out= buffer)",
            best_time(lambda: stains.deconvolve(rgb, m, out=out), args.repeat),
        )
    )
    rows.append(("cleihc deconvolve (allocating)", best_time(lambda: stains.deconvolve(rgb, m), args.repeat)))
    rows.append(
        (
            "cleihc concentration (one stain, out=)",
            best_time(lambda: stains.concentration(rgb, m, stain="dab", out=out1), args.repeat),
        )
    )
    rows.append(
        (
            "cleihc area_counts (1 region, 3 bins)",
            best_time(
                lambda: stains.area_counts(
                    rgb, m, target="dab", region_bits=bits, n_regions=1, thresholds_od=(0.2, 0.4, 0.6)
                ),
                args.repeat,
            ),
        )
    )
    from skimage.color import rgb2hed

    rows.append(("skimage.color.rgb2hed", best_time(lambda: rgb2hed(rgb), max(1, args.repeat // 2))))
    try:
        from histomicstk.preprocessing.color_deconvolution import color_deconvolution

        w = m.od_vectors.T.copy()  # HistomicsTK takes stain vectors as columns
        rows.append(
            (
                "HistomicsTK color_deconvolution",
                best_time(lambda: color_deconvolution(rgb, w, I_0=255), max(1, args.repeat // 2)),
            )
        )
    except ImportError as exc:
        print(f"HistomicsTK not installed ({exc}); skipping it", file=sys.stderr)

    print(f"tile {rgb.shape[1]} x {rgb.shape[0]} px ({mpx:.1f} Mpx, {source}); best of {args.repeat}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, {platform.processor() or platform.machine()}, "
        f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'unset')}"
    )
    t_copy = rows[0][1]
    t_ours = rows[2][1]
    print(f"{'method':<42} {'time (ms)':>10} {'Mpx/s':>9} {'x copy':>7} {'x cleihc':>9}")
    for name, t in rows:
        print(f"{name:<42} {t * 1e3:10.1f} {mpx / t:9.1f} {t / t_copy:7.2f} {t / t_ours:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
