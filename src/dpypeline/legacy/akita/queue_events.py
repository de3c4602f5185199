"""``EventsQueue`` and ``Sentinel``: where the original kept its queue of file events.

The original pickled an in-memory queue to ``CACHE_DIR`` at every change. Here files wait
in the durable ledger in ``CACHE_DIR`` (SQLite), which the service fills and empties: the
queue remains the handle a consumer is given (``queue=akita.queue``) to find its
``Akita``, and its sentinel works as before, but its methods that read or change the
queue name the ledger instead.
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn

from dpypeline.errors import Replaced

LEDGER = (
    "the durable ledger in CACHE_DIR: pass queue=akita.queue to ConsumerSerial or"
    " ConsumerParallel and call their run(), which queues every file there exactly once"
)


class Sentinel:
    """Whether the consumer should stop once the queue is empty (``akita.run()`` sets it
    from ``monitor``)."""

    def __init__(self, active: bool = False) -> None:
        self._active = active

    def set_state(self, active: bool) -> bool:
        self._active = active
        return self._active

    def __call__(self, *args: Any, **kwargs: Any) -> bool:
        return self._active


class EventsQueue:
    """One per process, as the original's singleton was (``clear_instance`` forgets it)."""

    _instance: ClassVar[EventsQueue | None] = None

    def __new__(cls, maxsize: int = 0) -> EventsQueue:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
            cls._instance._sentinel = Sentinel()
            cls._instance.akita = None
        return cls._instance

    def __init__(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize
        self.akita: Any  # the Akita given this queue; a consumer runs on its directory
        self._sentinel: Sentinel

    @property
    def sentinel(self) -> Sentinel:
        return self._sentinel

    def set_sentinel_state(self, active: bool) -> bool:
        return self._sentinel.set_state(active)

    @property
    def queue_list(self) -> list[Any]:
        _replaced("queue_list")

    @property
    def processed_events(self) -> list[Any]:
        _replaced("processed_events")

    def enqueue(self, event: Any) -> bool:
        _replaced("enqueue")

    def dequeue(self) -> Any:
        _replaced("dequeue")

    def peek(self) -> Any:
        _replaced("peek")

    def get_queue_size(self) -> int:
        _replaced("get_queue_size")

    def remove(self, event: Any) -> int:
        _replaced("remove")

    @classmethod
    def clear_instance(cls) -> None:
        cls._instance = None

    def __getattr__(self, name: str) -> NoReturn:
        """``queue.Queue``'s own methods (``get``, ``put``, ``qsize``...), which the
        original's queue inherited."""
        if name.startswith("_"):
            raise AttributeError(name)
        _replaced(name)


def _replaced(name: str) -> NoReturn:
    raise Replaced(f"EventsQueue.{name}: the pickled in-memory queue is replaced by {LEDGER}")


__all__ = ["EventsQueue", "Sentinel"]
