"""The loop's periodic duties, in one typed table: what is due when.

A duty is a ``Timer`` and, for the duties of one watch, the watch's index. Each entry knows
its period, so firing it is also rescheduling it. An entry added with no first time is due
at the first look but does not wake the loop (a rate limit, such as pruning the ledger at
most every hour on a full scan); the others are deadlines the loop sleeps towards.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

SERVICE = -1  # the watch index of duties that belong to the whole service


class Timer(StrEnum):
    HEALTH = "health"  # check health, ping the systemd watchdog, update STATUS
    EXECUTOR_STATUS = "executor status"  # write what `dpypeline status` shows of a cluster
    RESCAN = "rescan"  # walk a watch to find what events missed
    POLL = "poll"  # walk a watch that has no events (network filesystems)
    PRUNE = "prune"  # drop old finished jobs of a watch, after a full scan


@dataclass(slots=True)
class _Entry:
    every: float
    at: float | None  # None: due now, and no wake-up


class Timers:
    def __init__(self) -> None:
        self._table: dict[tuple[Timer, int], _Entry] = {}

    def every(
        self, timer: Timer, seconds: float, first: float | None, watch: int = SERVICE
    ) -> None:
        """(Re)schedule a duty: first due at ``first`` (None: at once), then every
        ``seconds`` after each time it fires."""
        self._table[timer, watch] = _Entry(seconds, first)

    def due_now(self, timer: Timer, watch: int = SERVICE) -> None:
        """Make a scheduled duty due at the next look (its period stays)."""
        if (entry := self._table.get((timer, watch))) is not None:
            entry.at = None

    def fire(self, timer: Timer, now: float, watch: int = SERVICE) -> bool:
        """True if the duty is due at ``now``; it is then due again a period later."""
        entry = self._table.get((timer, watch))
        if entry is None or (entry.at is not None and now < entry.at):
            return False
        entry.at = now + entry.every
        return True

    def next_deadline(self) -> float | None:
        """The earliest time a duty falls due (entries due "at once" do not count)."""
        return min((e.at for e in self._table.values() if e.at is not None), default=None)
