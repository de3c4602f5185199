"""to_zarr on real NEMO files: append, region, replays, refusals, locking; local and S3."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
import structlog
import xarray as xr
import zarr
from structlog.testing import capture_logs

from conftest import ROOT
from dpypeline.config.model import ObjectStoreConfig
from dpypeline.errors import PermanentError, Unavailable
from dpypeline.pipeline import JobContext, resolve_task
from dpypeline.tasks.netcdf import clean_dataset, open_dataset
from dpypeline.tasks.zarr.store import COMMITTED, locate, store_lock
from dpypeline.tasks.zarr.to_zarr import create_template, to_zarr
from s3server import S3Server

sys.path.insert(0, str(ROOT / "scripts"))
from make_nemo import make_series  # a script, not a package

T = "time_counter"
DECODE = xr.coders.CFDatetimeCoder(use_cftime=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_series(tmp_path_factory.mktemp("nemo"), 12)


def opened(paths: Sequence[Path]) -> list[xr.Dataset]:
    return [open_dataset(str(p)) for p in paths]


def expected(paths: Sequence[Path]) -> xr.Dataset:
    return xr.concat(
        opened(paths), dim=T, data_vars="minimal", coords="minimal", compat="override",
        join="exact", combine_attrs="override",
    )  # fmt: skip


def read(store: str, **kwargs: Any) -> xr.Dataset:
    ds = xr.open_zarr(store, decode_times=DECODE, **kwargs).load()
    ds.attrs = {k: v for k, v in ds.attrs.items() if not k.startswith("dpypeline_")}
    return ds


def assert_store_equals(store: str, paths: Sequence[Path], **kwargs: Any) -> None:
    """The store, read as users read it, is the concatenation of the files: values (NaN
    equal), attributes, time values, calendar and units; read with and without the
    consolidated metadata."""
    want = expected(paths)
    for consolidated in (True, False):
        got = read(store, consolidated=consolidated, **kwargs)
        xr.testing.assert_identical(got, want)
        for name in ("time_counter", "time_centered"):
            assert got[name].encoding["calendar"] == "360_day"
            # xarray may shorten "… 1900-01-01 00:00:00" to "… 1900-01-01": the same epoch
            assert got[name].encoding["units"].startswith("seconds since 1900-01-01")
            assert got[name].encoding["dtype"] == np.float64


def context(
    log: Any = None, objectstores: dict[str, ObjectStoreConfig] | None = None
) -> JobContext:
    return JobContext(1, 1, "f.nc", "f.nc", "/", "job", log or structlog.get_logger(),
                      objectstores or {})  # fmt: skip


def append_all(paths: Sequence[Path], store: str, **kwargs: Any) -> None:
    for p in paths:
        to_zarr(open_dataset(str(p)), store, append_dim=T, **kwargs)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_twelve_files_appended_one_by_one_equal_their_concat(
    files: list[Path], tmp_path: Path, zarr_format: int
) -> None:
    store = str(tmp_path / "n.zarr")
    with capture_logs() as logs:
        for p in files:
            assert to_zarr(open_dataset(str(p)), store, append_dim=T, zarr_format=zarr_format,
                           context=context()) == store  # fmt: skip
    assert_store_equals(store, files)
    group = zarr.open_group(store, mode="r", use_consolidated=False)
    assert group.metadata.zarr_format == zarr_format
    assert group.attrs[COMMITTED] == 12
    assert {a.shape[0] for n, a in group.arrays() if n.startswith("time") or n.endswith("ce")} == {
        12
    }
    assert [e["event"] for e in logs] == ["zarr_appended"] * 12
    assert logs[0]["created"] is True
    assert logs[5]["steps"] == [5, 6]
    assert logs[5]["first"] == "0006-07-01 00:00:00"


def test_builtin_name_resolves_to_to_zarr() -> None:
    assert resolve_task("to_zarr") is to_zarr


def test_appends_from_dask_chunked_files(files: list[Path], tmp_path: Path) -> None:
    store = str(tmp_path / "n.zarr")
    for p in files[:4]:
        ds = open_dataset(str(p), chunks={T: 1})
        to_zarr(clean_dataset(ds, missing_value=1e20), store, append_dim=T, chunks={"y": 11})
    assert_store_equals(store, files[:4])
    assert zarr.open_array(store, path="toce", mode="r").chunks == (1, 4, 11, 32)


def test_a_chunk_holding_only_the_fill_value_is_written_all_the_same(
    files: list[Path], tmp_path: Path
) -> None:
    """zarr leaves such a chunk out only after comparing it with the fill value, value by
    value: the store's chunks span the grid and always hold ocean, so the test is not
    made (it cost a fifth of an ORCA025 append)."""
    store = tmp_path / "n.zarr"
    for i, p in enumerate(files[:2]):
        ds = open_dataset(str(p), chunks={T: 1})
        if i == 1:  # a step of land only: every value the fill value
            ds["toce"] = ds.toce.where(False)
        to_zarr(ds, str(store), append_dim=T)
    array = zarr.open_array(str(store), path="toce", mode="r")
    assert array.nchunks_initialized == array.nchunks == 2
    assert bool(xr.open_zarr(store).toce[1].isnull().all())


@pytest.fixture
def bucket(s3: S3Server) -> str:
    fs = s3fs.S3FileSystem(**s3.storage_options())  # type: ignore[arg-type]
    fs.mkdir("nemo")
    return "nemo"


@pytest.mark.slow
def test_six_files_appended_to_s3_equal_their_concat(
    files: list[Path], s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Through a named objectstore, as a pipeline config gives it. (Twelve files are
    appended to a local store above: the S3 store takes the same code past the first.)"""
    stores = {"jasmin": ObjectStoreConfig(credentials=s3.credentials_file(tmp_path))}
    url = f"s3://{bucket}/n06/n06_T.zarr"
    six = files[:6]
    for p in six:
        to_zarr(open_dataset(str(p)), url, append_dim=T, objectstore="jasmin",
                context=context(objectstores=stores))  # fmt: skip
    to_zarr(open_dataset(str(six[4])), url, append_dim=T, storage_options=s3.storage_options())
    assert_store_equals(url, six, storage_options=s3.storage_options())


