"""open_dataset and clean_dataset on real NEMO files (made by scripts/make_nemo.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import cftime
import numpy as np
import pytest
import xarray as xr

from conftest import ROOT
from dpypeline.errors import ConfigError, PermanentError
from dpypeline.pipeline import resolve_task
from dpypeline.tasks.netcdf import clean_dataset, open_dataset

sys.path.insert(0, str(ROOT / "scripts"))
from make_nemo import default_source, make_series  # a script, not a package

SOURCE = default_source("T")  # the real GYRE file the series is made from


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_series(tmp_path_factory.mktemp("nemo"), 3, start_year=5)


def test_make_series_shifts_time_by_whole_360_day_years(series: list[Path]) -> None:
    assert [p.name for p in series] == [
        f"nemo4.0-GYRE_1y_{y:04d}0101_{y:04d}1230_grid_T.nc" for y in (5, 6, 7)
    ]
    src = xr.open_dataset(SOURCE, decode_times=False)
    for i, path in enumerate(series):
        raw = xr.open_dataset(path, decode_times=False)
        shift = (4 + i) * 360 * 86400.0
        for name in ("time_counter", "time_centered", "time_counter_bounds"):
            np.testing.assert_array_equal(raw[name].values, src[name].values + shift)
            assert raw[name].dtype == src[name].dtype
        assert raw.time_counter.attrs["calendar"] == "360_day"
        assert raw.toce.encoding["_FillValue"] == src.toce.encoding["_FillValue"]
        assert raw.attrs["name"] == f"GYRE_1y_{5 + i:04d}0101_{5 + i:04d}1230_grid_T"
        xr.testing.assert_identical(raw.nav_lat, src.nav_lat)


def test_open_dataset_keeps_360_day_calendar_as_cftime(series: list[Path]) -> None:
    ds = open_dataset(str(series[0]))
    value = ds.time_counter.values[0]
    assert isinstance(value, cftime.Datetime360Day)
    assert (value.year, value.month, value.day) == (5, 7, 1)
    assert ds.time_counter.encoding["calendar"] == "360_day"
    assert ds.time_counter.encoding["units"] == "seconds since 1900-01-01 00:00:00"
    assert ds.toce.dtype == np.float32


@pytest.mark.parametrize("engine", ["netcdf4", "h5netcdf"])
def test_open_dataset_engines_and_chunks(series: list[Path], engine: str) -> None:
    if engine == "h5netcdf":
        pytest.importorskip("h5py")
    ds = open_dataset(str(series[1]), engine=engine, chunks={"time_counter": 1})
    assert ds.toce.chunks is not None
    assert isinstance(ds.time_counter.values[0], cftime.Datetime360Day)
    xr.testing.assert_identical(ds.load(), open_dataset(str(series[1])).load())


def test_builtin_names_resolve_to_the_netcdf_tasks() -> None:
    assert resolve_task("open_dataset") is open_dataset
    assert resolve_task("clean_dataset") is clean_dataset


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_dataset(str(tmp_path / "gone.nc"))


@pytest.mark.parametrize("kind", ["zero-byte", "truncated-head", "truncated-tail", "text"])
@pytest.mark.parametrize("engine", [None, "netcdf4", "h5netcdf"])
def test_unreadable_file_is_a_permanent_error_naming_it(
    tmp_path: Path, series: list[Path], kind: str, engine: str | None
) -> None:
    if engine == "h5netcdf":
        pytest.importorskip("h5py")
    data = series[0].read_bytes()
    content = {
        "zero-byte": b"",
        "truncated-head": data[: len(data) // 3],
        "truncated-tail": data[:-64],
        "text": b"station,date,temp\n1,2023-01-01,41.2\n" * 20,
    }[kind]
    bad = tmp_path / f"GYRE_{kind}.nc"
    bad.write_bytes(content)
    with pytest.raises(PermanentError, match="re-send the file") as info:
        open_dataset(str(bad), engine=engine)
    assert str(bad) in str(info.value)
    if kind != "zero-byte":
        assert info.value.__cause__ is not None


def test_unknown_engine_is_a_config_error(series: list[Path]) -> None:
    with pytest.raises(ConfigError, match="engine"):
        open_dataset(str(series[0]), engine="pynio")


@pytest.fixture
def dirty(series: list[Path]) -> xr.Dataset:
    """A real file with sentinels written into toce and soce where the data were."""
    ds = open_dataset(str(series[0])).load()
    toce = ds.toce.values.copy()
    toce[0, 0, :2, :] = np.float32(1e20)
    toce[0, 1, 0, 0] = np.float32(9.999e19)  # near the sentinel, not equal
    soce = ds.soce.values.copy()
    soce[0, 0, 0, :3] = np.float32(-999.0)
    return ds.assign(toce=ds.toce.copy(data=toce), soce=ds.soce.copy(data=soce))


def test_clean_dataset_masks_values_equal_to_missing_value(dirty: xr.Dataset) -> None:
    out = clean_dataset(dirty, missing_value=1.0e20)
    assert int(out.toce.isnull().sum()) == 2 * 32
    assert float(out.toce[0, 1, 0, 0]) == pytest.approx(9.999e19)
    xr.testing.assert_identical(out.soce, dirty.soce)  # no -999 rule given
    assert int(dirty.toce.isnull().sum()) == 0  # the input is unchanged


def test_clean_dataset_threshold_is_a_tolerance_around_missing_value(dirty: xr.Dataset) -> None:
    out = clean_dataset(dirty, missing_value=1.0e20, threshold=1.0e17)
    assert int(out.toce.isnull().sum()) == 2 * 32 + 1
    assert int(clean_dataset(dirty, missing_value=-999.0).soce.isnull().sum()) == 3
    with pytest.raises(ConfigError, match="missing_value"):
        clean_dataset(dirty, threshold=1.0)


def test_clean_dataset_leaves_data_as_read_where_reading_masked_the_value_already(
    series: list[Path],
) -> None:
    """A value equal to the file's ``_FillValue`` was made NaN when the file was read: data
    still as read need no second comparison (a pass over every value of the file)."""
    ds = open_dataset(str(series[0]), chunks={"time_counter": 1})
    assert ds.toce.encoding["_FillValue"] == np.float32(1e20)
    out = clean_dataset(ds, missing_value=1.0e20)
    assert out.toce.data.name == ds.toce.data.name  # the same dask graph: no pass added
    assert "missing_value" not in out.toce.encoding
    raw = xr.open_dataset(series[0], mask_and_scale=False).toce.values
    np.testing.assert_array_equal(out.toce.isnull().values, raw == np.float32(1e20))
    # any other value, or a tolerance, is compared
    assert clean_dataset(ds, missing_value=-999.0).toce.data.name != ds.toce.data.name
    masked = clean_dataset(ds, missing_value=1.0e20, threshold=1.0e17)
    assert masked.toce.data.name != ds.toce.data.name


def test_clean_dataset_masks_a_value_put_back_after_reading(series: list[Path]) -> None:
    ds = open_dataset(str(series[0]), chunks={"time_counter": 1})
    west = ds.toce.x < 3
    back = ds.assign(toce=ds.toce.where(~west, np.float32(1e20)))  # a task wrote sentinels
    out = clean_dataset(back, missing_value=1.0e20)
    expected = (ds.toce.isnull() | west).transpose(*ds.toce.dims)
    np.testing.assert_array_equal(out.toce.isnull().values, expected.values)
    assert int(out.toce.isnull().sum()) >= 3 * 22 * 4


def test_clean_dataset_compares_where_the_files_missing_value_has_another_dtype(
    tmp_path: Path,
) -> None:
    """A float ``missing_value`` of a float32 variable is not float32(1e20): what reading
    masked is not what ``clean_dataset(missing_value=1e20)`` means, so it compares."""
    import netCDF4

    path = tmp_path / "double-missing.nc"
    with netCDF4.Dataset(path, "w") as nc:
        nc.createDimension("x", 3)
        var = nc.createVariable("v", "f4", ("x",))
        var.missing_value = np.float64(1e20)
        var[:] = np.array([1.0, 1e20, 2.0], dtype=np.float32)
    ds = open_dataset(str(path), chunks={})
    out = clean_dataset(ds, missing_value=1.0e20)
    assert out.v.isnull().values.tolist() == [False, True, False]


def test_clean_dataset_sets_fill_value_and_drops_missing_value(dirty: xr.Dataset) -> None:
    assert dirty.toce.encoding["missing_value"] == np.float32(1e20)
    out = clean_dataset(dirty, missing_value=1.0e20, fill_value=-1.0)
    for name in ("toce", "soce", "e3t"):
        assert out[name].encoding["_FillValue"] == np.float32(-1.0)
        assert out[name].encoding["_FillValue"].dtype == np.float32
        assert "missing_value" not in out[name].encoding
        assert "missing_value" not in out[name].attrs
    # only float data variables are touched: coordinates and times keep their encoding
    assert out.nav_lat.encoding == dirty.nav_lat.encoding
    assert out.time_counter_bounds.encoding == dirty.time_counter_bounds.encoding
    assert "missing_value" in dirty.toce.encoding  # the input is unchanged


def test_clean_dataset_output_round_trips_through_netcdf(dirty: xr.Dataset, tmp_path: Path) -> None:
    out = clean_dataset(dirty, missing_value=1.0e20, fill_value=-1.0)
    out.to_netcdf(tmp_path / "clean.nc")
    back = open_dataset(str(tmp_path / "clean.nc"))
    raw = xr.open_dataset(tmp_path / "clean.nc", mask_and_scale=False)
    assert int(back.toce.isnull().sum()) == 2 * 32
    assert int((raw.toce == -1.0).sum()) == 2 * 32
    for name in ("toce", "soce", "e3t"):
        xr.testing.assert_identical(back[name].load(), out[name])


def test_an_option_no_engine_takes_is_refused_before_any_file_and_is_permanent(
    series: list[Path], tmp_path: Path
) -> None:
    from conftest import write_config
    from dpypeline.commands.preflight import preflight
    from dpypeline.config.model import load_config
    from dpypeline.pipeline import import_tasks

    (tmp_path / "inbox").mkdir()
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(tmp_path / "inbox")}],
            "jobs": [
                {
                    "name": "zarr",
                    "tasks": [
                        {"task": "open_dataset", "with": {"no_such_arg": 1, "group": "/"}},
                        {"task": "to_zarr", "with": {"store": "out.zarr", "nor_this": 2}},
                    ],
                }
            ],
        },
    )
    config = load_config(cfg)
    jobs, setup = import_tasks(config)
    with pytest.raises(ConfigError) as refused:
        preflight(config, jobs, setup)
    text = str(refused.value)
    # both wrong options, each at its line, in one report; `group` is the backend's own
    assert "pipeline.yaml:9: jobs[0].tasks[0].with.no_such_arg: open_dataset: neither" in text
    assert "takes 'no_such_arg'" in text
    assert "jobs[0].tasks[1].with.nor_this" in text
    assert "group" not in text.split("no_such_arg", maxsplit=1)[0]
    # a call that gets past validate (the Python API) fails as the config's fault: dead at once
    with pytest.raises(ConfigError, match=r"no_such_arg.*fix the task's `with:`"):
        open_dataset(str(series[0]), no_such_arg=1)


def test_a_task_called_with_an_option_it_does_not_take_is_a_config_error_not_a_retry() -> None:
    from dpypeline.pipeline import Task

    def convert(path: str, factor: float = 1.0) -> str:
        return path

    def broken_inside(path: str) -> str:
        return len(5)  # type: ignore[arg-type] # a TypeError of the task's own

    with pytest.raises(ConfigError, match=r"convert.*unexpected keyword argument 'facter'"):
        Task(convert, facter=2.0)("a.nc")
    with pytest.raises(TypeError, match="has no len"):  # not the config's fault: retried
        Task(broken_inside)("a.nc")
