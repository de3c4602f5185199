"""The Icechunk adapter: repositories on disk and on moto's S3 (with and without
conditional writes), one commit per file found again by its job id, and icechunk's
failures classified as the worker needs them."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import icechunk
import pytest
import zarr

from dpypeline.config import ObjectStoreConfig
from dpypeline.errors import ConfigError, PermanentError, Unavailable
from dpypeline.tasks import repository as rp
from s3server import KEY, SECRET, S3Server

BUCKET = "ingest"


def s3_context(s3: S3Server, tmp_path: Path, *, conditional: bool = True, **cfg: Any) -> Any:
    creds = s3.credentials_file(tmp_path)
    store = ObjectStoreConfig(credentials=creds, conditional_writes=conditional, **cfg)
    return SimpleNamespace(objectstores={"moto": store})


def make_bucket(s3: S3Server, key: str = KEY, secret: str = SECRET) -> None:
    boto3.client(
        "s3", endpoint_url=s3.endpoint_url, region_name="us-east-1",
        aws_access_key_id=key, aws_secret_access_key=secret,
    ).create_bucket(Bucket=BUCKET)  # fmt: skip


def write_one(repo: icechunk.Repository, value: int) -> icechunk.Session:
    session = repo.writable_session(rp.BRANCH)
    zarr.open_group(session.store, mode="a", zarr_format=3).attrs["value"] = value
    return session


def commit_file(repo: icechunk.Repository, job_id: int, value: int) -> str:
    file = rp.FileCommit(job_id, f"2024/file{job_id}.nc", 1234, 1.7e9, "ingest")
    return rp.commit(write_one(repo, value), file)


def test_a_file_commit_names_the_file_and_is_found_by_its_job_id(tmp_path: Path) -> None:
    place = rp.locate(str(tmp_path / "store"))
    repo = rp.open_repository(place)
    first = commit_file(repo, 7, 1)
    second = commit_file(rp.open_repository(place), 8, 2)
    assert rp.find_commit(repo, 7) == first
    assert rp.find_commit(repo, 8) == second
    assert rp.find_commit(repo, 9) is None
    info = repo.lookup_snapshot(first)
    assert info.message == "2024/file7.nc (job 7)"
    assert info.metadata["job_id"] == 7
    assert info.metadata["path"] == "2024/file7.nc"
    assert (info.metadata["size"], info.metadata["mtime"]) == (1234, 1.7e9)
    assert info.metadata["pipeline"] == "ingest"
    assert info.metadata["dpypeline_version"]


def test_file_commit_is_read_from_the_job_context() -> None:
    context = SimpleNamespace(
        job_id=3, path="/in/a/b.nc", relpath="a/b.nc", size=10, mtime_ns=2_000_000_000,
        pipeline="p",
    )  # fmt: skip
    assert rp.FileCommit.of(context) == rp.FileCommit(3, "a/b.nc", 10, 2.0, "p")


def test_another_writer_on_the_branch_is_a_permanent_conflict(tmp_path: Path) -> None:
    place = rp.locate(str(tmp_path / "store"))
    repo = rp.open_repository(place)
    ours = write_one(repo, 1)
    commit_file(repo, 1, 2)  # someone else commits meanwhile
    with (
        pytest.raises(PermanentError, match="someone else wrote branch main") as info,
        rp.classified(place, "writing"),
    ):
        rp.commit(ours, rp.FileCommit(2, "x.nc"))
    assert isinstance(info.value.__cause__, icechunk.ConflictError)


def test_a_repository_in_a_newer_format_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    place = rp.locate(str(tmp_path / "store"))
    repo = rp.open_repository(place)
    commit_file(repo, 1, 1)
    # Every file of a repository starts with a header whose byte 36 is the spec version:
    # the files Icechunk 2 writes in its own format say 2.
    for path in (tmp_path / "store" / "snapshots").iterdir():
        data = bytearray(path.read_bytes())
        assert data[:12] == "ICE🧊CHUNK".encode()
        data[36] = 2
        path.write_bytes(bytes(data))
    with (
        pytest.raises(PermanentError, match="format this version of Icechunk") as info,
        rp.classified(place, "writing"),
    ):
        rp.find_commit(rp.open_repository(place), 1)
    assert "cannot read from repository written with a more modern version" in str(info.value)


def test_a_location_holding_something_else_is_refused_not_overwritten(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "repo").write_bytes(b"ICE\xf0\x9f\xa7\x8aCHUNK")  # what Icechunk 2 writes first
    with (
        pytest.raises(PermanentError, match=r"format this version of Icechunk .* cannot read"),
        rp.classified(rp.locate(str(store)), "writing"),
    ):
        rp.open_repository(rp.locate(str(store)))
    (store / "repo").rename(store / "notes.txt")
    with (
        pytest.raises(PermanentError, match="not an Icechunk repository this version"),
        rp.classified(rp.locate(str(store)), "writing"),
    ):
        rp.open_repository(rp.locate(str(store)))
    assert sorted(p.name for p in store.iterdir()) == ["notes.txt"]


def test_s3_repository_needs_a_named_objectstore(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="name its `objectstore:`"):
        rp.locate("s3://bucket/x")
    with pytest.raises(ConfigError, match="unknown objectstore 'nope'"):
        rp.locate("s3://bucket/x", "nope", SimpleNamespace(objectstores={}))


@pytest.mark.parametrize("conditional", [True, False], ids=["conditional", "unconditional"])
def test_s3_repository_commits_and_finds_files_in_both_write_modes(
    s3: S3Server, tmp_path: Path, conditional: bool
) -> None:
    make_bucket(s3)
    context = s3_context(s3, tmp_path, conditional=conditional)
    place = rp.locate(f"s3://{BUCKET}/ocean/gyre", "moto", context)
    with rp.classified(place, "writing"):
        repo = rp.open_repository(place)
        assert repo.config.storage is not None
        assert repo.config.storage.unsafe_use_conditional_update is conditional
        first = commit_file(repo, 1, 1)
        ours = write_one(repo, 5)
        commit_file(rp.open_repository(place), 2, 2)
    assert rp.find_commit(rp.open_repository(place), 1) == first
    with (
        pytest.raises(PermanentError, match="someone else wrote branch main"),
        rp.classified(place, "writing"),
    ):
        rp.commit(ours, rp.FileCommit(3, "x.nc"))


def test_s3_missing_bucket_is_permanent(s3: S3Server, tmp_path: Path) -> None:
    place = rp.locate("s3://no-such-bucket/r", "moto", s3_context(s3, tmp_path))
    with (
        pytest.raises(PermanentError, match="bucket 'no-such-bucket' does not exist"),
        rp.classified(place, "writing"),
    ):
        rp.open_repository(place)


def test_s3_refused_credentials_are_permanent_and_never_shown(
    s3: S3Server, s3_auth: dict[str, tuple[str, str]], tmp_path: Path
) -> None:
    make_bucket(s3, *s3_auth["writer"])
    key, secret = s3_auth["nobody"]
    path = tmp_path / "nobody.json"
    path.write_text(json.dumps({"token": key, "secret": secret, "endpoint_url": s3.endpoint_url}))
    path.chmod(0o600)
    context = SimpleNamespace(objectstores={"moto": ObjectStoreConfig(credentials=path)})
    place = rp.locate(f"s3://{BUCKET}/r", "moto", context)
    with pytest.raises(PermanentError) as info, rp.classified(place, "writing"):
        rp.open_repository(place)
    assert "denied access" in str(info.value) or "refused the credentials" in str(info.value)
    assert secret not in str(info.value)
    assert secret not in repr(place)


def test_s3_store_that_does_not_answer_is_an_outage(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    path = tmp_path / "s3.json"
    endpoint = f"http://127.0.0.1:{port}"
    path.write_text(json.dumps({"token": KEY, "secret": SECRET, "endpoint_url": endpoint}))
    path.chmod(0o600)
    cfg = ObjectStoreConfig(credentials=path, attempts=1, connect_timeout=1, read_timeout=2)
    place = rp.locate(f"s3://{BUCKET}/r", "moto", SimpleNamespace(objectstores={"moto": cfg}))
    with pytest.raises(Unavailable, match="unreachable") as info, rp.classified(place, "writing"):
        rp.open_repository(place)
    assert SECRET not in str(info.value)