@pytest.mark.slow
def test_s3_outage_is_unavailable_and_the_store_is_intact_after(
    files: list[Path], s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    stores = {"jasmin": ObjectStoreConfig(credentials=s3.credentials_file(tmp_path))}
    job = {"objectstore": "jasmin", "context": context(objectstores=stores)}
    url = f"s3://{bucket}/n.zarr"
    append_all(files[:2], url, **job)
    s3.stop()
    try:
        with pytest.raises(Unavailable, match="unreachable"):
            to_zarr(open_dataset(str(files[2])), url, append_dim=T, **job)
    finally:
        s3.start()
    append_all(files[2:4], url, **job)
    assert_store_equals(url, files[:4], storage_options=s3.storage_options())


def test_without_consolidated_metadata_no_stale_copy_is_left(
    files: list[Path], tmp_path: Path
) -> None:
    store = tmp_path / "n.zarr"
    append_all(files[:2], str(store))
    assert (store / ".zmetadata").exists()
    append_all(files[2:3], str(store), consolidated=False)
    assert not (store / ".zmetadata").exists()
    xr.testing.assert_identical(read(str(store), consolidated=False), expected(files[:3]))


def test_replayed_file_overwrites_its_steps_instead_of_appending(
    files: list[Path], tmp_path: Path
) -> None:
    store = str(tmp_path / "n.zarr")
    append_all(files[:5], store)
    with capture_logs() as logs:
        append_all([files[4], files[4], files[2]], store, context=context())
    assert_store_equals(store, files[:5])
    assert [(e["event"], e["action"], e["steps"]) for e in logs] == [
        ("zarr_replayed", "replaced", [4, 5]),
        ("zarr_replayed", "replaced", [4, 5]),
        ("zarr_replayed", "replaced", [2, 3]),
    ]
    append_all(files[5:], store)
    assert_store_equals(store, files)


def test_overlap_skip_keeps_identical_steps_and_refuses_different_ones(
    files: list[Path], tmp_path: Path
) -> None:
    store = str(tmp_path / "n.zarr")
    append_all(files[:3], store)
    with capture_logs() as logs:
        to_zarr(open_dataset(str(files[1])), store, append_dim=T, overlap="skip", context=context())
    assert logs[0]["action"] == "skipped_identical"
    changed = open_dataset(str(files[1])).load()
    changed["soce"] = changed.soce + 0.5
    with pytest.raises(PermanentError, match=r"different values of soce.*overlap: replace"):
        to_zarr(changed, store, append_dim=T, overlap="skip")
    assert_store_equals(store, files[:3])


def test_overlap_forbid_refuses_a_replay(files: list[Path], tmp_path: Path) -> None:
    store = str(tmp_path / "n.zarr")
    append_all(files[:3], store)
    with pytest.raises(PermanentError, match=r"0003-07-01.*already in.*overlap=forbid"):
        to_zarr(open_dataset(str(files[2])), store, append_dim=T, overlap="forbid")
    assert_store_equals(store, files[:3])


def test_partial_overlap_is_refused(files: list[Path], tmp_path: Path) -> None:
    store = str(tmp_path / "n.zarr")
    append_all(files[:3], store)
    two = xr.concat(opened(files[2:4]), dim=T, data_vars="minimal", coords="minimal",
                    compat="override")  # fmt: skip
    with pytest.raises(PermanentError, match="only in part"):
        to_zarr(two, store, append_dim=T)
    assert_store_equals(store, files[:3])


def test_out_of_order_file_in_append_mode_is_refused_pointing_to_region_mode(
    files: list[Path], tmp_path: Path
) -> None:
    store = str(tmp_path / "n.zarr")
    append_all([files[0], files[1], files[3]], store)
    with pytest.raises(PermanentError, match=r"0003-07-01.*before the last step.*region"):
        to_zarr(open_dataset(str(files[2])), store, append_dim=T)
    assert_store_equals(store, [files[0], files[1], files[3]])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ds: ds.assign(sst=ds.toce.isel(deptht=0)), "variables not in the store: sst"),
        (lambda ds: ds.drop_vars("e3t"), "variables missing from the file: e3t"),
        (lambda ds: ds.assign(toce=ds.toce.astype("f8")), "toce is float64, the store's is flo"),
        (lambda ds: ds.assign_coords(nav_lat=ds.nav_lat + 0.5), "values of nav_lat differ"),
        (lambda ds: ds.assign_coords(deptht=ds.deptht * 2), "values of deptht differ"),
        (lambda ds: ds.isel(x=slice(0, 30)), "dimension x has 30 points, the store's 32"),
        (lambda ds: ds.rename_dims(y="j"), "toce has dimensions"),
    ],
)  # fmt: skip
def test_schema_mismatch_is_refused_naming_what_differs(
    files: list[Path], tmp_path: Path, change: Any, message: str
) -> None:
    store = str(tmp_path / "n.zarr")
    append_all(files[:2], store)
    with pytest.raises(PermanentError, match="does not match") as info:
        to_zarr(change(open_dataset(str(files[2])).load()), store, append_dim=T)
    assert message in str(info.value)
    assert_store_equals(store, files[:2])


