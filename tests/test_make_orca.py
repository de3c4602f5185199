"""The synthetic ORCA generator makes files shaped like XIOS output: the chunk layouts it
names, NEMO's variables and time axis, land as 1e20, new values in every file, and re-runs
that leave finished files alone."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import cftime
import netCDF4
import numpy as np
import pytest
import xarray as xr

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from make_orca import GRIDS, LAYOUTS, VARIABLES, chunk_shape, main, make_files

GRID = (24, 18, 8)  # nx, ny, nz: small, with y and x not multiples of 4
CFTIME = xr.coders.CFDatetimeCoder(use_cftime=True)


def test_namnc4_chunks_orca025_as_real_nemo_output() -> None:
    assert chunk_shape("thetao", GRIDS["orca025"], "namnc4") == (1, 3, 302, 361)
    assert chunk_shape("tos", GRIDS["orca025"], "namnc4") == (1, 302, 361)
    assert chunk_shape("thetao", GRIDS["orca12"], "namnc4") == (1, 3, 765, 1081)


EXPECTED_CHUNKS = {
    "namnc4": {"thetao": [1, 3, 5, 6], "so": [1, 3, 5, 6], "tos": [1, 5, 6]},
    "tiles": {"thetao": [1, 8, 5, 6], "so": [1, 8, 5, 6], "tos": [1, 5, 6]},
    "whole": {"thetao": [1, 8, 18, 24], "so": [1, 8, 18, 24], "tos": [1, 18, 24]},
    "contiguous": {"thetao": "contiguous", "so": "contiguous", "tos": "contiguous"},
    "mixed": {"thetao": [1, 3, 5, 6], "so": [1, 8, 5, 6], "tos": [1, 5, 6]},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_chunks_fields_as_named_and_keeps_bounds_contiguous(
    tmp_path: Path, layout: str
) -> None:
    (path,) = make_files(tmp_path, 1, grid=GRID, layout=layout, variables=["thetao", "so", "tos"])
    with netCDF4.Dataset(path) as nc:
        for name, chunks in EXPECTED_CHUNKS[layout].items():
            assert nc[name].chunking() == chunks, name
            filters = nc[name].filters()
            compressed = layout != "contiguous"
            assert (filters["zlib"], filters["shuffle"]) == (compressed, compressed), name
            if compressed:
                assert filters["complevel"] == 1
        assert nc["deptht_bounds"].chunking() == "contiguous"
        assert nc["nav_lat"].chunking() == nc["nav_lon"].chunking() == [18, 24]
        # netCDF-4 stores nothing contiguous along an unlimited dimension
        assert nc.dimensions["time_counter"].isunlimited() == (layout != "contiguous")


def test_file_carries_nemo_variables_attributes_and_fill_values(tmp_path: Path) -> None:
    (path,) = make_files(tmp_path, 1, grid=GRID, complevel=4)
    with netCDF4.Dataset(path) as nc:
        assert set(VARIABLES) <= set(nc.variables)
        assert nc["thetao"].dimensions == ("time_counter", "deptht", "y", "x")
        assert nc["zos"].dimensions == ("time_counter", "y", "x")
        assert nc["deptht_bounds"].dimensions == ("deptht", "axis_nbounds")
        assert nc["time_counter_bounds"].dimensions == ("time_counter", "axis_nbounds")
        for name in VARIABLES:
            var = nc[name]
            assert var.dtype == np.float32
            assert var.getncattr("_FillValue") == var.getncattr("missing_value") == np.float32(1e20)
            assert var.coordinates == "time_centered nav_lat nav_lon"
            assert var.filters()["complevel"] == 4
        assert nc["time_counter"].dtype == np.float64
        assert nc["time_counter"].units == "seconds since 1900-01-01 00:00:00"
        assert nc["deptht"].bounds == "deptht_bounds"
        depth = nc["deptht"][:]
        bounds = nc["deptht_bounds"][:]
        assert np.all(np.diff(depth) > 0)
        assert np.all((bounds[:, 0] < depth) & (depth < bounds[:, 1]))


def test_xarray_decodes_times_in_the_files_calendar(tmp_path: Path) -> None:
    paths = make_files(tmp_path / "360", 2, grid=GRID, steps=2, variables=["tos"])
    assert [p.name for p in paths] == [
        "GRID24x18x8-TEST_1m_00010101_00010230_grid_T.nc",
        "GRID24x18x8-TEST_1m_00010301_00010430_grid_T.nc",
    ]
    with xr.open_dataset(paths[1], decode_times=CFTIME) as ds:
        times = ds.time_counter.values
        assert isinstance(times[0], cftime.Datetime360Day)
        assert [(t.month, t.day) for t in times] == [(3, 16), (4, 16)]
        assert ds.time_counter.dims == ("time_counter",)
    (greg,) = make_files(
        tmp_path / "greg", 1, grid=GRID, calendar="gregorian", start_year=2001, variables=["tos"]
    )
    assert greg.name == "GRID24x18x8-TEST_1m_20010101_20010131_grid_T.nc"
    with xr.open_dataset(greg, decode_times=CFTIME) as ds:
        (t,) = ds.time_counter.values
        assert (t.calendar, t.year, t.month, t.day, t.hour) == ("standard", 2001, 1, 16, 12)


def test_land_is_fill_value_nested_with_depth_and_nan_in_xarray(tmp_path: Path) -> None:
    (path,) = make_files(tmp_path, 1, grid=(48, 36, 10))
    with netCDF4.Dataset(path) as nc:
        nc.set_auto_mask(False)
        raw = nc["thetao"][0]
        land = raw == np.float32(1e20)
        assert np.all(land | (np.abs(raw) < 40))
        assert 0.2 < land[0].mean() < 0.4
        assert np.all(land[1:] >= land[:-1])  # land at one level is land below it
        assert land[-1].mean() > land[0].mean()
        assert np.array_equal(nc["tos"][0], raw[0])  # NEMO's tos is thetao's top level
    with xr.open_dataset(path) as ds:
        assert np.array_equal(ds.thetao.isnull().values[0], land)
        ocean = ds.so.values[0][~land]
        assert ocean.min() > 33
        assert ocean.max() < 37


def test_each_file_has_new_values_and_later_times(tmp_path: Path) -> None:
    paths = make_files(tmp_path, 3, grid=GRID, steps=2, variables=["thetao", "zos"])
    times, bounds, fields = [], [], []
    for path in paths:
        with netCDF4.Dataset(path) as nc:
            times.extend(nc["time_counter"][:])
            bounds.extend(nc["time_counter_bounds"][:])
            fields.append(nc["thetao"][:])
    assert np.all(np.diff(times) > 0)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))  # no gaps
    steps = [f[i] for f in fields for i in range(2)]
    for a, b in itertools.pairwise(steps):
        assert np.array_equal(a.mask, b.mask)
        assert not np.any(a.compressed() == b.compressed())


def test_same_seed_gives_the_same_data_in_any_layout(tmp_path: Path) -> None:
    (a,) = make_files(tmp_path / "a", 1, grid=GRID, layout="namnc4", variables=["so"])
    (b,) = make_files(tmp_path / "b", 1, grid=GRID, layout="whole", variables=["so"])
    (c,) = make_files(tmp_path / "c", 1, grid=GRID, seed=1, variables=["so"])
    with netCDF4.Dataset(a) as na, netCDF4.Dataset(b) as nb, netCDF4.Dataset(c) as nc:
        assert np.array_equal(na["so"][:], nb["so"][:])
        assert not np.array_equal(na["so"][:], nc["so"][:])


def test_rerun_leaves_finished_files_untouched_but_rewrites_changed_ones(tmp_path: Path) -> None:
    paths = make_files(tmp_path, 2, grid=GRID, variables=["tos"])
    before = {p: p.stat().st_mtime_ns for p in paths}
    assert make_files(tmp_path, 2, grid=GRID, variables=["tos"]) == paths
    assert {p: p.stat().st_mtime_ns for p in paths} == before
    assert sorted(tmp_path.iterdir()) == sorted(paths)  # no temporary left behind

    make_files(tmp_path, 2, grid=GRID, variables=["tos"], seed=7)
    with netCDF4.Dataset(paths[0]) as nc:
        assert '"seed": 7' in nc.make_orca_parameters


def test_command_line_takes_a_grid_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path), "--files", "2", "--grid", "20x12x5", "--vars", "thetao,sos"]
    assert main([*argv, "--layout", "tiles", "--steps", "3"]) == 0
    assert "2 files in" in capsys.readouterr().out
    paths = sorted(tmp_path.glob("*_grid_T.nc"))
    assert [p.name for p in paths] == [
        "GRID20x12x5-TEST_1m_00010101_00010330_grid_T.nc",
        "GRID20x12x5-TEST_1m_00010401_00010630_grid_T.nc",
    ]
    with netCDF4.Dataset(paths[0]) as nc:
        assert set(nc.variables) >= {"thetao", "sos"}
        assert "so" not in nc.variables
        assert nc["thetao"].shape == (3, 5, 12, 20)
        assert nc["thetao"].chunking() == [1, 5, 3, 5]
