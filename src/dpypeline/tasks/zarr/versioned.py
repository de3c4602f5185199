"""``to_zarr`` into an Icechunk repository (``icechunk: true``): one file, one commit.

The write itself is the plain store's (:class:`dpypeline.tasks.zarr.write.Write`: the
checks, the placement of the steps, the overlap policy, the layout of a new store), made
in a session of branch ``main`` rather than in place. Nothing of it is visible until
the commit, which records the file and its job (:mod:`dpypeline.tasks.repository`); a
job that died after its commit, before the ledger knew, finds that commit when it runs
again and does not write twice. A crash anywhere before the commit leaves the branch as
it was, so there is nothing to repair: the group's ``dpypeline_committed`` marker still
travels with each commit, and always equals the arrays' length.

The session is forked before anything is written, and every write goes to the fork:
chunks computed on the machines of a Dask cluster come back as copies of it, which
Icechunk merges (:func:`dpypeline.tasks.repository.store_dask`); then the fork is merged
into the session, which commits. With the threaded scheduler the same path runs in one
process.

Failpoints (:func:`dpypeline.tasks.zarr.store.failpoint`) for the crash tests:
``before_resize`` (before any data), ``before_commit`` (the data written, the markers
not), ``before_repository_commit`` (all written, not committed) and ``after_commit``
(committed, the job not yet reported done).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dpypeline.tasks import repository
from dpypeline.tasks.zarr import encoding as ze
from dpypeline.tasks.zarr import store as zs
from dpypeline.tasks.zarr.store import failpoint
from dpypeline.tasks.zarr.write import Write

if TYPE_CHECKING:
    from dpypeline.tasks.repository import Place


def write(
    write: Write,
    place: Place,
    *,
    append: bool,
    layout: ze.Layout,
    context: Any,
) -> dict[str, Any]:
    """Write one file under the store's lock, inside :func:`repository.classified`;
    the event to log, with the commit's snapshot id."""
    repo = repository.open_repository(place)
    file = _file(write, context)
    if file is not None and file.job_id is not None:
        found = repository.find_commit(repo, file.job_id, ordered=append)
        if found is not None:
            return {"event": "zarr_replayed", "action": "committed_before", "snapshot": found}
    session = repo.writable_session(repository.BRANCH)
    fork = session.fork()
    state = zs.open_store(fork.store, place.url)
    event = write.append(fork.store, state, 3, layout) if append else write.region(state)
    session.merge(fork)
    if not session.has_uncommitted_changes:  # overlap=skip found the same values
        return event | {"snapshot": session.snapshot_id}
    failpoint("before_repository_commit")
    event["snapshot"] = repository.commit(session, file or _anonymous(write))
    failpoint("after_commit")
    return event


def _file(write: Write, context: Any) -> repository.FileCommit | None:
    if getattr(context, "job_id", None) is None:
        return None
    return repository.FileCommit.of(context)


def _anonymous(write: Write) -> repository.FileCommit:
    """A call outside a pipeline (no job): the commit names the file the data came from."""
    source = write.ds.encoding.get("source") or "a dataset"
    return repository.FileCommit(job_id=None, path=str(source))
