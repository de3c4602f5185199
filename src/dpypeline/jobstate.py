"""The states a job can be in, named once for every layer that speaks of them.

The ledger stores them and its transition table (:mod:`dpypeline.state.transitions`)
says which event moves a job from which to which; the ordering rule
(:mod:`dpypeline.ordering`) decides from them which job may start; the loop, the metrics
and the reports show them. The enum sits below all of those so that none has to import
another to name a state.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    DONE = "done"
    DEAD = "dead"
    SKIPPED = "skipped"
