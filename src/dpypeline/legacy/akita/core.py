"""``Akita``: the original dpypeline's watcher, now a description of one watched directory.

In the original, ``Akita.run()`` started a watchdog observer that put file events in a
queue, and a consumer turned them into jobs. Here watching, settling, the queue and the
jobs belong to the service (inotify or polling, the durable ledger in ``CACHE_DIR``): an
``Akita`` says what to watch (its path, and its event handler's patterns), and the
consumer's ``run()`` starts the service on it. ``akita.run()`` still returns at once; a
file that arrives before the consumer's ``run()`` is found by the service's start-up scan,
so none is lost. ``akita.stop()`` stops the service a consumer is running.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from threading import Thread
from typing import Any, Protocol

from dpypeline.errors import ConfigError, Replaced

logger = logging.getLogger(__name__)


class Queue(Protocol):
    def enqueue(self, event: Any) -> bool: ...

    @property
    def queue_list(self) -> list[Any]: ...

    @property
    def processed_events(self) -> list[Any]: ...

    def set_sentinel_state(self, active: bool) -> bool: ...


class DirectoryState(Protocol):
    @property
    def stored_state(self) -> list[str]: ...

    @property
    def current_state(self) -> list[str]: ...


class EventHandler(Protocol):
    def on_created(self, event: Any) -> None: ...

    def on_deleted(self, event: Any) -> None: ...

    def on_modified(self, event: Any) -> None: ...

    def on_moved(self, event: Any) -> None: ...


class Observer(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def join(self) -> None: ...

    def schedule(self, event_handler: EventHandler, path: str, recursive: bool) -> None: ...

    def is_alive(self) -> bool: ...


class Akita:
    """``Akita(*get_akita_dependencies(path, patterns, ...), monitor=...)``. ``monitor``
    True: keep watching until stopped; False: stop once every file present is done.

    What to watch is read from ``event_handler`` (``patterns``, ``ignore_patterns``,
    ``case_sensitive``, as on a watchdog ``PatternMatchingEventHandler``), or from
    ``directory_state``'s patterns. ``ignore_patterns=None`` keeps the service's defaults,
    which leave out hidden and temporary files (``.*``, ``*.tmp``, ``*.part``: files still
    being copied); directories are never taken. ``observer`` and ``worker`` are not used:
    the service watches with its own threads."""

    def __init__(  # noqa: PLR0917 - the original's signature: Akita(*deps, monitor=...)
        self,
        path: str,
        queue: Queue,
        event_handler: EventHandler,
        directory_state: DirectoryState,
        observer: Observer,
        monitor: bool = True,
        worker: Thread | None = None,
    ) -> None:
        glob_kwargs = getattr(directory_state, "_glob_kwargs", None) or {}
        unknown = sorted(set(glob_kwargs) - {"recursive"})
        if unknown:
            raise Replaced(
                f"Akita glob_kwargs {', '.join(unknown)}: the files already present are found"
                " by the service's start-up scan, which matches `patterns` at any depth"
                " ('**' for directories); leave glob_kwargs out"
            )
        self._path = os.fspath(path)
        self._queue = queue
        self._event_handler = event_handler
        self._directory_state = directory_state
        self._observer = observer
        self._monitor = monitor
        self._worker = worker
        self.running = False
        self.service: Any = None  # the dpypeline.Pipeline a consumer runs, while it runs
        if hasattr(queue, "akita"):
            queue.akita = self  # how a consumer given queue=akita.queue finds its directory

    @property
    def path(self) -> str:
        return self._path

    @property
    def monitor(self) -> bool:
        return self._monitor

    @property
    def queue(self) -> Queue:
        return self._queue

    @queue.deleter
    def queue(self) -> None:
        del self._queue

    def enqueue_new_files(self) -> None:
        """The files already there are queued by the consumer's ``run()`` (the service's
        start-up scan against the ledger), so this has nothing left to do."""

    def stop(self, max_attempts: int = 10) -> None:
        """Ask the service a consumer is running on this directory to stop (from any
        thread); its ``run()`` returns once the running jobs end."""
        if self.service is None:
            logger.info("Attempted to stop akita but no worker thread has been found.")
            return
        logger.info("Stopping Akita...")
        self.service.stop()

    def run(
        self, monitor: bool = True, enqueue_new_files: bool = True, daemon: bool = False
    ) -> None:
        """Checks the directory and returns at once; the consumer's ``run()`` watches it.
        As in the original, the ``monitor`` given to the constructor decides, not this one."""
        if not Path(self._path).is_dir():
            raise ConfigError(f"Akita path is not a directory: {self._path} (create it or fix it)")
        if enqueue_new_files:
            self.enqueue_new_files()
        set_sentinel = getattr(self._queue, "set_sentinel_state", None)
        if set_sentinel is not None:
            set_sentinel(active=not self._monitor)
        self.running = True

    def watch(self) -> dict[str, Any]:
        """This Akita as a ``watch`` entry of the pipeline config."""
        handler = self._event_handler
        patterns = getattr(handler, "patterns", None)
        if patterns is None:
            patterns = getattr(self._directory_state, "_patterns", None)
        entry: dict[str, Any] = {
            "path": self._path,
            "case_sensitive": getattr(handler, "case_sensitive", True),
        }
        if patterns is not None:
            entry["patterns"] = _as_list(patterns)
        ignore = getattr(handler, "ignore_patterns", None)
        if ignore is not None:
            entry["ignore_patterns"] = _as_list(ignore)
        return entry


def _as_list(patterns: str | Sequence[str]) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


__all__ = ["Akita", "DirectoryState", "EventHandler", "Observer", "Queue"]
