"""Adapter around sdnotify: readiness, status, the watchdog and stop notices for systemd.

A no-op without ``NOTIFY_SOCKET`` (not under systemd). sdnotify swallows every error and
knows nothing of ``WATCHDOG_USEC``, so this module works out the ping interval itself (half
the watchdog timeout, as sd_watchdog_enabled(3) advises) and honours ``WATCHDOG_PID``. The
service pings from the loop that proves health, never from a free-running timer: a loop
that is stuck, or that finds the watcher, the worker or the database broken, sends no
ping and systemd restarts the service.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import sdnotify


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if (
            self.enabled
            and usec
            and usec.isdigit()
            and int(usec) > 0
            and (not pid or pid == str(os.getpid()))
        ):
            self.watchdog_interval = int(usec) / 2 / 1e6
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self._last_status = ""

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self, status: str) -> None:
        self._last_status = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more time while a long start-up or a graceful stop still progresses."""
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def stopping(self, status: str) -> None:
        self._send(f"STOPPING=1\nSTATUS={status}")
