"""A real S3 server on loopback for the tests: moto's server, one per test session, reset
between tests (as s3fs's own tests do). Its state lives in this process, so stopping and
starting the server on the same port simulates an outage without losing buckets."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

KEY, SECRET = "test-token-not-a-secret", "test-secret-not-a-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    port: int
    server: ThreadedMotoServer

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        start(self.server)

    def credentials_file(self, directory: Path, name: str = "s3.json") -> Path:
        """The original dpypeline's credentials format, private to its owner."""
        path = directory / name
        path.write_text(
            json.dumps({"token": KEY, "secret": SECRET, "endpoint_url": self.endpoint_url})
        )
        path.chmod(0o600)
        return path

    def storage_options(self) -> dict[str, object]:
        return {
            "key": KEY,
            "secret": SECRET,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
            "use_listings_cache": False,
            "skip_instance_cache": True,
        }


def start(server: ThreadedMotoServer) -> None:
    """Start the server in a thread named for the thread-leak guard (tests/conftest.py),
    which lets it outlive the test that restarted it."""
    server.start()
    server._thread.name = "moto-s3-server"  # type: ignore[union-attr]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    port = free_port()
    srv = S3Server(port, ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
    start(srv.server)
    yield srv
    srv.stop()


@pytest.fixture
def s3(s3_server: S3Server) -> S3Server:
    s3_server.reset()
    return s3_server


@pytest.fixture
def s3_auth(s3: S3Server) -> Iterator[dict[str, tuple[str, str]]]:
    """moto checks signatures and IAM policies: "writer" may use S3, "nobody" may not."""

    def reset_auth(count: str) -> None:
        request = urllib.request.Request(
            f"{s3.endpoint_url}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=10).close()

    reset_auth("5")  # the next five requests (setting up the users) need no auth
    iam = boto3.client(
        "iam", endpoint_url=s3.endpoint_url, region_name="us-east-1",
        aws_access_key_id="setup", aws_secret_access_key="setup",
    )  # fmt: skip
    keys = {}
    try:
        for user in ("writer", "nobody"):
            iam.create_user(UserName=user)
            access = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (access["AccessKeyId"], access["SecretAccessKey"])
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
                                                          "Resource": "*"}]}  # fmt: skip
        iam.put_user_policy(UserName="writer", PolicyName="s3", PolicyDocument=json.dumps(policy))
        yield keys
    finally:
        reset_auth("inf")
