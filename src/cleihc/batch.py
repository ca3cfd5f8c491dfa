"""Study runs: many slides, one protocol, resumable, one bad slide never stops the rest.

:func:`run_batch` finds the slides, skips those whose results already exist for the same input (sha256),
protocol (sha256) and cleihc version, measures the others (serially or on Dask), writes each slide's outputs
atomically, records failures with a one-line reason, and rebuilds the combined tables from the per-slide records.
It reports what happens through an ``on_event`` callback; it never prints.
"""

from __future__ import annotations

import contextvars
import csv
import glob
import io
import json
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cleihc import __version__
from cleihc.corrections import apply_saved_corrections, corrections_path
from cleihc.errors import CleihcError, SlideNotFoundError
from cleihc.io import atomic_write, read_user_csv, sha256_file
from cleihc.outputs import (
    check_results_folder,
    read_slide_records,
    rebuild_tables,
    results_folder_lock,
    write_json,
    write_slide_outputs,
)
from cleihc.pipeline import SlidePlan, measure_plan, plan_slide, slide_stem
from cleihc.protocol import Protocol
from cleihc.regions import regions_file_for_slide
from cleihc.slide import is_slide, open_slide
from cleihc.tables import mixed_protocols

__all__ = [
    "BatchSummary",
    "Event",
    "SlideLogFilter",
    "SlideOutcome",
    "StudyMetadata",
    "discover_slides",
    "is_results_folder",
    "run_batch",
]

log = logging.getLogger(__name__)

#: The slide whose work a log record belongs to: set by run_batch in whichever thread works on that slide.
_CURRENT_SLIDE: contextvars.ContextVar[str] = contextvars.ContextVar("cleihc_slide", default="-")


class SlideLogFilter(logging.Filter):
    """Adds ``record.slide``: the stem of the slide a batch was working on when the record was made, else "-".

    A batch plans the next slide in a second thread while it measures the current one, so a run log says which
    slide each line is about through this (``%(slide)s`` in the handler's format).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.slide = _CURRENT_SLIDE.get()
        return True


#: Sidecar files that sit next to slides and are not slides themselves.
_SIDECAR_SUFFIXES = (".json", ".geojson", ".xml", ".csv", ".md", ".txt", ".toml", ".parquet", ".npz", ".log")


#: Extensions of slides and images: such a file that cannot be read is a failure, not something to pass over.
_SLIDE_SUFFIXES = frozenset(
    ".svs .tif .tiff .ndpi .vms .vmu .mrxs .scn .bif .svslide .dcm .png .jpg .jpeg .btf .qptiff".split()
)


@dataclass(frozen=True)
class Event:
    """Something a progress display may show: ``kind`` in batch_start (with the number of slides in ``total``),
    slide_start, tile (``done`` of ``total`` tiles), slide_done (with ``status`` and ``message``)."""

    kind: str
    slide: str = ""
    done: int = 0
    total: int = 0
    status: str = ""
    message: str = ""


@dataclass(frozen=True)
class SlideOutcome:
    """What happened to one input: status ``done``, ``skipped`` or ``failed``, with a one-line reason."""

    slide: str
    path: str
    status: str
    reason: str = ""
    seconds: float = 0.0


@dataclass
class BatchSummary:
    """The outcome of a run."""

    out_dir: Path
    outcomes: list[SlideOutcome] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def is_results_folder(path: str | os.PathLike[str]) -> bool:
    """Whether a folder holds cleihc results (``run.json``, or the ``masks`` and ``qc`` folders a run writes first).

    Its masks are pyramidal OME-TIFFs and its QC images PNGs: searched as inputs, they would pass for slides.
    """
    p = Path(path)
    return (p / "run.json").is_file() or ((p / "masks").is_dir() and (p / "qc").is_dir())


def _holds_outputs(folder: Path, skip: set[Path]) -> bool:
    """This run's results folder (`skip`, maybe still empty) or any other results folder."""
    return folder.resolve() in skip or is_results_folder(folder)


