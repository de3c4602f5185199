"""``Akita``: the original dpypeline's watcher, now a description of one watched directory.

In the original, ``Akita.run()`` started a watchdog observer that put file events in an
in-memory queue, and a consumer turned them into jobs. Here watching, settling, the queue
and the jobs belong to the service (inotify or polling, the durable ledger in
``CACHE_DIR``): an ``Akita`` says what to watch, and the consumer's ``run()`` starts the
service on it. ``akita.run()`` still returns at once; a file that arrives before the
consumer's ``run()`` is found by the service's start-up scan, so none is lost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from dpypeline.errors import ConfigError, Replaced

Patterns = str | Sequence[str] | None


class Akita:
    """What to watch: ``path``, the glob ``patterns`` of the files to take, and
    ``monitor`` (True: keep watching until stopped; False: stop once every file present
    is done). ``ignore_patterns=None`` keeps the service's defaults, which leave out
    hidden and temporary files (``.*``, ``*.tmp``, ``*.part``: files still being
    copied); directories are never taken, whatever ``ignore_directories`` says."""

    def __init__(  # noqa: PLR0917 - the original's signature: Akita(*deps, monitor=...)
        self,
        path: str | os.PathLike[str],
        patterns: Patterns = None,
        ignore_patterns: Patterns = None,
        ignore_directories: bool = True,
        case_sensitive: bool = True,
        glob_kwargs: Mapping[str, Any] | None = None,
        monitor: bool = True,
    ) -> None:
        unknown = sorted(set(glob_kwargs or {}) - {"recursive"})
        if unknown:
            raise Replaced(
                f"Akita glob_kwargs {', '.join(unknown)}: the files already present are found"
                " by the service's start-up scan, which matches `patterns` at any depth"
                " ('**' for directories); leave glob_kwargs out"
            )
        self.path = os.fspath(path)
        self.patterns = _as_list(patterns)
        self.ignore_patterns = _as_list(ignore_patterns)
        self.ignore_directories = ignore_directories
        self.case_sensitive = case_sensitive
        self.glob_kwargs = glob_kwargs
        self.monitor = monitor
        self.running = False
        self.queue = EventQueue(self)

    def run(self) -> None:
        """Checks the directory and returns at once; the consumer's ``run()`` watches it."""
        if not Path(self.path).is_dir():
            raise ConfigError(f"Akita path is not a directory: {self.path} (create it or fix it)")
        self.running = True

    def watch(self) -> dict[str, Any]:
        """This Akita as a ``watch`` entry of the pipeline config."""
        entry: dict[str, Any] = {"path": self.path, "case_sensitive": self.case_sensitive}
        if self.patterns is not None:
            entry["patterns"] = self.patterns
        if self.ignore_patterns is not None:
            entry["ignore_patterns"] = self.ignore_patterns
        return entry


class EventQueue:
    """Where the original's in-memory event queue was: consumers take ``akita.queue`` to
    find their Akita. Events now go into the durable ledger; the queue itself is gone."""

    def __init__(self, akita: Akita) -> None:
        self.akita = akita

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("__"):
            raise AttributeError(name)
        raise Replaced(
            f"Akita's in-memory event queue (.{name}) is replaced by the durable ledger in"
            " CACHE_DIR: pass akita.queue to ConsumerSerial or ConsumerParallel and call"
            " their run(), which takes every file from the ledger exactly once"
        )


def _as_list(patterns: Patterns) -> list[str] | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


__all__ = ["Akita", "EventQueue", "Patterns"]
