"""Running the tiles of a slide: in this process, on a local Dask cluster, or on a remote one.

Results never depend on the runner: each tile's result is a pure function of the slide, the plan and the tile,
and :func:`cleihc.pipeline.finalize` sums them in tile order whatever order they arrive in.

Workers open a slide by path and keep it open for the tiles that follow (reopening it per task made reads about
3x slower). A remote cluster (``scheduler="tcp://host:8786"``) therefore needs the slides at the same path on every
worker: shared storage such as NFS or a mounted bucket.

A local cluster also runs small slides whole, one task per slide (:meth:`DaskRunner.map_unordered`, used by
:func:`cleihc.batch.run_batch`): a small slide's tiles take about as long as this process's own share of it
(hashing, planning, summing, writing its files), which would otherwise run beside the workers on the same cores.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

from cleihc._malloc import release_free_heap, restore_adaptive_mmap
from cleihc.slide import Slide, open_slide
from cleihc.tile_engine import SlidePlan, TileResult, iter_tiles, process_tile

__all__ = ["WHOLE_SLIDE_MAX_PX", "DaskRunner", "SerialRunner", "make_runner", "send_message"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

# Per worker process: slides kept open by (path, mpp override), a few at a time.
_OPEN_SLIDES: OrderedDict[tuple[str, Any], Slide] = OrderedDict()
_MAX_OPEN = 4

#: Slides of at most this many analysis pixels (a 10,000 x 10,000 px slide at the analysis resolution) run as one
#: task each on a local cluster. A worker then holds what a serial run holds, plus Dask (550-650 MB at this size),
#: so two workers stay within 1.5 GB; larger slides are split into tile tasks, whose memory does not grow with them.
WHOLE_SLIDE_MAX_PX = 10_000 * 10_000


def _worker_slide(path: str, mpp: Any) -> Slide:
    key = (path, mpp)
    slide = _OPEN_SLIDES.get(key)
    if slide is None:
        slide = open_slide(path, mpp=mpp)
        _OPEN_SLIDES[key] = slide
        while len(_OPEN_SLIDES) > _MAX_OPEN:
            _, old = _OPEN_SLIDES.popitem(last=False)
            old.close()
    else:
        _OPEN_SLIDES.move_to_end(key)
    return slide


def _warm_up() -> None:
    """Import the engine and load its compiled kernels in a worker, before any tile waits for it (seconds)."""
    # What unpickling a plan and the first read import (the protocol's parameter classes, the tissue mask, the
    # slide readers, the JPEG decoder): about 0.5 s that the first slide's first tiles would otherwise wait for.
    import imagecodecs
    import numpy as np

    import cleihc.protocol
    import cleihc.regions
    import cleihc.slide._openslide
    import cleihc.slide._tiff
    import cleihc.tissue  # noqa: F401
    from cleihc.cells import CellParams, detect_cells
    from cleihc.measure import accumulate_area, accumulate_area_rgb
    from cleihc.slide.base import _bin_mean
    from cleihc.stains import concentration, concentrations, deconvolve, preset

    stains = preset("hdab")
    imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(np.zeros((16, 16, 3), np.uint8)))
    rgb = np.full((64, 64, 3), 200, np.uint8)
    _bin_mean(rgb, 2)  # reads binned to the analysis resolution (a 40x scan measured at 0.5 µm/px)
    rgb[20:30, 20:30] = (90, 70, 140)
    conc = deconvolve(rgb, stains)
    concentration(rgb, stains, stain="dab")
    concentrations(rgb, stains, names=("hematoxylin", "dab"))
    accumulate_area(conc[..., 1], location_a=(0, 0), raster_factor=4, bins_od=(0.2, 0.4, 0.6))
    accumulate_area_rgb(rgb, stains, stain="dab", location_a=(0, 0), raster_factor=4, bins_od=(0.2, 0.4, 0.6))
    accumulate_area_rgb(
        rgb[2:, 2:], stains, stain="dab", location_a=(0, 0), raster_factor=4, bins_od=(0.2, 0.4, 0.6)
    )
    detect_cells(
        conc,
        names=stains.names,
        counterstain="hematoxylin",
        target="dab",
        mpp_um=0.5,
        params=CellParams(),
        positive_od=0.2,
        bins_od=(0.2, 0.4, 0.6),
    )


def _fast_alloc_plugin() -> Any:
    """A Dask worker plugin that calls :func:`restore_adaptive_mmap` in every worker, present and future."""
    from distributed import WorkerPlugin  # here: the serial command never imports Dask

    class FastAlloc(WorkerPlugin):
        def setup(self, worker: Any) -> None:
            restore_adaptive_mmap()

    return FastAlloc()


def _run_tiles(plan: SlidePlan, tile_positions: list[int]) -> list[TileResult]:
    """Dask task: a run of neighbouring tiles, with the slide kept open in this worker."""
    slide = _worker_slide(plan.slide_path, plan.mpp_override)
    return [process_tile(slide, plan, plan.tiles[i]) for i in tile_positions]


def _chunks(n_tiles: int, n_workers: int) -> list[list[int]]:
    """Tile positions grouped into runs: a few per worker, so load stays balanced, but several tiles per task.

    A task per tile cost about 25 % more time than a plain loop here (scheduling, messages, the event loop
    competing with the tile), and neighbouring tiles in one task share the reader's decoded-tile cache.
    """
    size = max(1, min(16, -(-n_tiles // (4 * max(1, n_workers)))))
    return [list(range(i, min(i + size, n_tiles))) for i in range(0, n_tiles, size)]


class SerialRunner(AbstractContextManager):
    """Tiles one after another in this process."""

    description = "serial"
    whole_slide_max_px = 0  # slides are never handed out whole: there is no one to hand them to

    def iter_results(self, plan: SlidePlan, *, progress: Progress | None = None) -> Iterator[TileResult]:
        """Yield each tile's result as it is made."""
        for i, res in enumerate(iter_tiles(plan), 1):
            yield res
            if progress is not None:
                progress(i, len(plan.tiles))

    def __exit__(self, *exc: object) -> None:
        return None


