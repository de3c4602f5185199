"""The main job on NEMO's real chunk layouts: any source chunking is read, the store chooses
its own chunks and codec, and layout errors are permanent, named and never retried.

The files are small grids written the way NEMO writes ORCA output (scripts/make_orca.py):
namnc4 chunks of (1, 3, ny/4, nx/4), full-depth tiles, one chunk per field, contiguous, and
chunks that differ between variables; deptht_bounds contiguous in every layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from conftest import ROOT
from dpypeline.errors import ConfigError, PermanentError
from dpypeline.tasks.netcdf import clean_dataset, open_dataset
from dpypeline.tasks.zarr import layout as zarrlayout
from dpypeline.tasks.zarr.layout import MAX_CHUNK_BYTES, Compressor, store_chunks
from dpypeline.tasks.zarr.to_zarr import plan_layout, to_zarr

sys.path.insert(0, str(ROOT / "scripts"))
from make_orca import make_files  # a script, not a package

T = "time_counter"
GRID = (64, 48, 10)  # nx, ny, nz: small, chunked as NEMO chunks ORCA025
DECODE = xr.coders.CFDatetimeCoder(use_cftime=True)
VARIABLES = ["thetao", "so", "tos"]
LAYOUTS = ["namnc4", "tiles", "whole", "contiguous", "mixed"]
ORCA025 = ("time_counter", "deptht", "y", "x"), (1, 75, 1207, 1442)
NAMNC4 = {"time_counter": 1, "deptht": 3, "y": 302, "x": 361}


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("orca")
    return {
        layout: make_files(
            root / layout, 3, grid=GRID, layout=layout, variables=["thetao", "so", "tos"]
        )
        for layout in LAYOUTS
    }


def ingest(files: list[Path], store: Path, **kwargs: object) -> None:
    """The README's main job: open with one step per chunk, clean, append."""
    for f in files:
        ds = clean_dataset(open_dataset(str(f), chunks={T: 1}), missing_value=1.0e20)
        to_zarr(ds, str(store), append_dim=T, **kwargs)  # type: ignore[arg-type]


