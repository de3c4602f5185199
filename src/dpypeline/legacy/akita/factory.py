"""``AkitaFactory`` and ``get_akita_dependencies``: ``Akita``'s arguments, in its order.

As in the original they are the path, the process's ``EventsQueue``, an ``EventHandler``
holding the patterns, a ``DirectoryState`` and a watchdog ``PollingObserver``; the
service watches with its own watcher, and the ``Akita`` reads the patterns from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from watchdog.observers.polling import PollingObserver

from dpypeline.legacy.akita.directory_state import DirectoryState
from dpypeline.legacy.akita.event_handler import EventHandler
from dpypeline.legacy.akita.queue_events import EventsQueue

DEFAULT_PATTERNS = ("*.nc",)


class AkitaFactory:
    def __init__(  # noqa: PLR0917 - the original's signature
        self,
        path: str = "./",
        patterns: str | list[str] | None = None,
        ignore_patterns: str | list[str] | None = None,
        ignore_directories: bool = True,
        case_sensitive: bool = True,
        glob_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self._path = path
        self._patterns = patterns if patterns is not None else list(DEFAULT_PATTERNS)
        self._ignore_patterns = ignore_patterns
        self._ignore_directories = ignore_directories
        self._case_sensitive = case_sensitive
        self._glob_kwargs = dict(glob_kwargs) if glob_kwargs is not None else {}

    def get_queue(self, maxsize: int = 0) -> EventsQueue:
        return EventsQueue(maxsize)

    def get_event_handler(
        self,
        queue: EventsQueue,
        patterns: str | list[str] | None = None,
        ignore_patterns: str | list[str] | None = None,
        ignore_directories: bool | None = None,
        case_sensitive: bool | None = None,
    ) -> EventHandler:
        """Each argument left None takes the factory's."""
        return EventHandler(
            queue,
            patterns if patterns is not None else self._patterns,
            ignore_patterns if ignore_patterns is not None else self._ignore_patterns,
            ignore_directories if ignore_directories is not None else self._ignore_directories,
            case_sensitive if case_sensitive is not None else self._case_sensitive,
        )

    def get_polling_observer(self) -> PollingObserver:
        return PollingObserver()

    def get_directory_state(
        self,
        path: str | None = None,
        patterns: str | list[str] | None = None,
        glob_kwargs: Mapping[str, Any] | None = None,
    ) -> DirectoryState:
        return DirectoryState(
            path if path is not None else self._path,
            patterns if patterns is not None else self._patterns,
            glob_kwargs if glob_kwargs is not None else self._glob_kwargs,
        )


def get_akita_dependencies(  # noqa: PLR0917 - the original's signature, order and all
    path: str = "./",
    patterns: str | list[str] | None = None,
    ignore_patterns: str | list[str] | None = None,
    ignore_directories: bool = True,
    case_sensitive: bool = True,
    glob_kwargs: Mapping[str, Any] | None = None,
) -> tuple[str, EventsQueue, EventHandler, DirectoryState, PollingObserver]:
    factory = AkitaFactory(
        path, patterns, ignore_patterns, ignore_directories, case_sensitive, glob_kwargs
    )
    queue = factory.get_queue()
    return (
        path,
        queue,
        factory.get_event_handler(queue),
        factory.get_directory_state(),
        factory.get_polling_observer(),
    )


__all__ = ["AkitaFactory", "get_akita_dependencies"]
