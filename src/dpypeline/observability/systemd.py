"""Adapter around sdnotify: readiness, status, the watchdog and stop notices for systemd.

A no-op without ``NOTIFY_SOCKET`` (not under systemd). sdnotify knows nothing of
``WATCHDOG_USEC``, so this module works out the ping interval itself (half the watchdog
timeout, as sd_watchdog_enabled(3) advises) and honours ``WATCHDOG_PID``. A send never holds
the loop up for long: when systemd does not read its socket (its queue is full), the first
send waits ``SEND_TIMEOUT``, the next are dropped at once until systemd reads again. The
service pings from the loop that proves health, never from a free-running timer: a loop
that is stuck, or that finds the watcher, the worker or the database broken, sends no
ping and systemd restarts the service.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import sdnotify

from dpypeline.observability.logs import get_logger

log = get_logger("dpypeline.systemd")

SEND_TIMEOUT = 1.0  # seconds a message waits for room in systemd's queue


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
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._failing = False  # the last send failed: the next ones do not wait
        if self.enabled:
            notifier = sdnotify.SystemdNotifier()  # a socket it cannot reach: .socket is None
            if notifier.socket is None:
                log.warning(
                    "systemd_notify_failed",
                    socket=env.get("NOTIFY_SOCKET"),
                    action="readiness, status and watchdog pings cannot reach systemd",
                )
            else:
                notifier.debug = True  # send errors raised, not hidden
                notifier.socket.settimeout(SEND_TIMEOUT)
                self._notifier = notifier
        self._last_status = ""

    def _send(self, message: str) -> None:
        if self._notifier is None:
            return
        try:
            self._notifier.notify(message)
        except OSError as exc:  # a full queue (systemd is not reading) or a socket gone
            if not self._failing:
                self._failing = True
                self._notifier.socket.settimeout(0)
                log.warning(
                    "systemd_notify_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    action="messages to systemd are dropped until it reads them again",
                )
            return
        if self._failing:
            self._failing = False
            self._notifier.socket.settimeout(SEND_TIMEOUT)
            log.info("systemd_notify_resumed")

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
