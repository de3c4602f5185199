"""Icechunk repositories: where a task's store is, one commit per file, and Icechunk's
failures in dpypeline's terms.

The one module that talks to icechunk (1.1.x). A task that writes to a repository
(``to_zarr`` with ``icechunk: true``, ``virtualize``) does, under the store's lock::

    place = repository.locate(store, objectstore, context)
    with repository.classified(place, "writing"):
        repo = repository.open_repository(place)
        if repository.find_commit(repo, job.job_id) is None:   # not a replay
            session = repo.writable_session(repository.BRANCH)
            ...  # zarr writes to session.store
            repository.commit(session, job)

- :func:`locate`: a local path, or ``s3://bucket/prefix`` reached through a named
  ``objectstores:`` entry (endpoint, region, path-style addressing, timeouts, attempts,
  and ``conditional_writes``: off for a store without conditional writes, JASMIN's, where
  a repository is safe only because dpypeline is its one writer).
- :func:`open_repository`: opens the repository, creating it with the first file; a
  location that holds something Icechunk 1.x cannot open is refused, never overwritten.
- :class:`FileCommit` and :func:`commit`: the commit of one file, whose message names the
  file (relative path) and whose metadata carries the job id, path, size, mtime, the
  pipeline's name and the dpypeline version; :func:`find_commit` finds a job's commit on
  the branch, so that a job replayed after its commit (before the ledger knew) does not
  commit again.
- :func:`classified`: what icechunk raises, translated. A store that is down, failing or
  throttling, or a full disk, is :class:`~dpypeline.errors.Unavailable` (the service
  pauses, no attempt is spent); refused credentials, a missing bucket, another writer's
  commit on the branch (a conflict) and a repository in a format this version cannot read
  are :class:`~dpypeline.errors.PermanentError`. The secret is never in a message.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dpypeline.config import ObjectStoreConfig
from dpypeline.errors import ConfigError, DpypelineError, PermanentError, Unavailable

if TYPE_CHECKING:
    import icechunk

__all__ = [
    "BRANCH",
    "FileCommit",
    "Place",
    "classified",
    "commit",
    "find_commit",
    "is_repository_store",
    "locate",
    "open_repository",
    "store_dask",
    "translate_error",
]

BRANCH = "main"
JOB_ID = "job_id"  # the metadata key find_commit looks for
DEFAULT_REGION = "us-east-1"  # the SDK needs one; S3-compatible stores ignore it

_CODE = re.compile(r'code: "?([A-Za-z]+)"?')
_FORMAT = ("more modern version", "invalid magic numbers", "Bad spec version", "invalid file type",
           "Invalid Icechunk metadata file", "uses Icechunk v2 format")  # fmt: skip
_NETWORK = ("dispatch failure", "Connection refused", "connection reset", "timed out",
            "timeout", "tcp connect error", "io error", "broken pipe", "Connection reset",
            "dns error", "error trying to connect")  # fmt: skip
_MISSING = "the repository doesn't exist"
_DISK_FULL = ("os error 28", "os error 122", "No space left on device", "Disk quota exceeded")


@dataclass(frozen=True)
class Place:
    """Where a repository is: ``url`` (an absolute path, or ``s3://bucket/prefix``) and,
    for S3, the objectstore that reaches it (its credentials are read when the
    repository is opened, never kept here)."""

    url: str
    objectstore: str | None = None
    config: ObjectStoreConfig | None = field(default=None, repr=False)

    @property
    def remote(self) -> bool:
        return self.url.startswith("s3://")

    def storage(self) -> icechunk.Storage:
        """Icechunk's storage for this place (for S3, it carries the credentials)."""
        import icechunk

        if not self.remote:
            return icechunk.local_filesystem_storage(self.url)
        from dpypeline.objectstore import load_credentials, split_url

        name, config = self.s3()
        bucket, prefix = split_url(self.url)
        creds = load_credentials(name, config)
        endpoint = creds.endpoint_url
        return icechunk.s3_storage(
            bucket=bucket,
            prefix=prefix or None,
            region=creds.region or DEFAULT_REGION,
            endpoint_url=endpoint,
            allow_http=bool(endpoint and endpoint.startswith("http://")),
            access_key_id=creds.key,
            secret_access_key=creds.secret,
            # an S3-compatible store (JASMIN, MinIO, Ceph) is addressed by path, as s3fs does
            force_path_style=endpoint is not None,
            network_stream_timeout_seconds=max(1, round(config.read_timeout)),
        )

    def s3(self) -> tuple[str, ObjectStoreConfig]:
        """The objectstore's name and settings (a remote place always has them)."""
        if self.objectstore is None or self.config is None:
            raise ConfigError(f"{self.url}: no objectstore is named to reach it")
        return self.objectstore, self.config

    def filesystem(self) -> Any:
        """An s3fs filesystem on the objectstore (for what Icechunk does not tell)."""
        from dpypeline.objectstore import filesystem

        name, config = self.s3()
        return filesystem({name: config}, name)

    def repository_config(self) -> icechunk.RepositoryConfig:
        """The settings this place needs: requests retried ``attempts`` times, and, without
        conditional writes, Icechunk told not to rely on them."""
        import icechunk

        if self.config is None:
            return icechunk.RepositoryConfig()
        conditional = self.config.conditional_writes
        return icechunk.RepositoryConfig(
            storage=icechunk.StorageSettings(
                retries=icechunk.StorageRetriesSettings(max_tries=self.config.attempts),
                unsafe_use_conditional_update=conditional,
                unsafe_use_conditional_create=conditional,
            )
        )


def locate(store: str, objectstore: str | None = None, context: Any = None) -> Place:
    """The :class:`Place` of a task's ``store:``: a local path (``file://`` allowed) or
    ``s3://bucket/prefix`` with ``objectstore`` naming an entry of the pipeline's
    ``objectstores:`` (found in the job's ``context``)."""
    if store.startswith(("s3://", "s3a://")):
        url = "s3://" + store.split("://", 1)[1].strip("/")
        if objectstore is None:
            raise ConfigError(
                f"the Icechunk repository {url} is on S3: name its `objectstore:` (an entry"
                " of `objectstores:` with its endpoint and credentials)"
            )
        stores: Mapping[str, ObjectStoreConfig] = getattr(context, "objectstores", None) or {}
        if objectstore not in stores:
            known = ", ".join(f"'{n}'" for n in sorted(stores)) or "none"
            raise ConfigError(
                f"unknown objectstore '{objectstore}' (the config defines: {known}; add it"
                " under `objectstores:`)"
            )
        from dpypeline.objectstore import split_url

        split_url(url)  # a ConfigError for a bad bucket name, now rather than at the write
        return Place(url, objectstore, stores[objectstore])
    if store.startswith("file://"):
        store = store.removeprefix("file://")
    elif "://" in store:
        raise ConfigError(
            f"an Icechunk repository is a local path or s3://bucket/prefix, not {store!r}"
        )
    return Place(os.path.abspath(os.path.expanduser(store)))


def open_repository(place: Place, *, create: bool = True) -> icechunk.Repository:
    """The repository at ``place``; with ``create``, a new one where there is nothing yet.

    Something else at ``place`` (files that are not a repository Icechunk 1.x can open,
    such as one written by Icechunk 2 in its own format) is refused, never overwritten.
    Call it inside :func:`classified`.
    """
    import icechunk

    _quiet_local_storage_warning()
    storage, config = place.storage(), place.repository_config()
    try:  # not Repository.exists, which ignores the config's retries and timeouts
        return icechunk.Repository.open(storage, config=config)
    except icechunk.IcechunkError as exc:
        if _MISSING not in str(exc):
            raise
    if not _is_empty(place):
        raise PermanentError(
            f"{place.url} holds something that is not an Icechunk repository this version of"
            f" Icechunk ({icechunk.__version__}) can read (a repository written by Icechunk 2"
            " in its own format, or other files): write to a new store, or have Icechunk 2"
            " write it with spec_version=1, a format both read"
        )
    if not create:
        raise PermanentError(f"there is no Icechunk repository at {place.url}")
    return icechunk.Repository.create(storage, config=config)


@functools.cache
def _quiet_local_storage_warning() -> None:
    """Icechunk warns, on every opening of a local repository, that concurrent commits
    are unsafe there; dpypeline's writes to a store hold its lock, so that line would
    only fill the journal. ``ICECHUNK_LOG``, when set, decides instead."""
    if "ICECHUNK_LOG" not in os.environ:
        import icechunk

        icechunk.set_logs_filter("icechunk::storage::object_store=error,warn")


def _is_empty(place: Place) -> bool:
    if not place.remote:
        return not os.path.isdir(place.url) or not os.listdir(place.url)
    fs = place.filesystem()
    try:
        return not fs.ls(place.url, detail=False)
    except FileNotFoundError:
        return True
    finally:
        _close(fs)


@dataclass(frozen=True)
class FileCommit:
    """What a file's commit records: the message names the file, the metadata says which
    job wrote it, from which file version, under which pipeline and dpypeline version."""

    job_id: int | None  # None: written outside a pipeline, by no job
    path: str  # relative to the watch root: the name users know the file by
    size: int | None = None
    mtime: float | None = None
    pipeline: str | None = None

    @classmethod
    def of(cls, context: Any) -> FileCommit:
        """The commit of the file a job's ``context`` (:class:`dpypeline.JobContext`) is about."""
        mtime_ns = getattr(context, "mtime_ns", None)
        return cls(
            job_id=int(context.job_id),
            path=str(getattr(context, "relpath", None) or context.path),
            size=getattr(context, "size", None),
            mtime=mtime_ns / 1e9 if mtime_ns is not None else None,
            pipeline=getattr(context, "pipeline", None),
        )

    @property
    def message(self) -> str:
        return self.path if self.job_id is None else f"{self.path} (job {self.job_id})"

    @property
    def metadata(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {
            JOB_ID: self.job_id,
            "path": self.path,
            "size": self.size,
            "mtime": self.mtime,
            "pipeline": self.pipeline,
            "dpypeline_version": version("dpypeline"),
        }


def commit(session: icechunk.Session, file: FileCommit) -> str:
    """Commit ``session`` as ``file``'s one commit; its snapshot id. The point after which
    readers of the branch see the whole file, and before which they see none of it."""
    return session.commit(file.message, metadata=file.metadata)


def find_commit(
    repo: icechunk.Repository, job_id: int, branch: str = BRANCH, *, ordered: bool = False
) -> str | None:
    """The snapshot id of job ``job_id``'s commit on ``branch``, or None. Reads the
    branch's history, newest first; a job replayed after a crash is normally the last.

    ``ordered``: the store takes files in queue order (an append store), so the search
    stops at the first commit of an earlier job, rather than reading the whole history.
    """
    for snapshot in repo.ancestry(branch=branch):
        found = snapshot.metadata.get(JOB_ID)
        if found == job_id:
            return str(snapshot.id)
        if ordered and isinstance(found, int) and found < job_id:
            return None
    return None


def is_repository_store(zstore: Any) -> bool:
    """Whether a zarr store is a session's store of an Icechunk repository."""
    from icechunk import IcechunkStore

    return isinstance(zstore, IcechunkStore)


def store_dask(sources: list[Any], targets: list[Any], regions: list[Any]) -> bool:
    """Write dask ``sources`` into zarr ``targets`` (``dask.array.store``) if they are
    arrays of a forked session's store (:meth:`icechunk.Session.fork`); False, writing
    nothing, for any other store.

    The chunks may be written on other machines (dask.distributed): each write's changes
    come back in a copy of the session, and Icechunk merges them into the fork, whose
    owner merges it into the session it commits. This is what ``to_icechunk`` does.
    """
    if not targets or not is_repository_store(targets[0].store):
        return False
    from icechunk.dask import store_dask as ice_store_dask

    fork = targets[0].store.session
    fork.merge(ice_store_dask(sources=sources, targets=targets, regions=regions))
    return True


@contextmanager
def classified(place: Place, what: str) -> Iterator[None]:
    """Translate icechunk's failures inside into dpypeline errors (:func:`translate_error`);
    *what* completes "… while {what} {place.url}". The original stays the cause."""
    try:
        yield
    except DpypelineError:
        raise
    except Exception as exc:
        translated = translate_error(exc, f"{what} {place.url}", place)
        if translated is None:
            raise
        raise translated from exc


def translate_error(exc: BaseException, what: str, place: Place) -> DpypelineError | None:
    """The dpypeline error for *exc*, or None to let it pass (a bug, not the store's state)."""
    import icechunk

    from dpypeline.outages import chain

    where = f"the object store '{place.objectstore}'" if place.objectstore else "the disk"
    for e in chain(exc):
        if isinstance(e, icechunk.ConflictError | icechunk.RebaseFailedError):
            return PermanentError(
                f"someone else wrote branch {BRANCH} of {place.url} while {what}"
                f" ({_detail(str(e))}): dpypeline must be the only writer of its stores. Find"
                " the other writer and stop it, then retry the job"
            )
        if not isinstance(e, icechunk.IcechunkError | OSError):
            continue
        text = str(e)
        if any(s in text for s in _FORMAT):
            return PermanentError(
                f"{place.url} is an Icechunk repository in a format this version of Icechunk"
                f" ({icechunk.__version__}) cannot read ({_detail(text)}) while {what}: write to"
                " a new store, or have a newer Icechunk write it with spec_version=1"
            )
        if any(s in text for s in _DISK_FULL):
            return Unavailable(f"{where} is full ({_detail(text)}) while {what}; waiting for space")
        if (code := _code(text)) is not None and (found := _by_code(code, what, place)):
            return found
        if any(s in text for s in _NETWORK):
            return Unavailable(
                f"{where} is unreachable ({_detail(text)}) while {what}; waiting until it answers"
            )
        if place.remote and "service error" in text:
            return _ask_the_store(place, what)
    return None


def _ask_the_store(place: Place, what: str) -> DpypelineError | None:
    """Icechunk reports some answers of S3 without their code (a HEAD request's 403 has
    no body): ask the store the same question through s3fs, whose answer the object
    store module classifies."""
    from dpypeline.objectstore import classify_errors

    fs = place.filesystem()
    try:
        with classify_errors(what, objectstore=place.objectstore, config=place.config):
            fs.ls(place.url)
    except DpypelineError as exc:
        return exc
    except Exception:  # noqa: BLE001 - no clearer answer than icechunk's: let it pass
        return None
    finally:
        _close(fs)
    return None


def _close(fs: Any) -> None:
    """Close an s3fs client used once (an open HTTP session is reported at exit)."""
    if (client := getattr(fs, "_s3", None)) is not None:
        from fsspec.asyn import sync

        sync(fs.loop, client.close)
        fs._s3 = None


def _by_code(code: str, what: str, place: Place) -> DpypelineError | None:
    from dpypeline.objectstore import translate_error as s3_error

    status = int(code) if code.isdigit() else 0

    answer = _Answer(code)  # what S3 answered, in the shape the object store module reads
    bucket = place.url.removeprefix("s3://").partition("/")[0] or None
    answer.response = {
        "Error": {"Code": code, "BucketName": bucket},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return s3_error(answer, what, objectstore=place.objectstore, config=place.config)


class _Answer(Exception):
    response: dict[str, Any]


def _code(text: str) -> str | None:
    found = _CODE.search(text)
    return found.group(1) if found else None


def _detail(text: str) -> str:
    """Icechunk's multi-line report in one line: its innermost cause."""
    lines = [ln.strip(" |`->x") for ln in text.splitlines() if ln.strip(" |`->x")]
    causes = [ln for ln in lines if not ln.startswith(("context:", "at ", "with ", "0:", "1:"))]
    causes = [ln for ln in causes if not re.match(r"^\d+:", ln)]
    return (causes[-1] if causes else text)[:300]
