"""Study runs: failures isolated, resume after kill -9, Dask (local and remote) equal to serial, tidy tables."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cleihc.cli import main
from cleihc.synthetic import render_skin, write_svs
from cleihc.tables import metric_unit, tidy

CLEIHC = [sys.executable, "-m", "cleihc.cli"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Three good CD3 slides, one truncated, one without MPP, one file that is not a slide."""
    d = tmp_path_factory.mktemp("study")
    for i, name in enumerate(["S01_pre_cd3", "S01_post_cd3", "S02_pre_cd3"]):
        syn = render_skin(
            stain="cd3", width_px=900, height_px=700, mpp_um=0.5, seed=20 + i, jpeg_quality=None
        )
        write_svs(d / f"{name}.svs", syn.rgb, mpp_um=0.5)
    data = (d / "S01_pre_cd3.svs").read_bytes()
    (d / "S03_pre_cd3.svs").write_bytes(data[: len(data) // 2])
    Image.fromarray(syn.rgb).save(d / "S04_pre_cd3.png")
    (d / "notes.svs").write_text("not a slide")
    return d


def _good(study: Path) -> list[str]:
    return [str(study / f"{n}.svs") for n in ("S01_pre_cd3", "S01_post_cd3", "S02_pre_cd3")]


def _table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "regions.csv")


@pytest.fixture(scope="module")
def serial_run(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    status = main(["quantify", str(study), "--stain", "cd3", "--out", str(out), "--quiet"])
    return status, out


def test_bad_slides_do_not_stop_the_batch(serial_run):
    status, out = serial_run
    assert status == 1
    table = _table(out)
    assert sorted(table["slide"].unique()) == ["S01_post_cd3", "S01_pre_cd3", "S02_pre_cd3"]
    failures = pd.read_csv(out / "failures.csv")
    reasons = dict(zip(failures["slide"], failures["reason"], strict=True))
    assert set(reasons) == {"S03_pre_cd3", "S04_pre_cd3", "notes"}
    assert "truncated" in reasons["S03_pre_cd3"]
    assert "--mpp" in reasons["S04_pre_cd3"]
    assert all("\n" not in r for r in reasons.values())
    run = __import__("json").loads((out / "run.json").read_text())
    assert {f["slide"] for f in run["failures"]} == set(reasons)
    assert {i["slide"] for i in run["inputs"]} >= {"S01_pre_cd3", "S01_post_cd3", "S02_pre_cd3"}


def test_second_run_skips_and_force_recomputes(study, serial_run, capsys):
    _, out = serial_run
    before = _table(out)
    assert main(["quantify", *_good(study), "--stain", "cd3", "--out", str(out), "--quiet"]) == 0
    assert "0 done, 3 skipped" in capsys.readouterr().out
    pd.testing.assert_frame_equal(before, _table(out))
    assert main(["quantify", _good(study)[0], "--stain", "cd3", "--out", str(out), "--quiet", "--force"]) == 0
    assert "1 done, 0 skipped" in capsys.readouterr().out
    pd.testing.assert_frame_equal(before, _table(out))


def test_a_moved_slide_is_skipped_and_its_new_place_recorded(study, tmp_path):
    """Regression: a slide moved (same content) was skipped and its results kept pointing at the old place, so
    the review found no image. The record, the tables and provenance now name the new place; nothing is
    measured again."""
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(_good(study)[0], old / "S01_pre_cd3.svs")
    out = tmp_path / "out"
    assert main(["quantify", str(old), "--stain", "cd3", "--out", str(out), "--quiet"]) == 0
    before = _table(out)
    new = tmp_path / "archive" / "cd3"
    new.parent.mkdir()
    (old).rename(new)
    assert main(["quantify", str(new), "--stain", "cd3", "--out", str(out), "--quiet"]) == 0
    assert (
        "S01_pre_cd3: skipped (results are current; new location recorded)" in (out / "run.log").read_text()
    )
    after = _table(out)
    assert set(after["path"]) == {str(new / "S01_pre_cd3.svs")}
    pd.testing.assert_frame_equal(before.drop(columns="path"), after.drop(columns="path"))
    record = json.loads((out / "slides" / "S01_pre_cd3.json").read_text())
    assert record["provenance"]["slide"]["absolute_path"] == str((new / "S01_pre_cd3.svs").resolve())
    # Run again from there: nothing to record.
    assert main(["quantify", str(new), "--stain", "cd3", "--out", str(out), "--quiet"]) == 0
    assert (out / "run.log").read_text().count("new location recorded") == 1


# jobs 2: whole slides written by Dask workers, killed with the command
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_kill_9_then_rerun_gives_the_same_tables(study, serial_run, tmp_path, jobs):
    _, ref = serial_run
    out = tmp_path / "killed"
    args = [*CLEIHC, "quantify", *_good(study), "--stain", "cd3", "--out", str(out)]
    args += ["--quiet", "--jobs", jobs]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list((out / "slides").glob("*.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "slides").glob("*.json")))
    assert done_before < 3, "the run finished before it could be killed"
    assert subprocess.run(args, capture_output=True).returncode == 0
    assert not list(out.rglob("*.partial"))
    pd.testing.assert_frame_equal(_table(ref).drop(columns="path"), _table(out).drop(columns="path"))


def test_two_jobs_equal_serial(study, serial_run, tmp_path):
    # Small slides on a local cluster: each one a task, measured and written by a worker.
    _, ref = serial_run
    out = tmp_path / "jobs2"
    empty = tmp_path / "no-annotations"
    empty.mkdir()
    args = ["quantify", str(study), "--stain", "cd3", "--out", str(out), "--jobs", "2", "--quiet"]
    assert main([*args, "--regions", str(empty)]) == 1
    pd.testing.assert_frame_equal(_table(ref), _table(out))
    failures = pd.read_csv(out / "failures.csv")
    reasons = dict(zip(failures["slide"], failures["reason"], strict=True))
    assert set(reasons) == {"S03_pre_cd3", "S04_pre_cd3", "notes"}
    assert "truncated" in reasons["S03_pre_cd3"] and "--mpp" in reasons["S04_pre_cd3"]
    for name in ("S01_pre_cd3", "S02_pre_cd3"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(ref / "cells" / f"{name}.parquet"),
            pd.read_parquet(out / "cells" / f"{name}.parquet"),
        )
    run = __import__("json").loads((out / "run.json").read_text())
    # Outcomes in input order however the tasks finished (the inputs' own failures first, as serially).
    assert [(o["slide"], o["status"]) for o in run["outcomes"]] == [
        ("notes", "failed"),
        ("S01_post_cd3", "done"),
        ("S01_pre_cd3", "done"),
        ("S02_pre_cd3", "done"),
        ("S03_pre_cd3", "failed"),
        ("S04_pre_cd3", "failed"),
    ]
    assert [i["slide"] for i in run["inputs"]][:3] == ["S01_post_cd3", "S01_pre_cd3", "S02_pre_cd3"]
    log = (out / "run.log").read_text()
    assert "whole slides on workers: 5, slides split into tile tasks: 0" in log
    # A worker's log lines reach the run log, tagged with their slide.
    assert "[S02_pre_cd3]: " in log and "no annotation file for slide" in log.split("[S02_pre_cd3]: ", 1)[1]


def test_whole_slide_tasks_report_tile_progress(study, tmp_path):
    from cleihc.batch import run_batch
    from cleihc.parallel import DaskRunner
    from cleihc.protocol import load_protocol

    events = []
    with DaskRunner(jobs=2) as runner:
        summary = run_batch(
            _good(study),
            load_protocol("cd3"),
            out_dir=tmp_path / "out",
            runner=runner,
            tile_size=256,  # several tiles a slide
            on_event=events.append,
        )
    assert [o.status for o in summary.outcomes] == ["done"] * 3
    for name in ("S01_pre_cd3", "S01_post_cd3", "S02_pre_cd3"):
        mine = [e for e in events if e.slide == name]
        kinds = [e.kind for e in mine]
        # started, its tiles counted up to the total, then done; nothing after
        assert kinds[0] == "slide_start" and kinds[-1] == "slide_done" and set(kinds[1:-1]) == {"tile"}
        done = [e.done for e in mine[1:-1]]
        assert done == sorted(done) and done[-1] == mine[-2].total >= 2


def test_a_slide_whose_worker_dies_fails_alone(study, tmp_path):
    from types import SimpleNamespace

    from distributed import KilledWorker

    from cleihc.batch import run_batch
    from cleihc.protocol import load_protocol

    class DyingFirstWorker:
        """The runner interface run_batch uses, tasks run here; the first slide's worker "dies" as Dask reports."""

        whole_slide_max_px = 10**9

        def map_unordered(self, fn, calls, *, on_message=None):
            for k, args in enumerate(calls):
                if k == 0:
                    yield k, None, KilledWorker("call-0", SimpleNamespace(address="tcp://127.0.0.1:1"), 1)
                else:
                    yield k, fn(*args, None), None

    summary = run_batch(
        _good(study), load_protocol("cd3"), out_dir=tmp_path / "out", runner=DyingFirstWorker()
    )
    assert [(o.slide, o.status) for o in summary.outcomes] == [
        ("S01_pre_cd3", "failed"),
        ("S01_post_cd3", "done"),
        ("S02_pre_cd3", "done"),
    ]
    reason = summary.outcomes[0].reason
    assert "worker process measuring it stopped" in reason and "cleihc info" in reason and "\n" not in reason
    assert pd.read_csv(tmp_path / "out" / "failures.csv")["slide"].tolist() == ["S01_pre_cd3"]
    assert sorted(_table(tmp_path / "out")["slide"].unique()) == ["S01_post_cd3", "S02_pre_cd3"]


def test_progress_display_keeps_a_bar_per_running_slide(monkeypatch):
    from cleihc.batch import Event
    from cleihc.cli.quantify import _Display

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    display = _Display(quiet=False)
    try:
        display.event(Event("batch_start", total=2))
        for name in ("a", "b"):  # two workers, two slides at once
            display.event(Event("slide_start", name))
            display.event(Event("tile", name, done=1, total=4))
        assert sorted(display._tile_tasks) == ["a", "b"]
        display.event(Event("slide_done", "a", status="done"))
        display.event(Event("tile", "a", done=2, total=4))  # late: ignored
        assert list(display._tile_tasks) == ["b"]
        bar = display._progress.tasks[-1]
        assert (bar.description.strip(), bar.completed, bar.total) == ("b", 1, 4)
        display.event(Event("slide_done", "b", status="done"))
        assert display._tile_tasks == {}
        assert display._progress.tasks[0].completed == 2
        # Slide names and reasons are text: brackets are not rich markup (a closing "[/...]" raised MarkupError).
        odd = "S05[/scan 2]"
        display.event(Event("slide_start", odd))
        display.event(Event("slide_done", odd, status="failed", message="read error [Errno 5] in [/data/x]"))
    finally:
        display.close()


def test_jobs_alone_means_one_worker_per_core():
    from cleihc.cli import build_parser

    def jobs(*extra):
        return build_parser().parse_args(["quantify", "slides/", "--stain", "cd3", *extra]).jobs

    assert (jobs(), jobs("--jobs", "3"), jobs("--jobs")) == (None, 3, os.cpu_count())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_remote_dask_scheduler_equals_serial(study, serial_run, tmp_path):
    _, ref = serial_run
    port = _free_port()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    sched = subprocess.Popen(
        [str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    worker = subprocess.Popen(
        [
            str(bindir / "dask"),
            "worker",
            f"tcp://127.0.0.1:{port}",
            "--nworkers",
            "1",
            "--nthreads",
            "1",
            "--no-dashboard",
            "--host",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        out = tmp_path / "remote"
        status = main(
            [
                "quantify",
                *_good(study),
                "--stain",
                "cd3",
                "--out",
                str(out),
                "--quiet",
                "--scheduler",
                f"tcp://127.0.0.1:{port}",
            ]
        )
        assert status == 0
        pd.testing.assert_frame_equal(_table(ref), _table(out))
        # Remote workers may not see the results folder: tile tasks only, the files written here.
        assert "whole slides on workers: 0, slides split into tile tasks: 3" in (out / "run.log").read_text()
    finally:
        for p in (worker, sched):
            p.terminate()
        for p in (worker, sched):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_metadata_and_tidy_table(study, tmp_path):
    out = tmp_path / "meta"
    samples = tmp_path / "samples.csv"
    samples.write_text("slide,subject,timepoint,group\nS01_pre_cd3,S01,pre,A\nS01_post_cd3,S01,post,A\n")
    good = _good(study)[:2]
    assert (
        main(["quantify", *good, "--stain", "cd3", "--out", str(out), "--samples", str(samples), "--quiet"])
        == 0
    )
    table = _table(out)
    assert list(table.columns[:3]) == ["subject", "timepoint", "group"]
    study_csv = tmp_path / "study.csv"
    assert main(["tables", str(out), "--out", str(study_csv)]) == 0
    long = pd.read_csv(study_csv)
    assert list(long.columns) == [
        "subject",
        "timepoint",
        "group",
        "slide",
        "stain",
        "region",
        "metric",
        "value",
        "unit",
        "corrected",
        "review",
    ]
    assert set(long["review"]) == {"unreviewed"}
    # every wide value appears once in the long table, with its unit
    wide = table.set_index(["slide", "region"])
    row = long[
        (long.slide == "S01_pre_cd3") & (long.region == "tissue") & (long.metric == "positive_cells_per_mm2")
    ]
    assert len(row) == 1
    assert row["value"].iloc[0] == pytest.approx(
        wide.loc[("S01_pre_cd3", "tissue"), "positive_cells_per_mm2"]
    )
    assert row["unit"].iloc[0] == "1/mm2"
    assert set(long["subject"]) == {"S01"} and set(long["timepoint"]) == {"pre", "post"}
    assert len(long) == len(tidy([out]))
    # A reviewer flags a slide (napari review queue): the table says so, for the statistician to filter on.
    from cleihc.corrections import set_review_status

    set_review_status(out, "S01_post_cd3", "flagged", author="rev", note="fold across the dermis")
    long = tidy([out])
    assert set(long.loc[long.slide == "S01_post_cd3", "review"]) == {"flagged"}
    assert set(long.loc[long.slide == "S01_pre_cd3", "review"]) == {"unreviewed"}


def test_name_pattern_metadata(study, tmp_path):
    out = tmp_path / "pattern"
    good = _good(study)[2:]
    args = [
        "quantify",
        *good,
        "--stain",
        "cd3",
        "--out",
        str(out),
        "--quiet",
        "--name-pattern",
        "{subject}_{timepoint}_{marker}",
    ]
    assert main(args) == 0
    table = _table(out)
    assert (
        (table["subject"] == "S02").all()
        and (table["timepoint"] == "pre").all()
        and (table["marker"] == "cd3").all()
    )


@pytest.mark.parametrize(
    ("metric", "unit"),
    [
        ("region_area_mm2", "mm2"),
        ("positive_cells_per_mm2", "1/mm2"),
        ("positive_area_percent", "%"),
        ("positive_mean_od", "OD"),
        ("h_score", "score 0-300"),
        ("cells_total", "cells"),
    ],
)
def test_units_from_names(metric, unit):
    assert metric_unit(metric) == unit


def test_usage_errors_exit_2(study, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["quantify", str(study)])  # no --stain / --protocol
    assert e.value.code == 2
    assert main(["quantify", str(study), "--stain", "no-such-stain", "--out", str(tmp_path / "x")]) == 2
    assert main(["quantify", str(study), "--stain", "cd3", "--mpp", "-1"]) == 2


def test_partial_files_of_a_killed_run_are_cleaned(study, tmp_path):
    out = tmp_path / "stale"
    (out / "cells").mkdir(parents=True)
    stale = out / "cells" / ".S01_pre_cd3.parquet.abc.partial"
    stale.write_bytes(b"half")
    assert main(["quantify", _good(study)[0], "--stain", "cd3", "--out", str(out), "--quiet"]) == 0
    assert not stale.exists()
    assert np.isfinite(_table(out)["region_area_mm2"]).all()
    shutil.rmtree(out)


def test_next_slide_is_planned_while_this_one_is_measured(study, tmp_path, monkeypatch):
    # The look-ahead thread plans slide 2 while slide 1's outputs are being written: writing slide 1 waits until
    # slide 2's planning has begun, in the other thread (without a look-ahead it would wait for ever: 60 s).
    import threading

    from cleihc import batch

    slides = _good(study)
    second = Path(slides[1]).stem
    planning_second = threading.Event()
    threads: dict[str, str] = {}
    real_plan, real_write = batch.plan_slide, batch.write_slide_outputs

    def plan_slide(path, *args, **kwargs):
        threads[Path(path).stem] = threading.current_thread().name
        if Path(path).stem == second:
            planning_second.set()
        return real_plan(path, *args, **kwargs)

    waited: list[bool] = []

    def write_slide_outputs(result, *args, **kwargs):
        if not waited:
            waited.append(planning_second.wait(timeout=60))
        return real_write(result, *args, **kwargs)

    monkeypatch.setattr(batch, "plan_slide", plan_slide)
    monkeypatch.setattr(batch, "write_slide_outputs", write_slide_outputs)
    out = tmp_path / "ahead"
    summary = batch.run_batch(slides, load_cd3(), out_dir=out)
    assert waited == [True]
    assert [o.status for o in summary.outcomes] == ["done"] * 3
    assert [o.slide for o in summary.outcomes] == [Path(s).stem for s in slides]  # input order kept
    assert set(threads.values()) == {"cleihc-plan_0"}  # never planned in the main thread


def test_run_log_names_the_slide_of_each_line(serial_run):
    # (Other tests add runs to the same log: every line must name its own slide, whatever the run.)
    _, out = serial_run
    lines = (out / "run.log").read_text().splitlines()
    done = [line for line in lines if ": done in " in line]
    for line in done:
        slide = line.split("[", 1)[1].split("]", 1)[0]
        assert f"]: {slide}: done in " in line
    assert {line.split("[", 1)[1].split("]", 1)[0] for line in done} == {
        "S01_post_cd3",
        "S01_pre_cd3",
        "S02_pre_cd3",
    }
    failed = [line for line in lines if "S04_pre_cd3: failed" in line]
    assert failed and all("[S04_pre_cd3]" in line and "--mpp" in line for line in failed)


def load_cd3():
    from cleihc.protocol import load_protocol

    return load_protocol("cd3")


def test_console_warnings_name_their_slide(tmp_path):
    """A slide stained otherwise (Alcian blue measured as CD3) is measured, and the console's warning says which
    slide it is about (the next slide is planned while the current one is measured)."""
    from cleihc_testdata import SAMPLE_IMAGES

    slides = [str(SAMPLE_IMAGES / "S01_pre_gag-alcian.svs"), str(SAMPLE_IMAGES / "S01_pre_cd3.svs")]
    out = tmp_path / "out"
    proc = subprocess.run(
        [*CLEIHC, "quantify", *slides, "--stain", "cd3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "stains:" in line]
    assert len(warned) == 1 and warned[0].startswith("WARNING cleihc.pipeline [S01_pre_gag-alcian]: stains: ")
    assert "2 done" in proc.stdout
    record = json.loads((out / "slides" / "S01_pre_gag-alcian.json").read_text())
    assert record["provenance"]["stain_fit"]["explained"] is False
    assert any(w.startswith("stains:") for w in record["provenance"]["warnings"])
    # --quiet: the summary only; the warning is still in run.log.
    quiet = subprocess.run(
        [*CLEIHC, "quantify", slides[0], "--stain", "cd3", "--out", str(out), "--force", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert quiet.stdout.startswith("1 done, 0 skipped, 0 failed")
    assert quiet.stdout.rstrip().endswith("; 1 warning about 1 slide, see run.log")  # the summary counts them
    log = (out / "run.log").read_text().splitlines()
    assert sum("[S01_pre_gag-alcian]: stains: " in line for line in log) == 2


def _box(path: Path, x1: int) -> None:
    feature = {
        "type": "Feature",
        "properties": {"classification": {"name": "lesion"}},
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[100, 100], [x1, 100], [x1, 500], [100, 500], [100, 100]]],
        },
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))


def test_changed_annotations_or_mpp_are_measured_again(study, tmp_path, capsys):
    """Resume skips a slide only when this run would give the same results: an edited --regions file, one taken
    away, or another --mpp measures it again; the same arguments skip it."""
    slide = _good(study)[0]
    out, regions = tmp_path / "out", tmp_path / "S01_pre_cd3.geojson"
    args = ["quantify", slide, "--stain", "cd3", "--out", str(out), "--quiet"]

    def lesion_mm2() -> float:
        t = _table(out)
        return float(t.loc[t["region"] == "lesion", "region_area_mm2"].iloc[0])

    _box(regions, 300)
    assert main([*args, "--regions", str(regions)]) == 0
    small = lesion_mm2()
    assert main([*args, "--regions", str(tmp_path)]) == 0  # the same file, found in its folder: current
    assert "0 done, 1 skipped" in capsys.readouterr().out
    _box(regions, 700)
    assert main([*args, "--regions", str(regions)]) == 0
    assert "1 done, 0 skipped" in capsys.readouterr().out
    assert lesion_mm2() == pytest.approx(small * 3, rel=0.05)  # 600 x 400 px against 200 x 400 px
    assert main(args) == 0  # no annotations any more
    assert "1 done" in capsys.readouterr().out and "lesion" not in set(_table(out)["region"])
    tissue_mm2 = float(_table(out).query("region == 'tissue'")["region_area_mm2"].iloc[0])
    assert main([*args, "--mpp", "0.25"]) == 0
    assert "1 done" in capsys.readouterr().out
    assert float(_table(out).query("region == 'tissue'")["region_area_mm2"].iloc[0]) == pytest.approx(
        tissue_mm2 / 4,
        rel=0.05,  # tissue is found on a grid of another size
    )
    log = (out / "run.log").read_text()
    assert (
        "measured again: its --regions annotations changed" in log and "measured again: --mpp changed" in log
    )
    # A record from before these fields were kept is not taken as current.
    rec_path = out / "slides" / "S01_pre_cd3.json"
    record = json.loads(rec_path.read_text())
    del record["regions_sha256"]
    rec_path.write_text(json.dumps(record))
    assert main([*args, "--mpp", "0.25"]) == 0
    assert "1 done" in capsys.readouterr().out


def test_new_study_metadata_updates_skipped_slides(study, tmp_path, capsys):
    """Metadata changes no measurement: a rerun with --samples skips the slides and gives their rows the new
    lead columns (corrected rows and the automatic rows kept beside them alike)."""
    from shapely.geometry import box

    from cleihc.corrections import Corrections, apply_saved_corrections, write_corrections

    good = _good(study)
    out = tmp_path / "out"
    args = ["quantify", *good, "--stain", "cd3", "--out", str(out), "--quiet"]
    assert main(args) == 0
    # A reviewer's exclusion on one slide: its record then has corrected and automatic rows.
    write_corrections(out, "S01_pre_cd3", Corrections(exclusions=(box(100, 100, 400, 400),)))
    apply_saved_corrections(out, "S01_pre_cd3")
    before = _table(out)
    assert before["corrected"].any()
    capsys.readouterr()
    samples = tmp_path / "samples.csv"
    samples.write_text(
        "slide,subject,timepoint\nS01_pre_cd3,S01,pre\nS01_post_cd3,S01,post\nS02_pre_cd3,S02,pre\n"
    )
    assert main([*args, "--samples", str(samples)]) == 0
    assert "0 done, 3 skipped" in capsys.readouterr().out
    after = _table(out)
    assert list(after.columns[:3]) == ["subject", "timepoint", "slide"]
    assert after.set_index(["slide", "region"])["subject"].to_dict() == {
        (s, r): s[:3] for s, r in zip(before["slide"], before["region"], strict=True)
    }
    pd.testing.assert_frame_equal(
        after.drop(columns=["subject", "timepoint", "corrected"], errors="ignore"),
        before.drop(columns=["corrected"], errors="ignore"),
    )
    record = json.loads((out / "slides" / "S01_pre_cd3.json").read_text())
    assert record["metadata"] == {"subject": "S01", "timepoint": "pre"}
    assert all(row["subject"] == "S01" for key in ("rows", "automatic_rows") for row in record[key])
    # And back: without --samples the columns go again.
    assert main(args) == 0
    assert "subject" not in _table(out).columns


def test_results_folders_inside_the_inputs_are_not_slides(study, tmp_path, capsys):
    """`cleihc quantify . --out ./results`, twice: the results' OME-TIFF masks and PNG thumbnails (readable
    images) are not taken for slides, nor are files in hidden folders or a QuPath project's thumbnails; a results
    folder named as an input is an error that says so."""
    from cleihc.batch import discover_slides, is_results_folder

    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(_good(study)[0], folder / "S01_pre_cd3.svs")
    (folder / ".cache").mkdir()
    shutil.copy(_good(study)[1], folder / ".cache" / "S01_post_cd3.svs")
    qupath = folder / "qupath" / "data" / "1"  # a QuPath project beside the slides: its thumbnails are JPEGs
    qupath.mkdir(parents=True)
    (folder / "qupath" / "project.qpproj").write_text("{}")
    Image.new("RGB", (64, 48), (230, 200, 210)).save(qupath / "thumbnail.jpg")
    out = folder / "results"
    args = ["quantify", str(folder), "--stain", "cd3", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(out), "--force"]) == 0  # its masks/ and qc/ are there now
    assert main([*args, "--out", str(folder / "other")]) == 0  # and when they are another run's
    assert capsys.readouterr().out.count("1 done, 0 skipped, 0 failed") == 3
    assert is_results_folder(out) and not is_results_folder(folder)
    assert discover_slides([str(folder)]) == ([folder / "S01_pre_cd3.svs"], [])
    # A pattern reaching into the results (their masks are OME-TIFFs) passes over them too.
    assert list((out / "masks").glob("*.ome.tif"))
    assert discover_slides([str(folder / "**" / "*.tif"), str(folder / "*.svs")]) == (
        [folder / "S01_pre_cd3.svs"],
        [],
    )
    slides, failures = discover_slides([str(out)])
    assert slides == [] and [f.reason for f in failures] == [
        "a cleihc results folder, not slides: give the folder of the slides"
    ]


def test_unwritable_output_is_one_line(study, serial_run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["quantify", _good(study)[0], "--stain", "cd3", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cleihc quantify: error: cannot make the results folder") and err.count("\n") == 1
    assert main(["tables", str(serial_run[1]), "--out", str(blocker / "study.csv")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cleihc tables: error: ") and "Traceback" not in err and err.count("\n") == 1


def test_slides_without_study_metadata_are_named(study, tmp_path, capsys):
    """A slide the name pattern does not fit, or the samples CSV lacks, would be a row with empty subject and
    timepoint, dropped by a statistics package without a word: the run log says which and why."""
    good = _good(study)
    samples = tmp_path / "samples.csv"
    samples.write_text("slide,subject\nS01_pre_cd3,S01\nS01_post_cd3.svs,S01\nS09_pre_cd3,S09\n")
    out = tmp_path / "out"
    args = ["quantify", *good, "--stain", "cd3", "--out", str(out), "--quiet"]
    assert main([*args, "--samples", str(samples)]) == 0
    log = (out / "run.log").read_text()
    assert "[S02_pre_cd3]: S02_pre_cd3: no study metadata: it has no row in samples.csv" in log
    assert "no study metadata" not in log.replace("S02_pre_cd3: no study", "")
    assert "1 samples-CSV rows name no slide of this run: S09_pre_cd3" in log
    assert main([*args, "--name-pattern", "{subject}-{timepoint}"]) == 0
    log = (out / "run.log").read_text()
    for slide in ("S01_pre_cd3", "S01_post_cd3", "S02_pre_cd3"):
        assert (
            f"{slide}: no study metadata: its name does not match --name-pattern '{{subject}}-{{timepoint}}'"
            in log
        )
    samples.write_text("slide,subject\nS01_pre_cd3,S01\nS01_pre_cd3.svs,S02\n")
    assert main([*args, "--samples", str(samples)]) == 2
    assert "slide 'S01_pre_cd3' has two rows in the samples CSV; keep one" in capsys.readouterr().err


def test_tables_count_each_slide_once(serial_run, tmp_path, capsys):
    _, out = serial_run
    once, twice = tmp_path / "once.csv", tmp_path / "twice.csv"
    assert main(["tables", str(out), "--out", str(once)]) == 0
    assert main(["tables", str(out), str(out) + "/", "--out", str(twice)]) == 0  # one folder, given twice
    assert once.read_bytes() == twice.read_bytes()
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    capsys.readouterr()
    assert main(["tables", str(out), str(copy), "--out", str(tmp_path / "x.csv")]) == 1
    err = capsys.readouterr().err
    assert "stained 'cd3' is in two results folders" in err and not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize(
    "how, named",
    [
        (["--samples", "SAMPLES"], "region"),
        (["--samples", "SAMPLES"], "value"),
        (["--samples", "SAMPLES"], "cells_total"),
        (["--name-pattern", "{slide}_{timepoint}_{stain}"], "slide"),
        (["--name-pattern", "{subject}_{unit}_{stain}"], "unit"),
    ],
)
def test_study_columns_named_like_cleihcs_own_are_refused(study, tmp_path, capsys, how, named):
    """A samples column `region` (the biopsy site) failed every slide with an internal error; `value` or
    `metric` broke `cleihc tables`; `unit` was silently overwritten. Refused up front, naming the column."""
    samples = tmp_path / "samples.csv"
    samples.write_text(f"slide,subject,{named}\nS01_pre_cd3,S01,x\n")
    how = [str(samples) if a == "SAMPLES" else a for a in how]
    out = tmp_path / "out"
    assert main(["quantify", _good(study)[0], "--stain", "cd3", "--out", str(out), *how]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{named}" in err and "one of cleihc's own column names" in err
    assert not (out / "slides").exists()


def test_tables_take_a_folder_whose_every_slide_failed(study, serial_run, tmp_path, caplog):
    """A CD8 run in which every slide failed (say, no MPP) has failures.csv and run.json but no slides/: the study
    table is made from the other folders, with a warning, rather than refused."""
    _, out = serial_run
    failed = tmp_path / "cd8"
    assert (
        main(["quantify", str(study / "notes.svs"), "--stain", "cd8", "--out", str(failed), "--quiet"]) == 1
    )
    assert not (failed / "slides").exists()
    alone, both = tmp_path / "alone.csv", tmp_path / "both.csv"
    assert main(["tables", str(out), "--out", str(alone)]) == 0
    assert main(["tables", str(out), str(failed), "--out", str(both)]) == 0
    assert alone.read_bytes() == both.read_bytes()
    assert f"{failed}: no slide was measured in this results folder" in caplog.text
    assert main(["tables", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.csv")]) == 1


def test_a_results_folder_of_another_protocol_is_refused(study, serial_run, tmp_path, capsys):
    """Measuring with CD8 into the CD3 results folder would overwrite the CD3 results of any slide in both runs:
    refused (exit 2), nothing written. A new version of the same protocol replaces them, as resume means."""
    _, out = serial_run
    before = {p.name: p.read_bytes() for p in (out / "slides").glob("*.json")}
    assert main(["quantify", _good(study)[0], "--stain", "cd8", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: it holds results of protocol 'cd3' (3 slides)" in err and "cleihc-results/cd8/" in err
    assert {p.name: p.read_bytes() for p in (out / "slides").glob("*.json")} == before


def test_identical_slide_files_are_named(study, tmp_path):
    """A slide copied (or renamed since its first run) has rows under both names: a statistic would count that
    section twice, so the run says which files are one."""
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(_good(study)[0], folder / "S01_pre_cd3.svs")
    shutil.copy(_good(study)[0], folder / "S01_pre_cd3_rescan.svs")
    shutil.copy(_good(study)[1], folder / "S01_post_cd3.svs")
    out = tmp_path / "out"
    assert main(["quantify", str(folder), "--stain", "cd3", "--out", str(out), "--quiet"]) == 0
    warned = [line for line in (out / "run.log").read_text().splitlines() if "are the same file" in line]
    assert len(warned) == 1 and "slides S01_pre_cd3, S01_pre_cd3_rescan are the same file" in warned[0]


def test_one_run_writes_a_results_folder_at_a_time(study, tmp_path, capsys):
    """A second run into a folder another run is writing (two terminals, one study) is refused, naming the
    holder; the lock goes with its holder (the kill -9 test reruns into a killed run's folder)."""
    from cleihc.outputs import results_folder_lock

    out = tmp_path / "out"
    args = ["quantify", _good(study)[0], "--stain", "cd3", "--out", str(out), "--quiet"]
    with results_folder_lock(out):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{out}: another cleihc run is writing to this folder (pid {os.getpid()})" in err
        assert not (out / "slides").exists()
    assert main(args) == 0
    assert "1 done" in capsys.readouterr().out


def test_warnings_print_above_the_progress_bars_on_a_terminal(tmp_path):
    """On a terminal the rich bars redraw in place: a warning written straight to the terminal landed on a bar's
    line and the next redraw erased it. It must start on a line the display cleared for it."""
    from cleihc_testdata import SAMPLE_IMAGES

    try:
        master, slave = os.openpty()
    except OSError as exc:  # pragma: no cover - every Linux CI has pseudo-terminals
        pytest.skip(f"no pseudo-terminal here ({exc})")
    slides = [str(SAMPLE_IMAGES / "S01_pre_gag-alcian.svs"), str(SAMPLE_IMAGES / "S01_pre_cd3.svs")]
    cmd = [*CLEIHC, "quantify", *slides, "--stain", "cd3", "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the other end closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode("utf-8", "replace")
    at = text.index("WARNING cleihc.pipeline [S01_pre_gag-alcian]: stains:")
    assert text[:at].endswith("\x1b[2K"), repr(
        text[at - 80 : at]
    )  # printed on a cleared line, above the bars


@pytest.mark.parametrize(
    "content",
    [
        b"slide,subject,timepoint\nS01_pre_cd3,S01,pre\n",
        b"\xef\xbb\xbfslide,subject,timepoint\r\nS01_pre_cd3,S01,pre\r\n",  # Excel's "CSV UTF-8" (with a BOM)
        b"slide;subject;timepoint\nS01_pre_cd3;S01;pre\n",  # Excel in locales with a decimal comma
        b"slide\tsubject\ttimepoint\nS01_pre_cd3\tS01\tpre\n",  # exported as text
    ],
)
def test_samples_csv_as_spreadsheets_save_it(tmp_path, content):
    from cleihc.batch import StudyMetadata

    path = tmp_path / "samples.csv"
    path.write_bytes(content)
    meta = StudyMetadata(samples=path)
    assert meta.columns == ["subject", "timepoint"]
    assert meta.for_slide("S01_pre_cd3") == {"subject": "S01", "timepoint": "pre"}


def test_a_protocol_edited_under_its_name_on_some_slides_is_named(study, serial_run, tmp_path, caplog):
    """Regression: a copy of cd3 with other thresholds (same [protocol] name, so the same results folder) used on
    one slide left the others measured with the old one; nothing said so, and the long table cannot tell."""
    _, ref = serial_run
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    edited = tmp_path / "cd3-strict.toml"
    text = subprocess.run(
        [*CLEIHC, "protocols", "show", "cd3"], capture_output=True, text=True, check=True
    ).stdout
    edited.write_text(text.replace("bins_od = [0.2, 0.4, 0.6]", "bins_od = [0.2, 0.5, 0.8]"))
    assert "bins_od = [0.2, 0.5, 0.8]" in edited.read_text()
    assert main(["quantify", _good(study)[0], "--protocol", str(edited), "--out", str(out), "--quiet"]) == 0
    log_text = (out / "run.log").read_text()
    assert "stain 'cd3' was measured with 2 different protocols" in log_text
    assert "2 slide(s)" in log_text and "1 slide(s)" in log_text
    caplog.clear()
    assert main(["tables", str(out), "--out", str(tmp_path / "study.csv")]) == 0
    assert "stain 'cd3' was measured with 2 different protocols" in caplog.text
    caplog.clear()
    assert main(["tables", str(ref), "--out", str(tmp_path / "ref.csv")]) == 0
    assert "different protocols" not in caplog.text


def test_a_local_protocol_hiding_a_built_in_is_named(study, tmp_path, monkeypatch):
    """Regression: ./protocols/cd3.toml silently replaced the built-in cd3 for `--stain cd3`; neither the console,
    run.log nor run.json said which file was used."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "protocols").mkdir()
    text = subprocess.run(
        [*CLEIHC, "protocols", "show", "cd3"], capture_output=True, text=True, check=True
    ).stdout
    (tmp_path / "protocols" / "cd3.toml").write_text(text.replace("[0.2, 0.4, 0.6]", "[0.2, 0.5, 0.8]"))
    out = tmp_path / "out"
    assert main(["quantify", _good(study)[0], "--stain", "cd3", "--out", str(out), "--quiet"]) == 0
    log_text = (out / "run.log").read_text()
    assert (
        "protocols/cd3.toml, not the built-in protocol of that name" in log_text
        and "--stain cd3 uses" in log_text
    )
    run = json.loads((out / "run.json").read_text())
    assert Path(run["protocol"]["source"]).resolve() == (tmp_path / "protocols" / "cd3.toml").resolve()
    # Named explicitly: no warning, the file still recorded.
    out2 = tmp_path / "out2"
    args = ["quantify", _good(study)[0], "--protocol", "protocols/cd3.toml", "--out", str(out2), "--quiet"]
    assert main(args) == 0
    assert "not the built-in" not in (out2 / "run.log").read_text()
    assert "protocols/cd3.toml" in json.loads((out2 / "run.json").read_text())["protocol"]["source"]
