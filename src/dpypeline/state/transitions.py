"""A job's life in one table: its states, the events that move it, and from which states
each event may move it to which.

::

    queued ──claim──► running ──succeed──► done
      ▲  ▲               │────fail──────► retrying ──promote──► queued
      │  └──hold         │────give_up───► dead ──retry──► queued
      │                  │────drop──────► skipped    dead ──skip──► skipped
      │                  │────exhaust───► dead      (at start-up, out of attempts)
      └──────────────────┴──release | park | resume  (a stop, a hold, a crash)
    queued | retrying | dead ──supersede──► queued  (a new version of its file)

The states themselves are :class:`dpypeline.jobstate.JobState`, below this package so that
the ordering rule can name them too. Every change of a job's state is made by
:func:`apply`, which writes the event's from-states into the SQL (``UPDATE jobs ... WHERE
state IN (...)``): an event that does not apply to the job as it is now changes nothing,
whichever process (the service, a CLI command) acted first. States are written into SQL
as literals taken from ``JobState``, never as typed-out names, and never as bound
parameters (SQLite uses a partial index such as ``WHERE state = 'queued'`` only when the
query names the same literal).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dpypeline.jobstate import JobState

TERMINAL = (JobState.DONE, JobState.DEAD, JobState.SKIPPED)
WAITING = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING)


class Event(StrEnum):
    CLAIM = "claim"  # the service takes the job to run it; the attempt is counted
    HOLD = "hold"  # it must wait behind an earlier job of its resource; stays queued
    SUCCEED = "succeed"
    FAIL = "fail"  # a transient failure: it waits out a backoff
    GIVE_UP = "give_up"  # a permanent failure, or its last attempt failed
    DROP = "drop"  # its file vanished or was replaced before it ran
    RELEASE = "release"  # a stop interrupted it; the attempt is not counted
    PARK = "park"  # withdrawn before its commit, to wait behind an earlier job
    RESUME = "resume"  # found running at start-up: the service died under it
    EXHAUST = "exhaust"  # the same, after its last attempt: it keeps killing the service
    PROMOTE = "promote"  # its backoff has passed
    RETRY = "retry"  # the operator revives a dead job
    SKIP = "skip"  # the operator accepts the gap a dead job leaves
    SUPERSEDE = "supersede"  # a new version of its file takes its place, with fresh attempts


@dataclass(frozen=True, slots=True)
class Transition:
    from_states: tuple[JobState, ...]
    to: JobState


Q, R, W = JobState.QUEUED, JobState.RUNNING, JobState.RETRYING
TRANSITIONS: Mapping[Event, Transition] = {
    Event.CLAIM: Transition((Q,), R),
    Event.HOLD: Transition((Q,), Q),
    Event.SUCCEED: Transition((R,), JobState.DONE),
    Event.FAIL: Transition((R,), W),
    Event.GIVE_UP: Transition((R,), JobState.DEAD),
    Event.DROP: Transition((R,), JobState.SKIPPED),
    Event.RELEASE: Transition((R,), Q),
    Event.PARK: Transition((R,), Q),
    Event.RESUME: Transition((R,), Q),
    Event.EXHAUST: Transition((R,), JobState.DEAD),
    Event.PROMOTE: Transition((W,), Q),
    Event.RETRY: Transition((JobState.DEAD,), Q),
    Event.SKIP: Transition((JobState.DEAD,), JobState.SKIPPED),
    Event.SUPERSEDE: Transition((Q, W, JobState.DEAD), Q),
}

# how an attempt ends, by the state it ends in (``Ledger.finish``)
OUTCOMES: Mapping[JobState, Event] = {
    JobState.DONE: Event.SUCCEED,
    JobState.RETRYING: Event.FAIL,
    JobState.DEAD: Event.GIVE_UP,
    JobState.SKIPPED: Event.DROP,
}


def is_state(states: Iterable[JobState], column: str = "state") -> str:
    """``state = 'x'`` or ``state IN ('x', 'y')``, for SQL."""
    values = [f"'{JobState(s).value}'" for s in states]
    if len(values) == 1:
        return f"{column} = {values[0]}"
    return f"{column} IN ({', '.join(values)})"


def sql(event: Event, where: str, *, assign: str = "", returning: str = "") -> str:
    """The guarded statement of ``event``: it sets the state and ``updated`` (``:now``),
    then ``assign``, on the rows matching ``where`` that are in a from-state."""
    t = TRANSITIONS[event]
    sets = f"state = '{t.to.value}', updated = :now" + (f", {assign}" if assign else "")
    text = f"UPDATE jobs SET {sets} WHERE {is_state(t.from_states)} AND ({where})"
    return text + (f" RETURNING {returning}" if returning else "")


def apply(
    db: sqlite3.Connection,
    event: Event,
    where: str,
    params: Mapping[str, Any],
    *,
    assign: str = "",
    returning: str = "",
) -> sqlite3.Cursor:
    """Run ``event`` on the jobs matching ``where`` (named parameters; ``:now`` is the
    time of the change). The cursor's ``rowcount`` says how many jobs it moved."""
    return db.execute(sql(event, where, assign=assign, returning=returning), params)
