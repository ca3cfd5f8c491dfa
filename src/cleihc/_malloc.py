"""glibc heap tuning: where the engine's memory goes back to the system, and how workers allocate.

Both are no-ops where the C library is not glibc (macOS, musl): there is then nothing to tune.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["one_heap_for_all_threads", "release_free_heap", "restore_adaptive_mmap"]

_M_TRIM_THRESHOLD = -1  # from malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def release_free_heap() -> None:
    """Return the heap's free pages to the system (``malloc_trim(0)``).

    The per-slide steps (tissue, overview, compartments) free a few hundred MB of medium-sized arrays on a big
    slide; glibc keeps them in a heap that the decoder's small blocks pin, so without a trim the memory of a
    finished step stays resident under the next one (about 200 MB at 40,000 x 30,000 px).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def restore_adaptive_mmap() -> None:
    """Let glibc serve tile-sized buffers from its heap (in a Dask worker, again).

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also switches off glibc's adaptive
    mmap threshold: every buffer over 128 KiB is then a fresh ``mmap`` whose pages fault in on first touch, and
    tiles ran 1.3-1.7x slower than in a plain process here. Raising both thresholds restores plain-process speed;
    per-tile memory is bounded by the tile size, so little is left unreturned. A plain process gains too (glibc's
    adaptive threshold still maps the first large buffers fresh): `cleihc quantify` sets it for serial runs, where
    the 10k CD3 slide's tiles took 5.9-6.0 s against 6.35-6.7 s without it.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum on 64-bit systems
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def one_heap_for_all_threads() -> None:
    """Make threads started from now on allocate from the main heap (``M_ARENA_MAX`` = 1).

    The command runs the next slide's planning, the output writers and Dask's client in threads; glibc gives
    each its own arena, whose freed blocks stay resident: with ``--jobs 2`` on four 10k slides the main process
    peaked at 749 MB, 659 MB with one arena, at the same speed (15.1 s serial, 18.0 s with 2 jobs either way).
    Local Dask workers get the same through their environment (:class:`cleihc.parallel.DaskRunner`).
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 1)
