"""`dpypeline history`, `revert` and `gc` on real stores: GYRE files ingested by the
pipeline in this process (plain Zarr and Icechunk), the CLI run on them, the store read
back and compared with the source files."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import yaml

from conftest import ROOT, write_config
from dpypeline import cli
from dpypeline.api import Pipeline
from dpypeline.state.ledger import JobState, Ledger
from s3server import SECRET, S3Server

sys.path.insert(0, str(ROOT / "scripts"))
from make_nemo import make_series  # scripts, not a package

CODER = xr.coders.CFDatetimeCoder(use_cftime=True)


def config(tmp_path: Path, **to_zarr: Any) -> tuple[Path, Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    store = tmp_path / "out" / "gyre_T.zarr"
    where = to_zarr.pop("store", str(store))
    data = {
        "name": "gyre",
        "cache_dir": str(tmp_path / "state"),
        "monitor": False,
        "watch": [{"path": str(inbox), "patterns": ["*.nc"], "settle": "50ms"}],
        "jobs": [
            {
                "name": "to-zarr",
                "tasks": [
                    {"task": "open_dataset"},
                    {
                        "task": "to_zarr",
                        "with": {"store": where, "append_dim": "time_counter", **to_zarr},
                    },
                ],
            }
        ],
        "logging": {"format": "json", "level": "warning"},
    }
    return write_config(tmp_path, data), inbox, store


def ingest(cfg: Path) -> None:
    assert Pipeline.from_yaml(cfg).run(once=True) == 0


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def open_store(store: Path, icechunk: bool) -> xr.Dataset:
    if not icechunk:
        return xr.open_zarr(store, decode_times=CODER, consolidated=None, chunks=None)
    import icechunk as ic

    repo = ic.Repository.open(ic.local_filesystem_storage(str(store)))
    session = repo.readonly_session(branch="main")
    return xr.open_zarr(session.store, decode_times=CODER, consolidated=False, chunks=None)


def steps(store: Path, icechunk: bool) -> int:
    try:
        return int(open_store(store, icechunk).sizes["time_counter"])
    except FileNotFoundError:  # zarr's GroupNotFoundError: an empty repository
        return 0


def assert_store_is(ds: xr.Dataset, files: list[Path]) -> None:
    want = xr.concat(
        [xr.open_dataset(f, decode_times=CODER) for f in files],
        "time_counter",
        data_vars="minimal",
        coords="minimal",
        compat="override",
    )
    assert list(ds.time_counter.values) == list(want.time_counter.values)
    for name, var in want.data_vars.items():
        if "time_counter" in var.dims:
            np.testing.assert_array_equal(ds[name].values, var.values, err_msg=name)


def job_states(cfg: Path) -> dict[int, JobState]:
    ledger = Ledger(cfg.parent / "state", read_only=True)
    try:
        return {r.id: r.state for r in ledger.jobs(limit=-1)}
    finally:
        ledger.close()


KINDS = [pytest.param(False, id="plain-zarr"), pytest.param(True, id="icechunk")]


@pytest.mark.parametrize("icechunk", KINDS)
def test_history_lists_each_file_commit_newest_first_in_text_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], icechunk: bool
) -> None:
    cfg, inbox, store = config(tmp_path, **({"icechunk": True} if icechunk else {}))
    files = sorted(make_series(inbox, 3))
    ingest(cfg)

    code, out, _ = run_cli(capsys, "history", "-c", str(cfg), "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["job_id"] for r in rows] == [3, 2, 1]
    assert [r["file"] for r in rows] == [f.name for f in reversed(files)]  # as in the watch
    assert [r["steps"] for r in rows] == [[2, 3], [1, 2], [0, 1]]
    assert {r["store"] for r in rows} == {str(store)}
    assert all(r["time"] for r in rows)
    assert all(bool(r["snapshot"]) == icechunk for r in rows)

    code, out, _ = run_cli(capsys, "history", str(store), "-c", str(cfg))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{store}:"
    assert "snapshot" in lines[1]
    assert "file" in lines[1]
    assert [line.split()[-1] for line in lines[2:]] == [f.name for f in reversed(files)]
    assert [line.split()[-2] for line in lines[2:]] == ["2..2", "1..1", "0..0"]


@pytest.mark.parametrize("icechunk", KINDS)
def test_revert_of_the_first_file_writes_it_and_the_later_ones_again_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], icechunk: bool
) -> None:
    cfg, inbox, store = config(tmp_path, **({"icechunk": True} if icechunk else {}))
    files = sorted(make_series(inbox, 3))
    ingest(cfg)

    code, out, err = run_cli(capsys, "revert", "1", "-c", str(cfg))

    assert code == 0, err
    assert "3 job(s) queued" in out
    assert job_states(cfg) == {1: JobState.QUEUED, 2: JobState.QUEUED, 3: JobState.QUEUED}
    assert steps(store, icechunk) == 0  # Icechunk: the empty repository, as before the first
    ingest(cfg)
    assert job_states(cfg) == {1: JobState.DONE, 2: JobState.DONE, 3: JobState.DONE}
    assert_store_is(open_store(store, icechunk), files)
    code, out, _ = run_cli(capsys, "history", "-c", str(cfg), "--json")
    assert [r["job_id"] for r in json.loads(out)] == [3, 2, 1]


@pytest.mark.parametrize("icechunk", KINDS)
def test_revert_skip_leaves_the_file_out_and_writes_the_later_ones_after_the_earlier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], icechunk: bool
) -> None:
    cfg, inbox, store = config(tmp_path, **({"icechunk": True} if icechunk else {}))
    files = sorted(make_series(inbox, 3))
    ingest(cfg)

    code, _out, err = run_cli(capsys, "revert", "2", "--skip", "-c", str(cfg))

    assert code == 0, err
    assert job_states(cfg) == {1: JobState.DONE, 2: JobState.SKIPPED, 3: JobState.QUEUED}
    assert_store_is(open_store(store, icechunk), files[:1])
    ingest(cfg)
    assert_store_is(open_store(store, icechunk), [files[0], files[2]])
    ledger = Ledger(tmp_path / "state", read_only=True)
    try:
        skipped = ledger.get(2)
    finally:
        ledger.close()
    assert skipped is not None
    assert skipped.error is not None
    assert "reverted by the operator" in skipped.error


def test_files_written_again_after_a_revert_follow_the_config_as_it_is_now(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, inbox, store = config(tmp_path, icechunk=True)
    files = sorted(make_series(inbox, 3))
    ingest(cfg)
    fixed = yaml.safe_load(cfg.read_text())
    correction = {"task": "taskbox.offset", "with": {"variable": "soce", "by": 1.0}}
    fixed["jobs"][0]["tasks"].insert(1, correction)
    cfg.write_text(yaml.safe_dump(fixed))

    code, _, err = run_cli(capsys, "revert", "2", "-c", str(cfg))
    assert code == 0, err
    ingest(cfg)

    stored = open_store(store, icechunk=True)["soce"].values
    sources = [xr.open_dataset(f)["soce"].values[0] for f in files]
    np.testing.assert_array_equal(stored[0], sources[0])  # before N: as written then
    np.testing.assert_array_equal(stored[1], sources[1] + 1)  # from N on: the fixed config
    np.testing.assert_array_equal(stored[2], sources[2] + 1)


def test_revert_refuses_when_the_snapshot_before_the_job_has_expired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import icechunk as ic

    from dpypeline.tasks.versions import collect

    cfg, inbox, store = config(tmp_path, icechunk=True)
    make_series(inbox, 1)
    ingest(cfg)
    repo = ic.Repository.open(ic.local_filesystem_storage(str(store)))
    first = repo.lookup_snapshot(repo.lookup_branch("main")).written_at
    make_series(inbox, 3)
    ingest(cfg)
    collect(repo, first + dt.timedelta(microseconds=1), expire_after=0, grace=DAY)  # job 1's

    code, _, err = run_cli(capsys, "revert", "2", "-c", str(cfg))
    assert code == 1
    assert "the snapshot just before job 2's commit has expired" in err
    assert job_states(cfg) == {1: JobState.DONE, 2: JobState.DONE, 3: JobState.DONE}
    assert steps(store, icechunk=True) == 3
    code, _, err = run_cli(capsys, "revert", "3", "-c", str(cfg))  # its parent is kept
    assert code == 0, err
    assert steps(store, icechunk=True) == 2


DAY = 86400.0


def test_revert_refuses_an_unknown_job_and_one_that_never_committed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, inbox, store = config(tmp_path)
    make_series(inbox, 1)
    ingest(cfg)
    code, _, err = run_cli(capsys, "revert", "7", "-c", str(cfg))
    assert (code, "job 7 does not exist") == (1, err.strip().split(" (")[0].split(": ", 1)[1])
    ledger = Ledger(tmp_path / "state")
    try:  # a job the service has not run yet
        ledger.enqueue([_Version(inbox / "late.nc")], str(inbox), ["to-zarr"], "cli", 1.0)
    finally:
        ledger.close()
    code, _, err = run_cli(capsys, "revert", "2", "-c", str(cfg))
    assert code == 1
    assert "job 2 has no commit recorded" in err
    assert job_states(cfg) == {1: JobState.DONE, 2: JobState.QUEUED}
    assert open_store(store, False).sizes["time_counter"] == 1


def test_revert_refuses_while_the_service_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, inbox, store = config(tmp_path)
    make_series(inbox, 1)
    ingest(cfg)
    service = Ledger(tmp_path / "state", service=True)  # holds the lock, as the service does
    try:
        code, _, err = run_cli(capsys, "revert", "1", "-c", str(cfg))
    finally:
        service.close()
    assert code == 1
    assert "the service is running" in err
    assert "stop it first" in err
    assert job_states(cfg) == {1: JobState.DONE}
    assert open_store(store, False).sizes["time_counter"] == 1


class _Version:
    def __init__(self, path: Path) -> None:
        self.path, self.size, self.mtime_ns = str(path), 1, 1


def _icechunk_store_of_three(
    tmp_path: Path,
) -> tuple[Path, list[Path], Any, list[str]]:
    """An Icechunk store of three GYRE files, one commit per file with its job id, as the
    service writes it (through dpypeline's repository adapter), and the ledger's jobs for
    them, done."""
    from dpypeline.tasks import repository

    cfg, inbox, store = config(tmp_path, icechunk=True)
    files = sorted(make_series(inbox, 3))
    ledger = Ledger(tmp_path / "state", service=True)
    try:
        ledger.enqueue([_Version(f) for f in files], str(inbox), ["to-zarr"], "watch", 1.0)
        repo = repository.open_repository(repository.locate(str(store)))
        snapshots = []
        for f in files:
            claim = ledger.claim(2.0)
            assert claim is not None
            session = repo.writable_session("main")
            ds = xr.open_dataset(f, decode_times=CODER)
            first = claim.record.id == 1
            ds.to_zarr(session.store, consolidated=False, **({} if first else {"append_dim": DIM}))
            file = repository.FileCommit(claim.record.id, f.name)
            snapshots.append(repository.commit(session, file))
            ledger.finish(claim, JobState.DONE, 3.0)
    finally:
        ledger.close()
    return cfg, files, repo, snapshots


DIM = "time_counter"


def test_history_and_revert_of_an_icechunk_store_reset_the_branch_and_queue_the_jobs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, files, repo, snapshots = _icechunk_store_of_three(tmp_path)

    code, out, _ = run_cli(capsys, "history", "-c", str(cfg), "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["snapshot"], r["job_id"], r["file"], r["steps"]) for r in rows] == [
        (snapshots[2], 3, files[2].name, [2, 3]),
        (snapshots[1], 2, files[1].name, [1, 2]),
        (snapshots[0], 1, files[0].name, [0, 1]),
    ]
    code, out, _ = run_cli(capsys, "history", "-c", str(cfg))
    assert [line.split()[0] for line in out.splitlines()[2:]] == snapshots[::-1]

    code, out, err = run_cli(capsys, "revert", "2", "-c", str(cfg))

    assert code == 0, err
    assert f"reset to snapshot {snapshots[0]}" in out
    assert repo.lookup_branch("main") == snapshots[0]
    assert job_states(cfg) == {1: JobState.DONE, 2: JobState.QUEUED, 3: JobState.QUEUED}
    session = repo.readonly_session(snapshot_id=snapshots[2])  # the old tip, by id
    assert xr.open_zarr(session.store, consolidated=False).sizes[DIM] == 3
    code, _, err = run_cli(capsys, "revert", "2", "-c", str(cfg))
    assert code == 1
    assert "job 2 has no commit on the branch" in err
    code, out, _ = run_cli(capsys, "gc", "-c", str(cfg), "--dry-run")
    assert code == 0
    assert out.startswith(
        f"{tmp_path / 'out' / 'gyre_T.zarr'}: 0 snapshot(s) expired; would delete"
    )


def test_revert_skip_of_an_icechunk_store_skips_the_job_and_queues_the_later_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, _, repo, snapshots = _icechunk_store_of_three(tmp_path)

    code, _, err = run_cli(capsys, "revert", "1", "--skip", "-c", str(cfg))

    assert code == 0, err
    assert repo.lookup_branch("main") not in snapshots  # the empty repository's snapshot
    assert job_states(cfg) == {1: JobState.SKIPPED, 2: JobState.QUEUED, 3: JobState.QUEUED}


def test_history_revert_and_gc_reach_an_icechunk_store_on_s3_through_its_objectstore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], s3: S3Server
) -> None:
    bucket = "versions"
    url = f"s3://{bucket}/gyre_T.icechunk"
    cfg, inbox, _ = config(tmp_path, icechunk=True, store=url, objectstore="moto")
    data = yaml.safe_load(cfg.read_text())
    data["objectstores"] = {"moto": {"credentials": str(s3.credentials_file(tmp_path))}}
    data["setup"] = [{"task": "create_bucket", "with": {"objectstore": "moto", "bucket": bucket}}]
    cfg.write_text(yaml.safe_dump(data))
    files = sorted(make_series(inbox, 2))
    ingest(cfg)

    code, out, err = run_cli(capsys, "history", url, "-c", str(cfg), "--json")
    assert code == 0, err
    assert [(r["job_id"], r["steps"]) for r in json.loads(out)] == [(2, [1, 2]), (1, [0, 1])]
    code, _, err = run_cli(capsys, "revert", "2", "-c", str(cfg))
    assert code == 0, err
    ingest(cfg)
    code, out, err = run_cli(capsys, "gc", "-c", str(cfg), "--json")
    assert code == 0, err
    assert json.loads(out)[url]["expired"] == 0  # nothing is 30 days old
    code, out, _ = run_cli(capsys, "history", "-c", str(cfg), "--json")
    assert [Path(r["file"]).name for r in json.loads(out)] == [files[1].name, files[0].name]
    assert SECRET not in out + err
