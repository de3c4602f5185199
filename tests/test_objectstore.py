"""Credentials, s3fs options and S3 error classification, against moto's real S3 server."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import s3fs

from dpypeline.config.credentials import FILE_FORMAT
from dpypeline.config.model import ObjectStoreConfig, config_from_dict
from dpypeline.errors import ConfigError, PermanentError, Unavailable
from dpypeline.objectstore import (
    classify_errors,
    filesystem,
    load_credentials,
    split_url,
    storage_options,
)
from s3server import SECRET, S3Server

PRIVATE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSECRET"


def secret_file(directory: Path, mode: int = 0o600, **data: Any) -> Path:
    path = directory / "s3.json"
    content = {"token": "AKIAEXAMPLEKEY123456", "secret": PRIVATE_SECRET, **data}
    path.write_text(json.dumps(content))
    path.chmod(mode)
    return path


def moto_fs(s3: S3Server, tmp_path: Path, key: str, secret: str) -> s3fs.S3FileSystem:
    path = tmp_path / f"{key}.json"
    path.write_text(json.dumps({"token": key, "secret": secret, "endpoint_url": s3.endpoint_url}))
    path.chmod(0o600)
    return filesystem({"moto": ObjectStoreConfig(credentials=path)}, "moto")


# --- credentials ------------------------------------------------------------------------------


def test_credentials_file_in_the_original_format_is_read(tmp_path: Path) -> None:
    path = secret_file(tmp_path, endpoint_url="https://noc-msm-o.s3.jc.rl.ac.uk")
    creds = load_credentials("jasmin", ObjectStoreConfig(credentials=path), environ={})
    assert (creds.key, creds.secret) == ("AKIAEXAMPLEKEY123456", PRIVATE_SECRET)
    assert creds.endpoint_url == "https://noc-msm-o.s3.jc.rl.ac.uk"
    assert creds.source == str(path)


def test_config_endpoint_and_region_override_the_file(tmp_path: Path) -> None:
    path = secret_file(tmp_path, endpoint_url="https://in-file", region="file-region")
    cfg = ObjectStoreConfig(credentials=path, endpoint_url="https://in-config", region="eu-west-2")
    creds = load_credentials("jasmin", cfg, environ={})
    assert (creds.endpoint_url, creds.region) == ("https://in-config", "eu-west-2")


def test_credentials_path_may_use_systemd_credentials_directory(tmp_path: Path) -> None:
    path = secret_file(tmp_path)
    data = {
        "watch": [{"path": str(tmp_path)}],
        "jobs": [{"name": "j", "tasks": [{"task": "upload_file"}]}],
        "objectstores": {"jasmin": {"credentials": "${CREDENTIALS_DIRECTORY}/s3.json"}},
    }
    config = config_from_dict(data, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert load_credentials("jasmin", config.objectstores["jasmin"]).secret == PRIVATE_SECRET
    assert config.objectstores["jasmin"].credentials == path


def test_the_units_empty_default_for_a_missing_file_names_the_file_to_fill_in(
    tmp_path: Path,
) -> None:
    # what the units hand over (SetCredential=s3.json:\n) when the real file is missing
    (tmp_path / "s3.json").write_text("\n")
    (tmp_path / "s3.json").chmod(0o400)
    source = "/etc/dpypeline/nemo.credentials.json"
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path), "DPYPELINE_CREDENTIALS_SOURCE": source}
    data = {
        "watch": [{"path": str(tmp_path)}],
        "jobs": [{"name": "j", "tasks": [{"task": "upload_file"}]}],
        "objectstores": {"jasmin": {"credentials": "${CREDENTIALS_DIRECTORY}/s3.json"}},
    }
    store = config_from_dict(data, environ=environ).objectstores["jasmin"]
    with pytest.raises(ConfigError) as info:
        load_credentials("jasmin", store, environ=environ)
    assert str(info.value) == (
        f"objectstore 'jasmin': the credentials file {source} (handed over by systemd as"
        " $CREDENTIALS_DIRECTORY/s3.json) is missing or empty: put"
        f" {FILE_FORMAT} in it (mode 0600, owned by root), then restart the service"
    )
    # an empty file given directly is named as it is
    with pytest.raises(ConfigError, match=f"credentials file {tmp_path}/s3.json is empty"):
        load_credentials("jasmin", store, environ={})


def test_credentials_from_aws_environment_variables() -> None:
    environ = {
        "AWS_ACCESS_KEY_ID": "AKIAENVKEY",
        "AWS_SECRET_ACCESS_KEY": PRIVATE_SECRET,
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_DEFAULT_REGION": "us-west-1",
    }
    creds = load_credentials("env", ObjectStoreConfig(), environ=environ)
    assert (creds.key, creds.secret) == ("AKIAENVKEY", PRIVATE_SECRET)
    assert (creds.endpoint_url, creds.region) == ("http://127.0.0.1:9000", "us-west-1")


def test_no_credentials_anywhere_is_a_config_error_saying_where_to_put_them() -> None:
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID") as info:
        load_credentials("jasmin", ObjectStoreConfig(), environ={})
    assert "'jasmin'" in str(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_credentials_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = secret_file(tmp_path, mode=mode)
    with pytest.raises(ConfigError) as info:
        load_credentials("jasmin", ObjectStoreConfig(credentials=path), environ={})
    message = str(info.value)
    assert str(path) in message
    assert f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message
    assert PRIVATE_SECRET not in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"token": "AKIAEXAMPLEKEY123456", "secret": "' + PRIVATE_SECRET, "not valid JSON"),
        (f"token={PRIVATE_SECRET}", "not valid JSON"),
        (f'["{PRIVATE_SECRET}"]', "not a JSON object"),
        (json.dumps({"token": PRIVATE_SECRET}), "lacks secret"),
        (json.dumps({"secret": PRIVATE_SECRET, "token": ""}), "lacks token"),
        (json.dumps({"token": "k", "secret": PRIVATE_SECRET, "endpoint_url": 5}), "endpoint_url"),
    ],
)
def test_broken_credentials_file_error_never_echoes_its_content(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "s3.json"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        load_credentials("jasmin", ObjectStoreConfig(credentials=path), environ={})
    message = str(info.value)
    assert expected in message
    assert "'jasmin'" in message
    assert str(path) in message
    assert PRIVATE_SECRET not in message
    assert info.value.__cause__ is None  # a JSONDecodeError would carry the document


def test_missing_credentials_file_names_objectstore_and_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_credentials("jasmin", ObjectStoreConfig(credentials=path), environ={})
    assert "'jasmin'" in str(info.value)
    assert str(path) in str(info.value)


def test_credentials_repr_and_str_hide_the_secret_and_most_of_the_key(tmp_path: Path) -> None:
    creds = load_credentials("j", ObjectStoreConfig(credentials=secret_file(tmp_path)), {})
    for text in (repr(creds), str(creds), f"{creds}", repr([creds])):
        assert PRIVATE_SECRET not in text
        assert "AKIAEXAMPLEKEY123456" not in text
        assert "AKIA…(20 chars)" in text


# --- storage options --------------------------------------------------------------------------


def test_storage_options_turn_off_listing_cache_and_bound_timeouts(tmp_path: Path) -> None:
    path = secret_file(tmp_path, endpoint_url="http://127.0.0.1:1")
    options = storage_options({"jasmin": ObjectStoreConfig(credentials=path)}, "jasmin")
    assert options["use_listings_cache"] is False
    assert options["skip_instance_cache"] is True
    assert options["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:1"}
    assert (options["key"], options["secret"]) == ("AKIAEXAMPLEKEY123456", PRIVATE_SECRET)
    config = options["config_kwargs"]
    assert config["connect_timeout"] <= 10
    assert config["read_timeout"] <= 30
    assert config["retries"]["total_max_attempts"] <= 2  # a silent store: an outage in < 1 min


def test_timeouts_and_attempts_are_settable_per_objectstore(tmp_path: Path) -> None:
    data = {
        "watch": [{"path": str(tmp_path)}],
        "jobs": [{"name": "j", "tasks": [{"task": "upload_file"}]}],
        "objectstores": {
            "slow": {"credentials": str(secret_file(tmp_path)), "connect_timeout": "2s",
                     "read_timeout": "500ms", "attempts": 3},
        },
    }  # fmt: skip
    stores = config_from_dict(data).objectstores
    config = storage_options(stores, "slow")["config_kwargs"]
    assert (config["connect_timeout"], config["read_timeout"]) == (2.0, 0.5)
    assert config["retries"] == {"total_max_attempts": 3, "mode": "standard"}


def test_unknown_objectstore_lists_the_configured_ones(tmp_path: Path) -> None:
    stores = {"jasmin": ObjectStoreConfig(), "local": ObjectStoreConfig()}
    with pytest.raises(ConfigError, match="unknown objectstore 'jasmine'") as info:
        storage_options(stores, "jasmine")
    assert "'jasmin', 'local'" in str(info.value)


def test_split_url_validates_the_bucket() -> None:
    assert split_url("s3://nemo-n06/n06_T.zarr/x") == ("nemo-n06", "n06_T.zarr/x")
    assert split_url("s3://nemo-n06") == ("nemo-n06", "")
    for bad in ("s3://", "s3://No_Caps/x", "s3://ab/x", "nemo-n06/x", "file:///tmp/x"):
        with pytest.raises(ConfigError):
            split_url(bad)


# --- error classification against a real server ------------------------------------------------


@pytest.mark.parametrize("case", ["wrong secret", "unknown key", "no permission"])
def test_rejected_credentials_are_permanent_and_never_show_the_secret(
    s3: S3Server, tmp_path: Path, s3_auth: dict[str, tuple[str, str]], case: str
) -> None:
    key, secret = s3_auth["writer"]
    moto_fs(s3, tmp_path, key, secret).mkdir("bucket-1")
    if case == "wrong secret":
        secret, code = "not-the-" + secret, "SignatureDoesNotMatch"
    elif case == "unknown key":
        key, code = "AKIAUNKNOWNKEY000000", "InvalidAccessKeyId"
    else:
        (key, secret), code = s3_auth["nobody"], "AccessDenied"
    fs = moto_fs(s3, tmp_path, key, secret)
    cfg = ObjectStoreConfig(credentials=tmp_path / f"{key}.json")
    what = "writing s3://bucket-1/x"
    with (
        pytest.raises(PermanentError) as info,
        classify_errors(what, objectstore="moto", config=cfg),
    ):
        fs.pipe("s3://bucket-1/x", b"data")
    message = str(info.value)
    assert f"403 {code}" in message
    assert "while writing s3://bucket-1/x" in message
    assert str(cfg.credentials) in message
    assert secret not in message
    assert s3_auth["writer"][1] not in message
    assert info.value.__cause__ is not None


def test_missing_bucket_is_permanent_and_says_to_create_it(s3: S3Server, tmp_path: Path) -> None:
    fs = moto_fs(s3, tmp_path, "k", SECRET)
    with pytest.raises(PermanentError, match="create_bucket"), classify_errors("writing"):
        fs.pipe("s3://no-such-bucket/x", b"data")


def test_missing_object_is_not_translated(s3: S3Server, tmp_path: Path) -> None:
    fs = moto_fs(s3, tmp_path, "k", SECRET)
    fs.mkdir("bucket-1")
    with pytest.raises(FileNotFoundError), classify_errors("reading"):
        fs.cat_file("s3://bucket-1/absent")
    with pytest.raises(ValueError, match="mine"), classify_errors("reading"):
        raise ValueError("mine")


def test_stopped_server_is_unavailable_within_seconds(s3: S3Server, tmp_path: Path) -> None:
    fs = moto_fs(s3, tmp_path, "k", SECRET)
    fs.mkdir("bucket-1")
    s3.stop()
    try:
        started = time.monotonic()
        with (
            pytest.raises(Unavailable, match="unreachable") as info,
            classify_errors("writing s3://bucket-1/x", objectstore="moto"),
        ):
            fs.pipe("s3://bucket-1/x", b"data")
        assert time.monotonic() - started < 15
        assert SECRET not in str(info.value)
    finally:
        s3.start()
    fs.pipe("s3://bucket-1/x", b"data")  # the same filesystem works again
    assert fs.cat_file("s3://bucket-1/x") == b"data"


class _Faulty(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint in trouble: answers with the S3 error in ``server.fault``, or hangs up."""

    protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue"

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)  # type: ignore[attr-defined]

    def do_any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        status, code = self.server.fault  # type: ignore[attr-defined]
        if status == 0:
            self.close_connection = True
            return
        body = f"<Error><Code>{code}</Code><Message>busy</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_any

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def faulty() -> Iterator[socketserver.TCPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Faulty)
    server.connections = set()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name="faulty-s3", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    for connection in server.connections:  # type: ignore[attr-defined]
        # the client keeps its connection for the next request: hang up, so that the
        # thread serving it ends with the test
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
    server.server_close()
    thread.join(5)


@pytest.mark.parametrize(
    "fault", [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable"), (0, "")]
)
def test_server_errors_throttling_and_hang_ups_are_unavailable(
    faulty: socketserver.TCPServer, tmp_path: Path, fault: tuple[int, str]
) -> None:
    faulty.fault = fault  # type: ignore[attr-defined]
    endpoint = f"http://127.0.0.1:{faulty.server_address[1]}"
    path = secret_file(tmp_path, endpoint_url=endpoint)
    fs = filesystem({"s": ObjectStoreConfig(credentials=path)}, "s")
    started = time.monotonic()
    with pytest.raises(Unavailable) as info, classify_errors("writing s3://bucket-1/x"):
        fs.pipe("s3://bucket-1/x", b"data")
    assert time.monotonic() - started < 15
    assert fault[1] in str(info.value)
    assert PRIVATE_SECRET not in str(info.value)