def _files_under(folder: Path, skip: set[Path]) -> list[Path]:
    """Every file under `folder` (sorted), passing over hidden files and folders, results folders, QuPath
    projects and `skip`."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        keep = []
        for d in dirs:
            sub = here / d
            if d.startswith("."):
                continue
            if _holds_outputs(sub, skip):
                log.info("%s: a cleihc results folder, not searched for slides", sub)
                continue
            if (sub / "project.qpproj").is_file():  # its thumbnails are JPEGs, not slides
                log.info("%s: a QuPath project, not searched for slides", sub)
                continue
            keep.append(d)
        dirs[:] = keep
        found.extend(here / f for f in files if not f.startswith("."))
    return sorted(found)


def _in_results_folder(path: Path, skip: set[Path]) -> bool:
    """Whether a file is one of a run's outputs (they sit one folder down in a results folder: masks/, qc/...)."""
    return _holds_outputs(path.parent, skip) or _holds_outputs(path.parent.parent, skip)


def discover_slides(
    inputs: Sequence[str], *, exclude: Sequence[str | os.PathLike[str]] = ()
) -> tuple[list[Path], list[SlideOutcome]]:
    """Expand files, folders (recursively, slides recognised by content) and globs into slide paths.

    Returns the slides (sorted, deduplicated) and a failure for each named input that is missing or not a slide.
    Files met inside folders that are not slides (sidecars, notes) are passed over silently, and so are hidden
    files and folders, cleihc results folders (:func:`is_results_folder`), QuPath projects (``project.qpproj``)
    and the folders in `exclude` (this run's results folder, which may still be empty).
    """
    skip = {Path(e).resolve() for e in exclude}
    slides: dict[Path, None] = {}
    failures: list[SlideOutcome] = []
    empty_patterns: list[str] = []

    def fail(path: str, reason: str) -> None:
        failures.append(SlideOutcome(slide_stem(path), str(path), "failed", reason))

    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches:
            empty_patterns.append(item)
            continue
        globbed = len(matches) > 1 or matches[0] != item
        for m in matches:
            p = Path(m)
            if globbed and p.is_file() and (p.name.lower().endswith(_SIDECAR_SUFFIXES) or not is_slide(p)):
                continue  # a pattern also catches sidecars and notes: pass them over, as in folders
            if globbed and p.is_file() and _in_results_folder(p, skip):
                continue  # "**/*.tif" also reaches the masks of earlier runs: not slides, as in folders
            if p.is_dir() and is_results_folder(p):
                fail(m, "a cleihc results folder, not slides: give the folder of the slides")
            elif p.is_dir():
                for f in _files_under(p, skip):
                    if f.is_file() and not f.name.lower().endswith(_SIDECAR_SUFFIXES):
                        if is_slide(f):
                            slides[f] = None
                        elif f.suffix.lower() in _SLIDE_SUFFIXES:
                            # Named like a slide but unreadable: the user expects it measured, so say why not.
                            fail(
                                str(f),
                                "not a slide or image that cleihc reads (check the file; `cleihc info` tells more)",
                            )
            elif p.is_file():
                if is_slide(p):
                    slides[p] = None
                else:
                    fail(
                        m, "not a slide or image that cleihc reads (see `cleihc info` for supported formats)"
                    )
            else:
                fail(m, "no such file or folder")
    for item in empty_patterns:
        # One pattern of several finding nothing is normal (e.g. no OME-TIFFs); all finding nothing is an error.
        if slides:
            log.warning("no file matches %s", item)
        else:
            fail(item, "no file matches this pattern")
    return list(slides), failures


