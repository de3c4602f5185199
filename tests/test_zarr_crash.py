"""SIGKILL during a Zarr write, at each failpoint, then the replay: the store is exactly
right (every step once, in order, all arrays the same length) and readable throughout. The
killed job runs in a process of its own; the replay runs here, as a worker runs its jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import s3fs
import xarray as xr
import zarr

from conftest import ROOT, env_for_subprocess
from dpypeline.tasks.netcdf import open_dataset
from dpypeline.tasks.zarr.to_zarr import create_template, to_zarr
from s3server import S3Server

sys.path.insert(0, str(ROOT / "scripts"))
from make_nemo import make_series  # a script, not a package

pytestmark = pytest.mark.slow

T = "time_counter"
DECODE = xr.coders.CFDatetimeCoder(use_cftime=True)
ALONG = ["time_centered_bounds", "time_counter_bounds", "toce", "soce", "e3t", "time_centered"]
# failpoint -> (length of the arrays, how many of ALONG have the new step, and the coordinate);
# the data variables (all of ALONG but the coordinate time_centered) are written together
KILLED_AT = {
    "before_resize": (3, 0, False),
    "between_arrays": (4, 5, False),
    "before_coordinate": (4, 6, False),
    "before_commit": (4, 6, True),
}
# One job's to_zarr calls, as the worker runs them: argv = mode store options paths…
RUNNER = """
import json, sys
from dpypeline.tasks.netcdf import open_dataset
from dpypeline.tasks.zarr.to_zarr import to_zarr
mode, store, options, paths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
for path in paths:
    to_zarr(open_dataset(path), store, **{mode: "time_counter"}, storage_options=options or None)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_series(tmp_path_factory.mktemp("nemo"), 6)


def run(
    store: str,
    paths: Sequence[Path],
    *,
    failpoint: str | None = None,
    once: Path | None = None,
    options: dict[str, Any] | None = None,
    mode: str = "append_dim",
) -> subprocess.CompletedProcess[str]:
    env = env_for_subprocess()
    env.pop("DPYPELINE_FAILPOINT", None)
    if failpoint:
        env["DPYPELINE_FAILPOINT"] = failpoint
    if once:
        env["DPYPELINE_FAILPOINT_ONCE_FILE"] = str(once)
    cmd = [sys.executable, "-c", RUNNER, mode, store, json.dumps(options or {}), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)


def replay(
    store: str,
    paths: Sequence[Path],
    *,
    options: dict[str, Any] | None = None,
    mode: str = "append_dim",
) -> None:
    """RUNNER's calls, here."""
    for path in paths:
        to_zarr(open_dataset(str(path)), store, **{mode: T}, storage_options=options or None)


def expected(paths: Sequence[Path]) -> xr.Dataset:
    return xr.concat(
        [open_dataset(str(p)) for p in paths], dim=T, data_vars="minimal", coords="minimal",
        compat="override", combine_attrs="override",
    )  # fmt: skip


def assert_store_is(store: str, paths: Sequence[Path], **kwargs: Any) -> None:
    """Every array has the same length along time, and the store read as users read it
    (with or without consolidated metadata) is the concatenation of the files."""
    group = zarr.open_group(store, mode="r", use_consolidated=False, **kwargs)
    lengths = {n: a.shape[0] for n, a in group.arrays() if n in (*ALONG, T)}
    assert set(lengths.values()) == {len(paths)}, lengths
    for consolidated in (True, False):
        got = xr.open_zarr(store, decode_times=DECODE, consolidated=consolidated, **kwargs).load()
        got.attrs = {k: v for k, v in got.attrs.items() if not k.startswith("dpypeline_")}
        xr.testing.assert_identical(got, expected(paths))


