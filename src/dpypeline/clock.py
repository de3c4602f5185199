"""The service's two clocks: the monotonic one for every wait, the wall clock for what is
stored and shown.

The wall clock can be stepped by any amount (NTP setting a wrong clock at boot, an
operator's ``date -s``, a virtual machine resumed): a job timeout, a settle window, a
backoff, a timer or the watchdog's ping measured on it would end a healthy job a day early
or wait an hour for nothing. So the loop's ``now`` is ``time.monotonic()``; the wall clock
is read alongside it only for the times the ledger stores (they must survive a restart)
and that people read. ``Clock`` keeps the offset between the two as of the loop's last
pass, to turn a stored wall time into a monotonic deadline and back, and notices when
the wall clock was stepped: the offset moved by more than ``STEP``.
"""

from __future__ import annotations

import time

STEP = 1.0  # an offset change this large is a step (NTP's slewing moves it by far less)


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0  # wall minus monotonic, at the last reading
        self._read = False

    def read(self, now: float | None = None, wall: float | None = None) -> tuple[float, float]:
        """The monotonic ``now`` of a loop pass and by how much the wall clock was stepped
        since the last pass (0.0: not). A caller's ``now`` (a test driving the loop) is
        both clocks unless it gives ``wall`` too."""
        if now is None:
            now, wall = time.monotonic(), time.time()
        offset = (now if wall is None else wall) - now
        stepped = offset - self.offset if self._read else 0.0
        self.offset, self._read = offset, True
        return now, stepped if abs(stepped) >= STEP else 0.0

    def wall(self, now: float) -> float:
        """The wall-clock time of the monotonic ``now``: what the ledger stores."""
        return now + self.offset

    def monotonic(self, wall: float) -> float:
        """The monotonic time of a stored wall-clock time: a deadline the loop waits for."""
        return wall - self.offset
