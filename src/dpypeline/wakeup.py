"""The loop's wake-up call: a self-pipe that threads and signals can both ring.

A ``threading.Event`` cannot be set from a signal handler: ``set()`` takes the lock that
the loop itself holds inside ``clear()`` and ``wait()``, and a handler runs on the loop's
own thread, so a signal landing there waits for itself forever. Here the flag is a byte in
a pipe: ``set()`` is one ``write(2)`` and takes no lock, the loop waits in ``poll(2)``, and
``signal.set_wakeup_fd(wakeup.signal_fd)`` makes the interpreter's C-level handler write
the byte, so the signal handlers themselves only set plain flags.

``Wakeup`` is a ``threading.Event`` in everything the executors and the watcher's threads
use (``set``, ``clear``, ``is_set``, ``wait``), so it takes the Event's place unchanged.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import weakref


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


class Wakeup(threading.Event):
    def __init__(self) -> None:
        super().__init__()  # its lock stays unused: the pipe is the flag
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        # closed when the last user (an executor's thread, say) lets go, never earlier:
        # a write to a closed descriptor could land in whatever file reused its number
        weakref.finalize(self, _close, self._read, self._write)
        self._poll = select.poll()  # not select(2): it fails on descriptors past 1023
        self._poll.register(self._read, select.POLLIN)

    @property
    def signal_fd(self) -> int:
        """The descriptor for ``signal.set_wakeup_fd``."""
        return self._write

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: the loop has plenty to wake up to
            os.write(self._write, b"\0")

    def clear(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def is_set(self) -> bool:
        return bool(self._poll.poll(0))

    def wait(self, timeout: float | None = None) -> bool:
        return bool(self._poll.poll(None if timeout is None else max(timeout, 0.0) * 1000))
