"""``EventHandler``: the original's watchdog handler, which put each created file's path
in its queue once the file's size stopped changing.

An ``Akita`` reads what to watch from it (``patterns``, ``ignore_patterns``,
``case_sensitive``); the service's own watcher takes the files, and settles them on
close or stillness rather than on a one-second size check.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Protocol

from watchdog.events import FileSystemEvent, PatternMatchingEventHandler


class Queue(Protocol):
    def enqueue(self, event: Any) -> Any: ...


class EventHandler(PatternMatchingEventHandler):
    """Its ``on_*`` methods return the event, as the original's did (watchdog's return
    None, hence the overrides' differing return type)."""

    def __init__(
        self,
        queue: Queue,
        patterns: str | list[str] | None = None,
        ignore_patterns: str | list[str] | None = None,
        ignore_directories: bool = False,
        case_sensitive: bool = True,
    ) -> None:
        self._queue = queue
        super().__init__(
            patterns=patterns,  # type: ignore[arg-type] # a str too, as the original passed it
            ignore_patterns=ignore_patterns,  # type: ignore[arg-type]
            ignore_directories=ignore_directories,
            case_sensitive=case_sensitive,
        )

    @staticmethod
    def is_file_size_stable(path: str, sleep_time: int = 1) -> bool:
        """Waits until two sizes ``sleep_time`` seconds apart agree; returns True."""
        filesize = -1
        while filesize != os.path.getsize(path):
            filesize = os.path.getsize(path)
            time.sleep(sleep_time)
        return True

    def on_created(self, event: FileSystemEvent) -> FileSystemEvent:  # type: ignore[override]
        logging.info(f"{event}")
        if self.is_file_size_stable(os.fsdecode(event.src_path)):
            self._queue.enqueue(os.fsdecode(event.src_path))
        return event

    def on_deleted(self, event: FileSystemEvent) -> FileSystemEvent:  # type: ignore[override]
        logging.info(f"{event}")
        return event

    def on_modified(self, event: FileSystemEvent) -> FileSystemEvent:  # type: ignore[override]
        logging.info(f"{event}")
        return event

    def on_moved(self, event: FileSystemEvent) -> FileSystemEvent:  # type: ignore[override]
        logging.info(f"{event}")
        return event


__all__ = ["EventHandler", "Queue"]
