"""The dask executor on a real SLURM batch cluster (``../shared/tools/slurm-sandbox``, one
node on loopback), built from the YAML with ``dask_jobqueue.SLURMCluster``: files run on
SLURM-launched workers, a worker job cancelled mid-run costs a retry, not the job, and a
stopped service leaves no SLURM job behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    ROOT,
    ServiceProcess,
    env_for_subprocess,
    jobs,
    runs,
    status,
    wait_for,
    write_config,
)

# one SLURM for the machine: its tests on one worker
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]

SANDBOX = Path(ROOT).parent / "shared/tools/slurm-sandbox"


@pytest.fixture(scope="session")
def slurm() -> Iterator[None]:
    """A running single-node SLURM for the whole session, stopped at its end."""
    if not SANDBOX.exists():
        pytest.skip(f"the SLURM sandbox is missing: {SANDBOX}")
    if os.geteuid() != 0:
        pytest.skip("the SLURM sandbox needs root (CI runs as root)")
    started = subprocess.run(
        [str(SANDBOX), "start"], capture_output=True, text=True, timeout=600, check=False
    )
    if started.returncode != 0:
        pytest.fail(f"slurm-sandbox start failed:\n{started.stdout}\n{started.stderr}")
    env = subprocess.run([str(SANDBOX), "env"], capture_output=True, text=True, check=True)
    conf = env.stdout.strip().removeprefix("export SLURM_CONF=")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield
    finally:
        subprocess.run([str(SANDBOX), "stop"], capture_output=True, timeout=120, check=False)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def slurm_jobs(name: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def slurm_pipeline(tmp_path: Path, log: Path, pids: Path, job_name: str) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data: dict[str, Any] = {
        "cache_dir": str(tmp_path / "state"),
        "watch": [{"path": str(inbox), "settle": "100ms"}],
        "executor": {
            "kind": "dask",
            "cluster": {
                "class": "dask_jobqueue.SLURMCluster",
                "options": {
                    "cores": 1,
                    "processes": 1,
                    "memory": "1GB",
                    "queue": "debug",
                    "walltime": "00:10:00",
                    "interface": "lo",
                    "job_name": job_name,
                    "log_directory": str(tmp_path / "slurm-logs"),  # not the working directory
                },
                "scale": {"jobs": 2},
            },
        },
        "retry": {"max_attempts": 3, "backoff": {"initial": "200ms", "max": "1s"}},
        "jobs": [
            {
                "name": "ingest",
                "tasks": [
                    {"task": "taskbox.killable", "with": {"log": str(log), "pids": str(pids)}}
                ],
            }
        ],
        "logging": {"format": "json"},
    }
    return write_config(tmp_path, data), inbox


def test_files_run_on_slurm_workers_a_cancelled_worker_job_costs_a_retry_and_stop_leaves_no_job(
    slurm: None, tmp_path: Path, service_processes: list[ServiceProcess]
) -> None:
    log, pids = tmp_path / "runs.log", tmp_path / "pids"
    pids.mkdir()
    name = f"dpypeline-test-{uuid.uuid4().hex[:8]}"
    cfg, inbox = slurm_pipeline(tmp_path, log, pids, name)
    service = ServiceProcess(cfg)
    service_processes.append(service)
    service.wait_ready(timeout=60)
    wait_for(
        lambda: (s := status(cfg)["executor"]) and s["workers"] == 2,
        timeout=90,
        message="two SLURM worker jobs running",
    )
    assert len(slurm_jobs(name)) == 2
    (inbox / "victim.nc").write_text("x")
    victim = pids / "victim.nc.pid"
    wait_for(victim.exists, timeout=30, message="the job running on a SLURM worker")
    _, slurm_job = victim.read_text().split()
    assert slurm_job in slurm_jobs(name)
    for i in range(6):
        (pids / f"f{i}.nc.pid").write_text("0 -")  # these run straight through
        (inbox / f"f{i}.nc").write_text("x")
    subprocess.run(["scancel", slurm_job], check=True)
    wait_for(lambda: status(cfg)["done"] == 7, timeout=120, message="every job done")
    assert sorted(rel for rel, _, _ in runs(log)) == [*(f"f{i}.nc" for i in range(6)), "victim.nc"]
    ran_on = {(pids / f"f{i}.nc.ran").read_text() for i in range(6)}
    assert "-" not in ran_on, "every job ran inside a SLURM job"
    assert (pids / "victim.nc.ran").read_text() != slurm_job
    assert {j["state"] for j in jobs(cfg)} == {"done"}
    retried = [e for e in service.events() if e.get("event") == "job_retrying"]
    assert [Path(e["file"]).name for e in retried] == ["victim.nc"]
    assert "KilledWorker" in retried[0]["error"]
    service.signal(signal.SIGTERM)
    assert service.wait(60) == 0
    wait_for(lambda: not slurm_jobs(name), timeout=30, message="no SLURM job left behind")


def test_the_lotus_batch_script_stops_at_its_budget_and_the_next_run_finishes(
    slurm: None, tmp_path: Path
) -> None:
    """deploy/jasmin/dpypeline.sbatch as a real batch job: the budget ends the run with exit
    75 and work left in the ledger; the next job takes it up; each file runs once."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "settle": "100ms"}],
            "jobs": [
                {
                    "name": "work",
                    "tasks": [
                        {
                            "task": "taskbox.record",
                            "with": {"log": str(tmp_path / "runs.log"), "delay": 2.0},
                        }
                    ],
                }
            ],
            "logging": {"format": "json"},
        },
    )
    for n in range(4):
        (inbox / f"f{n}.dat").write_bytes(b"x")
    job_name = f"dpypeline-{uuid.uuid4().hex[:8]}"

    def submit(budget: str) -> tuple[int, str]:
        env = {
            **env_for_subprocess(),
            "DPYPELINE_CONFIG": str(cfg),
            "DPYPELINE_MAX_RUNTIME": budget,
            "DPYPELINE": f"{sys.executable} -m dpypeline",
        }
        proc = subprocess.run(
            # the script's own #SBATCH lines name LOTUS's partition and memory; the
            # sandbox has one partition and less memory
            ["sbatch", "--wait", "--parsable", "--partition=debug", "--mem=1G",
             f"--job-name={job_name}", f"--chdir={tmp_path}", "--export=ALL",
             str(ROOT / "deploy/jasmin/dpypeline.sbatch")],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )  # fmt: skip
        job_id = proc.stdout.strip().split(";")[0]
        return proc.returncode, (tmp_path / f"dpypeline-{job_id}.out").read_text()

    code, output = submit("1s")
    assert code == 75, output[-3000:]
    assert '"time_budget_reached"' in output
    counts = status(cfg)
    assert counts["running"] == 0
    assert counts["done"] + counts["queued"] == 4
    assert counts["queued"] > 0
    code, output = submit("10m")
    assert code == 0, output[-3000:]
    assert sorted(rel for rel, _, _ in runs(tmp_path / "runs.log")) == [
        f"f{n}.dat" for n in range(4)
    ]
