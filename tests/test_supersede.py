"""A new version of a file takes its job's place in its append store's order, end to end:
the main job (NetCDF → Zarr, appended along time_counter) on five yearly NEMO files, the
service watching its inbox in this process. A year that arrives truncated or empty goes
dead and holds the later years; the provider re-sending it (rsync: a temporary name, then
a rename), or filling the placeholder in place, is enough for it to be written in its
place and the held years after it, with no hole; so is ``dpypeline retry N`` after a
re-send while the service was stopped. A year re-sent after it was written rewrites its
own steps. The same re-send through the Dask executor runs as a real service process."""

from __future__ import annotations

import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
import netCDF4
import numpy as np
import pytest
import xarray as xr

from conftest import ROOT, ServiceProcess, dpypeline, wait_for, write_config
from dpypeline.config.model import load_config
from dpypeline.loop.service import Service
from dpypeline.pipeline import import_tasks
from dpypeline.state.ledger import Ledger

sys.path.insert(0, str(ROOT / "scripts"))
from make_nemo import make_series  # a script, not a package

T = "time_counter"
DASK = {
    "kind": "dask",
    "cluster": {
        "options": {
            "n_workers": 1,
            "threads_per_worker": 2,
            "processes": True,
            "dashboard_address": ":0",
        }
    },
}


@pytest.fixture(autouse=True)
def one_thread_per_job() -> Iterator[None]:
    """The jobs' reads compute in the job's own thread: dask's threaded scheduler keeps a
    pool for each thread that calls it, and the job threads of a service run in this
    process would leave theirs behind (a service process ends with its own)."""
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.fixture(scope="module")
def years(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_series(tmp_path_factory.mktemp("nemo"), 5)


def pipeline(tmp_path: Path, executor: dict[str, Any] | None = None) -> tuple[Path, Path, Path]:
    inbox, store = tmp_path / "inbox", tmp_path / "out.zarr"
    inbox.mkdir()
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "patterns": ["*.nc"], "settle": "100ms"}],
            "executor": executor or {"kind": "serial"},
            "retry": {"max_attempts": 3, "backoff": {"initial": "200ms", "max": "1s"}},
            "jobs": [
                {
                    "name": "to-zarr",
                    "tasks": [
                        {"task": "open_dataset", "with": {"chunks": {T: 1}}},
                        {"task": "to_zarr", "with": {"store": str(store), "append_dim": T}},
                    ],
                }
            ],
            "logging": {"format": "json"},
        },
    )
    return cfg, inbox, store


def service(cfg: Path, *, once: bool) -> Service:
    config = load_config(cfg)
    job_list, setup = import_tasks(config)
    return Service(config, job_list, setup, once=once)


@contextmanager
def watching(cfg: Path) -> Iterator[Service]:
    """The service, watching, in a thread of this process."""
    svc = service(cfg, once=False)
    thread = threading.Thread(target=svc.run, name="test-service")
    thread.start()
    try:
        yield svc
    finally:
        svc.request_stop()
        thread.join(30)
        assert not thread.is_alive(), "the service did not stop"


def deliver(inbox: Path, source: Path, data: bytes | None = None) -> None:
    """As rsync delivers: written under a temporary name, then renamed into place."""
    part = inbox / f".{source.name}.part"
    if data is None:
        shutil.copyfile(source, part)
    else:
        part.write_bytes(data)
    part.rename(inbox / source.name)


def truncated(source: Path) -> bytes:
    return source.read_bytes()[:40_000]  # head -c 40000


def ledger_jobs(cfg: Path) -> list[dict[str, Any]]:
    """Every job, as ``dpypeline jobs --json`` gives it, read straight from the ledger (the
    service in this process logs to the same stdout the command prints to)."""
    config = load_config(cfg)
    ledger = Ledger(config.cache_dir)
    try:
        held = {h.job_id: h.behind for h in ledger.held()}
        records = ledger.jobs(limit=1000)
    finally:
        ledger.close()
    return [
        {
            "id": r.id,
            "path": r.path,
            "state": r.state.value,
            "attempts": r.attempts,
            "error": r.error,
            "held_behind": held.get(r.id),
        }
        for r in reversed(records)
    ]


def by_year(cfg: Path) -> dict[int, Any]:
    """Jobs by the year in their file's name; a year with two jobs shows as a list."""
    out: dict[int, Any] = {}
    for j in ledger_jobs(cfg):
        year = int(Path(j["path"]).name.split("_")[2][:4])
        out[year] = [out[year], j] if year in out else j
    return out


def states(cfg: Path) -> dict[int, str]:
    return {y: j["state"] if isinstance(j, dict) else "two jobs" for y, j in by_year(cfg).items()}


def wait_states(cfg: Path, want: dict[int, str], message: str, timeout: float = 30) -> None:
    wait_for(
        lambda: states(cfg) == want,
        timeout=timeout,
        message=message,
        detail=lambda: f"jobs: {by_year(cfg)}",
    )


def arrive(cfg: Path, inbox: Path, files: list[tuple[Path, bytes | None]]) -> None:
    """Deliver the files one after the other, each once the one before has its job: the
    jobs' ids, and so the store's order, follow the years."""
    for n, (f, data) in enumerate(files, len(ledger_jobs(cfg)) + 1):
        deliver(inbox, f, data)
        wait_for(lambda: len(ledger_jobs(cfg)) >= n, message=f"a job for {f.name}")  # noqa: B023


def steps(store: Path) -> list[float]:
    return [float(v) for v in xr.open_zarr(store, decode_times=False)[T].values]


