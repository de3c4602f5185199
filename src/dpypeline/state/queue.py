"""Adapter around persist-queue's SQLite ack queue: the window of jobs ready to run.

The ledger (``ledger.py``) is the source of truth for every job; this queue only holds the
ids of the next few ``queued`` jobs in order, so that taking work is a cheap ``get``.
Because it is derived, the traps of persist-queue are designed around rather than fixed:

- ``nack`` would put a failed job back at the *front* (head-of-line blocking, a hot retry
  loop): failed jobs are acked here and re-admitted by the ledger after their backoff.
- there is no attempt counter, backoff or dead letter: the ledger has them.
- pickle is its default serializer: payloads are JSON (``{"job_id": N}``), never code.
- it assumes one process: only the service opens it; the CLI works on the ledger alone.
- acked rows are kept forever and slow ``get`` down: ``prune`` deletes them.

Its connection commits without fsync (``synchronous=NORMAL``): after a power loss the
window may miss or repeat entries, and ``Ledger.recover`` rebuilds it from the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import persistqueue
import persistqueue.serializers.json
from persistqueue.sqlackqueue import AckStatus

DB_FILE = "dpypeline.db"
PRUNE_EVERY_ACKS = 500


@dataclass(frozen=True, slots=True)
class QueueItem:
    queue_id: int
    job_id: int


class ReadyQueue:
    """FIFO of job ids, durable enough to survive a process crash."""

    def __init__(self, cache_dir: Path) -> None:
        self._q = persistqueue.SQLiteAckQueue(
            str(cache_dir),
            name="ready",
            db_file_name=DB_FILE,
            serializer=persistqueue.serializers.json,
            multithreading=True,
            auto_resume=True,  # entries taken before a crash become ready again
            timeout=30.0,
        )
        # persist-queue has no option for this; both attributes are its two connections.
        self._acked = 0
        for conn in (self._q._putter, self._q._getter):
            if conn is not None:
                conn.execute("PRAGMA synchronous=NORMAL")

    def put(self, job_id: int) -> None:
        self._q.put({"job_id": job_id})

    def get(self) -> QueueItem | None:
        """The next entry, or None when the queue is empty (never blocks)."""
        try:
            raw = self._q.get(block=False, raw=True)
        except persistqueue.Empty:
            return None
        return QueueItem(queue_id=int(raw["pqid"]), job_id=int(raw["data"]["job_id"]))

    def ack(self, item: QueueItem) -> None:
        self._q.ack(id=item.queue_id)
        self._acked += 1
        if self._acked >= PRUNE_EVERY_ACKS:
            self.prune()

    def put_back_first(self, item: QueueItem) -> None:
        """Return an entry to the head of the queue: only for jobs interrupted by a stop."""
        self._q.nack(id=item.queue_id)

    def __len__(self) -> int:
        return max(0, self._q.qsize())

    def pending_job_ids(self) -> set[int]:
        """Job ids of entries not yet acked (ready or taken)."""
        pending = {AckStatus.inited, AckStatus.ready, AckStatus.unack}
        return {
            int(row["data"]["job_id"]) for row in self._q.queue() if str(row["status"]) in pending
        }

    def prune(self) -> None:
        """Delete acked entries: persist-queue keeps them, and its ``get`` walks past every
        one of them (0.03 ms per get+ack with none kept, 3 ms with 100k)."""
        self._acked = 0
        self._q.clear_acked_data(max_delete=0, keep_latest=0, clear_ack_failed=True)

    def close(self) -> None:
        self._q.close()
