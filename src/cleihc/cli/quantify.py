"""``cleihc quantify``: measure slides with a protocol, resumably, serially or on Dask."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cleihc.errors import CleihcError, ResultsFolderError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _say_which_protocol(protocol: Any, *, by_name: bool) -> None:
    """Name the protocol file in run.log; warn when a name found a local file that hides the built-in one."""
    from cleihc.protocol import builtin_protocol

    log = logging.getLogger("cleihc")
    source = Path(protocol.source) if protocol.source else None
    log.info("protocol %s@%s (sha256 %s) from %s", protocol.name, protocol.version, protocol.sha256, source)
    if not by_name or source is None:
        return
    builtin = builtin_protocol(source.stem)
    if builtin is not None and builtin.resolve() != source.resolve():
        log.warning(
            "--stain %s uses %s, not the built-in protocol of that name (a local file comes first); "
            "give --protocol FILE to choose explicitly",
            source.stem,
            source,
        )


def register(sub: Any) -> None:
    p = sub.add_parser(
        "quantify",
        help="measure slides with a protocol (batch, resumable)",
        description=(
            "Measure every slide in INPUT (files, folders searched recursively, globs) with one protocol. "
            "Slides whose results exist for the same input, protocol and cleihc version are skipped."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="slide files, folders or glob patterns")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--stain", metavar="NAME", help="a protocol by name (see `cleihc protocols`), e.g. cxcl10"
    )
    which.add_argument("--protocol", metavar="FILE", help="a protocol TOML file")
    p.add_argument(
        "--out", metavar="DIR", type=Path, help="results folder (default ./cleihc-results/<stain>/)"
    )
    p.add_argument(
        "--regions",
        metavar="PATH",
        help="annotation file, or folder of <slide stem>.geojson/.xml (or <slide file name>.geojson, as QuPath exports)",
    )
    p.add_argument(
        "--samples", metavar="CSV", help="study metadata: a 'slide' column plus subject, timepoint, ..."
    )
    p.add_argument(
        "--name-pattern",
        metavar="PATTERN",
        help='metadata from slide names, e.g. "{subject}_{timepoint}_{stain}"',
    )
    p.add_argument(
        "--mpp", type=float, metavar="X", help="microns per pixel for slides that lack it (never guessed)"
    )
    p.add_argument(
        "--tile-size",
        type=int,
        metavar="PX",
        help="tile size in analysis pixels (results do not depend on it)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        nargs="?",
        const=os.cpu_count() or 1,
        metavar="N",
        help="worker processes on a local Dask cluster; --jobs alone: one per core (default: serial)",
    )
    p.add_argument("--scheduler", metavar="ADDRESS", help="existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    p.add_argument("--force", action="store_true", help="recompute slides whose results are current")
    p.add_argument("--quiet", action="store_true", help="print only the summary and failures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cleihc._malloc import one_heap_for_all_threads, restore_adaptive_mmap
    from cleihc.batch import StudyMetadata, run_batch
    from cleihc.parallel import make_runner
    from cleihc.protocol import load_protocol

    if args.mpp is not None and not args.mpp > 0:
        print(
            "cleihc quantify: error: --mpp must be a positive number of microns per pixel, e.g. --mpp 0.25",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.jobs is not None and args.jobs < 1:
        print("cleihc quantify: error: --jobs must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.tile_size is not None and args.tile_size < 64:
        print("cleihc quantify: error: --tile-size must be at least 64 pixels", file=sys.stderr)
        return EXIT_USAGE
    try:
        protocol = load_protocol(args.protocol or args.stain)
        metadata = StudyMetadata(samples=args.samples, name_pattern=args.name_pattern)
    except CleihcError as exc:
        print(f"cleihc quantify: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = args.out or Path("cleihc-results") / protocol.name
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(
            f"cleihc quantify: error: cannot make the results folder {out} ({exc.strerror}); give another --out",
            file=sys.stderr,
        )
        return EXIT_USAGE
    one_heap_for_all_threads()  # before the look-ahead, writer and Dask threads start
    restore_adaptive_mmap()  # serial tiles allocate as Dask workers do (plugin): 8-10 % faster here
    handler = _attach_run_log(out / "run.log")
    warned = _WarningCount()
    logging.getLogger("cleihc").addHandler(warned)
    display = _Display(quiet=args.quiet)
    untag_console = _tag_console(quiet=args.quiet)  # after the display: its live bars take stderr
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    t0 = time.perf_counter()
    try:
        with make_runner(jobs=args.jobs or 1, scheduler=args.scheduler) as runner:
            logging.getLogger("cleihc").info("runner: %s", getattr(runner, "description", "serial"))
            _say_which_protocol(protocol, by_name=args.protocol is None)
            summary = run_batch(
                args.inputs,
                protocol,
                out_dir=out,
                regions=args.regions,
                metadata=metadata,
                mpp=args.mpp,
                tile_size=args.tile_size,
                runner=runner,
                force=args.force,
                arguments=arguments,
                on_event=display.event,
            )
    except ResultsFolderError as exc:
        print(f"cleihc quantify: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # e.g. a Dask scheduler that cannot be reached
        print(f"cleihc quantify: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        display.close()
        untag_console()
        logging.getLogger("cleihc").removeHandler(handler)
        logging.getLogger("cleihc").removeHandler(warned)
        handler.close()
    for o in summary.failed:
        print(f"cleihc quantify: failed: {o.path}: {o.reason}", file=sys.stderr)
    # Warnings scroll by in an overnight run (or stay in run.log with --quiet): the summary counts them.
    noted = f"; {warned.describe()}, see run.log" if warned.count else ""
    print(
        f"{summary.count('done')} done, {summary.count('skipped')} skipped, {summary.count('failed')} failed "
        f"in {time.perf_counter() - t0:.1f} s; results in {out}/{noted}"
    )
    return EXIT_FAILED if summary.failed else EXIT_OK


def _attach_run_log(path: Path) -> logging.Handler:
    from cleihc.batch import SlideLogFilter

    handler = logging.FileHandler(path, encoding="utf-8")
    # [slide]: the next slide is planned while the current one is measured, so lines say which one they are about.
    handler.addFilter(SlideLogFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(slide)s]: %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("cleihc")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


class _WarningCount(logging.Handler):
    """Counts the run's warnings and the slides they are about."""

    def __init__(self) -> None:
        from cleihc.batch import SlideLogFilter

        super().__init__(logging.WARNING)
        self.addFilter(SlideLogFilter())
        self.count = 0
        self.slides: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if getattr(record, "slide", "-") != "-":
            self.slides.add(record.slide)

    def describe(self) -> str:
        about = f" about {len(self.slides)} slide{'s' * (len(self.slides) != 1)}" if self.slides else ""
        return f"{self.count} warning{'s' * (self.count != 1)}{about}"


