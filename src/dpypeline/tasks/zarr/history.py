"""Which job wrote which steps of a plain (not Icechunk) append store, and taking the store
back to before one of them (``dpypeline history`` and ``dpypeline revert``).

Each append records, in the same group-attribute write that commits it
(:func:`dpypeline.tasks.zarr.store.commit`), ``[job id, first step, end]`` in the group
attribute ``dpypeline_commits``: the store's own record, which travels with it and says
how long the store was before any job's file. A replay that writes steps already there
records nothing; they stay the first writer's.

Going back to before job N cuts every array to N's first step, in the order the
crash-consistency protocol needs (:mod:`dpypeline.tasks.zarr.store`): the commit marker
first (anything beyond it is then a leftover that the next write would cut anyway), then
the arrays, then the consolidated metadata. Unlike an Icechunk repository, where the
reset is one atomic switch of the branch, a reader of a plain store may see the arrays
cut while it reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpypeline.errors import PermanentError
from dpypeline.tasks.zarr import compat
from dpypeline.tasks.zarr import store as zs
from dpypeline.tasks.zarr.store import COMMITS


@dataclass(frozen=True, slots=True)
class StoreCommit:
    """Job ``job_id`` appended steps ``[start, stop)``."""

    job_id: int
    start: int
    stop: int


def recorded(attrs: Mapping[str, Any], job_id: int | None, start: int, stop: int) -> dict[str, Any]:
    """The group attributes that record an append of ``[start, stop)`` by ``job_id``,
    to be written with the commit marker; nothing when the job is not known (a call of
    ``to_zarr`` outside a pipeline)."""
    if job_id is None:
        return {}
    kept = [c for c in attrs.get(COMMITS, []) if int(c[1]) < start]
    return {COMMITS: [*kept, [int(job_id), int(start), int(stop)]]}


def commits(attrs: Mapping[str, Any]) -> list[StoreCommit]:
    """The appends the store records, oldest first."""
    return [StoreCommit(int(j), int(a), int(b)) for j, a, b in attrs.get(COMMITS, [])]


def cut_back(location: zs.Location, job_id: int) -> tuple[StoreCommit, dict[str, int]]:
    """Take the append store at ``location`` back to just before job ``job_id``'s steps:
    its commit as recorded, and the arrays cut with their lengths before."""
    with zs.store_lock(location):
        zstore = location.open()
        state = zs.open_store(zstore, location.url)
        if state is None or zs.APPEND_DIM not in state.attrs:
            raise PermanentError(f"{location.url} is not an append store written by dpypeline")
        found = [c for c in commits(state.attrs) if c.job_id == job_id]
        committed = int(state.attrs.get(zs.COMMITTED, 0))
        if not found or found[0].start >= committed:
            raise PermanentError(
                f"job {job_id} has no commit recorded in {location.url}: it never appended"
                " steps to it (it may have rewritten steps already there, or the store was"
                " written before dpypeline recorded its commits)"
            )
        mine = found[0]
        dim = str(state.attrs[zs.APPEND_DIM])
        consolidated = _consolidated(state)
        kept = [[c.job_id, c.start, c.stop] for c in commits(state.attrs) if c.start < mine.start]
        zs.save_group(state, {zs.COMMITTED: mine.start, COMMITS: kept}, consolidated)
        cut = zs.repair(state, dim, mine.start)
        zs.save_group(state, {}, consolidated)
        return mine, cut


def _consolidated(state: zs.StoreState) -> bool:
    """Whether the store keeps consolidated metadata (kept so after the cut)."""
    import zarr

    if state.zarr_format == 2:
        return bool(compat.run(state.zstore.exists(".zmetadata")))
    group = zarr.open_group(state.zstore, mode="r", use_consolidated=None)
    return group.metadata.consolidated_metadata is not None
