"""virtualize: NetCDF files referenced where they lie, in an Icechunk repository, read back
equal to the files as xarray decodes them; files that would read differently refused."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import icechunk as ic
import netCDF4
import numpy as np
import pytest
import structlog
import xarray as xr

from conftest import ROOT
from dpypeline.config.model import ObjectStoreConfig
from dpypeline.errors import PermanentError, Unavailable
from dpypeline.pipeline import JobContext, SetupContext, Task
from s3server import KEY, SECRET, S3Server

sys.path.insert(0, str(ROOT / "scripts"))
from make_nemo import make_series  # a script, not a package

T = "time_counter"


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_series(tmp_path_factory.mktemp("nemo"), 3)


@pytest.fixture
def files(series: list[Path], tmp_path: Path) -> list[Path]:
    """The series copied into this test's watch root (tests rewrite them)."""
    root = tmp_path / "inbox"
    root.mkdir()
    copies = []
    for path in series:
        copies.append(root / path.name)
        shutil.copy2(path, copies[-1])
    return copies


def context(path: str, job_id: int, root: Path, stores: Any = None) -> JobContext:
    return JobContext(
        job_id=job_id, attempt=1, path=path, relpath=os.path.basename(path), root=str(root),
        job="nemo", log=structlog.get_logger(), objectstores=stores or {},
    )  # fmt: skip


def virtualize(
    path: Path | str, store: Path | str, job_id: int, root: Path, stores: Any = None, **kw: Any
) -> str:
    task = Task("virtualize", store=str(store), append_dim=T, **kw)
    return str(task(str(path), context(str(path), job_id, root, stores)))


def ingest(paths: Sequence[Path], store: Path) -> None:
    for job_id, path in enumerate(paths, 1):
        virtualize(path, store, job_id, path.parent)


def repository(store: Path, *prefixes: str) -> ic.Repository:
    return ic.Repository.open(
        ic.local_filesystem_storage(str(store)),
        authorize_virtual_chunk_access=dict.fromkeys(prefixes),
    )


def read(store: Path, root: Path) -> xr.Dataset:
    repo = repository(store, root.as_uri() + "/")
    return xr.open_zarr(repo.readonly_session("main").store, consolidated=False).load()


def decoded(paths: Sequence[Path]) -> xr.Dataset:
    """The files as xarray decodes them, one after the other along time."""
    cftime = xr.coders.CFDatetimeCoder(use_cftime=True)
    return xr.concat(
        [xr.open_dataset(p, decode_times=cftime) for p in paths],
        dim=T, data_vars="minimal", coords="minimal", compat="override", combine_attrs="override",
    ).load()  # fmt: skip


def commits(store: Path) -> list[dict[str, Any]]:
    repo = ic.Repository.open(ic.local_filesystem_storage(str(store)))
    return [dict(s.metadata) for s in repo.ancestry(branch="main")][:-1]  # not the initial one


def test_files_read_back_through_their_references_equal_to_the_files(
    files: list[Path], tmp_path: Path
) -> None:
    store = tmp_path / "virtual.icechunk"
    ingest(files, store)
    got, want = read(store, files[0].parent), decoded(files)
    xr.testing.assert_equal(got, want.drop_attrs(deep=False).assign_attrs(got.attrs))
    assert got[T].dt.calendar == "360_day"
    assert [c["path"] for c in commits(store)] == [p.name for p in reversed(files)]
    # the data are referenced, not copied: the repository is a fraction of the files
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert size < sum(p.stat().st_size for p in files) / 4
    repo = repository(store)
    containers = repo.config.virtual_chunk_containers or {}
    assert list(containers) == [files[0].parent.as_uri() + "/"]


def test_a_replayed_job_makes_no_second_commit(files: list[Path], tmp_path: Path) -> None:
    store = tmp_path / "virtual.icechunk"
    ingest(files[:2], store)
    virtualize(files[1], store, 2, files[0].parent)  # the same job again, after a crash
    assert [c["job_id"] for c in commits(store)] == [2, 1]


def test_a_new_version_of_a_file_replaces_its_steps_references(
    files: list[Path], tmp_path: Path, series: list[Path]
) -> None:
    store = tmp_path / "virtual.icechunk"
    ingest(files, store)
    _rewrite(files[1], _warmer, series[1])
    virtualize(files[1], store, 4, files[0].parent)  # the watcher took the new version in
    got = read(store, files[0].parent)
    xr.testing.assert_equal(got["toce"], decoded(files)["toce"])
    assert len(got[T]) == 3
    assert commits(store)[0]["job_id"] == 4