def _tag_console(*, quiet: bool) -> Callable[[], None]:
    """Console log lines name their slide too (planning runs ahead, and warnings come from workers), and with
    --quiet only errors show (warnings stay in run.log); returns the function that puts the console handlers
    back as they were."""
    from cleihc.batch import SlideLogFilter

    tagger = SlideLogFilter()
    fmt = logging.Formatter("%(levelname)s %(name)s [%(slide)s]: %(message)s")
    saved = [(h, h.formatter, h.level, getattr(h, "stream", None)) for h in logging.getLogger().handlers]
    for h, _, level, stream in saved:
        h.addFilter(tagger)
        h.setFormatter(fmt)
        if quiet:
            h.setLevel(max(level, logging.ERROR))
        if isinstance(h, logging.StreamHandler) and stream is sys.__stderr__ and sys.stderr is not stream:
            # rich's live bars redirect sys.stderr so that lines print above them; written to the terminal
            # directly, a warning landed on a bar's line and the next redraw erased it.
            h.setStream(sys.stderr)

    def untag() -> None:
        for h, f, level, stream in saved:
            h.removeFilter(tagger)
            h.setFormatter(f)
            h.setLevel(level)
            if isinstance(h, logging.StreamHandler) and stream is not None:
                h.setStream(stream)

    return untag


class _Display:
    """Progress: rich bars on a terminal, plain lines otherwise, nothing but the summary with --quiet."""

    def __init__(self, *, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._progress = None
        self._slides_task = None
        self._tile_tasks: dict[str, Any] = {}  # a bar per slide being measured (several with --jobs)
        self._n = 0
        if not quiet and self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=False,
            )
            self._progress.start()
            self._slides_task = self._progress.add_task("slides", total=None)

    def event(self, e: Any) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            from rich.markup import escape

            if e.kind == "batch_start":
                self._progress.update(self._slides_task, total=e.total)
            elif e.kind == "slide_start" and e.slide not in self._tile_tasks:
                # Names and reasons are text, not rich markup: "[Errno 5]" or "[/data]" would be read as tags.
                self._tile_tasks[e.slide] = self._progress.add_task(f"  {escape(e.slide)}", total=None)
            elif e.kind == "tile" and e.slide in self._tile_tasks:
                self._progress.update(self._tile_tasks[e.slide], completed=e.done, total=e.total)
            elif e.kind == "slide_done":
                if e.slide in self._tile_tasks:
                    self._progress.remove_task(self._tile_tasks.pop(e.slide))
                self._n += 1
                self._progress.update(self._slides_task, completed=self._n)
                if e.status == "failed":
                    self._progress.console.print(f"[red]failed[/red] {escape(e.slide)}: {escape(e.message)}")
        elif e.kind == "slide_done":
            tail = f": {e.message}" if e.message else ""
            print(f"{e.status:>7} {e.slide}{tail}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
