"""Named S3 endpoints: their s3fs options and clients, and S3 failures in dpypeline's terms.

Their credentials are read by :mod:`dpypeline.config.credentials` (re-exported here, the module
tasks use). This is the one module that knows s3fs and botocore. Tasks get a filesystem or
storage options here, and wrap their S3 calls in :func:`classify_errors`, which turns what
s3fs/botocore/aiohttp raise into the failure kinds the worker acts on: bad credentials,
missing permission or a missing bucket are :class:`PermanentError` (the job is ``dead`` at
once, with a reason that says what to fix); an unreachable, failing or throttling store is
:class:`Unavailable` (the worker pauses; no attempt is spent). Anything else propagates
unchanged. Secrets never appear in a message, repr or log line made here.
"""

from __future__ import annotations

import errno
import functools
import re
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog

from dpypeline.config.credentials import ENV_HINT, Credentials, load_credentials
from dpypeline.config.model import ObjectStoreConfig
from dpypeline.errors import ConfigError, DpypelineError, PermanentError, Unavailable
from dpypeline.outages import chain

if TYPE_CHECKING:
    import s3fs

__all__ = [
    "Credentials",
    "classify_errors",
    "close_clients",
    "filesystem",
    "keep_open",
    "s3_error_code",
    "split_url",
    "storage_options",
    "translate_error",
]

# An outage should fail an operation within a minute, not many: the worker's own backoff
# decides when to try again. Requests are retried in one place, botocore (standard mode:
# connection errors, timeouts, 5xx and throttling), `attempts` times, each bounded by the
# objectstore's timeouts; s3fs's own retry loop would multiply that, so it tries once.
S3FS_TRIES = 1

log = structlog.stdlib.get_logger("dpypeline.objectstore")
_KEPT: list[tuple[Any, Callable[[Coroutine[Any, Any, Any]], Any]]] = []
_KEPT_GUARD = threading.Lock()

_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")

_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
     "InvalidClientTokenId", "TokenRefreshRequired", "AuthorizationHeaderMalformed"}
)  # fmt: skip
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem"})
_BUSY_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
     "RequestTimeout", "ServiceUnavailable", "InternalError"}
)  # fmt: skip
_NETWORK_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
)  # fmt: skip


def _config(objectstores: Mapping[str, ObjectStoreConfig], name: str) -> ObjectStoreConfig:
    try:
        return objectstores[name]
    except KeyError:
        known = ", ".join(f"'{n}'" for n in sorted(objectstores)) or "none"
        raise ConfigError(
            f"unknown objectstore '{name}' (the config defines: {known}; add it under"
            " `objectstores:`)"
        ) from None


def storage_options(objectstores: Mapping[str, ObjectStoreConfig], name: str) -> dict[str, Any]:
    """fsspec/s3fs options for objectstore *name* (``storage_options=`` of xarray and zarr).

    The listing cache is off: s3fs would otherwise serve a stale listing of a store that
    another writer changed. The dict holds the secret: pass it on, never log it.
    """
    creds = load_credentials(name, _config(objectstores, name))
    client_kwargs: dict[str, Any] = {}
    if creds.endpoint_url:
        client_kwargs["endpoint_url"] = creds.endpoint_url
    if creds.region:
        client_kwargs["region_name"] = creds.region
    return {
        "key": creds.key,
        "secret": creds.secret,
        "client_kwargs": client_kwargs,
        "config_kwargs": client_config(_config(objectstores, name)),
        "use_listings_cache": False,
        "skip_instance_cache": True,
    }


def client_config(cfg: ObjectStoreConfig) -> dict[str, Any]:
    """botocore's client settings for a store (a fresh dict: callers may adjust it)."""
    from botocore.config import Config

    config: dict[str, Any] = {
        "connect_timeout": cfg.connect_timeout,
        "read_timeout": cfg.read_timeout,
        "retries": {"total_max_attempts": cfg.attempts, "mode": "standard"},
        "http_session_cls": _http_session_class(),
    }
    if "request_checksum_calculation" in Config.OPTION_DEFAULTS:
        # botocore >= 1.36 adds CRC checksum headers to every upload by default, which
        # S3-compatible stores (Ceph, MinIO, Caringo …) may reject; send them only where
        # the API requires them. Uploads carry their own Content-MD5 (tasks/upload.py).
        config["request_checksum_calculation"] = "when_required"
        config["response_checksum_validation"] = "when_required"
    return config


@functools.cache
def _http_session_class() -> type:
    """aiobotocore's HTTP session, without ``Expect: 100-continue``.

    botocore asks for it on every upload with a file-like body; aiohttp then waits for the
    interim "100 Continue" before sending the body, and no timeout covers that wait (the
    read timeout starts once the body is sent): a store that accepts the connection and
    never answers would hold the upload for ever. Without the header the body goes at once
    and ``read_timeout`` bounds the wait for the answer. (The header is never signed.)
    """
    from aiobotocore.httpsession import AIOHTTPSession

    class NoExpectContinue(AIOHTTPSession):
        async def send(self, request: Any) -> Any:
            request.headers.pop("Expect", None)
            return await super().send(request)

    return NoExpectContinue


def filesystem(objectstores: Mapping[str, ObjectStoreConfig], name: str) -> s3fs.S3FileSystem:
    """A fresh s3fs filesystem for objectstore *name* (never a cached instance)."""
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options(objectstores, name))
    fs.retries = S3FS_TRIES  # a class attribute in s3fs, not an option (default 5)
    return fs


