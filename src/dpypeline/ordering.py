"""Append ordering, the whole rule: which job may start, which is held behind which, in
what order the jobs in flight commit, and whose place a new version of a file takes.

The rule knows what jobs write to only as the *resource* a task declares
(:mod:`dpypeline.commits`): a Zarr store, an upload prefix, a user's database are all the
same to it. An *ordered* resource (an append-mode store, an append-only log) only takes
what comes after its last commit: a file whose job failed once and runs again later must
not be overtaken by the files after it, or its retry finds the resource past it and the
series keeps a hole. Everything here is pure (facts in, decisions out) and sits below both
the ledger and the executors: the ledger (:mod:`dpypeline.state.holds`) supplies the facts
and records the holds in SQL, the worker and the executors carry out the decisions.

- *Start* (:func:`hold_for`): a job that commits to an ordered resource starts only when
  every earlier job of that resource, in queue order (ledger ids), has committed
  (``done``), was ``skipped``, or is running now. Otherwise it is *held* behind the
  earliest of them: it stays ``queued``, spends no attempt, and is not taken again until
  that job commits or is skipped. Behind a ``dead`` job the hold lasts until a new version
  of its file arrives, or the operator either retries it (``dpypeline retry N``, once the
  cause is fixed) or accepts the gap (``dpypeline skip N``).
- *Place* (:func:`takeover`): a job's place in its resource's order is its id, and it
  belongs to the file, not to one version of it. A new version of a file whose job is not
  written yet (dead, held, queued, retrying) takes that job, with its place and fresh
  attempts: a superseded version never holds anything, and re-sending a bad file is enough
  for it and the files held behind it to be written in order. A new version of a file
  already written is a job of its own, at the end of the line, which writes the file's
  steps again where they are (``to_zarr``'s ``overlap``).
- *Commit* (:class:`CommitOrder`): of the jobs of one resource in flight at once (the dask
  executor computes several files ahead), the earliest commits first, one at a time; when
  one of them fails, the later ones of an ordered resource are withdrawn before they
  commit (:class:`Held`) and held behind it.

Unordered resources (a template store written by region, an upload prefix) take files in
any order: their jobs are never held, and the commit order only keeps their commits from
overlapping.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterable
from dataclasses import dataclass

from dpypeline.jobstate import JobState

DEAD = JobState.DEAD
RUNNING = JobState.RUNNING
QUEUED = JobState.QUEUED

# states in which a job keeps the later jobs of its resource from committing
HOLDING = (QUEUED, RUNNING, JobState.RETRYING, DEAD)
# the same, without "running": jobs in flight commit first, so they hold no start
AHEAD = (QUEUED, JobState.RETRYING, DEAD)
# a job of a file not written yet and not running: a new version of the file takes it
OPEN = AHEAD


# -- start --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pending:
    """A job of the same resource that has neither committed nor been skipped, in the
    state the ledger gives it (``queued``, ``running``, ``retrying`` or ``dead``)."""

    job_id: int
    state: JobState


@dataclass(frozen=True, slots=True)
class Hold:
    """Job ``job_id`` waits for job ``behind`` (in state ``behind_state``) to commit."""

    job_id: int
    behind: int
    behind_state: JobState

    @property
    def needs_operator(self) -> bool:
        """Behind a dead job nothing moves by itself."""
        return self.behind_state == DEAD

    @property
    def reason(self) -> str:
        if self.needs_operator:
            return (
                f"held behind dead job {self.behind}, an earlier file of the same append store:"
                " a new version of that file takes its place by itself; else fix its cause and"
                f" run `dpypeline retry {self.behind}`, or accept the gap with"
                f" `dpypeline skip {self.behind}`"
            )
        return (
            f"held behind job {self.behind} ({self.behind_state}), an earlier file of the"
            " same append store; it runs once that one is written"
        )


def hold_for(job_id: int, ahead: Iterable[Pending]) -> Hold | None:
    """Whether job ``job_id`` may start. ``ahead``: jobs of its resource that have not
    committed (any order, any ids; those after ``job_id`` are ignored). Jobs running now
    do not hold it: they are in flight, and the executor commits them first. The earliest
    of the others holds it; None means it may start."""
    waiting = [p for p in ahead if p.job_id < job_id and p.state != RUNNING]
    if not waiting:
        return None
    first = min(waiting, key=lambda p: p.job_id)
    return Hold(job_id, first.job_id, first.state)


def held_summary(held: Iterable[Hold]) -> str:
    """One line on held jobs, for the service's status and its last line in ``--once``:
    how many wait behind which job, and what frees them. Empty when none is held."""
    by_job: dict[tuple[int, JobState], int] = {}
    for h in held:
        by_job[(h.behind, h.behind_state)] = by_job.get((h.behind, h.behind_state), 0) + 1
    parts = []
    for (behind, state), n in sorted(by_job.items()):
        if state == DEAD:
            parts.append(
                f"{n} held behind dead job {behind}"
                f" (dpypeline retry {behind}, or dpypeline skip {behind} to accept the gap)"
            )
        else:
            parts.append(f"{n} held behind job {behind} ({state})")
    return "; ".join(parts)


def behind_dead(job_id: int, held: int) -> str:
    """Why ``held`` later jobs of a resource wait on dead job ``job_id``, and what frees
    them: said once, when the job goes dead."""
    return (
        f"{held} later job(s) of the store wait behind dead job {job_id}:"
        " a new version of its file takes its place by itself; else fix its cause"
        f" and run `dpypeline retry {job_id}`, or accept the gap with"
        f" `dpypeline skip {job_id}`"
    )


# -- place --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Takeover:
    """Job ``place`` (open, not running) takes the newest version of its file, keeping its
    id and so its place, with fresh attempts; the jobs ``later`` (queued, made for newer
    versions, ascending) go, the last one's version being the one taken."""

    place: int
    later: tuple[int, ...]