class StudyMetadata:
    """Study columns (subject, timepoint, group, ...) for each slide, from a samples CSV or a name pattern.

    Parameters
    ----------
    samples : path, optional
        CSV with a ``slide`` column (slide stem or file name) and any metadata columns.
    name_pattern : str, optional
        Like ``"{subject}_{timepoint}_{stain}"``: fields parsed from the slide stem.
    """

    def __init__(self, *, samples: str | os.PathLike[str] | None = None, name_pattern: str | None = None):
        self.columns: list[str] = []
        self._table: dict[str, dict[str, str]] = {}
        self._regex: re.Pattern[str] | None = None
        self._samples_name = None if samples is None else Path(samples).name
        self._pattern = name_pattern
        if samples is not None:
            self._read_samples(Path(samples))
        if name_pattern:
            self._regex = self._compile(name_pattern)
            for name in self._regex.groupindex:
                if name not in self.columns:
                    self.columns.append(name)
        self._refuse_reserved(samples, name_pattern)

    def _refuse_reserved(self, samples: Any, name_pattern: str | None) -> None:
        """A study column named like one of cleihc's own (``region``, ``value``, a metric) would overwrite it or
        break the long table: refused before any slide is measured."""
        reserved = _reserved_columns() - {"stain"}  # a study's own stain name is kept as stain_label
        for name in self.columns:
            if name in reserved:
                where = (
                    f"--name-pattern {name_pattern!r} has the field {{{name}}}"
                    if name_pattern and self._regex is not None and name in self._regex.groupindex
                    else f"the samples CSV {Path(samples).name} has a column {name!r}"
                )
                raise CleihcError(
                    f"{where}, which is one of cleihc's own column names; rename it (e.g. {name}_label)"
                )

    def _read_samples(self, path: Path) -> None:
        try:
            df = read_user_csv(path, dtype=str, keep_default_na=False)
        except FileNotFoundError:
            raise SlideNotFoundError("samples file not found; check the --samples path", path=path) from None
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise CleihcError(
                f"cannot read the samples CSV ({exc}); save it as UTF-8 CSV", path=path
            ) from None
        if "slide" not in df.columns:
            raise CleihcError(
                f"the samples CSV needs a 'slide' column (found: {', '.join(df.columns)})", path=path
            )
        self.columns = [c for c in df.columns if c != "slide"]
        for row in df.to_dict(orient="records"):
            key = slide_stem(row.pop("slide").strip())
            if key in self._table:  # which row would win is a guess: the user says
                raise CleihcError(f"slide {key!r} has two rows in the samples CSV; keep one", path=path)
            self._table[key] = row

    def unmatched(self, stem: str) -> str:
        """Why a slide gets no metadata from a source it was given ("" when every source has it)."""
        why = []
        if self._regex is not None and not self._regex.match(stem):
            why.append(f"its name does not match --name-pattern {self._pattern!r}")
        if self._samples_name is not None and stem not in self._table:
            why.append(f"it has no row in {self._samples_name}")
        return " and ".join(why)

    def rows_without_slide(self, stems: Iterable[str]) -> list[str]:
        """Samples-CSV slides that are none of `stems` (a typo, or a slide of another run)."""
        have = set(stems)
        return [k for k in self._table if k not in have]

    @staticmethod
    def _compile(pattern: str) -> re.Pattern[str]:
        parts = re.split(r"(\{[A-Za-z_][A-Za-z0-9_]*\})", pattern)
        regex = ""
        names: list[str] = []
        for part in parts:
            if part.startswith("{") and part.endswith("}"):
                name = part[1:-1]
                if name in names:
                    raise CleihcError(f"--name-pattern {pattern!r} names the field {{{name}}} twice")
                names.append(name)
                regex += f"(?P<{name}>.+?)"
            else:
                regex += re.escape(part)
        if not names:
            raise CleihcError(
                f"--name-pattern {pattern!r} has no {{field}}; e.g. '{{subject}}_{{timepoint}}_{{stain}}'"
            )
        return re.compile(f"^{regex}$")

    def for_slide(self, stem: str) -> dict[str, str]:
        """The metadata of one slide (missing fields are absent)."""
        meta: dict[str, str] = {}
        if self._regex is not None:
            m = self._regex.match(stem)
            if m:
                meta.update(m.groupdict())
        meta.update(self._table.get(stem, {}))
        # 'stain' in tables is the protocol's name; a parsed stain is kept apart.
        if "stain" in meta:
            meta["stain_label"] = meta.pop("stain")
        return meta

    @property
    def lead_columns(self) -> tuple[str, ...]:
        cols = ["stain_label" if c == "stain" else c for c in self.columns]
        return tuple(cols)


def _reserved_columns() -> frozenset[str]:
    """Column names cleihc writes itself: identifiers, the long table's, and every metric."""
    from cleihc.measure import AreaTotals, area_metrics, cell_metrics
    from cleihc.tables import ID_COLUMNS

    metrics = {
        *area_metrics(AreaTotals((0, 0, 0, 0), 0.0, 0), pixel_area_um2=1.0),
        *cell_metrics(pd.DataFrame(), region_area_mm2=0.0),
    }
    return frozenset({*ID_COLUMNS, "metric", "value", "unit", "folder", *metrics})  # folder: the report's


