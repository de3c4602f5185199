"""The virtual repository on Icechunk: opened or created with the virtual chunk
containers its references need, commits that name their file and job, a job's commit
found again after a crash, Icechunk's and the object store's failures in dpypeline's
terms."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dpypeline.errors import ConfigError, DpypelineError, PermanentError, Unavailable

if TYPE_CHECKING:
    import icechunk

    from dpypeline.credentials import Credentials
    from dpypeline.tasks.virtual.sources import Container, Source

_OUTAGE_WORDS = (
    "error sending request",
    "connection refused",
    "dns error",
    "timed out",
    "connect error",
)


def normalise(store: str) -> str:
    if store.startswith("s3://"):
        return "s3://" + store.removeprefix("s3://").strip("/")
    if "://" in store:
        raise ConfigError(
            f"virtualize: store must be a local path or s3://bucket/prefix, not {store!r}"
        )
    return os.path.abspath(os.path.expanduser(store))


def credentials(objectstore: str | None, context: Any) -> Credentials | None:
    if objectstore is None:
        return None
    from dpypeline.objectstore import load_credentials

    stores = getattr(context, "objectstores", None) or {}
    if objectstore not in stores:
        known = ", ".join(sorted(stores)) or "none"
        raise ConfigError(f"unknown objectstore '{objectstore}' (the config defines: {known})")
    return load_credentials(objectstore, stores[objectstore])


def storage(store: str, creds: Credentials | None) -> icechunk.Storage:
    import icechunk as ic

    url = normalise(store)
    if not url.startswith("s3://"):
        return ic.local_filesystem_storage(url)
    if creds is None:
        raise ConfigError(f"virtualize: {url} is on an object store: set `objectstore:`")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    endpoint = creds.endpoint_url
    return ic.s3_storage(
        bucket=bucket,
        prefix=prefix or None,
        region=creds.region or "us-east-1",
        endpoint_url=endpoint,
        allow_http=bool(endpoint and endpoint.startswith("http://")),
        access_key_id=creds.key,
        secret_access_key=creds.secret,
        force_path_style=True,
    )


def open_repository(
    store: str, creds: Credentials | None, containers: Iterable[Container], *, create: bool = True
) -> icechunk.Repository:
    """The repository at ``store``, created if missing (and ``create``), its config
    recording each of ``containers`` (saved once, when one is new) and authorised to read
    them."""
    import icechunk as ic

    where = storage(store, creds)
    containers = list(containers)
    authorise = ic.containers_credentials({c.prefix: c.authorisation() for c in containers})
    config = ic.Repository.fetch_config(where)
    if config is None:
        if not ic.Repository.exists(where):
            if not create:
                raise PermanentError(f"{normalise(store)}: no Icechunk repository there")
            config = ic.RepositoryConfig.default()
            for c in containers:
                config.set_virtual_chunk_container(c.config())
            return ic.Repository.create(
                where, config=config, authorize_virtual_chunk_access=authorise
            )
        config = ic.RepositoryConfig.default()
    known = set((config.virtual_chunk_containers or {}).keys())
    new = [c for c in containers if c.prefix not in known]
    for c in new:
        config.set_virtual_chunk_container(c.config())
    repo = ic.Repository.open(where, config=config, authorize_virtual_chunk_access=authorise)
    if new:
        repo.save_config()
    return repo


def commit_metadata(src: Source, context: Any) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "job_id": getattr(context, "job_id", None),
        "path": src.display,
        "size": src.size,
        "mtime": src.modified.isoformat(),
        "pipeline": getattr(context, "job", None),
        "version": version("dpypeline"),
    }


def committed(repo: icechunk.Repository, branch: str, metadata: dict[str, Any]) -> str | None:
    """The snapshot this job already committed for this file (a replay after a crash
    between the commit and the ledger's record of it), or None."""
    if metadata.get("job_id") is None:
        return None
    try:
        ancestry = repo.ancestry(branch=branch)
    except Exception:  # noqa: BLE001 (a new repository has no such branch yet)
        return None
    for snapshot in ancestry:
        found = snapshot.metadata or {}
        if found.get("job_id") == metadata["job_id"] and found.get("path") == metadata["path"]:
            return str(snapshot.id)
    return None


def commit(session: Any, message: str, metadata: dict[str, Any]) -> str:
    import icechunk as ic

    from dpypeline.tasks.zarr.store import failpoint

    failpoint("virtual_before_commit")
    try:
        snapshot = str(session.commit(message, metadata=metadata))
    except ic.ConflictError as exc:
        raise PermanentError(
            f"{message}: another writer committed to the repository meanwhile ({exc}); only"
            " one pipeline may write to a repository"
        ) from exc
    failpoint("virtual_after_commit")
    return snapshot


@contextmanager
def classified(store: str, objectstore: str | None, context: Any) -> Iterator[None]:
    """Failures as dpypeline errors: an unreachable object store is an outage
    (:class:`Unavailable`, no attempt spent); refused credentials are permanent."""
    try:
        yield
    except DpypelineError:
        raise
    except Exception as exc:
        text = str(exc).lower()
        kind = type(exc).__name__
        what = f"writing the virtual repository {normalise(store)}"
        if any(word in text for word in _OUTAGE_WORDS):
            raise Unavailable(
                f"the object store{_named(objectstore)} is unreachable while {what}; waiting until"
                " it answers"
            ) from exc
        if kind in ("UnauthenticatedError", "PermissionDeniedError") or "403" in text:
            raise PermanentError(
                f"the object store{_named(objectstore)} refused the credentials while {what}:"
                " check the objectstore's token and secret"
            ) from exc
        if kind == "NotFoundError" or isinstance(exc, FileNotFoundError):
            raise PermanentError(f"{what}: the file to reference is gone ({kind})") from exc
        raise


def _named(objectstore: str | None) -> str:
    return f" '{objectstore}'" if objectstore else ""