def assert_same_as_files(store: Path, files: list[Path]) -> None:
    stored = xr.open_zarr(store, decode_times=DECODE)
    parts = [xr.open_dataset(f, decode_times=DECODE) for f in files]
    src = xr.concat(parts, dim=T, data_vars="minimal", coords="minimal", compat="override")
    src = clean_dataset(src, missing_value=1.0e20)
    assert stored.sizes[T] == len(files)
    for name in ("thetao", "so", "tos", "deptht_bounds", "nav_lat", T):
        np.testing.assert_array_equal(stored[name].values, src[name].values, err_msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_nemo_chunk_layout_is_appended_whole_and_exact(
    series: dict[str, list[Path]], tmp_path: Path, layout: str
) -> None:
    store = tmp_path / "T.zarr"
    ingest(series[layout], store)
    assert_same_as_files(store, series[layout])
    # the store's chunks are its own: one step, the other dimensions whole (a small grid)
    group = zarr.open_group(store, mode="r")
    assert group["thetao"].chunks == (1, GRID[2], GRID[1], GRID[0])
    assert group["deptht_bounds"].chunks == (GRID[2], 2)


def test_large_fields_are_split_largest_dimension_first_along_the_file_chunks(
    series: dict[str, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a target of 16 KiB, a 120 KiB thetao step is split as ORCA025 is at 64 MiB: the
    largest dimension first, each split on a boundary of the file's chunks, while the small
    contiguous deptht_bounds stays whole: chunks that differ between variables."""
    monkeypatch.setattr(zarrlayout, "TARGET_CHUNK_BYTES", 16 * 2**10)
    store = tmp_path / "T.zarr"
    ingest(series["namnc4"], store)
    assert_same_as_files(store, series["namnc4"])
    group = zarr.open_group(store, mode="r")
    # 120 KiB: x 64 -> 32, y 48 -> 24, x 32 -> 16 (15 KiB): on the file's (1, 3, 12, 16)
    assert group["thetao"].chunks == (1, GRID[2], 24, 16)
    assert np.prod(group["thetao"].chunks) * 4 <= 16 * 2**10
    assert group["deptht_bounds"].chunks == (GRID[2], 2)


def test_whole_dimension_chunks_are_whole_not_one(
    series: dict[str, list[Path]], tmp_path: Path
) -> None:
    store = tmp_path / "T.zarr"
    ingest(series["namnc4"][:1], store, chunks={"deptht": -1, "y": 8})
    assert zarr.open_group(store, mode="r")["thetao"].chunks == (1, GRID[2], 8, GRID[0])


def test_an_existing_store_keeps_its_chunks_whatever_the_file_or_the_arguments_say(
    series: dict[str, list[Path]], tmp_path: Path
) -> None:
    store = tmp_path / "T.zarr"
    ingest(series["namnc4"][:1], store, chunks={"y": 16})
    ingest(series["tiles"][1:], store, chunks={"y": 4}, compressor="zlib")
    group = zarr.open_group(store, mode="r")
    assert group["thetao"].chunks == (1, GRID[2], 16, GRID[0])
    assert "zstd" in str(group["thetao"].compressors[0])
    assert group["thetao"].shape[0] == 3


@pytest.mark.parametrize(
    ("zarr_format", "compressor", "expected"),
    [
        (2, None, "Blosc(cname='zstd', clevel=3, shuffle=SHUFFLE"),
        (
            2,
            {"codec": "blosc-lz4", "level": 5, "shuffle": "bit"},
            "cname='lz4', clevel=5, shuffle=BITSHUFFLE",
        ),
        (2, {"codec": "zstd", "level": 7}, "Zstd(level=7"),
        (2, "zlib", "Zlib(level=1)"),
        (3, {"codec": "blosc-zstd", "level": 2}, "cname=<BloscCname.zstd: 'zstd'>, clevel=2"),
        (3, "zstd", "ZstdCodec(level=3"),
    ],
)
def test_the_codec_comes_from_the_yaml_for_both_formats(
    series: dict[str, list[Path]],
    tmp_path: Path,
    zarr_format: int,
    compressor: object,
    expected: str,
) -> None:
    store = tmp_path / "T.zarr"
    ingest(series["namnc4"][:2], store, zarr_format=zarr_format, compressor=compressor)
    group = zarr.open_group(store, mode="r")
    assert expected in str(group["thetao"].compressors[0])
    assert_same_as_files(store, series["namnc4"][:2])


def test_no_compression_when_asked(series: dict[str, list[Path]], tmp_path: Path) -> None:
    store = tmp_path / "T.zarr"
    ingest(series["namnc4"][:1], store, compressor="none")
    assert zarr.open_group(store, mode="r")["thetao"].compressors == ()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("snappy", "codec must be one of"),
        ({"codec": "zstd", "shuffle": "byte"}, "shuffle works with the blosc codecs only"),
        ({"codec": "blosc-lz4", "level": "high"}, "level must be a whole number"),
        ({"codec": "zstd", "speed": 3}, "unknown keys speed"),
    ],
)
def test_a_bad_codec_is_a_config_error(spec: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Compressor.parse(spec)  # type: ignore[arg-type]


def test_orca025_store_chunks_are_about_64_mib_and_on_the_file_chunk_boundaries() -> None:
    dims, shape = ORCA025
    chunks = store_chunks("thetao", dims, shape, 4, along=T, overrides={}, source=NAMNC4)
    size = np.prod(chunks) * 4
    assert 4 * 2**20 <= size <= 64 * 2**20
    assert chunks[0] == 1
    for dim, n in zip(dims[1:], chunks[1:], strict=True):
        assert n % NAMNC4[dim] == 0 or n == shape[dims.index(dim)], (dim, n)
    # a whole-field source (one chunk of 522 MB) is split the same size
    field = dict(zip(dims, shape, strict=True))
    whole = store_chunks("thetao", dims, shape, 4, along=T, overrides={}, source=field)
    assert 32 * 2**20 <= np.prod(whole) * 4 <= 64 * 2**20


def test_orca12_chunks_stay_under_the_target_and_no_chunk_can_pass_the_codec_limit() -> None:
    dims, shape = ("time_counter", "deptht", "y", "x"), (1, 75, 3059, 4322)
    chunks = store_chunks("thetao", dims, shape, 4, along=T, overrides={}, source=NAMNC4)
    assert 4 * 2**20 <= np.prod(chunks) * 4 <= 64 * 2**20
    # asking for whole ORCA12 fields (4 GB a chunk) is refused before anything is written
    with pytest.raises(ConfigError, match=r"at most 2 GiB per chunk.*deptht, y, x"):
        store_chunks("thetao", dims, shape, 4, along=T, overrides=dict.fromkeys(dims[1:], -1))
    # a dimension left free is split to fit, even when others are fixed whole
    fitted = store_chunks("thetao", dims, shape, 4, along=T, overrides={"deptht": -1, "y": -1})
    assert fitted[1:3] == (75, 3059)
    assert np.prod(fitted) * 4 <= MAX_CHUNK_BYTES


def test_append_dimension_gets_one_step_unless_told(series: dict[str, list[Path]]) -> None:
    assert store_chunks("v", ["t", "x"], [12, 10], 4, along="t", overrides={}) == (1, 10)
    assert store_chunks("v", ["t", "x"], [1, 10], 4, along="t", overrides={"t": 12}) == (12, 10)
    with pytest.raises(ConfigError, match=r"chunks: x: 0 is not a chunk size"):
        store_chunks("v", ["t", "x"], [1, 10], 4, along="t", overrides={"x": 0})


def test_validate_sample_shows_the_layout_a_new_store_gets(series: dict[str, list[Path]]) -> None:
    ds = open_dataset(str(series["mixed"][0]), chunks={T: 1})
    rows = {r["variable"]: r for r in plan_layout(ds, append_dim=T, store="x.zarr")}
    nx, ny, nz = GRID
    assert rows["thetao"]["read_chunks"] == {T: 1, "deptht": 3, "y": 12, "x": 16}
    assert rows["so"]["read_chunks"] == {T: 1, "deptht": nz, "y": 12, "x": 16}
    assert rows["thetao"]["store_chunks"] == {T: 1, "deptht": nz, "y": ny, "x": nx}
    assert rows["thetao"]["chunk_bytes"] == nx * ny * nz * 4
    assert rows["thetao"]["codec"] == "blosc-zstd level 3, byte shuffle"


def test_data_that_do_not_fit_the_store_are_a_permanent_error_naming_the_variable(
    series: dict[str, list[Path]], tmp_path: Path
) -> None:
    ds = open_dataset(str(series["namnc4"][0]), chunks={T: 1})
    ds["thetao"].attrs["valid_range"] = {1, 2}  # a set: no store can hold it
    with pytest.raises(PermanentError, match=r"variable thetao .* cannot be written"):
        to_zarr(ds, str(tmp_path / "T.zarr"), append_dim=T)
