"""A versioned store's history, its revert to before one file, and its garbage
collection: what ``dpypeline history``, ``revert`` and ``gc`` do to an Icechunk repository
(the plain-Zarr side is :mod:`dpypeline.tasks.zarr.history`).

Every file is one commit on the branch ``main`` whose metadata names its job
(``job_id``). Reverting to before job N resets ``main`` to the parent of N's commit, as a
compare-and-swap on the tip that was read (Icechunk refuses the reset if anything
committed meanwhile), after tagging that tip: the reverted snapshots stay readable by id,
and the tag keeps them from garbage collection until they expire like any other.

Garbage collection is two steps of Icechunk's own: snapshots older than the expiry leave
the history (the tip of a branch never does; a revert's tag goes once its snapshot has
expired), then objects no snapshot still reachable uses are deleted, if older than a
grace period. The grace period is what makes it safe while the service writes (it is
the only writer): the chunks of a file being ingested are written before its commit and
are referenced by no snapshot yet, but they are younger than the grace period, so they
are kept.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dpypeline.errors import PermanentError
from dpypeline.tasks.repository import BRANCH, JOB_ID

if TYPE_CHECKING:
    import icechunk

REVERTED_TAG = "dpypeline-reverted-{job}-{tip}"


@dataclass(frozen=True, slots=True)
class Version:
    """One commit of one file: its snapshot, when, the job and file, the steps it wrote
    along the append dimension (``[start, stop)``; None where unknown)."""

    snapshot: str
    time: dt.datetime
    job_id: int | None
    file: str
    steps: tuple[int, int] | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot,
            "time": self.time.isoformat(),
            "job_id": self.job_id,
            "file": self.file,
            "steps": list(self.steps) if self.steps is not None else None,
            "message": self.message,
        }


def versions(repo: icechunk.Repository, append_dim: str | None) -> Iterator[Version]:
    """The commits of ``main``, newest first, without the repository's first, empty one.
    The steps come from the store's own record of its appends in the tip (one read); for
    a commit the record does not name (a replay, a template, a store written before the
    record), from the length of ``append_dim`` in its snapshot and its parent."""
    from dpypeline.tasks.zarr import history as zh

    tip = repo.lookup_branch(BRANCH)
    recorded = {c.job_id: (c.start, c.stop) for c in zh.commits(_attrs(repo, tip))}
    snapshots = [s for s in repo.ancestry(snapshot_id=tip) if s.parent_id is not None]
    lengths: dict[str, int | None] = {}

    def length(snapshot: str) -> int | None:
        if snapshot not in lengths:
            lengths[snapshot] = _length(repo, snapshot, append_dim)
        return lengths[snapshot]

    for s in snapshots:
        meta = s.metadata or {}
        job = int(meta[JOB_ID]) if meta.get(JOB_ID) is not None else None
        steps = recorded.get(job) if job is not None else None
        if steps is None and (stop := length(s.id)) is not None:
            steps = (length(s.parent_id or "") or 0, stop)
        yield Version(
            snapshot=s.id,
            time=s.written_at,
            job_id=job,
            file=str(meta.get("path") or s.message),
            steps=steps,
            message=s.message,
        )


def _length(repo: icechunk.Repository, snapshot: str, dim: str | None) -> int | None:
    if dim is None:
        return None
    import zarr

    session = repo.readonly_session(snapshot_id=snapshot)
    try:
        array = zarr.open_array(session.store, path=dim, mode="r")
    except (FileNotFoundError, KeyError):
        return 0  # not created yet
    return int(array.shape[0])


@dataclass(frozen=True, slots=True)
class Reverted:
    """``main`` went from ``tip`` back to ``to`` (the parent of ``commit``), and the old
    tip is kept under ``tag``."""

    commit: Version
    tip: str
    to: str
    tag: str


def find_commit(repo: icechunk.Repository, job_id: int) -> tuple[str, str, str]:
    """``(tip, commit, parent)``: the branch's tip, and job ``job_id``'s commit on it with
    its parent. PermanentError when the branch holds no commit of that job."""
    tip = repo.lookup_branch(BRANCH)
    for s in repo.ancestry(snapshot_id=tip):
        job = (s.metadata or {}).get(JOB_ID)
        if job is not None and int(job) == job_id:
            if s.parent_id is None:
                break
            _require_parent_kept(repo, job_id, s.id, s.parent_id)
            return tip, s.id, s.parent_id
    raise PermanentError(
        f"job {job_id} has no commit on the branch {BRANCH!r}: it never committed to this"
        " repository, or its commit was reverted or has expired (see `dpypeline history`)"
    )


def _require_parent_kept(repo: icechunk.Repository, job_id: int, commit: str, parent: str) -> None:
    """Refuse when the snapshot just before job ``job_id``'s commit has expired: Icechunk
    then names an older snapshot (the repository's first) as its parent, and a reset to
    it would drop more than the job's steps. The store's own commit record in the job's
    snapshot says where its steps start; the parent must end there."""
    from dpypeline.tasks.zarr import history as zh
    from dpypeline.tasks.zarr import store as zs

    mine = [c for c in zh.commits(_attrs(repo, commit)) if c.job_id == job_id]
    before = int(_attrs(repo, parent).get(zs.COMMITTED, 0))
    if mine and mine[-1].start != before:
        raise PermanentError(
            f"the snapshot just before job {job_id}'s commit has expired (snapshot_expiry,"
            f" `dpypeline gc`): the store can no longer go back to exactly before it (its"
            f" steps start at {mine[-1].start}; the oldest snapshot kept before it has"
            f" {before})"
        )


def _attrs(repo: icechunk.Repository, snapshot: str) -> dict[str, Any]:
    import zarr

    session = repo.readonly_session(snapshot_id=snapshot)
    try:
        return dict(zarr.open_group(session.store, mode="r").attrs)
    except FileNotFoundError:  # the empty repository
        return {}


def revert(repo: icechunk.Repository, job_id: int, tip: str, parent: str) -> str:
    """Reset ``main`` from ``tip`` to ``parent`` (a compare-and-swap: refused if the
    branch moved since ``tip`` was read), after tagging ``tip``; returns the tag."""
    import icechunk

    tag = REVERTED_TAG.format(job=job_id, tip=tip)
    if tag not in repo.list_tags():
        repo.create_tag(tag, tip)
    try:
        repo.reset_branch(BRANCH, parent, from_snapshot_id=tip)
    except icechunk.IcechunkError as exc:
        if "conflict" not in str(exc):
            raise
        raise PermanentError(
            f"the branch {BRANCH!r} moved while it was being reverted: something else"
            " committed to the repository. Nothing was reverted; look at `dpypeline history`"
            " and run the revert again"
        ) from None
    return tag


@dataclass(frozen=True, slots=True)
class Collected:
    """What one garbage collection did."""

    expired: int  # snapshots that left the history
    snapshots: int  # objects deleted, by kind
    manifests: int
    chunks: int
    bytes: int

    def as_dict(self) -> dict[str, int]:
        return {
            "expired": self.expired,
            "snapshots_deleted": self.snapshots,
            "manifests_deleted": self.manifests,
            "chunks_deleted": self.chunks,
            "bytes_deleted": self.bytes,
        }


def collect(
    repo: icechunk.Repository,
    now: dt.datetime,
    expire_after: float | None,
    grace: float,
    *,
    dry_run: bool = False,
) -> Collected:
    """Expire the snapshots older than ``expire_after`` seconds (none when None), then
    delete the objects no kept snapshot uses that are older than ``grace`` seconds."""
    expired: set[str] = set()
    if expire_after is not None and not dry_run:
        expired = repo.expire_snapshots(
            now - dt.timedelta(seconds=expire_after), delete_expired_tags=True
        )
    summary = repo.garbage_collect(now - dt.timedelta(seconds=grace), dry_run=dry_run)
    return Collected(
        expired=len(expired),
        snapshots=summary.snapshots_deleted,
        manifests=summary.manifests_deleted,
        chunks=summary.chunks_deleted,
        bytes=summary.bytes_deleted,
    )
