"""upload_file and create_bucket against moto's real S3 server, called as pipelines call them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import s3fs
import structlog
from structlog.testing import capture_logs

from dpypeline.config.model import ObjectStoreConfig
from dpypeline.errors import ConfigError, PermanentError, Unavailable
from dpypeline.pipeline import JobContext, SetupContext, Task
from dpypeline.tasks.upload import parse_size
from s3server import KEY, SECRET, S3Server


@pytest.fixture
def stores(s3: S3Server, tmp_path: Path) -> dict[str, ObjectStoreConfig]:
    return {"moto": ObjectStoreConfig(credentials=s3.credentials_file(tmp_path))}


@pytest.fixture
def fs(s3: S3Server) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**s3.storage_options())


@pytest.fixture
def bucket(stores: dict[str, ObjectStoreConfig]) -> str:
    Task("create_bucket", bucket="raw-files", objectstore="moto").run_setup(SetupContext(stores))
    return "raw-files"


def context(root: Path, relpath: str, stores: dict[str, ObjectStoreConfig]) -> JobContext:
    return JobContext(
        job_id=1, attempt=1, path=str(root / relpath), relpath=relpath, root=str(root),
        job="upload", log=structlog.get_logger(), objectstores=stores,
    )  # fmt: skip


def write(root: Path, relpath: str, data: bytes) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def upload(root: Path, relpath: str, stores: dict[str, ObjectStoreConfig], **kwargs: Any) -> str:
    options = {"objectstore": "moto", "bucket": "raw-files", **kwargs}
    task = Task("upload_file", **options)
    return str(task(str(root / relpath), context(root, relpath, stores)))


def test_create_bucket_is_idempotent(
    stores: dict[str, ObjectStoreConfig], fs: s3fs.S3FileSystem
) -> None:
    task = Task("create_bucket", bucket="nemo-n06", objectstore="moto")
    with capture_logs() as logs:
        assert task.run_setup(SetupContext(stores, log=structlog.get_logger())) == "s3://nemo-n06"
        assert task.run_setup(SetupContext(stores, log=structlog.get_logger())) == "s3://nemo-n06"
    assert fs.exists("s3://nemo-n06")
    assert [e["event"] for e in logs] == ["bucket_created"]


def test_upload_copies_the_file_under_prefix_and_relative_path(
    tmp_path: Path, stores: dict[str, ObjectStoreConfig], bucket: str, fs: s3fs.S3FileSystem
) -> None:
    data = os.urandom(3000)
    write(tmp_path, "means/1990/ORCA_T.nc", data)
    url = upload(tmp_path, "means/1990/ORCA_T.nc", stores, prefix="/n06//raw/")
    assert url == "s3://raw-files/n06/raw/means/1990/ORCA_T.nc"
    assert fs.cat_file(url) == data
    assert fs.metadata(url)["sha256"] == hashlib.sha256(data).hexdigest()


def test_without_a_context_the_key_is_the_name_and_credentials_come_from_the_environment(
    s3: S3Server, tmp_path: Path, bucket: str, fs: s3fs.S3FileSystem,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from dpypeline.tasks.upload import upload_file

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    path = write(tmp_path, "deep/dir/a.nc", b"abc")
    url = upload_file(str(path), objectstore="any", bucket=bucket, prefix="p")
    assert url == f"s3://{bucket}/p/a.nc"
    assert fs.cat_file(url) == b"abc"


@pytest.mark.parametrize(
    "relpath",
    ["../escape.nc", "a/../../escape.nc", "/etc/passwd", "a\x00b.nc", "a\nb.nc", "x\x7f.nc",
     "a\\..\\b.nc", "..", "./"],
)  # fmt: skip
def test_relative_paths_that_could_escape_the_prefix_are_refused(
    tmp_path: Path, stores: dict[str, ObjectStoreConfig], bucket: str, fs: s3fs.S3FileSystem,
    relpath: str,
) -> None:  # fmt: skip
    write(tmp_path, "inbox/safe.nc", b"data")
    task = Task("upload_file", objectstore="moto", bucket=bucket, prefix="raw")
    ctx = context(tmp_path / "inbox", relpath, stores)
    with pytest.raises(PermanentError, match="refusing to upload"):
        task(str(tmp_path / "inbox" / "safe.nc"), ctx)
    assert fs.find(f"s3://{bucket}") == []


def test_large_file_goes_up_in_parts_and_is_verified(
    tmp_path: Path, stores: dict[str, ObjectStoreConfig], bucket: str, fs: s3fs.S3FileSystem
) -> None:
    data = os.urandom(12 * 10**6)
    write(tmp_path, "big.nc", data)
    with capture_logs() as logs:
        url = upload(tmp_path, "big.nc", stores, multipart_threshold="5MB")
    info = fs.info(url)
    assert info["size"] == len(data)
    assert info["ETag"].strip('"').endswith("-3")  # 5 MiB + 5 MiB + the rest
    assert hashlib.sha256(fs.cat_file(url)).hexdigest() == hashlib.sha256(data).hexdigest()
    assert [(e["event"], e["parts"]) for e in logs] == [("file_uploaded", 3)]
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []


def test_identical_file_is_not_uploaded_again(
    tmp_path: Path, stores: dict[str, ObjectStoreConfig], bucket: str, fs: s3fs.S3FileSystem
) -> None:
    for threshold in ("64MB", "5MiB"):  # single and multipart objects alike
        write(tmp_path, f"f{threshold}.nc", os.urandom(6 * 2**20))
        url = upload(tmp_path, f"f{threshold}.nc", stores, multipart_threshold=threshold)
        before = fs.info(url)
        with capture_logs() as logs:
            assert (
                upload(tmp_path, f"f{threshold}.nc", stores, multipart_threshold=threshold) == url
            )
        assert [e["event"] for e in logs] == ["upload_skipped"]
        assert fs.info(url)["LastModified"] == before["LastModified"]


def test_changed_file_with_the_same_name_is_uploaded_again(
    tmp_path: Path, stores: dict[str, ObjectStoreConfig], bucket: str, fs: s3fs.S3FileSystem
) -> None:
    write(tmp_path, "a.nc", b"first  version")
    url = upload(tmp_path, "a.nc", stores)
    write(tmp_path, "a.nc", b"second version")  # same size as the first
    with capture_logs() as logs:
        upload(tmp_path, "a.nc", stores)
    assert [e["event"] for e in logs] == ["file_uploaded"]
    assert fs.cat_file(url) == b"second version"


def test_empty_file_is_uploaded(
    tmp_path: Path, stores: dict[str, ObjectStoreConfig], bucket: str, fs: s3fs.S3FileSystem
) -> None:
    write(tmp_path, "empty.nc", b"")
    assert fs.cat_file(upload(tmp_path, "empty.nc", stores)) == b""


def test_upload_to_a_missing_bucket_is_permanent(
    tmp_path: Path, stores: dict[str, ObjectStoreConfig]
) -> None:
    write(tmp_path, "a.nc", b"data")
    with pytest.raises(PermanentError, match="create_bucket"):
        upload(tmp_path, "a.nc", stores, bucket="no-such-bucket")


def test_upload_while_the_store_is_down_is_unavailable(
    s3: S3Server, tmp_path: Path, stores: dict[str, ObjectStoreConfig], bucket: str
) -> None:
    write(tmp_path, "a.nc", b"data")
    s3.stop()
    try:
        with pytest.raises(Unavailable):
            upload(tmp_path, "a.nc", stores)
    finally:
        s3.start()
    assert upload(tmp_path, "a.nc", stores) == "s3://raw-files/a.nc"


def test_multipart_threshold_accepts_bytes_and_units() -> None:
    assert parse_size(8388608) == parse_size("8MiB") == parse_size("8 mib") == 8 * 2**20
    assert parse_size("64MB") == 64 * 10**6
    assert parse_size("1.5GB") == 1_500_000_000
    for bad in ("lots", "0", "-5MB", "5 parsecs", True, ""):
        with pytest.raises(ConfigError, match="not a size"):
            parse_size(bad)


def test_uploads_commit_to_their_bucket_and_prefix_in_any_order_of_files() -> None:
    from dpypeline.commits import Commit

    for prefix in ("raw/2024", "/raw/2024/", "raw/2024/"):
        task = Task("upload_file", objectstore="moto", bucket="b", prefix=prefix)
        assert task.commit == Commit("s3://b/raw/2024", ordered=False)
    assert Task("upload_file", objectstore="moto", bucket="b").commit == Commit("s3://b")
    assert Task("create_bucket", objectstore="moto", bucket="b").commit is None
