"""A NetCDF file where it lies, as VirtualiZarr references: which parser reads it, which
object store serves its bytes, the Icechunk *virtual chunk container* that lets a reader
follow a reference there, and the time after which its bytes are no longer the ones
referenced.

A source is a local path or an ``s3://bucket/key`` URL (what ``upload_file`` returns). The
container of a local file is its watch root (or its directory), so one container covers a
whole run; an object's is its bucket, at the objectstore's endpoint, path-style (as
JASMIN's object store needs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dpypeline.errors import DpypelineError, PermanentError, Unavailable

if TYPE_CHECKING:
    import icechunk
    import xarray as xr
    from obspec_utils.registry import ObjectStoreRegistry

    from dpypeline.config.credentials import Credentials
    from dpypeline.config.model import ObjectStoreConfig

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
NETCDF3_SIGNATURES = (b"CDF\x01", b"CDF\x02")
_OUTAGE = ("error sending request", "connection refused", "connect error", "timed out", "dns error")


@dataclass(frozen=True)
class Container:
    """Where references may point: a URL prefix and the object store behind it. Readers
    authorise the prefix (``authorize_virtual_chunk_access``); ``credentials`` is what
    this process authorises it with (None: a local directory, or the environment's)."""

    prefix: str
    endpoint_url: str | None = None
    region: str | None = None
    credentials: Credentials | None = field(default=None, repr=False)
    # an outage must fail a read within the objectstore's bounds, not obstore's minutes
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    attempts: int = 2

    def config(self) -> icechunk.VirtualChunkContainer:
        import icechunk as ic

        if self.prefix.startswith("file://"):
            return ic.VirtualChunkContainer(
                self.prefix, ic.local_filesystem_store(self.prefix.removeprefix("file://"))
            )
        endpoint = self.endpoint_url
        store = ic.s3_store(
            region=self.region or "us-east-1",
            endpoint_url=endpoint,
            allow_http=bool(endpoint and endpoint.startswith("http://")),
            s3_compatible=endpoint is not None,
            force_path_style=True,
        )
        return ic.VirtualChunkContainer(self.prefix, store)

    def authorisation(self) -> Any:
        """What ``authorize_virtual_chunk_access`` maps this prefix to."""
        import icechunk as ic

        if self.prefix.startswith("file://") or self.credentials is None:
            return None
        return ic.s3_static_credentials(
            access_key_id=self.credentials.key, secret_access_key=self.credentials.secret
        )


@dataclass(frozen=True)
class Source:
    """One file to reference: its URL, the container that serves it, its size, and the
    moment (whole seconds, rounded up as Icechunk keeps them) its bytes were last written."""

    url: str
    display: str
    container: Container
    size: int
    modified: datetime
    kind: str

    def open(self, native: set[str] | None = None, native_below: int = 0) -> xr.Dataset:
        """The file as a dataset of references (``ManifestArray``), except its index
        coordinates, the variables named in ``native`` and any smaller than
        ``native_below`` bytes, which are loaded to be stored natively."""
        from virtualizarr import open_virtual_dataset

        parser = self._parser()
        store = parser(url=self.url, registry=self._registry())
        probe = store.to_virtual_dataset(loadable_variables=[])
        loaded = set(native or ()) | {
            str(name)
            for name, var in probe.variables.items()
            if name in probe.dims or var.nbytes < native_below
        }
        del probe
        return open_virtual_dataset(
            self.url,
            registry=self._registry(),
            parser=parser,
            loadable_variables=sorted(loaded),
        )

    def raw(self, names: list[str]) -> dict[str, bytes]:
        """The bytes of ``names`` as stored in the file (before scale_factor or fill
        values), to compare grids between files without trusting decoding."""
        import numpy as np
        import zarr

        group = zarr.open_group(self._parser()(url=self.url, registry=self._registry()), mode="r")
        arrays = {name: cast("zarr.Array", group[name]) for name in names}
        return {name: np.ascontiguousarray(a[...]).tobytes() for name, a in arrays.items()}

    def _parser(self) -> Any:
        from virtualizarr.parsers import HDFParser, NetCDF3Parser

        if self.kind == "hdf5":
            return HDFParser()
        return NetCDF3Parser(reader_options=self._fsspec_options())

    def _fsspec_options(self) -> dict[str, Any]:
        creds = self.container.credentials
        if not self.url.startswith("s3://") or creds is None:
            return {}
        client = {"endpoint_url": creds.endpoint_url} if creds.endpoint_url else {}
        return {
            "storage_options": {"key": creds.key, "secret": creds.secret, "client_kwargs": client}
        }

    def _registry(self) -> ObjectStoreRegistry:
        from obspec_utils.registry import ObjectStoreRegistry

        if self.url.startswith("file://"):
            from obstore.store import LocalStore

            return ObjectStoreRegistry({"file://": LocalStore()})
        return ObjectStoreRegistry({self.container.prefix: _s3_store(self.container)})


def locate(
    source: str,
    *,
    root: str | None = None,
    credentials: Credentials | None = None,
    settings: ObjectStoreConfig | None = None,
) -> Source:
    """The file a task was given: a local path (its container the watch ``root`` when the
    file lies under it, else its directory), or an ``s3://`` URL read with ``credentials``."""
    if source.startswith("s3://"):
        if credentials is None:
            raise PermanentError(
                f"{source} is on an object store: give virtualize the `objectstore:` that"
                " reaches it"
            )
        return _object(source, credentials, settings)
    if "://" in source:
        raise PermanentError(f"virtualize reads local paths and s3:// URLs, not {source!r}")
    path = Path(source).resolve()
    try:
        stat = path.stat()
        with path.open("rb") as stream:
            head = stream.read(8)
    except FileNotFoundError:
        raise PermanentError(f"{source}: no such file to reference") from None
    base = (
        Path(root).resolve() if root and path.is_relative_to(Path(root).resolve()) else path.parent
    )
    return Source(
        url=path.as_uri(),
        display=str(path),
        container=Container(base.as_uri().rstrip("/") + "/"),
        size=stat.st_size,
        modified=_ceil_seconds(stat.st_mtime),
        kind=_kind(head, str(path)),
    )


@contextmanager
def reading(source: str, objectstore: str | None) -> Iterator[None]:
    """The object store's failures while a source is read, in dpypeline's terms: an
    unreachable store is an outage (no attempt spent), a missing object or refused
    credentials are permanent. (obstore's errors: the object store module knows s3fs's.)"""
    try:
        yield
    except DpypelineError:
        raise
    except Exception as exc:
        kind, text = type(exc).__name__, str(exc)
        store = f"the object store '{objectstore}'" if objectstore else "the object store"
        if kind == "NotFoundError":
            raise PermanentError(f"{source} is not there to reference (it was removed?)") from exc
        if kind in ("UnauthenticatedError", "PermissionDeniedError"):
            raise PermanentError(
                f"{store} refused the credentials while reading {source}: check the"
                " objectstore's token and secret"
            ) from exc
        if any(word in text.lower() for word in _OUTAGE):
            raise Unavailable(
                f"{store} is unreachable while reading {source}; waiting until it answers"
            ) from exc
        raise


def _object(url: str, credentials: Credentials, settings: ObjectStoreConfig | None) -> Source:
    from dpypeline.objectstore import split_url

    bucket, key = split_url(url)
    bounds: dict[str, Any] = {}
    if settings is not None:
        bounds = {
            "connect_timeout": settings.connect_timeout,
            "read_timeout": settings.read_timeout,
            "attempts": settings.attempts,
        }
    container = Container(
        f"s3://{bucket}/", credentials.endpoint_url, credentials.region, credentials, **bounds
    )
    store = _s3_store(container)
    meta = store.head(key)
    head = bytes(store.get_range(key, start=0, length=8))
    return Source(
        url=url,
        display=url,
        container=container,
        size=int(meta["size"]),
        modified=_ceil_seconds(meta["last_modified"].timestamp()),
        kind=_kind(head, url),
    )


def _s3_store(container: Container) -> Any:
    from obstore.store import S3Store

    creds = container.credentials
    bucket = container.prefix.removeprefix("s3://").strip("/")
    from datetime import timedelta

    client: dict[str, Any] = {
        "connect_timeout": f"{container.connect_timeout}s",
        "timeout": f"{container.read_timeout}s",
    }
    bound = container.attempts * (container.connect_timeout + container.read_timeout)
    options: dict[str, Any] = {
        "virtual_hosted_style_request": False,
        "retry_config": {
            "max_retries": container.attempts - 1,
            "retry_timeout": timedelta(seconds=bound),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=2),
                "base": 2,
            },
        },
    }
    if container.endpoint_url:
        options["endpoint"] = container.endpoint_url
        client["allow_http"] = container.endpoint_url.startswith("http://")
    options["client_options"] = client
    if creds is not None:
        options["access_key_id"] = creds.key
        options["secret_access_key"] = creds.secret
    return S3Store(bucket, region=container.region or "us-east-1", **options)


def _kind(head: bytes, where: str) -> str:
    if head.startswith(HDF5_SIGNATURE):
        return "hdf5"
    if head[:4] in NETCDF3_SIGNATURES:
        return "netcdf3"
    raise PermanentError(
        f"{where} is neither NetCDF4/HDF5 nor NetCDF3 classic: virtualize references only"
        " those (64-bit data NetCDF3 files too are not supported by its reader)"
    )


def _ceil_seconds(timestamp: float) -> datetime:
    """Icechunk keeps whole seconds; rounding down would call a file written in the same
    second changed."""
    return datetime.fromtimestamp(math.ceil(timestamp), UTC)