def test_a_source_rewritten_after_it_was_referenced_fails_reads_naming_it(
    files: list[Path], tmp_path: Path, series: list[Path]
) -> None:
    store = tmp_path / "virtual.icechunk"
    ingest(files, store)
    _rewrite(files[1], _warmer, series[1])
    ds = xr.open_zarr(
        repository(store, files[0].parent.as_uri() + "/").readonly_session("main").store,
        consolidated=False,
    )
    ds.toce.isel({T: [0, 2]}).load()  # the other files' steps still read
    with pytest.raises(ic.IcechunkError, match="checksum of the object") as changed:
        ds.toce.isel({T: 1}).load()
    # Icechunk's report wraps long lines: the file's URL, unwrapped
    assert files[1].as_uri() in re.sub(r"\n\s*\|?\s*", "", str(changed.value))


@pytest.mark.parametrize(
    ("attribute", "change"),
    [
        ("scale_factor", lambda v: v.setncattr("scale_factor", np.float32(2.0))),
        ("add_offset", lambda v: v.setncattr("add_offset", np.float32(273.15))),
        ("missing_value", lambda v: v.setncattr("missing_value", np.float32(-1.0))),
    ],
)
def test_a_file_whose_encoding_differs_is_refused_naming_the_attribute(
    files: list[Path], tmp_path: Path, attribute: str, change: Any
) -> None:
    store = tmp_path / "virtual.icechunk"
    ingest(files[:2], store)
    with netCDF4.Dataset(files[2], "a") as nc:
        change(nc["toce"])
    with pytest.raises(PermanentError, match=rf"{files[2].name}.*'toce' has {attribute}"):
        virtualize(files[2], store, 3, files[0].parent)
    assert len(commits(store)) == 2


def test_a_file_with_other_codecs_is_refused(files: list[Path], tmp_path: Path) -> None:
    store = tmp_path / "virtual.icechunk"
    ingest(files[:2], store)
    ds = xr.open_dataset(files[2], decode_times=False).load()
    recompressed = tmp_path / "other" / files[2].name
    recompressed.parent.mkdir()
    encoding = {
        "toce": {"zlib": True, "complevel": 9, "chunksizes": ds.toce.encoding["chunksizes"]}
    }
    ds.to_netcdf(recompressed, encoding=encoding)
    with pytest.raises(PermanentError, match=r"'toce' has codecs"):
        virtualize(recompressed, store, 3, recompressed.parent)


def test_a_file_out_of_order_is_refused(files: list[Path], tmp_path: Path) -> None:
    store = tmp_path / "virtual.icechunk"
    virtualize(files[0], store, 1, files[0].parent)
    virtualize(files[2], store, 2, files[0].parent)
    with pytest.raises(PermanentError, match="come before the repository's last step"):
        virtualize(files[1], store, 3, files[0].parent)


