"""Writes to one append-mode store commit in queue order, end to end: `dpypeline run --once`
on six yearly NEMO files with a fault on year 3, serial and dask executors. A failed year
holds the later ones (no attempt spent, no hole, no dead job for being overtaken) until it
is written, retried by the operator, or skipped by the operator; template stores are not
held."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from conftest import (
    ROOT,
    cli,
    dpypeline,
    env_for_subprocess,
    jobs,
    status,
    wait_for,
    write_config,
)

sys.path.insert(0, str(ROOT / "scripts"))
from make_nemo import make_series  # a script, not a package

T = "time_counter"
YEAR3 = "_00030101_"
DASK = {
    "kind": "dask",
    "cluster": {
        "options": {
            "n_workers": 2,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": ":0",
        }
    },
}


@pytest.fixture(scope="module")
def years(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_series(tmp_path_factory.mktemp("nemo"), 6)


def pipeline(
    tmp_path: Path,
    years: list[Path],
    fault: dict[str, Any],
    *,
    store: dict[str, Any] | None = None,
    executor: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for f in years:
        shutil.copy2(f, inbox / f.name)
    out = tmp_path / "out.zarr"
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "monitor": False,
            "watch": [{"path": str(inbox), "patterns": ["*.nc"], "settle": "100ms"}],
            "executor": executor or {"kind": "serial"},
            "retry": {"max_attempts": 3, "backoff": {"initial": "300ms", "max": "1s"}},
            "jobs": [
                {
                    "name": "to-zarr",
                    "tasks": [
                        fault,
                        {"task": "open_dataset", "with": {"chunks": {T: 1}}},
                        {"task": "to_zarr", "with": {"store": str(out), **(store or {})}},
                    ],
                }
            ],
            "logging": {"format": "json"},
        },
    )
    return cfg, out


def run_once(cfg: Path, timeout: float = 120.0) -> list[dict[str, Any]]:
    """`dpypeline run --once`; it must end by itself. Returns its log events. With the
    serial executor it runs in this process (``run_here``); a dask run is a process of
    its own, which starts its cluster's workers."""
    from dpypeline.config.model import load_config

    if load_config(cfg, environ=env_for_subprocess()).executor.kind == "serial":
        return run_here(cfg)
    proc = dpypeline("run", "-c", str(cfg), "--once", timeout=timeout)
    events = []
    for line in proc.stderr.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    assert events, proc.stderr[-3000:]
    assert events[-1]["event"] == "service_stopped", proc.stderr[-3000:]
    return events


def run_here(cfg: Path) -> list[dict[str, Any]]:
    """`dpypeline run --once` in this process: the same service loop, ledger, tasks and
    store, and its log events as the command logs them (but for timestamp, level and
    logger), without an interpreter's start-up and imports (two seconds of CPU a run). The
    jobs' reads compute in the job's own thread: dask's threaded scheduler keeps a pool for
    each thread that calls it, and the job threads of a service run in this process would
    leave theirs behind (a service process ends with its own)."""
    import dask
    from structlog.testing import capture_logs

    from dpypeline.config.model import load_config
    from dpypeline.loop.service import Service
    from dpypeline.pipeline import import_tasks

    config = load_config(cfg, environ=env_for_subprocess())
    job_list, setup = import_tasks(config)
    with dask.config.set(scheduler="synchronous"), capture_logs() as events:
        code = Service(config, job_list, setup, once=True).run()
    assert events, "no log events"
    assert events[-1]["event"] == "service_stopped", events[-3:]
    assert code in (0, 3), code  # 3: some jobs ended dead
    return events


def steps(store: Path) -> list[float]:
    return [float(v) for v in xr.open_zarr(store, decode_times=False)[T].values]


def times(files: list[Path]) -> list[float]:
    return [float(xr.open_dataset(f, decode_times=False)[T].values[0]) for f in files]


def by_year(cfg: Path) -> dict[int, dict[str, Any]]:
    """Jobs by the year in their file's name."""
    return {int(Path(j["path"]).name.split("_")[2][:4]): j for j in jobs(cfg)}


def assert_store_is(store: Path, files: list[Path]) -> None:
    assert steps(store) == times(files)
    got = xr.open_zarr(store, decode_times=False).load()
    want = np.concatenate([xr.open_dataset(f, decode_times=False).toce.values for f in files])
    np.testing.assert_array_equal(got.toce.values, want)
    assert got.attrs["dpypeline_committed"] == len(files)


