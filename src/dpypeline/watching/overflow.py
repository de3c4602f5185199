"""Noticing an inotify queue overflow, whatever watchdog does with it.

When the kernel's event queue of an inotify instance is full it drops events and queues one
``IN_Q_OVERFLOW`` event (watch descriptor -1) instead. What watchdog makes of it depends on
its version: 6.0 drops it without a word, 7.x logs a warning (which ``logging.level: error``
suppresses) and rebuilds its watches. Neither tells the application, and a lost event is a
file never processed until the next rescan. So dpypeline looks at the raw events itself.

Every watchdog from 6.0 to 7.x reads the inotify descriptor in one place and hands the
bytes to one static method, ``_parse_event_buffer`` of ``inotify_c.Inotify`` (6.x) or
``inotify_c.InotifyFD`` (7.x), which yields ``(wd, mask, cookie, name)`` per event.
:func:`install` wraps that method, once per process, and the wrapper calls every
registered listener for each event whose mask holds ``IN_Q_OVERFLOW``. It is the only place
that knows watchdog's internals: should a future watchdog move the method, :func:`install`
raises at start-up (and the overflow tests fail) rather than overflows going unnoticed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from watchdog.observers import inotify_c

IN_Q_OVERFLOW = 0x4000  # <sys/inotify.h>
_CLASSES = ("InotifyFD", "Inotify")  # watchdog 7.x, 6.x

_listeners: set[Callable[[], None]] = set()
_lock = threading.Lock()


def _reader() -> Any:
    for name in _CLASSES:
        cls = getattr(inotify_c, name, None)
        if cls is not None and callable(getattr(cls, "_parse_event_buffer", None)):
            return cls
    raise RuntimeError(
        "this watchdog version reads inotify events in an unknown way, so queue overflows"
        f" could go unnoticed (looked for {' or '.join(_CLASSES)}._parse_event_buffer)"
    )


def install() -> None:
    """Wrap watchdog's parser of raw inotify events so that overflows reach the listeners.

    The one place that changes watchdog: idempotent (a second call finds the wrapper and
    leaves it), called by the watcher before its observer starts. Raises RuntimeError if
    this watchdog parses events somewhere else."""
    with _lock:
        cls = _reader()
        parse = cls._parse_event_buffer
        if getattr(parse, "notices_overflow", False):
            return

        def parse_and_notice(event_buffer: bytes) -> Iterator[tuple[Any, ...]]:
            for event in parse(event_buffer):
                if event[1] & IN_Q_OVERFLOW:
                    with _lock:
                        listeners = tuple(_listeners)
                    for listener in listeners:
                        listener()
                yield event

        parse_and_notice.notices_overflow = True  # type: ignore[attr-defined]
        parse_and_notice.__wrapped__ = parse  # type: ignore[attr-defined]
        cls._parse_event_buffer = staticmethod(parse_and_notice)


def installed() -> bool:
    return bool(getattr(_reader()._parse_event_buffer, "notices_overflow", False))


def listen(listener: Callable[[], None]) -> None:
    """Call ``listener()`` (on watchdog's reader thread: keep it short) at every overflow
    of any inotify instance of this process. :func:`install` must have run."""
    if not installed():
        raise RuntimeError("overflow.install() was not called: overflows would go unnoticed")
    with _lock:
        _listeners.add(listener)


def unlisten(listener: Callable[[], None]) -> None:
    with _lock:
        _listeners.discard(listener)
