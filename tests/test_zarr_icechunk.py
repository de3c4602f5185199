"""to_zarr into an Icechunk repository (``icechunk: true``) on real NEMO GYRE files: one
commit per file, found again on replay; the plain store's checks and policies hold; a
reader of the branch only ever sees whole files; local, and moto's S3 with and without
conditional writes; chunks written on a real Dask cluster."""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import icechunk
import numpy as np
import pytest
import xarray as xr

from conftest import ROOT
from dpypeline.config import ObjectStoreConfig
from dpypeline.errors import ConfigError, PermanentError
from dpypeline.tasks import repository as rp
from dpypeline.tasks.netcdf import open_dataset
from dpypeline.tasks.zarr.to_zarr import create_template, to_zarr
from s3server import S3Server
from test_repository import BUCKET, make_bucket

sys.path.insert(0, str(ROOT / "scripts"))
from make_nemo import make_series  # a script, not a package

T = "time_counter"
DECODE = xr.coders.CFDatetimeCoder(use_cftime=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_series(tmp_path_factory.mktemp("nemo"), 4)


def job(job_id: int, path: Path, objectstores: dict[str, Any] | None = None) -> Any:
    """A job's context as the worker makes it (the fields to_zarr reads)."""
    return SimpleNamespace(
        job_id=job_id, path=str(path), relpath=f"gyre/{path.name}", size=path.stat().st_size,
        mtime_ns=path.stat().st_mtime_ns, pipeline="ingest", log=None,
        objectstores=objectstores or {},
    )  # fmt: skip


def write(paths: Sequence[Path], store: str, first_job: int = 1, **kwargs: Any) -> None:
    objectstores = kwargs.pop("objectstores", None)
    for i, path in enumerate(paths):
        context = job(first_job + i, path, objectstores)
        to_zarr(open_dataset(str(path)), store, icechunk=True, context=context, **kwargs)


def expected(paths: Sequence[Path]) -> xr.Dataset:
    return xr.concat(
        [open_dataset(str(p)) for p in paths], dim=T, data_vars="minimal", coords="minimal",
        compat="override", join="exact", combine_attrs="override",
    )  # fmt: skip


def branch(repo: icechunk.Repository, ref: str = rp.BRANCH) -> xr.Dataset:
    """The branch as a reader opens it (README)."""
    session = repo.readonly_session(branch=ref)
    ds = xr.open_zarr(session.store, consolidated=False, decode_times=DECODE).load()
    ds.attrs = {k: v for k, v in ds.attrs.items() if not k.startswith("dpypeline_")}
    return ds


def commits(repo: icechunk.Repository) -> list[str]:
    return [s.message for s in repo.ancestry(branch=rp.BRANCH)][:-1]  # not the root


def local(path: Path) -> icechunk.Repository:
    return icechunk.Repository.open(icechunk.local_filesystem_storage(str(path)))


def test_each_file_is_one_commit_naming_it_and_the_branch_equals_the_sources(
    files: list[Path], tmp_path: Path
) -> None:
    store = tmp_path / "gyre.icechunk"
    write(files[:3], str(store), append_dim=T)
    repo = local(store)
    assert commits(repo) == [
        f"gyre/{p.name} (job {i})" for i, p in reversed(list(enumerate(files[:3], 1)))
    ]
    tip = repo.lookup_snapshot(repo.lookup_branch(rp.BRANCH))
    assert tip.metadata["job_id"] == 3
    assert tip.metadata["size"] == files[2].stat().st_size
    xr.testing.assert_identical(branch(repo), expected(files[:3]))


def test_a_job_replayed_after_its_commit_does_not_commit_again(
    files: list[Path], tmp_path: Path
) -> None:
    store = tmp_path / "gyre.icechunk"
    write(files[:2], str(store), append_dim=T)
    tip = local(store).lookup_branch(rp.BRANCH)
    write(files[1:2], str(store), first_job=2, append_dim=T)  # job 2 again
    assert local(store).lookup_branch(rp.BRANCH) == tip
    write(files[2:3], str(store), first_job=3, append_dim=T)
    assert len(commits(local(store))) == 3
    xr.testing.assert_identical(branch(local(store)), expected(files[:3]))


def test_overlap_policies_hold_for_a_new_job_writing_stored_steps(
    files: list[Path], tmp_path: Path
) -> None:
    store = str(tmp_path / "gyre.icechunk")
    write(files[:2], store, append_dim=T)
    tip = local(Path(store)).lookup_branch(rp.BRANCH)
    write(files[1:2], store, first_job=7, append_dim=T, overlap="skip")
    assert local(Path(store)).lookup_branch(rp.BRANCH) == tip  # identical: nothing to commit
    with pytest.raises(PermanentError, match="overlap=forbid refuses"):
        write(files[1:2], store, first_job=8, append_dim=T, overlap="forbid")
    write(files[1:2], store, first_job=9, append_dim=T, overlap="replace")
    xr.testing.assert_identical(branch(local(Path(store))), expected(files[:2]))


def test_a_file_that_does_not_match_is_refused_and_nothing_is_committed(
    files: list[Path], tmp_path: Path
) -> None:
    store = str(tmp_path / "gyre.icechunk")
    write(files[:1], store, append_dim=T)
    tip = local(Path(store)).lookup_branch(rp.BRANCH)
    odd = open_dataset(str(files[1])).drop_vars("soce")
    with pytest.raises(PermanentError, match="variables missing from the file: soce"):
        to_zarr(odd, store, append_dim=T, icechunk=True, context=job(2, files[1]))
    later = open_dataset(str(files[3]))
    assert local(Path(store)).lookup_branch(rp.BRANCH) == tip
    write([files[2]], store, first_job=3, append_dim=T)
    with pytest.raises(PermanentError, match="come before the last step"):
        to_zarr(open_dataset(str(files[1])), store, append_dim=T, icechunk=True,
                context=job(4, files[1]))  # fmt: skip
    to_zarr(later, store, append_dim=T, icechunk=True, context=job(5, files[3]))
    assert len(commits(local(Path(store)))) == 3


def test_layout_and_codec_of_a_new_repository_are_the_plain_stores(
    files: list[Path], tmp_path: Path
) -> None:
    store = str(tmp_path / "gyre.icechunk")
    write(files[:1], store, append_dim=T, compressor={"codec": "zstd", "level": 5},
          chunks={"y": 11})  # fmt: skip
    session = local(Path(store)).readonly_session(branch=rp.BRANCH)
    import zarr

    toce = zarr.open_group(session.store, mode="r")["toce"]
    assert toce.metadata.zarr_format == 3
    assert toce.chunks == (1, 4, 11, 32)
    assert [c.to_dict()["name"] for c in toce.metadata.codecs][-1] == "zstd"


def test_icechunk_refuses_zarr_format_2_and_storage_options(
    files: list[Path], tmp_path: Path
) -> None:
    ds = open_dataset(str(files[0]))
    with pytest.raises(ConfigError, match="Zarr format 3 only"):
        to_zarr(ds, str(tmp_path / "r"), append_dim=T, icechunk=True, zarr_format=2)
    with pytest.raises(ConfigError, match="through `objectstore:`"):
        to_zarr(ds, "s3://b/r", append_dim=T, icechunk=True, storage_options={"key": "k"})
    assert not (tmp_path / "r").exists()


def test_region_writes_into_a_template_repository_in_any_order(
    files: list[Path], tmp_path: Path
) -> None:
    store = str(tmp_path / "template.icechunk")
    axis = [open_dataset(str(p)).time_counter.values[0] for p in files]
    create_template(open_dataset(str(files[0])), store, T, axis, icechunk=True)
    for i in (3, 1, 0, 2):
        write([files[i]], store, first_job=10 + i, region=T)
    write([files[1]], store, first_job=11, region=T)  # a replay: found, not written again
    assert len(commits(local(Path(store)))) == 5  # the template and four files
    xr.testing.assert_identical(branch(local(Path(store))), expected(files))


def test_a_reader_polling_the_branch_never_sees_a_partly_written_file(
    files: list[Path], tmp_path: Path
) -> None:
    """Each read opens the branch afresh, as a reader's poll does: every variable has the
    same number of steps, that number is a whole number of files, and no step is
    missing its data."""
    store = tmp_path / "gyre.icechunk"
    write(files[:1], str(store), append_dim=T)
    done = threading.Event()
    seen: list[int] = []
    problems: list[str] = []

    def poll() -> None:
        repo = local(store)
        while not done.is_set() or len(seen) < 3:
            session = repo.readonly_session(branch=rp.BRANCH)  # no dask: no thread pool
            ds = xr.open_zarr(session.store, consolidated=False, decode_times=False, chunks=None)
            lengths = {n: v.sizes[T] for n, v in ds.variables.items() if T in v.dims}
            if len(set(lengths.values())) != 1:
                problems.append(f"unequal lengths {lengths}")
            n = ds.sizes[T]
            if np.isnan(ds.toce.isel({T: n - 1}).values).all():
                problems.append(f"step {n - 1} without data")
            seen.append(n)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        write(files[1:], str(store), first_job=2, append_dim=T)
    finally:
        done.set()
        reader.join(60)
    assert not problems, problems[:5]
    assert set(seen) <= {1, 2, 3, 4}
    assert seen == sorted(seen)


@pytest.mark.parametrize("conditional", [True, False], ids=["conditional", "unconditional"])
def test_s3_repository_in_both_write_modes_equals_the_sources(
    files: list[Path], s3: S3Server, tmp_path: Path, conditional: bool
) -> None:
    make_bucket(s3)
    stores = {"moto": ObjectStoreConfig(credentials=s3.credentials_file(tmp_path),
                                        conditional_writes=conditional)}  # fmt: skip
    url = f"s3://{BUCKET}/gyre.icechunk"
    write(files[:2], url, append_dim=T, objectstore="moto", objectstores=stores)
    write(files[1:3], url, first_job=2, append_dim=T, objectstore="moto", objectstores=stores)
    place = rp.locate(url, "moto", SimpleNamespace(objectstores=stores))
    repo = rp.open_repository(place)
    assert len(commits(repo)) == 3
    xr.testing.assert_identical(branch(repo), expected(files[:3]))


@pytest.mark.slow
def test_chunks_written_on_a_dask_cluster_are_all_in_the_one_commit(
    files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a distributed client, dask.array.store ships the targets to the workers (two
    processes): each worker's writes come back and are merged before the commit. The
    GYRE files are small, so the size below which a variable is read at once rather than
    through dask is lowered to make them go through the cluster."""
    from distributed import Client, LocalCluster

    from dpypeline.tasks.zarr import layout

    monkeypatch.setattr(layout, "TARGET_CHUNK_BYTES", 4096)
    store = tmp_path / "gyre.icechunk"
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster),
    ):
        datasets = [open_dataset(str(p)).chunk({T: 1, "deptht": 2}) for p in files[:2]]
        for i, ds in enumerate(datasets, 1):
            to_zarr(ds, str(store), append_dim=T, icechunk=True, context=job(i, files[i - 1]))
    assert len(commits(local(store))) == 2
    xr.testing.assert_identical(branch(local(store)), expected(files[:2]))


@pytest.mark.slow
def test_the_dask_executor_commits_each_file_once_in_queue_order(
    files: list[Path], tmp_path: Path
) -> None:
    """The service, with jobs on a LocalCluster of two worker processes: each file's
    commit is made on a worker, one at a time, in queue order."""
    import shutil

    from conftest import status
    from test_dask import pipeline, run_once

    store = tmp_path / "gyre.icechunk"
    cfg, inbox = pipeline(
        tmp_path,
        [
            {"task": "open_dataset"},
            {"task": "to_zarr", "with": {"store": str(store), "append_dim": T, "icechunk": True}},
        ],
    )
    for f in files:
        shutil.copy2(f, inbox / f.name)
    run_once(cfg, timeout=180)
    assert status(cfg)["done"] == 4
    repo = local(store)
    assert [s.metadata.get("path") for s in repo.ancestry(branch=rp.BRANCH)][-2::-1] == [
        f.name for f in files
    ]
    assert {s.metadata.get("pipeline") for s in repo.ancestry(branch=rp.BRANCH)} >= {"pipeline"}
    xr.testing.assert_identical(branch(repo), expected(files))


def test_the_readme_lines_open_the_branch_a_tag_and_a_snapshot(
    files: list[Path], tmp_path: Path
) -> None:
    store = tmp_path / "gyre.icechunk"
    write(files[:1], str(store), append_dim=T)
    first = local(store).lookup_branch(rp.BRANCH)
    local(store).create_tag("v1", first)
    write(files[1:2], str(store), first_job=2, append_dim=T)
    # the README's lines, with this store's path
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(store)))
    ds = xr.open_zarr(repo.readonly_session(branch="main").store, consolidated=False)
    assert ds.sizes[T] == 2
    for ref in ({"tag": "v1"}, {"snapshot_id": first}):
        old = xr.open_zarr(repo.readonly_session(**ref).store, consolidated=False)
        assert old.sizes[T] == 1