@pytest.mark.slow
@pytest.mark.parametrize(
    "executor",
    [pytest.param(None, id="serial"), pytest.param(DASK, id="dask", marks=pytest.mark.slow)],
)
def test_a_year_that_fails_once_is_written_in_its_place_and_nothing_goes_dead(
    tmp_path: Path, years: list[Path], executor: dict[str, Any] | None
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    # year 3 fails after 2 s: with the dask executor, year 4 is computed by then and
    # waits for its turn to commit, so it is withdrawn
    slow = {"marks": str(marks), "match": YEAR3, "delay": 2.0}
    fault = {"task": "taskbox.fail_once", "with": slow}
    cfg, store = pipeline(tmp_path, years, fault, store={"append_dim": T}, executor=executor)
    events = run_once(cfg, timeout=180)
    assert (marks / (years[2].name + ".failed")).exists(), "year 3 failed once"
    state = by_year(cfg)
    assert {y: j["state"] for y, j in state.items()} == {y: "done" for y in range(1, 7)}
    assert state[3]["attempts"] == 2
    assert [state[y]["attempts"] for y in (4, 5, 6)] == [1, 1, 1], "a hold spends no attempt"
    assert_store_is(store, years)
    held = [e for e in events if e["event"] == "job_held"]
    assert held
    assert {e["behind"] for e in held} == {state[3]["id"]}
    assert not [e for e in events if e["event"] in ("job_dead", "store_held")]
    withdrawn = [e for e in held if "that failed" in e["reason"]]
    assert [e["job_id"] for e in withdrawn] == ([state[4]["id"]] if executor else [])


@pytest.mark.slow
def test_a_dead_year_holds_the_later_ones_until_the_operator_skips_it(
    tmp_path: Path, years: list[Path]
) -> None:
    flag = tmp_path / "year3-is-broken"
    flag.touch()
    fault = {"task": "taskbox.broken_while", "with": {"flag": str(flag), "match": YEAR3}}
    cfg, store = pipeline(tmp_path, years, fault, store={"append_dim": T})
    events = run_once(cfg)
    state = by_year(cfg)
    dead = state[3]["id"]
    assert state[3]["state"] == "dead"
    assert [state[y]["state"] for y in (1, 2)] == ["done", "done"]
    for y in (4, 5, 6):
        assert (state[y]["state"], state[y]["attempts"]) == ("queued", 0)
        assert state[y]["held_behind"] == dead
        assert f"held behind dead job {dead}" in state[y]["held"]
    assert steps(store) == times(years[:2])
    held_lines = [e for e in events if e["event"] == "job_held"]
    assert sorted(e["job_id"] for e in held_lines) == [state[y]["id"] for y in (4, 5, 6)]
    drained = next(e for e in events if e["event"] == "service_drained")
    assert f"3 held behind dead job {dead}" in drained["held"]
    assert f"dpypeline skip {dead}" in drained["held"]
    report = status(cfg)
    assert [h["job_id"] for h in report["held"]] == [state[y]["id"] for y in (4, 5, 6)]
    assert {h["behind"] for h in report["held"]} == {dead}
    listed = cli("jobs", "-c", str(cfg))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count(f"held behind dead job {dead}") == 3
    assert f"held: 3 held behind dead job {dead}" in cli("status", "-c", str(cfg)).stdout

    run_once(cfg)  # nothing moves without the operator, and the run still ends
    assert steps(store) == times(years[:2])

    refused = cli("skip", "-c", str(cfg), str(state[4]["id"]))
    assert refused.returncode == 1
    assert "only a dead job can be skipped; it is queued" in refused.stdout

    # the service, watching: systemd's STATUS= shows the hold; a skip frees it at once
    cfg.write_text(cfg.read_text().replace("monitor: false", "monitor: true"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    env = {**env_for_subprocess(), "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    env["WATCHDOG_USEC"] = "1000000"  # health, and so STATUS=, every half second
    with (tmp_path / "service.log").open("w") as err:
        service = subprocess.Popen(
            [sys.executable, "-m", "dpypeline", "run", "-c", str(cfg)], stderr=err, env=env
        )
    try:
        sock.settimeout(20)
        want = f"3 held behind dead job {dead} (dpypeline retry {dead}"
        while want not in (message := sock.recv(65536).decode()):
            pass
        assert message.startswith("STATUS=") or "\nSTATUS=" in message
        sock.close()  # a full socket would block the service's next notification
        (tmp_path / "notify.sock").unlink()
        proc = cli("skip", "-c", str(cfg), str(dead))
        assert proc.returncode == 0, proc.stderr
        assert f"job {dead} skipped" in proc.stdout
        skip_line = json.loads(proc.stderr.strip().splitlines()[-1])
        assert (skip_line["event"], skip_line["job_id"], skip_line["by"]) == (
            "job_skipped",
            dead,
            "operator",
        )
        wait_for(lambda: status(cfg)["done"] == 5, timeout=60, message="the held years written")
        service.send_signal(signal.SIGTERM)
        assert service.wait(30) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        sock.close()
    state = by_year(cfg)
    assert state[3]["state"] == "skipped"
    assert state[3]["error"].startswith("skipped by the operator (dpypeline skip")
    assert "needs fixing" in state[3]["error"]
    assert [state[y]["state"] for y in (1, 2, 4, 5, 6)] == ["done"] * 5
    assert_store_is(store, [years[i] for i in (0, 1, 3, 4, 5)])
    assert status(cfg)["held"] == []


@pytest.mark.slow
def test_a_dead_year_retried_after_its_fix_is_written_before_the_later_ones(
    tmp_path: Path, years: list[Path]
) -> None:
    flag = tmp_path / "year3-is-broken"
    flag.touch()
    fault = {"task": "taskbox.broken_while", "with": {"flag": str(flag), "match": YEAR3}}
    cfg, store = pipeline(tmp_path, years, fault, store={"append_dim": T})
    run_once(cfg)
    dead = by_year(cfg)[3]["id"]
    assert steps(store) == times(years[:2])
    flag.unlink()
    assert cli("retry", "-c", str(cfg), str(dead)).returncode == 0
    run_once(cfg)
    state = by_year(cfg)
    assert {y: j["state"] for y, j in state.items()} == {y: "done" for y in range(1, 7)}
    assert [state[y]["attempts"] for y in (3, 4, 5, 6)] == [1, 1, 1, 1]
    assert_store_is(store, years)


@pytest.mark.slow
def test_a_template_store_takes_the_later_years_while_one_is_dead(
    tmp_path: Path, years: list[Path]
) -> None:
    from dpypeline.tasks.netcdf import open_dataset
    from dpypeline.tasks.zarr.to_zarr import create_template

    flag = tmp_path / "year3-is-broken"
    flag.touch()
    fault = {"task": "taskbox.broken_while", "with": {"flag": str(flag), "match": YEAR3}}
    cfg, store = pipeline(tmp_path, years, fault, store={"region": T})
    axis = [open_dataset(str(f))[T].values[0] for f in years]
    create_template(open_dataset(str(years[0])), str(store), T, axis)
    events = run_once(cfg)
    state = by_year(cfg)
    assert state[3]["state"] == "dead"
    assert [state[y]["state"] for y in (1, 2, 4, 5, 6)] == ["done"] * 5
    assert not [e for e in events if e["event"] in ("job_held", "store_held")]
    got = xr.open_zarr(store, decode_times=False).load()
    for i in (0, 1, 3, 4, 5):
        want = xr.open_dataset(years[i], decode_times=False)
        np.testing.assert_array_equal(got.toce.isel({T: [i]}).values, want.toce.values)
    assert bool(got.toce.isel({T: 2}).isnull().all())
    assert status(cfg)["held"] == []


DATABASE_WRITER = '''
"""A user's own task: appends one row per file to a file standing in for a database
table, and declares that table as the resource it commits to."""

import os

from dpypeline.commits import Commit, commits


@commits(lambda kw: Commit("table:" + os.path.abspath(kw["table"]), ordered=True))
def append_row(path, *, table, context=None):
    with open(table, "a") as rows:
        rows.write(os.path.basename(path) + "\\n")
    return path
'''


@pytest.mark.parametrize(
    "executor",
    [pytest.param(None, id="serial"), pytest.param(DASK, id="dask", marks=pytest.mark.slow)],
)
def test_a_users_own_task_that_declares_its_table_gets_its_rows_in_queue_order(
    tmp_path: Path, executor: dict[str, Any] | None
) -> None:
    inbox, marks, table = tmp_path / "inbox", tmp_path / "marks", tmp_path / "table.txt"
    inbox.mkdir()
    marks.mkdir()
    names = [f"row{i}.dat" for i in range(1, 7)]
    for name in names:
        (inbox / name).write_text(name)
    (tmp_path / "dbwriter.py").write_text(DATABASE_WRITER)
    # row 3 fails once, after 2 s: with the dask executor the later rows are computed by
    # then and wait for their turn to commit
    fault = {"marks": str(marks), "match": "row3", "delay": 2.0}
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "monitor": False,
            "watch": [{"path": str(inbox), "patterns": ["*.dat"], "settle": "100ms"}],
            "executor": executor or {"kind": "serial"},
            "retry": {"max_attempts": 3, "backoff": {"initial": "300ms", "max": "1s"}},
            "jobs": [
                {
                    "name": "rows",
                    "tasks": [
                        {"task": "taskbox.fail_once", "with": fault},
                        {"task": "dbwriter.append_row", "with": {"table": str(table)}},
                    ],
                }
            ],
            "logging": {"format": "json"},
        },
    )
    events = run_once(cfg, timeout=180)
    assert table.read_text().split() == names
    state = {Path(j["path"]).name: j for j in jobs(cfg)}
    assert {n: j["state"] for n, j in state.items()} == dict.fromkeys(names, "done")
    assert [state[n]["attempts"] for n in names] == [1, 1, 2, 1, 1, 1]
    held = [e for e in events if e["event"] == "job_held"]
    assert held
    assert {e["behind"] for e in held} == {state["row3.dat"]["id"]}
