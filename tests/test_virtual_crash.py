"""SIGKILL of a real process just before and just after a virtual commit, then the job
again: every file's steps are in the repository exactly once, in one commit each. The jobs
that are not killed run here, as a worker runs them (one process, many jobs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import icechunk as ic
import pytest
import structlog
import xarray as xr

from conftest import ROOT, env_for_subprocess
from dpypeline.pipeline import JobContext, Task

sys.path.insert(0, str(ROOT / "scripts"))
from make_nemo import make_series  # a script, not a package

pytestmark = pytest.mark.slow

# One job's virtualize call, as the worker runs it: argv = store job_id path
RUNNER = """
import os, sys, structlog
from dpypeline.pipeline import JobContext, Task
store, job_id, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = JobContext(
    job_id=job_id, attempt=1, path=path, relpath=os.path.basename(path),
    root=os.path.dirname(path), job="nemo", log=structlog.get_logger(),
)
Task("virtualize", store=store, append_dim="time_counter")(path, context)
"""


def run_killed(store: Path, job_id: int, path: Path, failpoint: str) -> int:
    """The job in a process of its own, which the failpoint kills."""
    env = {**env_for_subprocess(), "DPYPELINE_FAILPOINT": failpoint}
    cmd = [sys.executable, "-c", RUNNER, str(store), str(job_id), str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode in (0, -9), done.stderr
    return done.returncode


def run(store: Path, job_id: int, path: Path) -> int:
    """The job here, as RUNNER runs it; 0 when it returns."""
    context = JobContext(
        job_id=job_id, attempt=1, path=str(path), relpath=path.name, root=str(path.parent),
        job="nemo", log=structlog.get_logger(),
    )  # fmt: skip
    Task("virtualize", store=str(store), append_dim="time_counter")(str(path), context)
    return 0


@pytest.mark.parametrize("failpoint", ["virtual_before_commit", "virtual_after_commit"])
def test_sigkill_around_a_virtual_commit_leaves_each_file_once(
    tmp_path: Path, failpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DPYPELINE_FAILPOINT", raising=False)
    files = make_series(tmp_path / "inbox", 3)
    store = tmp_path / "virtual.icechunk"
    assert run(store, 1, files[0]) == 0
    assert run_killed(store, 2, files[1], failpoint) == -9
    assert run(store, 2, files[1]) == 0  # the worker runs the job again
    assert run(store, 3, files[2]) == 0
    repo = ic.Repository.open(
        ic.local_filesystem_storage(str(store)),
        authorize_virtual_chunk_access={(tmp_path / "inbox").as_uri() + "/": None},
    )
    jobs = [s.metadata.get("job_id") for s in repo.ancestry(branch="main")][:-1]
    assert jobs == [3, 2, 1]
    ds = xr.open_zarr(repo.readonly_session("main").store, consolidated=False)
    assert [t.year for t in ds.time_counter.values] == [1, 2, 3]
    ds.toce.load()
