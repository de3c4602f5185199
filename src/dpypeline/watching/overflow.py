"""Noticing what watchdog keeps to itself: an inotify queue overflow, and a refused watch.

When the kernel's event queue of an inotify instance is full it drops events and queues one
``IN_Q_OVERFLOW`` event (watch descriptor -1) instead. What watchdog makes of it depends on
its version: 6.0 drops it without a word, 7.x logs a warning (which ``logging.level: error``
suppresses) and rebuilds its watches. Neither tells the application, and a lost event is a
file never processed until the next rescan. So dpypeline looks at the raw events itself.

Every watchdog from 6.0 to 7.x reads the inotify descriptor in one place and hands the
bytes to one static method, ``_parse_event_buffer`` of ``inotify_c.Inotify`` (6.x) or
``inotify_c.InotifyFD`` (7.x), which yields ``(wd, mask, cookie, name)`` per event.
:func:`install` wraps that method, once per process, and the wrapper calls every
registered listener for each event whose mask holds ``IN_Q_OVERFLOW``.

A directory created after start whose watch the kernel refuses (``fs.inotify.
max_user_watches`` reached) is skipped by watchdog with at most a warning, and nothing in
it would be seen until the next rescan. Every watchdog asks the kernel for a watch in one
method, ``Inotify._add_watch`` (6.x) or ``InotifyFD.add_callback`` (7.x), which raises
OSError when refused: :func:`install` wraps it too, and tells every listener of
:func:`listen_refused` which directory went without a watch, so that it is polled at once.

This is the only place that knows watchdog's internals: should a future watchdog move these
methods, :func:`install` raises at start-up (and the overflow tests fail) rather than
overflows or refusals going unnoticed.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from watchdog.observers import inotify_c

IN_Q_OVERFLOW = 0x4000  # <sys/inotify.h>
_CLASSES = ("InotifyFD", "Inotify")  # watchdog 7.x, 6.x
_ADDERS = (("InotifyFD", "add_callback"), ("Inotify", "_add_watch"))  # watchdog 7.x, 6.x
#: What inotify_add_watch(2) fails with when the user's watches (or the kernel's memory for
#: them) are used up; a directory gone meanwhile (ENOENT) needs no polling.
REFUSALS = frozenset({errno.ENOSPC, errno.ENOMEM})

Refused = Callable[[str, OSError], None]

_listeners: set[Callable[[], None]] = set()
_refused_listeners: set[Refused] = set()
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


def _adder() -> tuple[Any, str]:
    for cls_name, method in _ADDERS:
        cls = getattr(inotify_c, cls_name, None)
        if cls is not None and callable(getattr(cls, method, None)):
            return cls, method
    raise RuntimeError(
        "this watchdog version adds inotify watches in an unknown way, so directories left"
        " without a watch could go unnoticed (looked for "
        + " or ".join(f"{c}.{m}" for c, m in _ADDERS)
        + ")"
    )


def _install_refusals() -> None:
    """Wrap watchdog's request for a watch so that refusals reach the listeners."""
    cls, method = _adder()
    add = getattr(cls, method)
    if getattr(add, "notices_refusal", False):
        return

    def add_and_notice(self: Any, path: bytes, *args: Any, **kwargs: Any) -> Any:
        try:
            return add(self, path, *args, **kwargs)
        except OSError as exc:
            if exc.errno in REFUSALS:
                with _lock:
                    listeners = tuple(_refused_listeners)
                for listener in listeners:
                    listener(os.fsdecode(path), exc)
            raise

    add_and_notice.notices_refusal = True  # type: ignore[attr-defined]
    add_and_notice.__wrapped__ = add  # type: ignore[attr-defined]
    setattr(cls, method, add_and_notice)


def install() -> None:
    """Wrap watchdog's parser of raw inotify events so that overflows reach the listeners,
    and its request for a watch so that refusals do.

    The one place that changes watchdog: idempotent (a second call finds the wrappers and
    leaves them), called by the watcher before its observer starts. Raises RuntimeError if
    this watchdog parses events or adds watches somewhere else."""
    with _lock:
        _install_refusals()
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
    cls, method = _adder()
    return bool(
        getattr(_reader()._parse_event_buffer, "notices_overflow", False)
        and getattr(getattr(cls, method), "notices_refusal", False)
    )


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


def listen_refused(listener: Refused) -> None:
    """Call ``listener(directory, error)`` whenever the kernel refuses any inotify instance
    of this process a watch for lack of room (:data:`REFUSALS`), on the thread that asked:
    keep it short. :func:`install` must have run."""
    if not installed():
        raise RuntimeError("overflow.install() was not called: refused watches would go unnoticed")
    with _lock:
        _refused_listeners.add(listener)


def unlisten_refused(listener: Refused) -> None:
    with _lock:
        _refused_listeners.discard(listener)
