"""Dask runner internals: tile chunks, repeated runs on one cluster, equality with the serial engine, what workers
import."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from cleihc.parallel import DaskRunner, SerialRunner, _chunks
from cleihc.pipeline import finalize, plan_slide
from cleihc_testdata import SAMPLE_IMAGES


@pytest.mark.parametrize(("n_tiles", "n_workers"), [(1, 2), (7, 2), (100, 2), (1000, 2), (5, 8), (64, 1)])
def test_chunks_cover_every_tile_once_in_order(n_tiles, n_workers):
    chunks = _chunks(n_tiles, n_workers)
    assert [i for c in chunks for i in c] == list(range(n_tiles))
    assert max(len(c) for c in chunks) <= 16
    # enough tasks to keep every worker busy to the end
    assert len(chunks) >= min(n_tiles, 4 * n_workers)


def test_dask_runner_runs_a_plan_twice_and_equals_serial():
    # Regression: task and data keys reused between runs made the second run fail ("lost dependencies").
    plan = plan_slide(SAMPLE_IMAGES / "S01_pre_cd3.svs", "cd3", tile_size=512)
    serial = finalize(plan, SerialRunner().iter_results(plan))
    with DaskRunner(jobs=2) as runner:
        runs = [finalize(plan, runner.iter_results(plan)) for _ in range(2)]
        # Whole-slide tasks go through map_unordered: each call's result with its position, or its error.
        assert runner.whole_slide_max_px == 10_000 * 10_000
        got = sorted(runner.map_unordered(divmod, [(7, 2), (1, 0), (1, 1)]), key=lambda r: r[0])
        assert [(k, res) for k, res, _ in got] == [(0, (3, 1)), (1, None), (2, (1, 0))]
        assert [type(err).__name__ for _, _, err in got] == ["NoneType", "ZeroDivisionError", "NoneType"]
        # Messages from inside the tasks reach on_message in this thread while they run (tile progress).
        messages = []

        def square(x, topic):
            __import__("cleihc.parallel").parallel.send_message(topic, [x, x * x])
            __import__("time").sleep(1.0)  # delivery is not awaited: let it arrive before the result
            return x

        results = runner.map_unordered(square, [(2,), (3,)], on_message=messages.append)
        assert sorted(results) == [(0, 2, None), (1, 3, None)]
        assert sorted(messages) == [(2, 4), (3, 9)]
        # Workers run cleihc.tile_engine only: pandas and scikit-image (about 90 MB a process) stay out.
        heavy = runner.client.run(
            lambda: sorted(m for m in ("pandas", "pyarrow", "skimage") if m in sys.modules)
        )
        # One malloc arena, set before each worker process started (a task thread's own arena was 8 % slower).
        arenas = runner.client.run(lambda: os.environ.get("MALLOC_ARENA_MAX"))
        # No statistical profiler sampling the tile thread (about 6 % of 2-job tile time here).
        profiling = runner.client.run(
            lambda: __import__("dask").config.get("distributed.worker.profile.enabled")
        )
        # A call whose worker dies (a reader crashing on a damaged file) fails alone, after one retry; the
        # workers started again are set up as the first were.
        died = list(runner.map_unordered(lambda x: __import__("os")._exit(3) if x else x, [(1,), (0,)]))
        assert sorted((k, res, type(err).__name__) for k, res, err in died) == [
            (0, None, "KilledWorker"),
            (1, 0, "NoneType"),
        ]
        runner.client.wait_for_workers(2)
        again = runner.client.run(lambda: os.environ.get("MALLOC_ARENA_MAX"))
        plugins = runner.client.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert list(again.values()) == ["1", "1"]
    assert all("cleihc-fast-alloc" in names for names in plugins.values())
    assert list(heavy.values()) == [[], []]
    assert list(arenas.values()) == ["1", "1"]
    assert list(profiling.values()) == [False, False]
    for res in runs:
        assert len(res.cells) == len(serial.cells) > 100
        np.testing.assert_array_equal(
            res.cells[["x_px", "y_px"]].to_numpy(), serial.cells[["x_px", "y_px"]].to_numpy()
        )
        np.testing.assert_array_equal(res.raster.bin_px, serial.raster.bin_px)
        np.testing.assert_array_equal(res.raster.positive_od_sum, serial.raster.positive_od_sum)
