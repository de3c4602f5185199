"""The main job end to end: `dpypeline run` ingests NEMO files into a Zarr store on a real
S3 server (moto on loopback), through outages and bad input."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
import xarray as xr

from conftest import (
    ROOT,
    ServiceProcess,
    cli,
    dpypeline,
    env_for_subprocess,
    jobs,
    status,
    wait_for,
    write_config,
)
from s3server import S3Server

sys.path.insert(0, str(ROOT / "scripts"))
from make_nemo import make_series  # scripts, not a package

pytestmark = pytest.mark.slow
BUCKET = "nemo-test"
STORE = f"s3://{BUCKET}/gyre_T.zarr"
BACKOFF = {"initial": "200ms", "max": "1s"}
POLL = 0.2  # seconds between looks at a running service (each one loads the config)


def nemo_config(tmp_path: Path, s3: S3Server, **extra: Any) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    creds = s3.credentials_file(tmp_path)
    data: dict[str, Any] = {
        "cache_dir": str(tmp_path / "state"),
        "watch": [{"path": str(inbox), "patterns": ["*.nc"], "settle": "200ms"}],
        "retry": {"max_attempts": 3, "backoff": {"initial": "1s", "max": "4s"}},
        "objectstores": {"moto": {"credentials": str(creds)}},
        "setup": [{"task": "create_bucket", "with": {"objectstore": "moto", "bucket": BUCKET}}],
        "jobs": [
            {
                "name": "to-zarr",
                "tasks": [
                    {"task": "open_dataset", "with": {"chunks": {"time_counter": 1}}},
                    {
                        "task": "to_zarr",
                        "with": {
                            "objectstore": "moto",
                            "store": STORE,
                            "append_dim": "time_counter",
                        },
                    },
                ],
            }
        ],
        "logging": {"format": "json"},
    }
    data.update(extra)
    return write_config(tmp_path, data), inbox


def run_here(cfg: Path) -> int:
    """What ``dpypeline run -c CFG`` exits with, run in this process to the end of its queue
    (the configs here have ``monitor: false``): the same service loop, ledger, tasks and
    store, without an interpreter's start-up and imports (two seconds of CPU a run). The
    runs whose process matters (its exit code, its output, a SIGKILL) run
    ``dpypeline(...)``. The jobs' reads compute in the job's own thread: dask's threaded
    scheduler keeps a pool for each thread that calls it, and the job threads of a service
    run in this process would leave theirs behind (a service process ends with its own)."""
    import dask

    from dpypeline.config.model import load_config
    from dpypeline.loop.service import Service
    from dpypeline.pipeline import import_tasks

    config = load_config(cfg, environ=env_for_subprocess())
    job_list, setup = import_tasks(config)
    with dask.config.set(scheduler="synchronous"):
        return Service(config, job_list, setup).run()


def read_store(s3: S3Server) -> xr.Dataset:
    return xr.open_zarr(
        STORE,
        storage_options=s3.storage_options(),
        consolidated=None,
        decode_times=xr.coders.CFDatetimeCoder(use_cftime=True),
    )


def expected(files: list[Path]) -> xr.Dataset:
    coder = xr.coders.CFDatetimeCoder(use_cftime=True)
    return xr.concat(
        [xr.open_dataset(f, decode_times=coder) for f in files],
        "time_counter",
        data_vars="minimal",
        coords="minimal",
        compat="override",
    )


def assert_store_is(store: xr.Dataset, files: list[Path]) -> None:
    want = expected(files)
    assert list(store.time_counter.values) == list(want.time_counter.values)
    assert store.time_counter.encoding["calendar"] == "360_day"
    for name, var in want.data_vars.items():
        if "time_counter" in var.dims:
            np.testing.assert_array_equal(store[name].values, var.values, err_msg=name)


def test_s3_outage_longer_than_every_retry_mid_ingest_costs_no_job(
    tmp_path: Path, s3: S3Server, service_processes: list[ServiceProcess]
) -> None:
    # pauses of 0.2, 0.4, 0.8, 1 s: more of them than max_attempts in a few seconds
    cfg, inbox = nemo_config(tmp_path, s3, retry={"max_attempts": 3, "backoff": BACKOFF})
    files = make_series(tmp_path / "made", 6)
    svc = ServiceProcess(cfg)
    service_processes.append(svc)
    svc.wait_ready()
    for f in files[:3]:
        shutil.copy(f, inbox / f".{f.name}.part")
        (inbox / f".{f.name}.part").rename(inbox / f.name)
    wait_for(lambda: status(cfg)["done"] >= 2, 60, POLL, message="two files ingested")
    s3.stop()
    try:
        for f in files[3:]:  # the rest arrive during the outage
            shutil.copy(f, inbox / f".{f.name}.part")
            (inbox / f".{f.name}.part").rename(inbox / f.name)
        # the outage met more often than max_attempts (3) allows: only refunds survive it
        wait_for(
            lambda: sum(e.get("event") == "service_paused" for e in svc.events()) > 3,
            timeout=60,
            interval=POLL,
            message="a fourth pause in the outage",
        )
        during = status(cfg)
        assert during["dead"] == 0
    finally:
        s3.start()
    wait_for(lambda: status(cfg)["done"] == 6, 120, POLL, message="all files after the outage")
    assert status(cfg)["dead"] == 0
    paused = [e for e in svc.events() if e.get("event") == "service_paused"]
    assert paused, "the outage was never noticed"
    assert all(j["attempts"] <= 2 for j in jobs(cfg))
    assert_store_is(read_store(s3), files)
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0


def _partial_overlap(files: list[Path], out: Path) -> Path:
    coder = xr.coders.CFDatetimeCoder(use_cftime=True)
    parts = [xr.open_dataset(f, decode_times=coder) for f in (files[1], files[5])]
    xr.concat(
        parts, "time_counter", data_vars="minimal", coords="minimal", compat="override"
    ).to_netcdf(out)
    return out


def test_bad_inputs_end_dead_with_clear_reasons_and_good_files_go_on(
    tmp_path: Path, s3: S3Server
) -> None:
    # (a credentials file readable by others is refused before start: test_cli)
    cfg, inbox = nemo_config(
        tmp_path, s3, monitor=False, retry={"max_attempts": 2, "backoff": {"initial": "200ms"}}
    )
    files = make_series(tmp_path / "made", 6)
    for f in files[:4]:
        shutil.copy(f, inbox / f.name)
    (inbox / "zero.nc").write_bytes(b"")
    (inbox / "text.nc").write_text("this is not NetCDF\n")
    truncated = files[4].read_bytes()
    (inbox / "truncated.nc").write_bytes(truncated[: len(truncated) // 2])
    u_file = make_series(tmp_path / "u", 1, grid="U", start_year=20)[0]
    shutil.copy(u_file, inbox / "z-schema-U.nc")
    _partial_overlap(files, inbox / "z-overlap.nc")

    proc = dpypeline("run", "-c", str(cfg), timeout=240)
    assert proc.returncode == 3, proc.stderr[-3000:]  # drained; some jobs ended dead
    # a dead file holds the later files of its store until the operator accepts the gap
    for _ in range(6):
        dead = [str(j["id"]) for j in jobs(cfg, "dead")]
        if not dead:
            break
        assert cli("skip", "-c", str(cfg), *dead).returncode == 0
        run_here(cfg)

    zarr_jobs = {Path(j["path"]).name: j for j in jobs(cfg) if j["job"] == "to-zarr"}
    for f in files[:4]:
        assert zarr_jobs[f.name]["state"] == "done", zarr_jobs[f.name]
    for name in ("zero.nc", "text.nc", "truncated.nc"):
        assert zarr_jobs[name]["state"] == "skipped", zarr_jobs[name]
        assert zarr_jobs[name]["attempts"] == 1  # permanent: no retry
        assert name in zarr_jobs[name]["path"]  # the file in its own field, once
        assert "the file is" in zarr_jobs[name]["error"]
        assert "re-send" in zarr_jobs[name]["error"]
    assert zarr_jobs["z-schema-U.nc"]["state"] == "skipped"
    assert "does not match" in zarr_jobs["z-schema-U.nc"]["error"]
    assert zarr_jobs["z-overlap.nc"]["state"] == "skipped"
    assert "overlap" in zarr_jobs["z-overlap.nc"]["error"].lower()
    assert_store_is(read_store(s3), files[:4])


def test_wrong_credentials_end_dead_with_the_403_and_never_show_the_secret(
    tmp_path: Path, s3: S3Server, s3_auth: dict[str, tuple[str, str]]
) -> None:
    key, secret = s3_auth["writer"]
    stores = {}
    for name, sec in (("good", secret), ("wrong", "not-the-secret")):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"token": key, "secret": sec, "endpoint_url": s3.endpoint_url}))
        path.chmod(0o600)
        stores[name] = {"credentials": str(path)}
    cfg, inbox = nemo_config(
        tmp_path,
        s3,
        monitor=False,
        objectstores=stores,
        setup=[{"task": "create_bucket", "with": {"objectstore": "good", "bucket": BUCKET}}],
        jobs=[
            {
                "name": f"upload-{name}",
                "tasks": [
                    {
                        "task": "upload_file",
                        "with": {"objectstore": name, "bucket": BUCKET, "prefix": name},
                    }
                ],
            }
            for name in stores
        ],
    )
    for f in make_series(tmp_path / "made", 2):
        shutil.copy(f, inbox / f.name)
    proc = dpypeline("run", "-c", str(cfg), timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]  # some jobs ended dead
    by_job: dict[str, list[dict[str, Any]]] = {}
    for j in jobs(cfg):
        by_job.setdefault(j["job"], []).append(j)
    assert [j["state"] for j in by_job["upload-good"]] == ["done", "done"]
    for j in by_job["upload-wrong"]:
        assert (j["state"], j["attempts"]) == ("dead", 1)
        assert "403" in j["error"]
        assert str(tmp_path / "wrong.json") in j["error"]
    everything = json.dumps(jobs(cfg)) + proc.stderr
    assert secret not in everything
    assert "not-the-secret" not in everything


def yaml_load(path: Path) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load(path.read_text()))


def test_validate_refuses_a_credentials_file_readable_by_others(
    tmp_path: Path, s3: S3Server
) -> None:
    cfg, _ = nemo_config(tmp_path, s3)
    creds = tmp_path / "s3.json"
    creds.chmod(0o644)
    proc = cli("validate", "-c", str(cfg))
    assert proc.returncode == 2
    assert str(creds) in proc.stderr
    assert "chmod 600" in proc.stderr
    creds.chmod(0o600)
    assert cli("validate", "-c", str(cfg)).returncode == 0


def test_replays_and_retry_never_duplicate_a_step(tmp_path: Path, s3: S3Server) -> None:
    cfg, inbox = nemo_config(tmp_path, s3, monitor=False)
    files = make_series(tmp_path / "made", 3)
    for f in files:
        shutil.copy(f, inbox / f.name)
    assert run_here(cfg) == 0
    # the same file again under another name (a replay), then a forced retry of a done job
    shutil.copy(files[1], inbox / "again.nc")
    assert run_here(cfg) == 0
    fs = s3fs.S3FileSystem(**s3.storage_options())
    assert fs.exists(f"{BUCKET}/gyre_T.zarr")
    assert_store_is(read_store(s3), files)
    [again] = [j for j in jobs(cfg) if j["path"].endswith("again.nc")]
    assert again["state"] == "done"


def test_the_readme_main_job_ingests_into_a_local_zarr_store(tmp_path: Path) -> None:
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "examples", work / "examples")
    made = make_series(work / "inbox" / "nemo", 6)
    proc = dpypeline_in(work, "run", "--once", "-c", "examples/netcdf-to-zarr.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = xr.open_zarr(
        work / "output" / "nemo_T.zarr", decode_times=xr.coders.CFDatetimeCoder(use_cftime=True)
    )
    want = expected(made)
    assert list(store.time_counter.values) == list(want.time_counter.values)
    for name in ("toce", "soce", "e3t"):
        np.testing.assert_array_equal(store[name].values, want[name].values, err_msg=name)


def test_the_readme_main_job_ingests_nemo_namnc4_chunked_files_unchanged(tmp_path: Path) -> None:
    """NEMO's own layout: 3-D fields in (1, 3, ny/4, nx/4) chunks, deptht_bounds contiguous;
    the README config as it is; every file done at its first attempt, the store exact."""
    from make_orca import make_files

    work = tmp_path / "repo"
    shutil.copytree(ROOT / "examples", work / "examples")
    made = make_files(work / "inbox" / "nemo", 3, grid=(64, 48, 10), layout="namnc4")
    proc = dpypeline_in(work, "run", "--once", "-c", "examples/netcdf-to-zarr.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = work / "examples" / "netcdf-to-zarr.yaml"
    assert [(j["state"], j["attempts"]) for j in jobs(config)] == [("done", 1)] * 3
    coder = xr.coders.CFDatetimeCoder(use_cftime=True)
    store = xr.open_zarr(work / "output" / "nemo_T.zarr", decode_times=coder)
    want = expected(made)
    for name in ("thetao", "so", "tos", "deptht_bounds"):
        got, exp = store[name].values, want[name].where(want[name] != 1e20).values
        np.testing.assert_array_equal(got, exp, err_msg=name)
    # validate --sample shows what the store got: whole small fields, one step per chunk
    sample = cli("validate", "-c", str(config), "--sample", str(made[0]))
    assert sample.returncode == 0, sample.stderr
    line = next(ln for ln in sample.stdout.splitlines() if ln.split()[:1] == ["thetao"])
    assert line.split()[1:3] == ["1x3x12x16", "1x10x48x64"], line


def test_the_readme_first_command_run_again_repeats_nothing(tmp_path: Path) -> None:
    """The README's first line, twice: make_nemo leaves identical files alone (mtimes
    too), so the second `run --once` finds no new file version and runs no job."""
    import subprocess

    work = tmp_path / "repo"
    shutil.copytree(ROOT / "examples", work / "examples")
    make = [sys.executable, str(ROOT / "scripts" / "make_nemo.py"), "inbox/nemo", "--files", "6"]

    def mtimes() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (work / "inbox" / "nemo").iterdir()}

    subprocess.run(make, cwd=work, check=True, env=env_for_subprocess(), capture_output=True)
    first = dpypeline_in(work, "run", "--once", "-c", "examples/netcdf-to-zarr.yaml")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count('"job_done"') == 6
    before = mtimes()
    subprocess.run(make, cwd=work, check=True, env=env_for_subprocess(), capture_output=True)
    assert mtimes() == before
    second = dpypeline_in(work, "run", "--once", "-c", "examples/netcdf-to-zarr.yaml")
    assert second.returncode == 0, second.stderr[-3000:]
    assert '"job_' not in second.stderr
    assert status(work / "examples" / "netcdf-to-zarr.yaml")["done"] == 6


def dpypeline_in(cwd: Path, *args: str) -> Any:
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "dpypeline", *args],
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env_for_subprocess(),
    )


def _crash_env(tmp_path: Path, point: str) -> dict[str, str]:
    once = tmp_path / "crash-once"
    once.touch()
    return {"DPYPELINE_FAILPOINT": point, "DPYPELINE_FAILPOINT_ONCE_FILE": str(once)}


# The service killed before any array of the file is written and after all of them are:
# the job's attempt is counted and the restart's replay makes the store exact. Every other
# point of an append is killed at in tests/test_zarr_crash.py, which replays it the same way.
@pytest.mark.parametrize("point", ["before_resize", "before_commit"])
def test_sigkill_of_the_service_during_an_append_then_restart_leaves_the_store_exact(
    tmp_path: Path, s3: S3Server, point: str
) -> None:
    cfg, inbox = nemo_config(
        tmp_path, s3, monitor=False, retry={"max_attempts": 2, "backoff": {"initial": "200ms"}}
    )
    files = make_series(tmp_path / "made", 3)
    shutil.copy(files[0], inbox / files[0].name)
    assert run_here(cfg) == 0  # the store is made
    for f in files[1:]:
        shutil.copy(f, inbox / f.name)
    killed = dpypeline("run", "-c", str(cfg), timeout=120, env=_crash_env(tmp_path, point))
    assert killed.returncode == -signal.SIGKILL  # died inside the second file's append
    assert not (tmp_path / "crash-once").exists()
    assert run_here(cfg) == 0  # the restart, on what the killed process left
    assert status(cfg)["done"] == 3  # the killed file, then one after it
    [second] = [j for j in jobs(cfg) if j["path"].endswith(files[1].name)]
    assert second["attempts"] == 2  # the killed attempt counted, then the replay
    store = read_store(s3)
    assert {
        store[v].sizes["time_counter"] for v in store.data_vars if "time_counter" in store[v].dims
    } == {3}
    assert_store_is(store, files)


def test_a_job_dead_after_writing_its_data_is_retried_without_duplicating_steps(
    tmp_path: Path, s3: S3Server
) -> None:
    cfg, inbox = nemo_config(tmp_path, s3, monitor=False, retry={"max_attempts": 1})
    files = make_series(tmp_path / "made", 3)
    for f in files:
        shutil.copy(f, inbox / f.name)
    env = _crash_env(tmp_path, "before_commit")  # the last file's data is in, uncommitted
    (tmp_path / "crash-once").unlink()
    assert run_here(cfg) == 0
    (tmp_path / "crash-once").touch()
    extra = make_series(tmp_path / "more", 1, start_year=4)[0]
    shutil.copy(extra, inbox / extra.name)
    assert dpypeline("run", "-c", str(cfg), timeout=120, env=env).returncode == -signal.SIGKILL
    # the killed job's only attempt is spent: this run records it dead, and says so
    assert dpypeline("run", "-c", str(cfg), timeout=120).returncode == 3
    [dead] = jobs(cfg, "dead")
    assert dead["path"].endswith(extra.name)
    assert "stopped during each of its 1 attempts" in dead["error"]
    assert cli("retry", "-c", str(cfg), "--dead").returncode == 0
    assert run_here(cfg) == 0
    assert status(cfg)["done"] == 4
    assert_store_is(read_store(s3), [*files, extra])


def test_the_store_follows_the_config_file_whichever_directory_the_service_starts_in(
    tmp_path: Path,
) -> None:
    """Every relative path of a config, a task's path arguments included, is relative to
    the config file: a run from examples/ appends to the same store as one from the top."""
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "examples", work / "examples")
    inbox = work / "inbox" / "nemo"

    def make(files: int) -> int:
        make_series(inbox, files)  # what scripts/make_nemo.py INBOX --files N does
        return len(list(inbox.glob("*_grid_T.nc")))

    first_files = make(1)
    first = dpypeline_in(work, "run", "--once", "-c", "examples/netcdf-to-zarr.yaml")
    assert first.returncode == 0, first.stderr[-3000:]
    all_files = make(2)
    second = dpypeline_in(work / "examples", "run", "--once", "-c", "netcdf-to-zarr.yaml")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count('"job_done"') == all_files - first_files > 0
    assert not (work / "examples" / "output").exists()
    store = xr.open_zarr(work / "output" / "nemo_T.zarr", decode_times=False)
    steps = sum(
        xr.open_dataset(f, decode_times=False).sizes["time_counter"] for f in inbox.iterdir()
    )
    assert store.sizes["time_counter"] == steps
    checked = dpypeline_in(work / "examples", "validate", "-c", "netcdf-to-zarr.yaml")
    assert f"jobs[0].tasks[2].with.store: {work / 'output' / 'nemo_T.zarr'}" in checked.stdout