class DaskRunner(AbstractContextManager):
    """Tiles as tasks on a Dask distributed cluster.

    Parameters
    ----------
    jobs : int, optional
        Worker processes of a local cluster (one thread each); default one per core.
    scheduler : str, optional
        Address of an existing cluster (``tcp://host:port``); `jobs` is then ignored.
    whole_slide_max_px : int, optional
        On a local cluster, a batch runs slides of at most this many analysis pixels as one task each (their
        files written by the worker); 0 splits every slide into tile tasks. A remote cluster always gets tile
        tasks: its workers may not see the results folder.

    Attributes
    ----------
    whole_slide_max_px : int
        0 for a remote cluster.
    """

    def __init__(
        self,
        *,
        jobs: int | None = None,
        scheduler: str | None = None,
        whole_slide_max_px: int = WHOLE_SLIDE_MAX_PX,
    ):
        from distributed import Client, LocalCluster

        self._cluster = None
        self.whole_slide_max_px = 0 if scheduler else int(whole_slide_max_px)
        if scheduler:
            self.client = Client(scheduler, timeout="30s")
            self.description = f"dask scheduler {scheduler}"
        else:
            import dask

            n = jobs or os.cpu_count() or 1
            # One malloc arena per worker process, set before it starts (glibc reads it once): tasks run in a
            # worker thread, whose own arena made tiles about 8 % slower than in a process's main thread here.
            environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), "MALLOC_ARENA_MAX": "1"}
            # Less bookkeeping on cores the tiles need: no statistical profiler sampling the busy thread every
            # 10 ms, and the memory monitor and event-loop health check once a second / five times a second
            # rather than 10 and 50 times: tiles of the 10k CD3 slide with 2 jobs 3.79 -> 3.57 s (mean of 6).
            quiet = {
                "distributed.worker.profile.enabled": False,
                "distributed.worker.memory.monitor-interval": "1s",
                "distributed.admin.tick.interval": "200ms",
                # A task whose worker dies is tried once more, not three times: here a worker dies of a slide
                # (a reader crashing on a damaged file, memory), and every retry costs a worker restart.
                "distributed.scheduler.allowed-failures": 1,
            }
            # Processes, one thread each: numba kernels and decoders then use every core without the GIL.
            with dask.config.set({"distributed.nanny.pre-spawn-environ": environ, **quiet}):
                self._cluster = LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",  # never clash with a dashboard already on 8787
                    silence_logs=logging.ERROR,
                )
            self.client = Client(self._cluster)
            self.description = f"dask local cluster, {n} worker processes"
        # Every task, tile or whole slide, allocates as fast as serially; a plugin, so that a worker started again
        # after a crash is set up too.
        self.client.register_plugin(_fast_alloc_plugin(), name="cleihc-fast-alloc")
        # Workers import the engine and load its kernels (seconds) while this process finds, hashes and plans the
        # first slide; the first tiles wait for it (they would otherwise wait in turn, one worker idle). A
        # whole-slide task does not wait: it shares the imports under way.
        warm = ThreadPoolExecutor(1, "cleihc-warm-up")
        self._warming: Future[Any] | None = warm.submit(self.client.run, _warm_up)
        warm.shutdown(wait=False)  # the one task still runs; the thread ends with it

    def iter_results(self, plan: SlidePlan, *, progress: Progress | None = None) -> Iterator[TileResult]:
        """Yield tile results as tasks finish (in no fixed order), so the caller folds them without a backlog."""
        from distributed import as_completed

        if not plan.tiles:
            return
        self.ready()
        # Ship the plan to every worker once, not with every task; tiles never need the compartment masks (the
        # bulk of a plan), only finalize does.
        tile_plan = dataclasses.replace(plan, compartment_masks={}, regions=())
        # Keys unique per run (never by content or id()): a key reused while the previous run's futures are being
        # released makes the scheduler drop the new data ("lost dependencies").
        run_id = uuid.uuid4().hex
        [plan_future] = self.client.scatter([tile_plan], broadcast=True, hash=False)
        n_workers = len(self.client.scheduler_info().get("workers", {})) or 1
        chunks = _chunks(len(plan.tiles), n_workers)
        futures = [
            self.client.submit(_run_tiles, plan_future, chunk, key=f"tiles-{run_id}-{k}", pure=False)
            for k, chunk in enumerate(chunks)
        ]
        done = 0
        try:
            for fut in as_completed(futures):
                results = fut.result()
                fut.release()  # the worker may drop it now: results are not kept twice
                for res in results:
                    done += 1
                    yield res
                if progress is not None:
                    progress(done, len(plan.tiles))
            # Idle workers hand their freed tile buffers back (they keep up to 128 MB each for speed, see
            # restore_adaptive_mmap) while this process folds and writes the slide: its peak and theirs then
            # no longer coincide (a 40k CD3 slide with --jobs 2: 1454 -> about 1300 MB for the whole tree).
            self.client.run(release_free_heap)
        finally:
            for fut in futures:
                fut.release()
            plan_future.release()

    def map_unordered(
        self,
        fn: Callable[..., Any],
        calls: Sequence[tuple[Any, ...]],
        *,
        on_message: Callable[[Any], None] | None = None,
    ) -> Iterator[tuple[int, Any, BaseException | None]]:
        """``(k, fn(*calls[k]), None)`` for every call, as its task finishes (in no fixed order), or
        ``(k, None, error)`` for a call that raised or whose worker died (``distributed.KilledWorker``): one
        failing call never stops the others.

        One task per call, each worker taking the next as it frees up. With `on_message`, each call gets one more
        argument, a topic: what the task passes to :func:`send_message` with it reaches ``on_message(msg)``,
        called in this thread while the tasks run (progress from inside a worker). Messages that arrive after
        the last result are dropped.
        """
        from distributed import as_completed

        run_id = uuid.uuid4().hex  # keys unique per run, as in iter_results
        topic = f"cleihc-{run_id}"
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        extra: tuple[str, ...] = ()
        if on_message is not None:
            self.client.subscribe_topic(topic, lambda event: inbox.put(event[1]))  # in the client's thread
            extra = (topic,)
        futures = {
            self.client.submit(fn, *args, *extra, key=f"call-{run_id}-{k}", pure=False): k
            for k, args in enumerate(calls)
        }
        try:
            pending = as_completed(futures)
            while not pending.is_empty():
                while on_message is not None and not inbox.empty():
                    on_message(inbox.get())
                batch = pending.next_batch(block=False)
                if not batch:
                    time.sleep(0.05)
                for fut in batch:
                    try:
                        result, error = fut.result(), None
                    except Exception as exc:  # the call's own error, or KilledWorker
                        result, error = None, exc
                    fut.release()
                    yield futures[fut], result, error
        finally:
            if on_message is not None:
                self.client.unsubscribe_topic(topic)
            for fut in futures:
                fut.release()

    def ready(self) -> None:
        """Wait until every worker has imported the engine and loaded its kernels (raising the error of a worker
        that could not, e.g. without cleihc installed). Tiles wait for this by themselves; a benchmark timing
        tiles calls it first."""
        if self._warming is not None:
            warming, self._warming = self._warming, None
            warming.result()

    def __exit__(self, *exc: object) -> None:
        try:
            self.ready()
        except Exception:  # closing anyway; an error that mattered was met by the tasks
            pass
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def send_message(topic: str, msg: Any) -> None:
    """From a task of :meth:`DaskRunner.map_unordered`, send `msg` (str, numbers, lists of them) to its
    ``on_message``. Delivery goes through the scheduler and is not awaited: for progress, not for results."""
    from distributed import get_worker

    get_worker().log_event(topic, msg)


def make_runner(*, jobs: int | None = None, scheduler: str | None = None) -> SerialRunner | DaskRunner:
    """Serial for ``jobs == 1`` without a scheduler; Dask otherwise."""
    if scheduler is None and (jobs is not None and jobs <= 1):
        return SerialRunner()
    return DaskRunner(jobs=jobs, scheduler=scheduler)