_UNKNOWN = object()  # a record older than a field of the resume key: not current


def _stale_because(
    record: dict[str, Any],
    *,
    input_sha256: str,
    protocol_sha256: str,
    regions_sha256: str | None,
    mpp_override: list[float] | None,
) -> str:
    """Why a slide's saved results are not those this run would make ("" when they are): the slide file, the
    protocol, cleihc, the slide's annotation file (``--regions``) or ``--mpp`` changed."""
    provenance = record.get("provenance") or {}
    checks = (
        (record.get("input_sha256") == input_sha256, "the slide file changed"),
        (record.get("protocol_sha256") == protocol_sha256, "the protocol changed"),
        (record.get("cleihc_version") == __version__, "another cleihc version made them"),
        (record.get("regions_sha256", _UNKNOWN) == regions_sha256, "its --regions annotations changed"),
        (provenance.get("mpp_override", _UNKNOWN) == mpp_override, "--mpp changed"),
    )
    return next((why for same, why in checks if not same), "")


def _with_metadata(
    rows: list[dict[str, Any]], old: dict[str, Any], new: dict[str, Any]
) -> list[dict[str, Any]]:
    """Rows with their study-metadata columns replaced (they lead each row, as when the slide was measured)."""
    return [{**new, **{k: v for k, v in row.items() if k not in old}} for row in rows]


