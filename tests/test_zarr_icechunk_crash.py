"""SIGKILL during a write into an Icechunk repository, before the data, between the data and
the commit, and between the commit and the ledger; then the job runs again, as the worker
replays it: exactly one commit per file, and the branch is the concatenation of the files.
The killed job runs in a process of its own; the others run here, as a worker runs its jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import xarray as xr

from conftest import env_for_subprocess
from dpypeline.config.model import ObjectStoreConfig
from dpypeline.tasks import repository as rp
from dpypeline.tasks.netcdf import open_dataset
from dpypeline.tasks.zarr.to_zarr import to_zarr
from s3server import S3Server
from test_repository import BUCKET, make_bucket
from test_zarr_icechunk import T, branch, expected, local, make_series, write

pytestmark = pytest.mark.slow

# failpoint -> how many files the branch holds after the kill (of the third file's job)
KILLED_AT = {
    "before_resize": 2,  # before any data of the file
    "before_commit": 2,  # the data written, the markers not
    "before_repository_commit": 2,  # everything written, not committed
    "after_commit": 3,  # committed, the job not yet reported done: the ledger does not know
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_series(tmp_path_factory.mktemp("nemo"), 4)


# One worker's jobs, as the worker runs them: argv = store first_job objectstores paths…
RUNNER = """
import json, sys
from pathlib import Path
from types import SimpleNamespace
from dpypeline.config.model import ObjectStoreConfig
from dpypeline.tasks.netcdf import open_dataset
from dpypeline.tasks.zarr.to_zarr import to_zarr
store, first, stores, paths = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:]
stores = {k: ObjectStoreConfig(**v) for k, v in stores.items()}
for i, path in enumerate(paths):
    context = SimpleNamespace(job_id=first + i, path=path, relpath=Path(path).name, size=None,
                              mtime_ns=None, pipeline="crash", log=None, objectstores=stores)
    to_zarr(open_dataset(path), store, append_dim="time_counter", icechunk=True,
            objectstore=next(iter(stores), None), context=context)
"""


def run(
    store: str,
    paths: Sequence[Path],
    first_job: int,
    *,
    failpoint: str | None = None,
    once: Path | None = None,
    stores: dict[str, Any] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = env_for_subprocess()
    env.pop("DPYPELINE_FAILPOINT", None)
    if failpoint:
        env["DPYPELINE_FAILPOINT"] = failpoint
    if once:
        env["DPYPELINE_FAILPOINT_ONCE_FILE"] = str(once)
    cmd = [sys.executable, "-c", RUNNER, store, str(first_job), json.dumps(stores or {}),
           *map(str, paths)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, check=False)


def replay(
    store: str, paths: Sequence[Path], first_job: int, *, stores: dict[str, Any] | None = None
) -> None:
    """RUNNER's jobs, here."""
    configs = {k: ObjectStoreConfig(**v) for k, v in (stores or {}).items()}
    for i, path in enumerate(paths):
        context = SimpleNamespace(job_id=first_job + i, path=str(path), relpath=path.name,
                                  size=None, mtime_ns=None, pipeline="crash", log=None,
                                  objectstores=configs)  # fmt: skip
        to_zarr(open_dataset(str(path)), store, append_dim=T, icechunk=True,
                objectstore=next(iter(configs), None), context=context)  # fmt: skip


def job_ids(repo: Any) -> list[int]:
    """The job ids of the branch's commits, oldest first (not the repository's root)."""
    return [s.metadata["job_id"] for s in list(repo.ancestry(branch=rp.BRANCH))[-2::-1]]


@pytest.mark.parametrize("failpoint", list(KILLED_AT))
def test_sigkill_at_any_point_then_replay_leaves_exactly_one_commit_per_file(
    files: list[Path], tmp_path: Path, failpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "gyre.icechunk"
    write(files[:2], str(store), append_dim=T)
    once = tmp_path / "die-once"
    once.touch()
    proc = run(str(store), files[2:3], 3, failpoint=failpoint, once=once)
    assert proc.returncode == -9, (
        f"expected death by SIGKILL, got {proc.returncode}:\n{proc.stderr}"
    )
    held = KILLED_AT[failpoint]
    assert job_ids(local(store)) == list(range(1, held + 1))
    xr.testing.assert_identical(branch(local(store)), expected(files[:held]))
    # the worker runs job 3 again (the ledger never heard it finish), then job 4, with the
    # failpoint still configured but spent
    assert not once.exists()
    monkeypatch.setenv("DPYPELINE_FAILPOINT", failpoint)
    monkeypatch.setenv("DPYPELINE_FAILPOINT_ONCE_FILE", str(once))
    replay(str(store), files[2:], 3)
    assert job_ids(local(store)) == [1, 2, 3, 4]
    xr.testing.assert_identical(branch(local(store)), expected(files))


def test_sigkill_between_data_and_commit_on_s3_then_replay_commits_each_file_once(
    files: list[Path], s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without conditional writes, as on JASMIN (the other mode's writes are tested in
    tests/test_zarr_icechunk.py)."""
    make_bucket(s3)
    creds = s3.credentials_file(tmp_path)
    stores = {"moto": {"credentials": str(creds), "conditional_writes": False}}
    url = f"s3://{BUCKET}/gyre.icechunk"
    replay(url, files[:1], 1, stores=stores)
    proc = run(url, files[1:2], 2, failpoint="before_repository_commit", stores=stores)
    assert proc.returncode == -9, proc.stderr
    monkeypatch.setenv("DPYPELINE_FAILPOINT", "after_commit")  # with its once-file gone
    monkeypatch.setenv("DPYPELINE_FAILPOINT_ONCE_FILE", str(tmp_path / "gone"))
    replay(url, files[1:3], 2, stores=stores)
    context = SimpleNamespace(objectstores={"moto": ObjectStoreConfig(**stores["moto"])})
    repo = rp.open_repository(rp.locate(url, "moto", context))
    assert job_ids(repo) == [1, 2, 3]
    xr.testing.assert_identical(branch(repo), expected(files[:3]))