def takeover(jobs: Iterable[tuple[int, JobState]]) -> Takeover | None:
    """Whose place a new version of a file takes. ``jobs``: (id, state) of every job of
    one file and job name. None when nothing changes: a job of the file runs (its end
    asks again), none is open, or no newer version waits behind the open one."""
    rows = sorted(jobs)
    if any(state == RUNNING for _, state in rows):
        return None
    place = next((job_id for job_id, state in rows if state in OPEN), None)
    if place is None:
        return None
    later = tuple(job_id for job_id, state in rows if job_id > place and state == QUEUED)
    return Takeover(place, later) if later else None


# -- commit -------------------------------------------------------------------------------


class Held(Exception):
    """A job in flight that was withdrawn before its commit because an earlier job of the
    same ordered resource failed: it goes back to the queue without spending an attempt
    and is held behind that job."""

    def __init__(self, behind: int) -> None:
        super().__init__(f"withdrawn before its commit: job {behind} before it failed")
        self.behind = behind

    @property
    def reason(self) -> str:
        return (
            f"held behind job {self.behind}, an earlier file of the same append store"
            " that failed; it runs once that one is written"
        )


class CommitOrder:
    """The commits of the jobs in flight, per resource: the earliest job (lowest id) of a
    resource commits first, and one commit per resource runs at a time.

    Events in: ``add`` (a job started), ``computed`` (it is ready to commit),
    ``finished`` (it ended). Decisions out: ``next_commit`` (which job starts its commit
    now) and the jobs ``finished`` withdraws."""

    def __init__(self) -> None:
        self._flight: dict[str, list[int]] = {}  # per resource: job ids in flight, ascending
        self._resource: dict[int, tuple[str, bool]] = {}  # job id -> (resource, ordered)
        self._ready: set[int] = set()
        self._committing: dict[str, int] = {}

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._resource

    def add(self, job_id: int, resource: str, *, ordered: bool) -> None:
        self._resource[job_id] = (resource, ordered)
        insort(self._flight.setdefault(resource, []), job_id)

    def computed(self, job_id: int) -> None:
        if job_id in self._resource:
            self._ready.add(job_id)

    def next_commit(self, resource: str) -> int | None:
        """The job that starts its commit to ``resource`` now (it is marked as
        committing), or None: another commit runs, or the earliest job in flight is not
        computed yet."""
        order = self._flight.get(resource)
        if not order or resource in self._committing or order[0] not in self._ready:
            return None
        head = order[0]
        self._ready.discard(head)
        self._committing[resource] = head
        return head

    def committing(self, resource: str) -> int | None:
        return self._committing.get(resource)

    def finished(self, job_id: int, *, failed: bool) -> list[int]:
        """Forget a job that ended. When it failed and its resource is ordered, the later
        jobs of that resource in flight are withdrawn (forgotten too, and returned): their
        commits would overtake it."""
        entry = self._resource.pop(job_id, None)
        if entry is None:
            return []
        resource, ordered = entry
        self._ready.discard(job_id)
        if self._committing.get(resource) == job_id:
            del self._committing[resource]
        order = self._flight[resource]
        order.remove(job_id)
        busy = self._committing.get(resource)
        withdrawn = [j for j in order if j > job_id and j != busy] if failed and ordered else []
        for j in withdrawn:
            order.remove(j)
            del self._resource[j]
            self._ready.discard(j)
        if not order:
            del self._flight[resource]
        return withdrawn

    def clear(self) -> None:
        self._flight.clear()
        self._resource.clear()
        self._ready.clear()
        self._committing.clear()