def test_netcdf3_classic_files_are_referenced_too(series: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "classic"
    root.mkdir()
    classic = []
    for path in series[:2]:
        classic.append(root / path.name)
        xr.open_dataset(path, decode_times=False).to_netcdf(classic[-1], format="NETCDF3_CLASSIC")
    store = tmp_path / "virtual.icechunk"
    ingest(classic, store)
    got, want = read(store, root), decoded(classic)
    xr.testing.assert_equal(got["toce"], want["toce"])
    assert got[T].dt.calendar == "360_day"


def test_objects_uploaded_to_the_object_store_are_referenced_there(
    series: list[Path], tmp_path: Path, s3: S3Server
) -> None:
    stores = {"moto": ObjectStoreConfig(credentials=s3.credentials_file(tmp_path))}
    Task("create_bucket", bucket="raw", objectstore="moto").run_setup(SetupContext(stores))
    Task("create_bucket", bucket="stores", objectstore="moto").run_setup(SetupContext(stores))
    root = series[0].parent
    upload = Task("upload_file", objectstore="moto", bucket="raw", prefix="gyre")
    for job_id, path in enumerate(series[:2], 1):
        url = upload(str(path), context(str(path), job_id, root, stores))
        assert url == f"s3://raw/gyre/{path.name}"
        repo_url = virtualize(
            url, "s3://stores/gyre.icechunk", job_id, root, objectstore="moto", stores=stores
        )
    assert repo_url == "s3://stores/gyre.icechunk"
    storage = ic.s3_storage(
        bucket="stores", prefix="gyre.icechunk", endpoint_url=s3.endpoint_url, allow_http=True,
        access_key_id=KEY, secret_access_key=SECRET, region="us-east-1", force_path_style=True,
    )  # fmt: skip
    repo = ic.Repository.open(
        storage,
        authorize_virtual_chunk_access=ic.containers_credentials(
            {"s3://raw/": ic.s3_static_credentials(access_key_id=KEY, secret_access_key=SECRET)}
        ),
    )
    got = xr.open_zarr(repo.readonly_session("main").store, consolidated=False).load()
    xr.testing.assert_equal(got["toce"], decoded(series[:2])["toce"])
    assert list(repo.config.virtual_chunk_containers or {}) == ["s3://raw/"]


def _rewrite(path: Path, change: Any, like: Path) -> None:
    """Replace ``path`` by a new file (another inode, a later mtime), changed by ``change``."""
    new = path.with_name("." + path.name + ".tmp")
    shutil.copy(like, new)
    with netCDF4.Dataset(new, "a") as nc:
        change(nc)
    stat = path.stat()
    os.utime(new, (stat.st_atime + 5, stat.st_mtime + 5))
    os.replace(new, path)


def _warmer(nc: netCDF4.Dataset) -> None:
    nc["toce"][:] = nc["toce"][:] + 1.0


@pytest.mark.parametrize("fmt", ["parquet", "json"])
def test_exported_kerchunk_references_read_equal_to_the_repository(
    files: list[Path], tmp_path: Path, fmt: str
) -> None:
    from dpypeline.cli import main

    store = tmp_path / "virtual.icechunk"
    ingest(files, store)
    out = tmp_path / f"refs.{fmt}"
    assert main(["export-references", str(store), str(out), "--format", fmt]) == 0
    got = xr.open_dataset(
        "reference://", engine="zarr", decode_times=xr.coders.CFDatetimeCoder(use_cftime=True),
        backend_kwargs={"consolidated": False, "storage_options": {"fo": str(out)}},
    ).load()  # fmt: skip
    xr.testing.assert_identical(got, read(store, files[0].parent))
    assert got[T].dt.calendar == "360_day"


def test_export_refuses_a_source_changed_since_its_commit(
    files: list[Path], tmp_path: Path, series: list[Path]
) -> None:
    from dpypeline.tasks.virtual.export import export_references

    store = tmp_path / "virtual.icechunk"
    ingest(files, store)
    _rewrite(files[2], _warmer, series[2])
    with pytest.raises(PermanentError, match=f"{files[2]} changed after it was referenced"):
        export_references(str(store), tmp_path / "refs.json", fmt="json")


def test_validate_sample_says_which_variables_would_be_references(
    series: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import write_config
    from dpypeline.cli import main

    config = write_config(
        tmp_path,
        {
            "name": "gyre",
            "cache_dir": str(tmp_path / "cache"),
            "watch": [{"path": str(series[0].parent), "patterns": ["*.nc"]}],
            "jobs": [
                {
                    "name": "virtual",
                    "tasks": [
                        {
                            "task": "virtualize",
                            "with": {"store": "gyre.icechunk", "append_dim": T},
                        }
                    ],
                }
            ],
        },
    )
    assert main(["validate", "-c", str(config), "--sample", str(series[0])]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[-11:]}
    assert rows["toce"].endswith("reference")
    assert rows["time_counter"].endswith("in the repository")
    assert rows["deptht_bounds"].endswith("in the repository")


def test_an_object_store_outage_costs_no_attempt_and_shows_no_secret(
    series: list[Path], tmp_path: Path, s3: S3Server
) -> None:
    stores = {"moto": ObjectStoreConfig(credentials=s3.credentials_file(tmp_path))}
    Task("create_bucket", bucket="raw", objectstore="moto").run_setup(SetupContext(stores))
    root = series[0].parent
    upload = Task("upload_file", objectstore="moto", bucket="raw")
    url = upload(str(series[0]), context(str(series[0]), 1, root, stores))
    store = tmp_path / "virtual.icechunk"
    s3.stop()
    try:
        with pytest.raises(Unavailable) as down:
            virtualize(url, store, 1, root, objectstore="moto", stores=stores)
    finally:
        s3.start()
    assert "unreachable" in str(down.value)
    assert SECRET not in str(down.value)
    assert KEY not in str(down.value)
    virtualize(url, store, 1, root, objectstore="moto", stores=stores)
    assert [c["job_id"] for c in commits(store)] == [1]


def test_region_mode_replaces_steps_where_their_values_are_and_refuses_others(
    files: list[Path], tmp_path: Path, series: list[Path]
) -> None:
    store = tmp_path / "virtual.icechunk"
    root = files[0].parent
    ingest(files, store)  # the repository whose axis the region writes go into
    _rewrite(files[0], _warmer, series[0])
    region = Task("virtualize", store=str(store), region=T)
    region(str(files[0]), context(str(files[0]), 4, root))
    xr.testing.assert_equal(read(store, root)["toce"], decoded(files)["toce"])
    later = make_series(tmp_path / "later", 1, start_year=9)[0]
    with pytest.raises(PermanentError, match="not all on the template's axis"):
        region(str(later), context(str(later), 5, later.parent))
    nowhere = Task("virtualize", store=str(tmp_path / "none.icechunk"), region=T)
    with pytest.raises(PermanentError, match="no Icechunk repository"):
        nowhere(str(later), context(str(later), 6, later.parent))
