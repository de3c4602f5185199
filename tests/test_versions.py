"""An Icechunk repository's history, revert and garbage collection
(``dpypeline.tasks.versions``) on real repositories of GYRE files, one commit per file
with its job id in the metadata, as the service writes them."""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path

import icechunk as ic
import numpy as np
import pytest
import xarray as xr
import zarr

from conftest import ROOT
from dpypeline.errors import PermanentError
from dpypeline.tasks import versions

sys.path.insert(0, str(ROOT / "scripts"))
from make_nemo import make_series  # scripts, not a package

CODER = xr.coders.CFDatetimeCoder(use_cftime=True)
DIM = "time_counter"


def source(path: Path) -> xr.Dataset:
    return xr.open_dataset(path, decode_times=CODER).load()


def commit_file(repo: ic.Repository, ds: xr.Dataset, job_id: int, *, replace: bool = False) -> str:
    session = repo.writable_session("main")
    if replace:  # the file's steps again, where they are (overlap: replace)
        ds.drop_vars([n for n in ds.variables if DIM not in ds[n].dims]).to_zarr(
            session.store, region="auto", consolidated=False
        )
    elif "time_counter" in zarr.open_group(session.store, mode="a"):
        ds.to_zarr(session.store, append_dim=DIM, consolidated=False)
    else:
        ds.to_zarr(session.store, mode="w", consolidated=False)
    return session.commit(f"job {job_id}", metadata={"job_id": job_id, "path": f"f{job_id}.nc"})


def changed(ds: xr.Dataset, by: int) -> xr.Dataset:
    """The same file with other values: a corrected version of it."""
    return ds.assign(soce=ds["soce"] + by)


def read(repo: ic.Repository, **at: str) -> xr.Dataset:
    session = repo.readonly_session(**at)
    return xr.open_zarr(session.store, decode_times=CODER, consolidated=False, chunks=None)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return sorted(make_series(tmp_path / "inbox", 3))


@pytest.fixture
def repo(tmp_path: Path) -> ic.Repository:
    return ic.Repository.create(ic.local_filesystem_storage(str(tmp_path / "repo")))


def test_versions_name_each_commit_job_file_and_steps_newest_first(
    repo: ic.Repository, files: list[Path]
) -> None:
    ids = [commit_file(repo, source(f), job) for job, f in enumerate(files, 1)]
    found = list(versions.versions(repo, DIM))
    assert [v.snapshot for v in found] == ids[::-1]
    assert [(v.job_id, v.file, v.steps) for v in found] == [
        (3, "f3.nc", (2, 3)),
        (2, "f2.nc", (1, 2)),
        (1, "f1.nc", (0, 1)),
    ]


def test_revert_resets_the_branch_to_before_the_job_and_keeps_the_old_snapshots_by_id(
    repo: ic.Repository, files: list[Path]
) -> None:
    ids = [commit_file(repo, source(f), job) for job, f in enumerate(files, 1)]
    tip, commit, parent = versions.find_commit(repo, 2)
    assert (tip, commit, parent) == (ids[2], ids[1], ids[0])

    tag = versions.revert(repo, 2, tip, parent)

    assert repo.lookup_branch("main") == ids[0]
    assert read(repo, branch="main").sizes[DIM] == 1
    assert read(repo, snapshot_id=ids[2]).sizes[DIM] == 3  # still readable by id
    assert repo.lookup_tag(tag) == ids[2]
    with pytest.raises(PermanentError, match="job 2 has no commit on the branch"):
        versions.find_commit(repo, 2)


def test_revert_is_a_compare_and_swap_refused_when_the_branch_moved(
    repo: ic.Repository, files: list[Path]
) -> None:
    ids = [commit_file(repo, source(f), job) for job, f in enumerate(files[:2], 1)]
    tip, _, parent = versions.find_commit(repo, 2)
    moved = commit_file(repo, source(files[2]), 3)  # a commit after the tip was read

    with pytest.raises(PermanentError, match="moved while it was being reverted"):
        versions.revert(repo, 2, tip, parent)
    assert repo.lookup_branch("main") == moved != ids[1]


def test_gc_expires_old_snapshots_deletes_replaced_data_and_keeps_every_retained_snapshot(
    repo: ic.Repository, files: list[Path]
) -> None:
    first = source(files[0])
    old = [commit_file(repo, first, 1)]
    for job in (2, 3):
        old.append(commit_file(repo, changed(first, job), job, replace=True))
    _after(old[-1], repo)
    cut = dt.datetime.now(dt.UTC)
    _after_time(cut)
    kept = [commit_file(repo, changed(first, job), job, replace=True) for job in (4, 5)]

    done = versions.collect(repo, cut, expire_after=0, grace=0)

    assert done.expired >= len(old)
    assert done.chunks > 0
    assert done.bytes > 0
    for snapshot in kept:  # every retained snapshot reads whole
        ds = read(repo, snapshot_id=snapshot)
        assert ds.sizes[DIM] == 1
    xr.testing.assert_equal(read(repo, branch="main")["soce"], changed(first, 5)["soce"])
    for snapshot in old:
        with pytest.raises(ic.IcechunkError):
            repo.readonly_session(snapshot_id=snapshot)
    assert [v.job_id for v in versions.versions(repo, DIM)] == [5, 4]


def test_gc_while_a_file_is_being_written_keeps_its_chunks_for_its_commit(
    repo: ic.Repository, files: list[Path]
) -> None:
    commit_file(repo, source(files[0]), 1)
    session = repo.writable_session("main")
    ds = source(files[1])
    ds.to_zarr(session.store, append_dim=DIM, consolidated=False)  # written, not committed

    versions.collect(repo, dt.datetime.now(dt.UTC), expire_after=0, grace=3600)
    session.commit("job 2", metadata={"job_id": 2})

    stored = read(repo, branch="main")
    np.testing.assert_array_equal(stored["soce"][1].values, ds["soce"][0].values)


def _after(snapshot: str, repo: ic.Repository) -> None:
    """Wait until the clock is past ``snapshot``'s time (expiry compares times)."""
    _after_time(repo.lookup_snapshot(snapshot).written_at)


def _after_time(when: dt.datetime) -> None:
    deadline = time.monotonic() + 5
    while dt.datetime.now(dt.UTC) <= when + dt.timedelta(milliseconds=5):
        assert time.monotonic() < deadline
        time.sleep(0.005)