def assert_killed(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == -9, (
        f"expected death by SIGKILL, got {proc.returncode}:\n{proc.stderr}"
    )


def written(store: Path, name: str, step: int) -> bool:
    """Whether the chunk of ``step`` of a local Zarr 2 array exists."""
    return any(store.joinpath(name).glob(f"{step}.*")) or store.joinpath(name, str(step)).exists()


@pytest.mark.parametrize("failpoint", list(KILLED_AT))
def test_sigkill_during_append_then_replay_leaves_no_duplicate_or_missing_step(
    files: list[Path], tmp_path: Path, failpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = str(tmp_path / "n.zarr")
    for p in files[:3]:
        to_zarr(open_dataset(str(p)), store, append_dim=T)
    once = tmp_path / "die-once"
    once.touch()
    assert_killed(run(store, files[3:4], failpoint=failpoint, once=once))
    # the kill came exactly where the failpoint is
    length, data, coordinate = KILLED_AT[failpoint]
    group = zarr.open_group(store, mode="r", use_consolidated=False)
    assert {a.shape[0] for n, a in group.arrays() if n in (*ALONG, T)} == {length}
    assert sum(written(Path(store), v, 3) for v in ALONG) == data
    assert written(Path(store), T, 3) == coordinate
    assert group.attrs["dpypeline_committed"] == 3
    # readers still see the last committed state, through the consolidated metadata
    committed = xr.open_zarr(store, decode_times=DECODE).load()
    xr.testing.assert_equal(committed, expected(files[:3]))
    # the job runs again, failpoint still configured but spent: replay, then the rest
    assert not once.exists()
    monkeypatch.setenv("DPYPELINE_FAILPOINT", failpoint)
    monkeypatch.setenv("DPYPELINE_FAILPOINT_ONCE_FILE", str(once))
    replay(store, files[3:])
    assert_store_is(store, files)


def test_after_a_crash_a_replay_of_an_earlier_file_cuts_the_leftovers(
    files: list[Path], tmp_path: Path
) -> None:
    """The crashed job is not the next to run (say it went dead): an older file's replay
    must not commit the half-written step along with its own."""
    store = str(tmp_path / "n.zarr")
    for p in files[:3]:
        to_zarr(open_dataset(str(p)), store, append_dim=T)
    assert_killed(run(store, files[3:4], failpoint="before_coordinate"))
    to_zarr(open_dataset(str(files[1])), store, append_dim=T)
    assert_store_is(store, files[:3])


def test_sigkill_while_creating_the_store_then_replay_recreates_it(
    files: list[Path], tmp_path: Path
) -> None:
    store = str(tmp_path / "n.zarr")
    assert_killed(run(store, files[:1], failpoint="before_commit"))
    assert "dpypeline_committed" not in zarr.open_group(store, mode="r").attrs
    replay(store, files[:3])
    assert_store_is(store, files[:3])


def test_sigkill_during_region_write_then_replay_writes_it_whole(
    files: list[Path], tmp_path: Path
) -> None:
    store = str(tmp_path / "template.zarr")
    axis = [open_dataset(str(p)).time_counter.values[0] for p in files]
    create_template(open_dataset(str(files[0])), store, T, axis)
    order = [files[i] for i in (4, 1, 5, 0, 2, 3)]
    for p in order[:2]:
        to_zarr(open_dataset(str(p)), store, region=T)
    assert_killed(run(store, order[2:3], failpoint="between_arrays", mode="region"))
    replay(store, order[2:], mode="region")
    assert zarr.open_group(store, mode="r").attrs["dpypeline_written"] == [[0, 6]]
    assert_store_is(store, files)


def test_sigkill_during_append_to_s3_then_replay_leaves_no_duplicate_or_missing_step(
    files: list[Path], s3: S3Server
) -> None:
    options = s3.storage_options()
    s3fs.S3FileSystem(**options).mkdir("crash")  # type: ignore[arg-type]
    url = "s3://crash/n.zarr"
    for p in files[:2]:
        to_zarr(open_dataset(str(p)), url, append_dim=T, storage_options=options)
    assert_killed(run(url, files[2:3], failpoint="between_arrays", options=options))
    replay(url, files[2:], options=options)
    assert_store_is(url, files, storage_options=options)