def times(files: list[Path]) -> list[float]:
    return [float(xr.open_dataset(f, decode_times=False)[T].values[0]) for f in files]


def assert_store_is(store: Path, files: list[Path]) -> None:
    assert steps(store) == times(files)
    got = xr.open_zarr(store, decode_times=False).load()
    want = np.concatenate([xr.open_dataset(f, decode_times=False).toce.values for f in files])
    np.testing.assert_array_equal(got.toce.values, want)


HELD = {1: "done", 2: "dead", 3: "queued", 4: "queued", 5: "queued"}
DONE = dict.fromkeys(range(1, 6), "done")


def year2_dead_and_the_rest_held(cfg: Path) -> int:
    def held() -> bool:
        state = by_year(cfg)
        behind = [state[y]["held_behind"] for y in (3, 4, 5)] if len(state) == 5 else []
        return states(cfg) == HELD and behind == [state[2]["id"]] * 3

    wait_for(held, timeout=30, message="year 2 dead, years 3..5 held behind it")
    return int(by_year(cfg)[2]["id"])


@pytest.mark.slow
def test_a_truncated_year_re_sent_whole_is_written_in_its_place_and_the_held_years_follow(
    tmp_path: Path, years: list[Path]
) -> None:
    cfg, inbox, store = pipeline(tmp_path)
    with watching(cfg):
        arrive(cfg, inbox, [(f, truncated(f) if i == 1 else None) for i, f in enumerate(years)])
        dead = year2_dead_and_the_rest_held(cfg)
        assert steps(store) == times(years[:1])
        deliver(inbox, years[1])  # the provider re-sends it whole under the same name
        wait_states(cfg, DONE, "every year written after the re-send")
    assert_store_is(store, years)
    state = by_year(cfg)
    assert state[2]["id"] == dead  # the re-sent version took the dead job's place
    assert (state[2]["attempts"], state[2]["error"]) == (1, None)
    assert [state[y]["attempts"] for y in (3, 4, 5)] == [1, 1, 1]


@pytest.mark.slow
@pytest.mark.parametrize("fill", ["in place", "replaced"])
def test_an_empty_placeholder_filled_later_is_written_in_its_place(
    tmp_path: Path, years: list[Path], fill: str
) -> None:
    cfg, inbox, store = pipeline(tmp_path)
    with watching(cfg):
        arrive(cfg, inbox, [(f, b"" if i == 1 else None) for i, f in enumerate(years)])
        year2_dead_and_the_rest_held(cfg)
        if fill == "in place":
            with (inbox / years[1].name).open("r+b") as placeholder:
                placeholder.write(years[1].read_bytes())
        else:
            deliver(inbox, years[1])
        wait_states(cfg, DONE, f"every year written after the placeholder was {fill}")
    assert_store_is(store, years)


@pytest.mark.slow
def test_retry_of_a_dead_year_re_sent_while_the_service_was_stopped_leaves_no_hole(
    tmp_path: Path, years: list[Path]
) -> None:
    cfg, inbox, store = pipeline(tmp_path)
    # the years as a run --once finds them: the scan gives them in name order
    for i, f in enumerate(years):
        deliver(inbox, f, truncated(f) if i == 1 else None)
    assert service(cfg, once=True).run() == 3  # a job ended dead
    dead = year2_dead_and_the_rest_held(cfg)
    deliver(inbox, years[1])
    dpypeline("retry", "-c", str(cfg), str(dead), check=True)  # as its error says
    assert service(cfg, once=True).run() == 0
    assert states(cfg) == DONE
    assert by_year(cfg)[2]["id"] == dead
    assert_store_is(store, years)


def test_a_year_re_sent_after_it_was_written_rewrites_its_own_steps(
    tmp_path: Path, years: list[Path]
) -> None:
    cfg, inbox, store = pipeline(tmp_path)
    corrected = tmp_path / "corrected" / years[1].name
    corrected.parent.mkdir()
    shutil.copyfile(years[1], corrected)
    with netCDF4.Dataset(corrected, "a") as nc:
        nc["toce"][:] = nc["toce"][:] + 1.0
    with watching(cfg):
        arrive(cfg, inbox, [(f, None) for f in years[:3]])
        wait_states(cfg, {1: "done", 2: "done", 3: "done"}, "three years written")
        deliver(inbox, corrected)
        wait_for(
            lambda: [j["state"] for j in ledger_jobs(cfg)] == ["done"] * 4,
            message="the corrected year written",
            detail=lambda: f"jobs: {ledger_jobs(cfg)}",
        )
    assert_store_is(store, [years[0], corrected, years[2]])


@pytest.mark.slow
def test_a_truncated_year_re_sent_whole_takes_its_place_with_the_dask_executor(
    tmp_path: Path, years: list[Path], service_processes: list[ServiceProcess]
) -> None:
    cfg, inbox, store = pipeline(tmp_path, DASK)
    svc = ServiceProcess(cfg)
    service_processes.append(svc)
    svc.wait_ready(60)
    three = years[:3]
    arrive(cfg, inbox, [(f, truncated(f) if i == 1 else None) for i, f in enumerate(three)])
    wait_states(cfg, {1: "done", 2: "dead", 3: "queued"}, "year 2 dead, year 3 held", 60)
    deliver(inbox, years[1])
    wait_states(cfg, {1: "done", 2: "done", 3: "done"}, "the three years written", 60)
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0
    assert_store_is(store, three)
    assert svc.events("job_superseded")
