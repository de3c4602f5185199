"""The dask executor: jobs on a LocalCluster of two worker processes keep every guarantee
of the serial executor (done once, retries, timeouts, dead, ordered Zarr appends)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import xarray as xr

from conftest import (
    ROOT,
    ServiceProcess,
    dpypeline,
    env_for_subprocess,
    jobs,
    runs,
    status,
    wait_for,
    write_config,
)

sys.path.insert(0, str(ROOT / "scripts"))
from make_nemo import make_series  # a script, not a package

pytestmark = pytest.mark.slow

LOCAL_CLUSTER = {
    "options": {
        "n_workers": 2,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": ":0",
    }
}
DASK = {"kind": "dask", "cluster": LOCAL_CLUSTER}
POLL = 0.2  # seconds between looks at a running service (each one loads the config)


def pipeline(
    tmp_path: Path,
    tasks: list[dict[str, Any]],
    *,
    executor: dict[str, Any] | None = None,
    monitor: bool = False,
    retry: dict[str, Any] | None = None,
    name: str = "pipeline.yaml",
) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / f"state-{Path(name).stem}"),
            "monitor": monitor,
            "watch": [{"path": str(inbox), "settle": "100ms", "rescan_interval": "30s"}],
            "executor": executor or DASK,
            "retry": retry or {"max_attempts": 3, "backoff": {"initial": "200ms", "max": "1s"}},
            "jobs": [{"name": "ingest", "tasks": tasks}],
            "logging": {"format": "json"},
        },
        name,
    )
    return cfg, inbox


def run_once(cfg: Path, timeout: float = 120.0, exit_code: int = 0) -> None:
    proc = dpypeline("run", "-c", str(cfg), "--once", timeout=timeout)
    assert proc.returncode == exit_code, proc.stderr[-3000:]


def run_serial_here(cfg: Path) -> None:
    """`dpypeline run --once` of a serial pipeline in this process: the reference a dask
    run is compared with, without an interpreter's start-up and imports (two seconds of
    CPU). The jobs' reads compute in the job's own thread: dask's threaded scheduler keeps
    a pool for each thread that calls it, and the job threads of a service run in this
    process would leave theirs behind (a service process ends with its own)."""
    import dask

    from dpypeline.config.model import load_config
    from dpypeline.loop.service import Service
    from dpypeline.pipeline import import_tasks

    config = load_config(cfg, environ=env_for_subprocess())
    assert config.executor.kind == "serial"
    job_list, setup = import_tasks(config)
    with dask.config.set(scheduler="synchronous"):
        assert Service(config, job_list, setup, once=True).run() == 0


def test_fifty_files_on_two_workers_are_each_done_once(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    cfg, inbox = pipeline(tmp_path, [{"task": "taskbox.record", "with": {"log": str(log)}}])
    for i in range(50):
        (inbox / f"f{i:02d}.nc").write_text(str(i))
    run_once(cfg)
    done = runs(log)
    assert sorted(rel for rel, _, _ in done) == [f"f{i:02d}.nc" for i in range(50)]
    assert {att for _, _, att in done} == {1}
    assert status(cfg)["done"] == 50


def test_a_worker_killed_mid_job_makes_the_job_retry_and_finish(
    tmp_path: Path, service_processes: list[ServiceProcess]
) -> None:
    log, pids = tmp_path / "runs.log", tmp_path / "pids"
    pids.mkdir()
    cfg, inbox = pipeline(
        tmp_path,
        [{"task": "taskbox.killable", "with": {"log": str(log), "pids": str(pids)}}],
        monitor=True,
    )
    service = ServiceProcess(cfg)
    service_processes.append(service)
    service.wait_ready()
    (inbox / "victim.nc").write_text("x")
    pid_file = pids / "victim.nc.pid"
    wait_for(pid_file.exists, message="the job running on a worker")
    worker_pid = int(pid_file.read_text().split()[0])
    assert worker_pid != service.proc.pid
    cluster = wait_for(
        lambda: (s := status(cfg)["executor"]) and s["in_flight"] == 1 and s,
        message="status showing the job in flight",
    )
    assert cluster["kind"] == "dask"
    assert cluster["workers"] == 2
    assert cluster["slots"] == 2
    assert cluster["address"].startswith("tls://127.0.0.1:")
    os.kill(worker_pid, signal.SIGKILL)
    wait_for(lambda: status(cfg)["done"] == 1, timeout=30, message="the job done")
    (job,) = jobs(cfg)
    assert job["attempts"] == 2
    assert [(rel, att) for rel, _, att in runs(log)] == [("victim.nc", 2)]
    retried = [e for e in service.events() if e.get("event") == "job_retrying"]
    assert len(retried) == 1
    assert "KilledWorker" in retried[0]["error"]
    service.signal(signal.SIGTERM)
    assert service.wait(30) == 0
    assert status(cfg)["executor"] is None


def test_a_hanging_job_times_out_is_retried_then_dead_and_the_others_finish(
    tmp_path: Path,
) -> None:
    log = tmp_path / "runs.log"
    cfg, inbox = pipeline(
        tmp_path,
        [{"task": "taskbox.behave", "with": {"log": str(log)}}],
        retry={"max_attempts": 2, "backoff": {"initial": "200ms"}, "job_timeout": "2s"},
    )
    (inbox / "a-hang.nc").write_text("x")
    for i in range(4):
        (inbox / f"good{i}.nc").write_text("x")
    run_once(cfg, exit_code=3)  # a job ended dead
    by_path = {Path(j["path"]).name: j for j in jobs(cfg)}
    hung = by_path.pop("a-hang.nc")
    assert hung["state"] == "dead"
    assert hung["attempts"] == 2
    assert "timed out after 2s" in hung["error"]
    assert {j["state"] for j in by_path.values()} == {"done"}
    assert sorted(rel for rel, _, _ in runs(log)) == [f"good{i}.nc" for i in range(4)]


def test_task_modules_next_to_the_config_import_on_the_workers(tmp_path: Path) -> None:
    (tmp_path / "mytasks.py").write_text(
        "import os\n\n"
        "def mark(path, out):\n"
        "    name = os.path.basename(path) + '.' + str(os.getpid())\n"
        "    open(os.path.join(out, name), 'w').close()\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    cfg, inbox = pipeline(tmp_path, [{"task": "mytasks.mark", "with": {"out": str(out)}}])
    for i in range(4):
        (inbox / f"f{i}.nc").write_text("x")
    run_once(cfg)
    marks = sorted(p.name for p in out.iterdir())
    assert [m.split(".nc.")[0] for m in marks] == ["f0", "f1", "f2", "f3"]
    assert str(os.getpid()) not in {m.split(".nc.")[1] for m in marks}


def test_twelve_nemo_files_computed_in_parallel_append_in_queue_order_as_serial_does(
    tmp_path: Path,
) -> None:
    files = make_series(tmp_path / "nemo", 12)
    stores = {}
    for kind, executor in (("serial", {"kind": "serial"}), ("dask", DASK)):
        work = tmp_path / kind
        work.mkdir()
        store = work / "out.zarr"
        stamps = work / "stamps"
        stamps.mkdir()
        cfg, inbox = pipeline(
            work,
            [
                {"task": "taskbox.stamp", "with": {"out": str(stamps), "overtake": kind == "dask"}},
                {"task": "open_dataset"},
                {"task": "clean_dataset", "with": {"missing_value": 1.0e20}},
                {"task": "to_zarr", "with": {"store": str(store), "append_dim": "time_counter"}},
            ],
            executor=executor,
        )
        for f in files:
            shutil.copy2(f, inbox / f.name)
        if kind == "serial":
            run_serial_here(cfg)
        else:
            run_once(cfg, timeout=180)
        assert status(cfg)["done"] == 12, jobs(cfg)
        stores[kind] = store
    computed = {
        int(p.name): tuple(map(float, p.read_text().split()))
        for p in (tmp_path / "dask" / "stamps").iterdir()
    }
    assert len({pid for pid, _, _ in computed.values()}) == 2, "both workers computed"
    overtaken = [j for j in range(1, 12) if computed[j + 1][2] < computed[j][2]]
    assert overtaken, "files were computed out of queue order, yet written in it"
    serial = xr.open_zarr(stores["serial"], decode_times=False).load()
    dask = xr.open_zarr(stores["dask"], decode_times=False).load()
    xr.testing.assert_identical(serial, dask)
    assert serial.attrs["dpypeline_committed"] == 12


def test_the_dask_benchmark_runs_in_quick_mode(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    # one worker: the script runs end to end; the suite's rows run it on two
    # (tests/test_bench_smoke.py)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_dask.py"), "--quick", "--workers", "1",
         "--json", str(report), "--dir", str(tmp_path / "work")],
        env=env_for_subprocess(), capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["cpu_bound"]["speedup"] > 0
    assert data["noop_overhead"]["dask_s_per_job"] > 0
    assert "cpu_bound" in proc.stdout
    assert "noop_overhead" in proc.stdout
    assert list((tmp_path / "work").iterdir()) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dask(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        env=env_for_subprocess(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_losing_the_scheduler_makes_the_service_unhealthy_then_restart_and_reconnect(
    tmp_path: Path, service_processes: list[ServiceProcess]
) -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    port = address.rsplit(":", 1)[1]
    scheduler_cmd = ("distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", port,
                     "--no-dashboard")  # fmt: skip
    worker_cmd = ("distributed.cli.dask_worker", address, "--nthreads", "1", "--no-dashboard",
                  "--no-nanny")  # fmt: skip
    started = [_dask(*scheduler_cmd), _dask(*worker_cmd)]
    try:
        log = tmp_path / "runs.log"
        cfg, inbox = pipeline(
            tmp_path,
            [{"task": "taskbox.record", "with": {"log": str(log)}}],
            executor={"kind": "dask", "address": address},
            monitor=True,
        )
        service = ServiceProcess(cfg)
        service_processes.append(service)
        service.wait_ready(timeout=60)
        (inbox / "before.nc").write_text("x")
        wait_for(lambda: status(cfg)["done"] == 1, timeout=30, message="the first job done")

        started[0].kill()
        started[0].wait()

        def logged(event: str) -> list[dict[str, Any]]:
            return [e for e in service.events() if e.get("event") == event]

        unhealthy = wait_for(
            lambda: [e for e in logged("health_changed") if e["problems"]],
            timeout=30,
            message="the service unhealthy",
        )
        assert "scheduler" in " ".join(unhealthy[0]["problems"])
        wait_for(lambda: logged("cluster_lost"), timeout=40, message="the service restarting")
        started += [_dask(*scheduler_cmd), _dask(*worker_cmd)]
        wait_for(lambda: len(logged("service_ready")) == 2, timeout=60, message="reconnected")
        assert service.proc.poll() is None
        (inbox / "after.nc").write_text("x")
        wait_for(lambda: status(cfg)["done"] == 2, timeout=30, message="a job after the restart")
        service.signal(signal.SIGTERM)
        assert service.wait(30) == 0
    finally:
        for p in started:
            p.kill()
            p.wait()


def test_the_readme_dask_example_appends_what_the_serial_example_does(tmp_path: Path) -> None:
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "examples", work / "examples")
    make_series(work / "inbox" / "nemo", 6)
    # the serial example as the reference (the README's command for it: test_ingest_nemo)
    run_serial_here(work / "examples" / "netcdf-to-zarr.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "dpypeline", "run", "--once", "-c",
         "examples/netcdf-to-zarr-dask.yaml"],
        cwd=work, env=env_for_subprocess(), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    serial = xr.open_zarr(work / "output" / "nemo_T.zarr", decode_times=False).load()
    dask = xr.open_zarr(work / "output" / "nemo_T_dask.zarr", decode_times=False).load()
    xr.testing.assert_identical(serial, dask)
    assert serial.sizes["time_counter"] == 6


def test_a_first_sigterm_lets_jobs_on_the_cluster_finish_a_second_puts_them_back(
    tmp_path: Path, service_processes: list[ServiceProcess]
) -> None:
    log = tmp_path / "runs.log"
    cfg, inbox = pipeline(
        tmp_path, [{"task": "taskbox.record", "with": {"log": str(log), "delay": 4}}], monitor=True
    )
    service = ServiceProcess(cfg)
    service_processes.append(service)
    service.wait_ready()
    for name in ("a.nc", "b.nc"):
        (inbox / name).write_text("x")
    wait_for(
        lambda: (s := status(cfg)["executor"]) and s["in_flight"] == 2,
        timeout=60,
        interval=POLL,
        message="two jobs running",
    )
    service.signal(signal.SIGTERM)
    assert service.wait(30) == 0
    assert sorted(rel for rel, _, _ in runs(log)) == ["a.nc", "b.nc"]
    assert {j["state"] for j in jobs(cfg)} == {"done"}

    for name in ("c.nc", "d.nc"):
        (inbox / name).write_text("x")
    cfg, _ = pipeline(  # the same pipeline, with jobs that outlast the test
        tmp_path, [{"task": "taskbox.record", "with": {"log": str(log), "delay": 60}}], monitor=True
    )
    service = ServiceProcess(cfg)
    service_processes.append(service)
    service.wait_ready()
    wait_for(
        lambda: (s := status(cfg)["executor"]) and s["in_flight"] == 2,
        timeout=60,
        interval=POLL,
        message="two jobs running",
    )
    service.signal(signal.SIGTERM)
    wait_for(
        lambda: sum(e.get("event") == "service_stopping" for e in service.events()) == 2,
        message="the first signal taken",  # the log holds both runs
    )
    service.signal(signal.SIGTERM)
    assert service.wait(15) == 0
    waiting = [j for j in jobs(cfg) if j["state"] != "done"]
    assert sorted((Path(j["path"]).name, j["state"], j["attempts"]) for j in waiting) == [
        ("c.nc", "queued", 0),
        ("d.nc", "queued", 0),
    ]


def test_slots_are_workers_over_workers_per_event_and_follow_the_cluster_size() -> None:
    from dpypeline.config.model import ClusterConfig, ExecutorConfig
    from dpypeline.executors.dask import DaskExecutor

    options = {"n_workers": 2, "processes": False, "dashboard_address": ":0"}
    config = ExecutorConfig(
        kind="dask", cluster=ClusterConfig(options=options), workers_per_event=2
    )
    executor = DaskExecutor(threading.Event(), config)
    executor.start()
    try:
        assert executor.capacity() == 1
        assert executor.describe()["slots"] == 1
        cluster = executor._cluster
        cluster.scale(4)
        wait_for(lambda: executor.capacity() == 2, message="two slots on four workers")
        cluster.scale(1)
        wait_for(lambda: executor.capacity() == 0, message="no slot on one worker")
        assert executor.problems() == []
    finally:
        executor.close()


def test_slots_and_health_answer_at_once_while_the_scheduler_does_not() -> None:
    """The loop asks for slots and health on every pass: a scheduler that stops answering
    must not hold it up (each look could wait 10 s on the scheduler)."""
    from dpypeline.config.model import ClusterConfig, ExecutorConfig
    from dpypeline.executors.dask import WORKERS_EVERY, DaskExecutor

    options = {"n_workers": 1, "processes": False, "dashboard_address": ":0"}
    config = ExecutorConfig(kind="dask", cluster=ClusterConfig(options=options))
    executor = DaskExecutor(threading.Event(), config)
    executor.start()
    release, looked = threading.Event(), threading.Event()

    def look() -> None:  # past the next count of the workers, then some
        deadline = time.monotonic() + 3 * WORKERS_EVERY
        while time.monotonic() < deadline:
            executor.capacity()
            executor.problems()
            looked.wait(0.05)
        looked.set()

    try:
        assert executor.capacity() == 1
        executor._cluster.loop.add_callback(release.wait)  # the scheduler's loop is stuck
        looker = threading.Thread(target=look, name="test-looker", daemon=True)
        looker.start()
        assert looked.wait(3 * WORKERS_EVERY + 5), "capacity() or problems() waited on it"
    finally:
        release.set()
        executor.close()


def test_validate_names_the_line_of_a_cluster_class_that_does_not_import(tmp_path: Path) -> None:
    executor = {"kind": "dask", "cluster": {"class": "dask_jobqueue.NoSuchCluster"}}
    cfg, _ = pipeline(tmp_path, [{"task": "taskbox.noop"}], executor=executor)
    proc = dpypeline("validate", "-c", str(cfg))
    assert proc.returncode == 2
    assert "pipeline.yaml:" in proc.stderr
    assert "executor.cluster.class: cannot import 'dask_jobqueue.NoSuchCluster'" in proc.stderr


def test_sigkill_of_the_service_with_jobs_on_the_cluster_loses_nothing(
    tmp_path: Path, service_processes: list[ServiceProcess]
) -> None:
    log = tmp_path / "runs.log"
    cfg, inbox = pipeline(
        tmp_path, [{"task": "taskbox.record", "with": {"log": str(log), "delay": 2}}], monitor=True
    )
    service = ServiceProcess(cfg)
    service_processes.append(service)
    service.wait_ready()
    names = [f"f{i}.nc" for i in range(4)]
    for name in names:
        (inbox / name).write_text("x")
    wait_for(
        lambda: (s := status(cfg)["executor"]) and s["in_flight"] == 2,
        timeout=60,
        interval=POLL,
        message="two jobs running",
    )
    service.kill()
    service = ServiceProcess(cfg)
    service_processes.append(service)
    service.wait_ready()
    wait_for(lambda: status(cfg)["done"] == 4, timeout=60, message="every job done")
    done = jobs(cfg)
    assert sorted(Path(j["path"]).name for j in done) == names
    assert max(j["attempts"] for j in done) == 2  # the two killed in flight ran again
    assert sorted({rel for rel, _, _ in runs(log)}) == names
    service.signal(signal.SIGTERM)
    assert service.wait(30) == 0