def test_region_mode_writes_shuffled_files_into_their_steps(
    files: list[Path], tmp_path: Path
) -> None:
    store = str(tmp_path / "template.zarr")
    axis = [open_dataset(str(p)).time_counter.values[0] for p in files]
    create_template(open_dataset(str(files[5])), store, T, axis)
    empty = read(store)
    assert empty.sizes[T] == 12
    assert bool(empty.toce.isnull().all())
    chosen = [i for i in range(12) if i not in (4, 9)]
    random.Random(7).shuffle(chosen)
    with capture_logs() as logs:
        for i in chosen:
            to_zarr(open_dataset(str(files[i])), store, region=T, context=context())
    assert [e["steps"] for e in logs] == [[i, i + 1] for i in chosen]
    assert {e["event"] for e in logs} == {"zarr_region_written"}
    got = read(store)
    assert list(got.time_counter.values) == axis
    for i in chosen:
        want = open_dataset(str(files[i])).load()
        for name in ("toce", "soce", "e3t", "time_counter_bounds", "time_centered"):
            xr.testing.assert_identical(got[name].isel({T: [i]}), want[name])
    for i in (4, 9):
        assert bool(got.toce.isel({T: i}).isnull().all())
        assert bool(got.e3t.isel({T: i}).isnull().all())
    xr.testing.assert_identical(got.nav_lat, open_dataset(str(files[0])).nav_lat.load())
    # a replay rewrites its steps; forbid refuses; a step outside the template is refused
    to_zarr(open_dataset(str(files[chosen[0]])), store, region=T)
    with pytest.raises(PermanentError, match="overlap=forbid"):
        to_zarr(open_dataset(str(files[chosen[0]])), store, region=T, overlap="forbid")
    later = make_series(tmp_path / "later", 1, start_year=20)
    with pytest.raises(PermanentError, match=r"not in the template.*extend the template"):
        to_zarr(open_dataset(str(later[0])), store, region=T)
    xr.testing.assert_identical(read(store), got)


def test_region_mode_needs_a_template(files: list[Path], tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="create_template"):
        to_zarr(open_dataset(str(files[0])), str(tmp_path / "none.zarr"), region=T)