def run_batch(
    inputs: Sequence[str],
    protocol: Protocol,
    *,
    out_dir: str | os.PathLike[str],
    regions: str | os.PathLike[str] | None = None,
    metadata: StudyMetadata | None = None,
    mpp: float | None = None,
    tile_size: int | None = None,
    runner: Any = None,
    force: bool = False,
    arguments: dict[str, Any] | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> BatchSummary:
    """Measure every slide found in `inputs` with one protocol, into `out_dir`.

    Parameters
    ----------
    inputs : sequence of str
        Files, folders (searched recursively) and glob patterns.
    protocol : Protocol
    out_dir : path
    regions : path, optional
        Annotation file or folder of ``<slide stem>.<ext>`` files.
    metadata : StudyMetadata, optional
        Study columns put at the front of every row.
    mpp : float, optional
        Microns per pixel for slides that lack it.
    tile_size : int, optional
    runner : SerialRunner or DaskRunner, optional
    force : bool
        Recompute slides whose results are current.
    arguments : dict, optional
        The command line, recorded in run.json.
    on_event : callable, optional
        Receives :class:`Event` objects for progress displays.

    Returns
    -------
    BatchSummary

    Raises
    ------
    ResultsFolderError
        `out_dir` holds another protocol's results, or another run is writing to it.
    """
    out = Path(out_dir)
    with results_folder_lock(out):  # one writer per folder: a second run would measure the same slides
        return _run_batch_locked(
            inputs,
            protocol,
            out=out,
            regions=regions,
            metadata=metadata,
            mpp=mpp,
            tile_size=tile_size,
            runner=runner,
            force=force,
            arguments=arguments,
            on_event=on_event,
        )


def _run_batch_locked(
    inputs: Sequence[str],
    protocol: Protocol,
    *,
    out: Path,
    regions: str | os.PathLike[str] | None,
    metadata: StudyMetadata | None,
    mpp: float | None,
    tile_size: int | None,
    runner: Any,
    force: bool,
    arguments: dict[str, Any] | None,
    on_event: Callable[[Event], None] | None,
) -> BatchSummary:
    """:func:`run_batch` once the folder is held."""
    started = time.perf_counter()
    for stale in out.rglob(".*.partial"):  # left by a run that was killed mid-write; never a finished output
        stale.unlink(missing_ok=True)
    existing = {rec["slide"]: rec for rec in read_slide_records(out)}
    check_results_folder(out, protocol, records=existing.values())
    emit = on_event or (lambda e: None)
    metadata = metadata or StudyMetadata()
    slides, failures = discover_slides(inputs, exclude=[out])
    extra = metadata.rows_without_slide(slide_stem(p) for p in slides)
    if extra:  # info only: one samples CSV often serves runs of several stains
        log.info("%d samples-CSV rows name no slide of this run: %s", len(extra), ", ".join(extra[:20]))
    summary = BatchSummary(out)
    summary.outcomes.extend(failures)
    emit(Event("batch_start", total=len(slides)))
    seen_stems: dict[str, Path] = {}
    # Each slide once, in order; a second input with the same stem is answered where it stands.
    queue: list[tuple[Path, str, Path | None]] = []
    for path in slides:
        stem = slide_stem(path)
        queue.append((path, stem, seen_stems.get(stem)))
        seen_stems.setdefault(stem, path)
    outcomes: dict[int, SlideOutcome] = {}  # by queue position: reported in input order however they finish
    inputs: dict[int, list[dict[str, Any]]] = {}

    def finished(k: int, outcome: SlideOutcome) -> None:
        outcomes[k] = outcome
        if outcome.status == "done":
            log.info("%s: done in %.1f s", outcome.slide, outcome.seconds)
        elif outcome.status == "skipped":
            log.info("%s: skipped (%s)", outcome.slide, outcome.reason)
        else:  # info, not warning: the console lists failures itself at the end
            log.info("%s: failed: %s", outcome.slide, outcome.reason)
        message = {"done": f"{outcome.seconds:.1f} s", "skipped": ""}.get(outcome.status, outcome.reason)
        emit(Event("slide_done", outcome.slide, status=outcome.status, message=message))

    for k, (path, stem, first) in enumerate(queue):
        if first is not None:
            finished(
                k,
                SlideOutcome(
                    stem, str(path), "failed", f"another input has the same name ({first}); rename one"
                ),
            )
    todo = [k for k in range(len(queue)) if k not in outcomes]
    max_px = getattr(runner, "whole_slide_max_px", 0)
    whole = [k for k in todo if max_px and _analysis_px(queue[k][0], protocol, mpp) <= max_px]
    tiled = sorted(set(todo) - set(whole))
    if hasattr(runner, "map_unordered"):
        log.info("whole slides on workers: %d, slides split into tile tasks: %d", len(whole), len(tiled))
    options = dict(out=out, protocol=protocol, force=force, regions=regions, mpp=mpp, tile_size=tile_size)
    if whole:
        # Small slides, one task each on a local cluster: the worker hashes, plans, measures and writes the
        # slide (files atomically, as here), and this process only collects what happened.
        calls = [(queue[k][0], queue[k][1], existing.get(queue[k][1]), metadata, options) for k in whole]
        running: set[str] = set()
        ended: set[str] = set()

        def tile_progress(msg: list[Any]) -> None:  # a worker's tiles, while its slide runs
            stem, done, total = msg
            if stem in ended:  # a late message: the slide's result came first
                return
            if stem not in running:
                running.add(stem)
                emit(Event("slide_start", stem))
            emit(Event("tile", stem, done=int(done), total=int(total)))

        for j, result, error in runner.map_unordered(_whole_slide_task, calls, on_message=tile_progress):
            k = whole[j]
            if error is None:
                outcome, input_records, lines = result
            else:  # the task never raises for a bad slide: its worker died (a reader crash, memory)
                path, stem, _ = queue[k]
                outcome = SlideOutcome(stem, str(path), "failed", _unforeseen_reason(error, path))
                input_records = []
                lines = [(logging.ERROR, log.name, f"{path}: {type(error).__name__}: {error}")]
            ended.add(outcome.slide)
            token = _CURRENT_SLIDE.set(outcome.slide)
            try:
                for level, name, message in lines:  # the worker's log lines, into this run's log
                    logging.getLogger(name).log(level, "%s", message)
                inputs[k] = input_records
                finished(k, outcome)
            finally:
                _CURRENT_SLIDE.reset(token)

    # Look-ahead: the next slide is hashed and planned in a second thread while this one is measured and its
    # outputs written. Planning is whole-slide work in this process that would otherwise leave the tile workers
    # (or, serially, the second core) idle; one slide ahead at most, so at most two plans are held.
    ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cleihc-plan")
    prepared: dict[int, Future[_Prepared]] = {}

    def prepare(u: int) -> None:
        if u < len(tiled) and u not in prepared:
            path, stem, _ = queue[tiled[u]]
            prepared[u] = ahead.submit(_prepare, path, stem, existing=existing, **options)

    try:
        for u, k in enumerate(tiled):
            path, stem, _ = queue[k]
            prepare(u)
            prepare(u + 1)
            t0 = time.perf_counter()
            emit(Event("slide_start", stem))
            token = _CURRENT_SLIDE.set(stem)
            try:
                inputs[k] = []
                outcome = _measure_prepared(
                    prepared.pop(u).result(),
                    path,
                    stem,
                    out=out,
                    metadata=metadata,
                    runner=runner,
                    emit=emit,
                    t0=t0,
                    inputs_record=inputs[k],
                )
                finished(k, outcome)
            finally:
                _CURRENT_SLIDE.reset(token)
    finally:
        ahead.shutdown(wait=True, cancel_futures=True)
    summary.outcomes.extend(outcomes[k] for k in sorted(outcomes))
    inputs_record = [rec for k in sorted(inputs) for rec in inputs[k]]
    records = read_slide_records(out)
    _warn_identical_files(records)
    lead = ("subject", "timepoint", "group", *metadata.lead_columns)
    table = rebuild_tables(out, lead_columns=tuple(dict.fromkeys(lead)))
    for message in mixed_protocols(table):  # a protocol edited under its name, used on some slides only
        log.warning("%s: %s", out, message)
    summary.seconds = time.perf_counter() - started
    _write_failures(out, summary.failed)
    write_json(
        out / "run.json",
        {
            "cleihc_version": __version__,
            "software": _versions(),
            "arguments": arguments or {},
            "protocol": {
                "name": protocol.name,
                "version": protocol.version,
                "sha256": protocol.sha256,
                # Which file: several may share a name (a local copy, an edited version).
                "source": str(protocol.source) if protocol.source else None,
            },
            "inputs": inputs_record,
            "outcomes": [o.__dict__ for o in summary.outcomes],
            "failures": [{"slide": o.slide, "path": o.path, "reason": o.reason} for o in summary.failed],
            "seconds": summary.seconds,
            "slides": {
                rec["slide"]: rec.get("provenance", {}) for rec in records if rec["slide"] in seen_stems
            },
        },
    )
    return summary


@dataclass
class _Prepared:
    """What the look-ahead thread hands over for one slide: its digest and, unless an error stopped it, whether
    its results are current (skip) or its plan."""

    started: float
    digest: str | None = None
    size_bytes: int | None = None
    skip: bool = False
    corrections_sha256: str | None = None
    corrections_changed: bool = False
    regions_sha256: str | None = None
    record: dict[str, Any] | None = None  # the saved results' record, when they are current
    plan: SlidePlan | None = None
    error: Exception | None = None
    traceback: str = ""


def _prepare(
    path: Path,
    stem: str,
    *,
    out: Path,
    existing: dict[str, dict[str, Any]],
    protocol: Protocol,
    force: bool,
    regions: str | os.PathLike[str] | None,
    mpp: float | None,
    tile_size: int | None,
) -> _Prepared:
    """Hash a slide, decide whether its results are current, and plan it if not (the look-ahead thread's job)."""
    token = _CURRENT_SLIDE.set(stem)
    prep = _Prepared(started=time.perf_counter())
    try:
        prep.digest = sha256_file(path)
        prep.size_bytes = path.stat().st_size
        rec = existing.get(stem)
        corr = corrections_path(out, stem)
        prep.corrections_sha256 = sha256_file(corr) if corr.exists() else None
        regions_file = None if regions is None else regions_file_for_slide(regions, path)
        prep.regions_sha256 = None if regions_file is None else sha256_file(regions_file)
        stale = "no results yet" if rec is None else "--force"
        if not force and rec is not None:
            stale = _stale_because(
                rec,
                input_sha256=prep.digest,
                protocol_sha256=protocol.sha256,
                regions_sha256=prep.regions_sha256,
                mpp_override=None if mpp is None else [float(mpp), float(mpp)],
            )
        if not stale:
            prep.skip = True
            prep.record = rec
            prep.corrections_changed = rec.get("corrections_sha256") != prep.corrections_sha256
        else:
            if rec is not None:
                log.info("%s: measured again: %s", stem, stale)
            # The file found and hashed above is the one read (a folder is searched once); without one, the
            # folder is passed on so that the plan says the slide has none.
            given = regions if regions_file is None else regions_file
            prep.plan = plan_slide(path, protocol, regions=given, mpp=mpp, tile_size=tile_size)
    except Exception as exc:  # reported when the batch reaches this slide, in order
        prep.error, prep.traceback = exc, traceback.format_exc()
    finally:
        _CURRENT_SLIDE.reset(token)
    return prep


def _measure_prepared(
    prep: _Prepared,
    path: Path,
    stem: str,
    *,
    out: Path,
    metadata: StudyMetadata,
    runner: Any,
    emit: Callable[[Event], None],
    t0: float,
    inputs_record: list[dict[str, Any]],
    write_threads: int = 2,
) -> SlideOutcome:
    """Measure a prepared slide and write its outputs (or apply its saved corrections); never raises."""
    if prep.digest is not None:
        inputs_record.append(
            {"slide": stem, "path": str(path), "size_bytes": prep.size_bytes, "sha256": prep.digest}
        )
    try:
        if prep.error is not None:
            raise prep.error
        missing = metadata.unmatched(stem)
        if missing:
            log.warning("%s: no study metadata: %s", stem, missing)
        if prep.skip:
            reason = "results are current"
            meta = metadata.for_slide(stem)
            saved_meta = (prep.record or {}).get("metadata") or {}
            if meta != saved_meta:  # --samples / --name-pattern changed: the rows' lead columns, no re-run
                _update_metadata(out, stem, saved_meta, meta)
                reason += "; study metadata updated"
            rec = prep.record or {}
            was = ((rec.get("provenance") or {}).get("slide") or {}).get("absolute_path") or rec.get("path")
            if was is not None and Path(was).resolve() != Path(path).resolve():  # same content, moved
                _update_path(out, stem, path)
                reason += "; new location recorded"
            if prep.corrections_changed:  # corrections changed: recompute, no re-run
                apply_saved_corrections(out, stem)
                reason += "; corrections re-applied"
            return SlideOutcome(stem, str(path), "skipped", reason)

        def progress(done: int, total: int) -> None:
            emit(Event("tile", stem, done=done, total=total))

        plan = prep.plan
        assert plan is not None
        # Provenance's total_s: planning plus measuring, not the time the plan waited for its turn.
        started = time.perf_counter() - plan.timings_s.get("plan_s", 0.0)
        result = measure_plan(plan, progress=progress, runner=runner, started=started)
        meta = metadata.for_slide(stem)
        if meta:
            for k, v in reversed(list(meta.items())):
                result.regions.insert(0, k, v)
        extra = {"metadata": meta, "regions_sha256": prep.regions_sha256}
        write_slide_outputs(result, out, extra=extra, threads=write_threads)
        if prep.corrections_sha256 is not None:  # later runs honour a reviewer's saved corrections
            apply_saved_corrections(out, stem)
        return SlideOutcome(stem, str(path), "done", seconds=time.perf_counter() - t0)
    except CleihcError as exc:
        reason = exc.reason if exc.path == str(path) else str(exc)
        return SlideOutcome(stem, str(path), "failed", reason, time.perf_counter() - t0)
    except Exception as exc:  # an unforeseen failure: isolate the slide, log the traceback, keep going
        trace = prep.traceback if exc is prep.error else traceback.format_exc()
        log.error("%s: %s\n%s", path, exc, trace)
        return SlideOutcome(
            stem, str(path), "failed", _unforeseen_reason(exc, path), time.perf_counter() - t0
        )


def _warn_identical_files(records: Iterable[dict[str, Any]]) -> None:
    """Name slides of the folder whose files are identical (a copy, or a slide renamed since its first run):
    each has a row, so a statistic would count that section twice."""
    by_digest: dict[str, list[str]] = {}
    for rec in records:
        by_digest.setdefault(str(rec.get("input_sha256")), []).append(rec["slide"])
    for digest, stems in by_digest.items():
        if len(stems) > 1 and digest != "None":
            log.warning(
                "slides %s are the same file (sha256 %s...): each has rows in the tables; if one was renamed or "
                "copied, remove its record from slides/",
                ", ".join(sorted(stems)),
                digest[:12],
            )


def _update_metadata(out: Path, stem: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Give a slide's saved record the study metadata of this run (atomically; the measurements stay)."""
    path = out / "slides" / f"{stem}.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    for key in ("rows", "automatic_rows"):  # automatic_rows: kept beside corrected rows
        if key in record:
            record[key] = _with_metadata(record[key], old, new)
    record["metadata"] = new
    write_json(path, record)


def _update_path(out: Path, stem: str, path: Path) -> None:
    """Record where a slide now is (same content, so the measurements stay): the review opens its image there."""
    file = out / "slides" / f"{stem}.json"
    record = json.loads(file.read_text(encoding="utf-8"))
    record["path"] = str(path)
    for key in ("rows", "automatic_rows"):
        for row in record.get(key) or []:
            if "path" in row:
                row["path"] = str(path)
    slide = (record.get("provenance") or {}).get("slide")
    if isinstance(slide, dict):
        slide["path"] = str(path)
        slide["absolute_path"] = str(Path(path).resolve())
    write_json(file, record)


def _unforeseen_reason(error: BaseException, path: Path) -> str:
    """One line for an unforeseen failure: a Dask worker that died on the slide (a tile task or a whole-slide
    task, twice), or an error of cleihc itself."""
    if type(error).__name__ == "KilledWorker":  # distributed's, not imported for a serial run
        return (
            "the worker process measuring it stopped twice (a crash reading the file, or memory); "
            f"check it with `cleihc info {path}`, or measure it alone without --jobs"
        )
    return f"internal error ({type(error).__name__}: {' '.join(str(error).split())}); see run.log"


def _analysis_px(path: Path, protocol: Protocol, mpp: float | None) -> int:
    """The slide's size in analysis pixels; 0 when it cannot be read (its task then reports why)."""
    try:
        with open_slide(path, mpp=mpp) as slide:
            w, h = slide.analysis_resolution(protocol.analysis.mpp_um).dimensions_a
        return w * h
    except Exception:
        return 0


class _Lines(logging.Handler):
    """Collects a worker's log lines for the run log of the process that started the batch."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[int, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.name, record.getMessage()))


def _whole_slide_task(
    path: Path,
    stem: str,
    record: dict[str, Any] | None,
    metadata: StudyMetadata,
    options: dict[str, Any],
    topic: str | None = None,
) -> tuple[SlideOutcome, list[dict[str, Any]], list[tuple[int, str, str]]]:
    """One slide from start to finish in a worker process: what :func:`run_batch` does for it serially.

    Returns the outcome, the slide's input record and the log lines it made; sends its tile progress to `topic`
    (:func:`cleihc.parallel.send_message`). Never raises for a bad slide.
    """
    from cleihc._malloc import release_free_heap
    from cleihc.parallel import send_message

    def emit(e: Event) -> None:
        if topic is not None and e.kind == "tile":
            send_message(topic, [e.slide, e.done, e.total])

    t0 = time.perf_counter()
    logger = logging.getLogger("cleihc")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    # A reader's own complaints about a damaged file (reported by cleihc in one line) follow the command's
    # logging settings rather than going to the worker's stderr.
    logging.getLogger("tifffile").addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    prep = None
    try:
        prep = _prepare(path, stem, existing={stem: record} if record else {}, **options)
        inputs_record: list[dict[str, Any]] = []
        outcome = _measure_prepared(
            prep,
            path,
            stem,
            out=options["out"],
            metadata=metadata,
            runner=None,
            emit=emit,
            t0=t0,
            inputs_record=inputs_record,
            write_threads=1,  # the other workers use the other cores
        )
    finally:
        logger.removeHandler(handler)
        logging.getLogger("tifffile").removeHandler(handler)
        logger.setLevel(level)
        del prep  # its plan: freed before the heap is trimmed
        release_free_heap()  # the next slide's peak does not stack on this one's freed arrays
    return outcome, inputs_record, handler.lines


def _write_failures(out: Path, failed: Iterable[SlideOutcome]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide", "path", "reason"])
    for o in failed:
        w.writerow([o.slide, o.path, o.reason])
    with atomic_write(out / "failures.csv", mode="w") as f:
        f.write(buf.getvalue())


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = [
        "numpy",
        "scipy",
        "scikit-image",
        "numba",
        "tifffile",
        "imagecodecs",
        "openslide-python",
        "openslide-bin",
        "pandas",
        "pyarrow",
        "dask",
        "distributed",
        "shapely",
    ]
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    import platform

    out["python"] = platform.python_version()
    return out
