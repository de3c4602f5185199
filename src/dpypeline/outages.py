"""Outages of what the jobs write to, as opposed to failures of a file.

An outage is not the file's fault: the job goes back to the queue without spending an
attempt and the worker pauses, with growing waits, until the destination works again
(:class:`~dpypeline.errors.Unavailable`). Object-store outages are recognised where S3 is
called (:mod:`dpypeline.objectstore`); this module recognises the others and waits them out
at start-up:

- a full disk or an exhausted quota (``ENOSPC``, ``EDQUOT``) anywhere in the exception
  chain of a task - from a plain ``write``, a dask computation or a zarr write - is an
  outage of the output's filesystem, named with its free space (:func:`disk_full_is_outage`);
- setup tasks that meet an outage (``create_bucket`` with the store down) are tried again
  with growing waits while the service runs, and no job starts until they succeeded
  (:class:`PendingSetup`).
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from dpypeline.config.model import BackoffConfig
from dpypeline.errors import DpypelineError, Unavailable

log = structlog.stdlib.get_logger("dpypeline.setup")

DISK_FULL = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded"}


def chain(exc: BaseException) -> Iterator[BaseException]:
    """*exc* and every exception it was raised from or during, each once."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        todo += [c for c in getattr(e, "exceptions", ()) if isinstance(c, BaseException)]


def disk_full(exc: BaseException, what: str, path: str | None = None) -> Unavailable | None:
    """The outage behind *exc* if a write found its disk full, else None.

    *what* completes "… while {what}"; *path* is the output being written when the caller
    knows it (a write's own error often names no file), else the failing call's file.
    """
    found = next((e for e in chain(exc) if isinstance(e, OSError) and e.errno in DISK_FULL), None)
    if found is None:
        return None
    assert found.errno is not None
    where = path or found.filename or found.filename2
    name = errno.errorcode[found.errno]
    if where is None:
        space = "the file is not named, so its free space is unknown"
        place = "the disk a task writes to"
    else:
        where = os.fsdecode(where)
        space = free_space(where)
        place = where
    return Unavailable(
        f"{DISK_FULL[found.errno]} on {place} ({name}; {space}) while {what}; waiting"
        " until space is freed"
    )


def free_space(path: str) -> str:
    """``"12.0 KiB free of 2.0 MiB"`` for the filesystem that holds *path* (or would)."""
    probe = os.path.abspath(path)
    while True:
        try:
            usage = shutil.disk_usage(probe)
            return f"{_size(usage.free)} free of {_size(usage.total)}"
        except OSError:
            parent = os.path.dirname(probe)
            if parent == probe:
                return "free space unknown"
            probe = parent


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@contextmanager
def disk_full_is_outage(what: str, path: str | None = None) -> Iterator[None]:
    """Re-raise a full disk or quota inside as :class:`Unavailable` (the cause is kept)."""
    try:
        yield
    except DpypelineError:
        raise
    except Exception as exc:
        outage = disk_full(exc, what, path)
        if outage is None:
            raise
        raise outage from exc


class PendingSetup:
    """The setup tasks not yet run: run them in order; one that meets an outage is tried
    again later, with growing waits (the retry backoff), and the rest wait behind it.

    Start-up runs them in its own thread; the service loop runs a retry in a thread of its
    own, since a store that hangs takes its timeouts to fail and the loop must go on
    proving its health meanwhile. Any failure other than an outage propagates: start-up
    (or the service) fails with it, as a bad setup always did.
    """

    def __init__(self, tasks: list[Any], context: Any, backoff: BackoffConfig) -> None:
        self.tasks, self.context, self.backoff = list(tasks), context, backoff
        self.next_at = 0.0
        self.failures = 0
        self.waiting_for = ""  # what the head task waits for, for STATUS
        self._thread: threading.Thread | None = None
        self._outcome: list[BaseException | None] = []

    @property
    def done(self) -> bool:
        return not self.tasks

    def run(self, now: float, *, background: bool = False) -> bool:
        """Run what is due; True once every setup task has succeeded."""
        if self._thread is not None:
            if self._thread.is_alive():
                return False
            self._thread = None
            if not self._settle(now):
                return False
        while self.tasks and now >= self.next_at:
            if background:
                self._thread = threading.Thread(
                    target=self._attempt, name="dpypeline-setup", daemon=True
                )
                self._thread.start()
                return False
            self._attempt()
            if not self._settle(now):
                return False
        return self.done

    def _attempt(self) -> None:
        try:
            self.tasks[0].run_setup(self.context)
        except BaseException as exc:  # noqa: BLE001 - handed to _settle, which re-raises
            self._outcome = [exc]
        else:
            self._outcome = [None]

    def _settle(self, now: float) -> bool:
        (exc,) = self._outcome
        task = self.tasks[0]
        if exc is None:
            self.tasks.pop(0)
            self.failures, self.waiting_for = 0, ""
            log.info("setup_done", task=task.name)
            return True
        if not isinstance(exc, Unavailable):
            raise exc
        self.failures += 1
        wait = self.backoff.delay(self.failures)
        self.next_at = now + wait
        store = task.kwargs.get("objectstore")
        self.waiting_for = f"objectstore '{store}'" if store else f"setup task {task.name}"
        log.warning(
            "setup_waiting",
            task=task.name,
            objectstore=store,
            error=str(exc),
            retry_in=round(wait, 1),
            failures=self.failures,
            action="no job starts until setup succeeds; new files are still recorded",
        )
        return False
