"""Taking files into the ledger without letting one file stop the service.

Anyone who can write to a watched directory chooses the names and contents the loop sees. A
failure that one file's data can cause (a value SQLite cannot bind, say) must end that file,
with a reason in the log, and never the loop; a failing database, on the other hand, must
still stop it (the health check and systemd restart the service). A batch that fails is
split in halves until the file at fault is found, so a million-file scan with one bad name
costs a few dozen extra queries, and the good files keep their order.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dpypeline.errors import StateError
from dpypeline.observability.logs import get_logger
from dpypeline.paths import refusal
from dpypeline.state.ledger import FileVersionLike, Ledger

log = get_logger("dpypeline.intake")

F = TypeVar("F", bound=FileVersionLike)


def is_systemic(exc: BaseException) -> bool:
    """True for a failure of the database itself (locked, I/O error, full, corrupt), which
    no single file causes; False for an error one file's data can cause."""
    return isinstance(exc, sqlite3.OperationalError | sqlite3.InternalError | StateError) or (
        type(exc) is sqlite3.DatabaseError
    )


def _split(
    files: Sequence[F],
    run: Callable[[Sequence[F]], list[int]],
    refused: Callable[[F, Exception], None],
    offset: int = 0,
) -> list[int]:
    """``run(files)``; on a per-file failure, ``run`` each half, down to single files
    (``refused``). Returns ``run``'s results with indexes shifted by ``offset``."""
    try:
        return [i + offset for i in run(files)]
    except Exception as exc:
        if is_systemic(exc):
            raise
        if len(files) == 1:
            refused(files[0], exc)
            return []
    mid = len(files) // 2
    head = _split(files[:mid], run, refused, offset)
    return head + _split(files[mid:], run, refused, offset + mid)


def _refused(stage: str) -> Callable[[FileVersionLike, Exception], None]:
    def report(f: FileVersionLike, exc: Exception) -> None:
        log.error(
            "file_refused",
            file=f.path,
            stage=stage,
            error=f"{type(exc).__name__}: {exc}",
            action="this file is left alone; the service goes on with the others",
        )

    return report


def enqueue(
    ledger: Ledger, files: Sequence[F], root: str, jobs: Sequence[str], *, source: str, now: float
) -> int:
    """``Ledger.enqueue``, leaving out (and logging) any file it cannot take."""
    added: list[int] = []

    def run(batch: Sequence[F]) -> list[int]:
        added.append(ledger.enqueue(batch, root, jobs, source, now))
        return []

    _split(files, run, _refused("enqueue"))
    return sum(added)


def unknown(ledger: Ledger, files: Sequence[F], jobs: Sequence[str]) -> list[int]:
    """``Ledger.unknown``, leaving out (and logging) any file it cannot look up."""
    return _split(files, lambda batch: ledger.unknown(batch, jobs), _refused("scan"))


def allowed(files: Sequence[Any], follows: Callable[[str], bool]) -> list[Any]:
    """The files whose path may be opened (see ``paths.refusal``); the others are logged
    and left out, as a scan leaves them out. ``follows(root)``: the watch's
    ``follow_symlinks``."""
    kept = []
    for f in files:
        try:
            reason = refusal(f.path, follow_symlinks=follows(f.root))
        except FileNotFoundError:
            continue  # gone since it settled: nothing to take
        except OSError:
            kept.append(f)  # cannot look (permissions): its job ends with the reason
            continue
        if reason is None:
            kept.append(f)
        else:
            log.info("file_ignored", file=f.path, reason=reason)
    return kept
