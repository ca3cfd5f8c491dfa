"""Throughput of cleihc.cells.detect_cells on one core (not a test).

Run:  .venv/bin/python benchmarks/bench_cells.py [--size 2048] [--repeat 3] [--steps]

Renders a synthetic CD3 skin tile (cleihc.synthetic.render_skin) and a crowded tile of random cells, deconvolves
each once, then times detect_cells alone (best of --repeat, wall clock and CPU time) and reports megapixels per
second; --steps adds the CPU time of each step (best over the repeats, from cProfile). On a shared machine the
CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import os

# One core: the pipeline parallelises per tile. Set before numpy/numba load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import cProfile  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from cleihc import stains, synthetic  # noqa: E402
from cleihc.cells import CellParams, detect_cells  # noqa: E402


def crowded_rgb(size: int, seed: int = 0) -> np.ndarray:
    """Beer-Lambert tile packed with nuclei (about 1 per 80 µm² at 0.5 µm/px), 40% with DAB rings."""
    rng = np.random.default_rng(seed)
    h_od = np.full((size, size), 0.03, np.float32)
    dab = np.zeros((size, size), np.float32)
    yy, xx = np.mgrid[-12:13, -12:13]
    d = np.hypot(xx, yy)
    for _ in range(size * size // 320):
        x, y = rng.integers(12, size - 12, 2)
        r = rng.uniform(4.5, 7.5)
        sl = (slice(y - 12, y + 13), slice(x - 12, x + 13))
        h_od[sl] = np.maximum(h_od[sl], np.where(d <= r, rng.uniform(0.3, 0.7), 0))
        if rng.random() < 0.4:
            dab[sl] = np.maximum(dab[sl], np.where((d > r) & (d <= r + 3), rng.uniform(0.3, 0.8), 0))
    m = stains.preset("hdab")
    od = h_od[..., None] * m.od_vectors[0] + dab[..., None] * m.od_vectors[1]
    rgb = 255.0 * 10.0 ** (-od) + rng.normal(0, 1.5, od.shape)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def bench(
    name: str, rgb: np.ndarray, matrix: stains.StainMatrix, params: CellParams, repeat: int, steps: bool
) -> None:
    conc = stains.deconvolve(rgb, matrix)
    kw = dict(
        names=matrix.names,
        counterstain="hematoxylin",
        target="dab",
        mpp_um=0.5,
        params=params,
        positive_od=0.1,
        bins_od=(0.1, 0.3, 0.5),
    )
    detect_cells(conc[:256, :256], **kw)  # compile / warm up
    best = best_cpu = np.inf
    step_cpu: dict[str, float] = {}
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        det = detect_cells(conc, **kw)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        if steps:
            prof = cProfile.Profile(time.process_time)
            prof.runcall(detect_cells, conc, **kw)
            for (_, _, func), row in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
                if func.endswith("_kernel") or func.startswith("_"):
                    step_cpu[func] = min(step_cpu.get(func, np.inf), row[2])
    mp = rgb.shape[0] * rgb.shape[1] / 1e6
    print(
        f"{name:>9}: {rgb.shape[1]}x{rgb.shape[0]}, {det.n_cells} cells "
        f"({int(det.table['positive'].sum())} positive): {best * 1e3:.0f} ms = {mp / best:.1f} MP/s wall, "
        f"{best_cpu * 1e3:.0f} ms = {mp / best_cpu:.1f} MP/s CPU (one core)"
    )
    for func, cpu in sorted(step_cpu.items(), key=lambda kv: -kv[1])[:12]:
        if cpu >= 0.0005:
            print(f"{'':>11}{func:<28} {cpu * 1e3:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", action="store_true", help="CPU time of each step (cProfile)")
    args = parser.parse_args()
    print("command:", " ".join([os.path.relpath(sys.executable), *sys.argv]))
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    params = CellParams()
    skin = synthetic.render_skin(stain="cd3", width_px=args.size, height_px=args.size, mpp_um=0.5, seed=1)
    matrix = stains.preset("hdab", background_rgb=tuple(skin.truth["stains"]["background_rgb"]))
    bench("skin cd3", skin.rgb, matrix, params, args.repeat, args.steps)
    bench("crowded", crowded_rgb(args.size), stains.preset("hdab"), params, args.repeat, args.steps)


if __name__ == "__main__":
    main()
