"""The health decision and the STATUS line, as plain functions of what the loop observed.

No I/O and no clock of its own: the loop gathers the facts (the watcher's unrepaired
problems, whether a job is overdue, what the executor reports lost) and these decide
healthy or not, when a lost cluster has been lost long enough to restart for, and what
``systemctl status`` shows. The loop then pings the watchdog only for a healthy verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

CLUSTER_GRACE = 15.0  # a lost Dask scheduler this long makes the service restart itself
OVERDUE = "a job is running past retry.job_timeout"


@dataclass(frozen=True, slots=True)
class Verdict:
    problems: list[str]  # empty: healthy
    changed: bool  # differs from the previous verdict (worth a log line)

    @property
    def healthy(self) -> bool:
        return not self.problems


class Health:
    """What the last check found, and since when the executor has reported a loss."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.lost_since: float | None = None

    def assess(
        self, now: float, *, watching: list[str], overdue: bool, executor: list[str]
    ) -> Verdict:
        """``watching``: what the watcher and the scan thread could not repair;
        ``overdue``: a job runs past its timeout; ``executor``: what the executor reports
        lost (an unreachable scheduler, a cluster that is not running)."""
        problems = [*watching, *([OVERDUE] if overdue else []), *executor]
        if not executor:
            self.lost_since = None
        elif self.lost_since is None:
            self.lost_since = now
        changed = problems != self.problems
        self.problems = problems
        return Verdict(problems, changed)

    def cluster_gone(self, now: float, *, watchdog: bool) -> bool:
        """Lost for longer than CLUSTER_GRACE. Under a systemd watchdog the missing pings
        make systemd restart the service; without one the service restarts itself."""
        since = self.lost_since
        return since is not None and now - since > CLUSTER_GRACE and not watchdog


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What STATUS is made of, gathered by the loop."""

    status: str  # the lifecycle state: running, stopping, ...
    counts: Mapping[str, int]  # jobs by state
    setup_waiting_for: str | None = None  # a setup task still waiting for its store
    paused: str | None = None  # the outage behind a pause in progress
    pending_scans: int = 0
    problems: tuple[str, ...] = ()
    held: str = ""  # summary of jobs held behind a failed earlier file of their store


def status_line(s: Snapshot) -> str:
    """One line for ``systemctl status``: what the service is doing, problems, counts."""
    doing = s.status
    if s.setup_waiting_for is not None:
        doing = f"waiting for {s.setup_waiting_for} (setup)"
    elif s.paused is not None:
        doing = f"paused: {s.paused}"
    elif s.pending_scans:
        doing += f", scanning ({s.pending_scans} pending)"
    if s.problems:
        doing += "; UNHEALTHY: " + "; ".join(s.problems)
    if s.held:
        doing += "; " + s.held
    counts = ", ".join(f"{n} {state}" for state, n in s.counts.items())
    return f"{doing}; {counts}"