def keep_open(fs: Any, run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
    """Remember an s3fs client kept for the life of the process (one per Zarr store, say),
    so that :func:`close_clients` closes it; *run* runs a coroutine on the event loop the
    client lives on."""
    with _KEPT_GUARD:
        _KEPT.append((fs, run))


def close_clients() -> None:
    """Close the clients kept open (at service stop). An HTTP session still open when the
    interpreter exits makes aiohttp log "Unclosed client session" errors."""
    with _KEPT_GUARD:
        kept = list(_KEPT)
        _KEPT.clear()
    for fs, run in kept:
        client = getattr(fs, "_s3", None)  # None: the client never connected
        if client is None:
            continue
        try:
            run(client.close())
        except Exception as exc:  # noqa: BLE001 - the process is stopping: say so, go on
            log.warning("objectstore_close_failed", error=f"{type(exc).__name__}: {exc}")
        fs._s3 = None


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key/x`` → ``("bucket", "key/x")``; ConfigError for anything else."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("s3", "s3a"):
        raise ConfigError(f"not an S3 URL: {url!r} (expected s3://BUCKET/KEY)")
    bucket, _, key = rest.partition("/")
    check_bucket(bucket)
    return bucket, key


def check_bucket(bucket: str) -> str:
    """*bucket* if it is a valid bucket name (3-63 of a-z 0-9 . - _), else ConfigError."""
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(
            f"not a valid bucket name: {bucket!r} (3 to 63 lowercase letters, digits, dots,"
            " hyphens; starting and ending with a letter or digit)"
        )
    return bucket


def s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code (``NoSuchBucket``, ``404`` …) behind *exc*, if S3 answered at all."""
    found = _client_error(exc)
    return found[0] if found else None


@contextmanager
def classify_errors(
    what: str, *, objectstore: str | None = None, config: ObjectStoreConfig | None = None
) -> Iterator[None]:
    """Translate failures of the S3 operations inside into dpypeline errors.

    *what* completes "… while {what}", e.g. ``"writing s3://b/x.zarr"``; *objectstore* and
    *config* only make the messages more precise. The original exception stays the cause.
    """
    try:
        yield
    except DpypelineError:
        raise
    except Exception as exc:
        translated = translate_error(exc, what, objectstore=objectstore, config=config)
        if translated is None:
            raise
        raise translated from exc


def translate_error(
    exc: BaseException,
    what: str,
    *,
    objectstore: str | None = None,
    config: ObjectStoreConfig | None = None,
) -> DpypelineError | None:
    """The dpypeline error for *exc* (see :func:`classify_errors`), or None to let it pass."""
    store = f"the object store '{objectstore}'" if objectstore else "the object store"
    if config is None:
        check = "the token and secret"
    elif config.credentials is not None:
        check = f"the token and secret in {config.credentials}"
    else:
        check = ENV_HINT
    client = _client_error(exc)
    if client is not None:
        code, status, bucket = client
        answer = f"{status} {code}" if str(status) != code else code
        if code in _CREDENTIAL_CODES:
            return PermanentError(
                f"{store} refused the credentials ({answer}) while {what}: check {check}"
            )
        if code in _DENIED_CODES or status == 403:
            return PermanentError(
                f"{store} denied access ({answer}) while {what}: check {check}, and that"
                " they are allowed to use this bucket"
            )
        if code == "NoSuchBucket":
            name = f"bucket '{bucket}'" if bucket else "the bucket"
            return PermanentError(
                f"{name} does not exist on {store} (NoSuchBucket) while {what}: create it"
                " (e.g. with a create_bucket setup task) or fix the bucket name"
            )
        if code in _BUSY_CODES or status >= 500 or status == 429:
            return Unavailable(
                f"{store} is unavailable ({answer}) while {what}; waiting until it answers"
            )
        return None
    network = next((e for e in chain(exc) if _is_network_error(e)), None)
    if network is not None:
        detail = str(network) or type(network).__name__
        where = f" at {config.endpoint_url}" if config is not None and config.endpoint_url else ""
        silent = "Timeout" in type(network).__name__ or isinstance(network, TimeoutError)
        state = "does not answer" if silent else "is unreachable"
        return Unavailable(
            f"{store}{where} {state} ({type(network).__name__}: {detail}) while {what};"
            " waiting until it answers"
        )
    if isinstance(exc, PermissionError):
        return PermanentError(f"permission denied while {what}: {exc}")
    return None


def _client_error(exc: BaseException) -> tuple[str, int, str | None] | None:
    """(code, HTTP status, bucket) of the first botocore ClientError behind *exc*."""
    for e in chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            error = response["Error"]
            code = str(error.get("Code") or "")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if not status and code.isdigit():
                status = int(code)
            return code, int(status), error.get("BucketName")
    return None


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, _network_errors()):
        return True
    return isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS


@functools.cache
def _network_errors() -> tuple[type[BaseException], ...]:
    import aiohttp
    import botocore.exceptions as boto

    return (
        boto.HTTPClientError,  # ReadTimeoutError, ConnectionClosedError, …
        boto.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, …
        aiohttp.ClientConnectionError,  # refused, reset, DNS, server disconnected
        aiohttp.ClientPayloadError,
        ConnectionError,
        TimeoutError,  # also asyncio's and fsspec's FSTimeoutError
        socket.gaierror,
    )