def test_misaligned_chunks_are_refused_before_writing(files: list[Path], tmp_path: Path) -> None:
    store = str(tmp_path / "n.zarr")
    to_zarr(open_dataset(str(files[0])), store, append_dim=T, chunks={T: 2})
    with pytest.raises(PermanentError, match=r"whole chunks.*chunks: \{time_counter: 1\}"):
        to_zarr(open_dataset(str(files[1])), store, append_dim=T)
    assert_store_equals(store, files[:1])
    template = str(tmp_path / "template.zarr")
    axis = [open_dataset(str(p)).time_counter.values[0] for p in files[:4]]
    create_template(open_dataset(str(files[0])), template, T, axis, chunks={T: 2})
    with pytest.raises(PermanentError, match="whole chunks"):
        to_zarr(open_dataset(str(files[1])), template, region=T)
    pair = xr.concat(opened(files[2:4]), dim=T, data_vars="minimal", coords="minimal",
                     compat="override")  # fmt: skip
    to_zarr(pair, template, region=T)  # two steps: exactly one chunk
    xr.testing.assert_equal(read(template).isel({T: [2, 3]}), expected(files[2:4]))


def test_existing_non_zarr_directory_is_never_overwritten(
    files: list[Path], tmp_path: Path
) -> None:
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "thesis.txt").write_text("four years of work")
    with pytest.raises(PermanentError, match="not a Zarr store"):
        to_zarr(open_dataset(str(files[0])), str(precious), append_dim=T)
    assert (precious / "thesis.txt").read_text() == "four years of work"


def test_store_written_by_plain_xarray_is_adopted(files: list[Path], tmp_path: Path) -> None:
    store = str(tmp_path / "n.zarr")
    first = open_dataset(str(files[0]))
    first.to_zarr(
        store,
        zarr_format=2,
        encoding={v: {"chunks": first[v].shape} for v in ("toce", "soce", "e3t")},
    )
    append_all(files[:3], store)
    assert_store_equals(store, files[:3])


def test_concurrent_appends_of_one_file_leave_one_step(files: list[Path], tmp_path: Path) -> None:
    store = str(tmp_path / "n.zarr")
    append_all(files[:2], store)
    errors: list[BaseException] = []
    # loaded first: the netCDF4/HDF5 libraries must not be called from several threads
    same_file = [open_dataset(str(files[2])).load() for _ in range(6)]

    def append(ds: xr.Dataset) -> None:
        try:
            to_zarr(ds, store, append_dim=T)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(ds,)) for ds in same_file]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert_store_equals(store, files[:3])


def test_concurrent_region_writes_all_land(files: list[Path], tmp_path: Path) -> None:
    store = str(tmp_path / "template.zarr")
    axis = [open_dataset(str(p)).time_counter.values[0] for p in files]
    create_template(open_dataset(str(files[0])), store, T, axis)
    datasets = [open_dataset(str(p)).load() for p in files]
    threads = [
        threading.Thread(target=lambda part=part: [to_zarr(ds, store, region=T) for ds in part])
        for part in (datasets[0::3], datasets[1::3], datasets[2::3])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert zarr.open_group(store, mode="r").attrs["dpypeline_written"] == [[0, 12]]
    xr.testing.assert_identical(read(store), expected(files))


def test_store_lock_keeps_other_processes_out_of_a_local_store(tmp_path: Path) -> None:
    location = locate(str(tmp_path / "n.zarr"))
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n"
        "    sys.exit(3)\n"
    )

    def try_lock() -> int:
        cmd = [sys.executable, "-c", probe, location.url + ".lock"]
        return subprocess.run(cmd, check=False, timeout=30).returncode

    with store_lock(location):
        assert try_lock() == 3
    assert try_lock() == 0


def test_to_zarr_commits_to_its_store_in_queue_order_only_when_it_appends(
    tmp_path: Path,
) -> None:
    from dpypeline.commits import Commit
    from dpypeline.pipeline import Task

    url = str(tmp_path / "out.zarr")
    append = Task("to_zarr", store=f"file://{tmp_path}/x/../out.zarr", append_dim=T)
    assert append.commit == Commit(url, ordered=True)
    assert Task("to_zarr", store=url, region=T).commit == Commit(url, ordered=False)
    s3 = Task("to_zarr", store="s3a://bucket/a.zarr/", objectstore="s", append_dim=T)
    assert s3.commit == Commit("s3://bucket/a.zarr", ordered=True)
    assert Task("to_zarr", store="ftp://host/a.zarr", append_dim=T).commit is None
    assert Task("open_dataset").commit is None
