"""What the watcher and the scan thread tell the loop: one frozen type per kind of news.

Only a scan carries files and a directory count; only a refused directory or an overflow
carries a reason (as watchdog gives only a move its ``dest_path``). The loop dispatches
on the type with ``match``, so a field can only be read where it means something; ``kind``
names each type in logs and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dpypeline.watching.scan import FileVersion


@dataclass(frozen=True, slots=True)
class Created:
    """A file was created: a writer may be at work (no close seen yet)."""

    kind: ClassVar[str] = "created"
    watch: int  # index into the configured watches
    path: str


@dataclass(frozen=True, slots=True)
class Writing:
    """A file was written to: it is complete only after its close, or once it settles."""

    kind: ClassVar[str] = "writing"
    watch: int
    path: str


@dataclass(frozen=True, slots=True)
class Complete:
    """A file was closed after writing, moved in, or made complete by other means."""

    kind: ClassVar[str] = "complete"
    watch: int
    path: str


@dataclass(frozen=True, slots=True)
class Deleted:
    """A file was deleted or moved away: it stops settling."""

    kind: ClassVar[str] = "deleted"
    watch: int
    path: str


@dataclass(frozen=True, slots=True)
class NewDirectory:
    """A directory was made or moved in: its files may predate its watch, so it is scanned."""

    kind: ClassVar[str] = "directory"
    watch: int
    path: str


@dataclass(frozen=True, slots=True)
class Unwatched:
    """The kernel refused a directory a watch (``max_user_watches``): it is polled instead."""

    kind: ClassVar[str] = "unwatched"
    watch: int
    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class Overflow:
    """The inotify queue overflowed: events of every watch may be lost."""

    kind: ClassVar[str] = "overflow"
    reason: str


@dataclass(frozen=True, slots=True)
class Scanned:
    """A scan ended: the files it found, or (``failed``) none, the failure logged."""

    kind: ClassVar[str] = "scanned"
    watch: int
    path: str  # the watch's root (``full``), or the directory walked
    reason: str  # why it was asked for: startup, rescan, poll, overflow, ...
    files: tuple[FileVersion, ...] = ()
    full: bool = False  # the whole watch was walked
    failed: bool = False  # the walk failed; nothing was found
    directories: int = 0  # the directories walked


FileNews = Created | Writing | Complete | Deleted
Observation = FileNews | NewDirectory | Unwatched | Overflow | Scanned
