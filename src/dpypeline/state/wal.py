"""SQLite's write-ahead log, read to see what SQLite would drop from it.

The log (https://www.sqlite.org/fileformat.html#the_write_ahead_log) is a 32-byte header
(magic, version, page size, checkpoint sequence, salt-1, salt-2, two checksum words), then
frames: a 24-byte header (page number, database size after the commit or 0 when the frame
does not end one, salt-1, salt-2, two checksum words) and a page. Each frame's checksum
carries on from the one before. SQLite reads the frames in order and stops at the first
whose salts or checksum do not match; what it accepted ends at ``mxFrame`` in the header of
the wal-index (``-shm``, https://www.sqlite.org/walformat.html). SQLite writes a frame
header and its page with two writes, so a crash leaves at most a frame header at the end,
and never a valid commit frame after a bad frame: when there is one, the log is damaged and
SQLite would drop committed transactions.
"""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Callable
from pathlib import Path
from sqlite3 import Connection

from dpypeline.errors import LedgerRefused

HEADER, FRAME_HEADER = 32, 24
MAGIC = (0x377F0682, 0x377F0683)  # checksums of little- / big-endian words
MASK = 0xFFFFFFFF
RECHECKS, RECHECK_EVERY = 20, 0.05  # a damaged log stays damaged for a second

Refuse = Callable[[Path, str], LedgerRefused]  # (the database, what is wrong) → the error


def log_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + "-wal")


def index_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + "-shm")


def check_log(db_path: Path, left_open: bool, refuse: Refuse) -> None:
    """Before SQLite opens it: the log is there when the ledger was left open (the database
    header says so), has a header, and does not end mid-frame where no write ends."""
    log = log_path(db_path)
    try:
        size = log.stat().st_size
    except FileNotFoundError:
        size = None
    if not size:
        if left_open:
            state = "empty" if size == 0 else "missing"
            raise refuse(
                db_path,
                f"its write-ahead log {log.name} is {state}, yet the service did not close the"
                " ledger (it was killed, or the machine stopped): the jobs recorded since its"
                " last checkpoint were in the log. To go on from the database file as it is"
                " instead (the files of those jobs are processed again), run"
                f" `dpypeline ledger restore {db_path}`",
            )
        return
    try:
        with log.open("rb") as f:
            head = f.read(HEADER)
    except FileNotFoundError:
        return  # checkpointed and removed by its last connection since the stat: nothing lost
    magic, _, page_size = struct.unpack(">3I", head[:12]) if len(head) == HEADER else (0, 0, 0)
    if magic not in MAGIC or page_size < 512:
        raise refuse(db_path, f"its write-ahead log {log.name} has no valid header")
    cut = (size - HEADER) % (FRAME_HEADER + page_size)
    # a write killed midway ends where the kernel stopped copying: on a memory page boundary
    if cut not in (0, FRAME_HEADER) and size % mmap.PAGESIZE:
        raise refuse(
            db_path,
            f"its write-ahead log {log.name} is cut short ({size} bytes, {cut} into a frame):"
            " SQLite would drop the transactions at its end",
        )


def check_frames(db: Connection, db_path: Path, refuse: Refuse) -> None:
    """After SQLite read the log, before anything writes to it: no committed transaction
    lies beyond what SQLite accepted. ``db`` is read-only: a commit being written as this
    reads is published by its writer within moments, so what looks dropped is read again
    a few times before it is called damage."""
    log = log_path(db_path)
    dropped = None
    for _ in range(RECHECKS):
        if not log.exists() or log.stat().st_size <= HEADER:
            return
        db.execute("BEGIN")
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads the log
            accepted = _max_frame(index_path(db_path))
            dropped = _dropped(log, accepted) if accepted is not None else None
        finally:
            db.execute("ROLLBACK")
        if dropped is None:
            return
        time.sleep(RECHECK_EVERY)
    if dropped is None:  # no pass ran (RECHECKS is 0)
        return
    first, last, count = dropped
    raise refuse(
        db_path,
        f"its write-ahead log {log.name} is damaged at frame {first} of {count}: SQLite"
        f" would drop it and every later one, with the transactions committed up to"
        f" frame {last}",
    )


def _max_frame(index: Path) -> int | None:
    """``mxFrame`` of the wal-index header (two copies, native byte order); None when
    unreadable or the copies differ."""
    try:
        with index.open("rb") as f:
            raw = f.read(96)
    except FileNotFoundError:
        return None
    if len(raw) < 96 or raw[:48] != raw[48:96]:
        return None
    _, _, _, is_init, _, _, max_frame = struct.unpack("=IIIBBHI", raw[:20])
    return int(max_frame) if is_init else None


def _dropped(log: Path, accepted: int) -> tuple[int, int, int] | None:
    """(the first frame SQLite did not accept, the last valid commit frame after it, the
    frames in the log), or None when no committed transaction lies beyond ``accepted``."""
    with log.open("rb") as f:
        magic, _, page_size, _, salt1, salt2, *seed = struct.unpack(">8I", f.read(HEADER))
        frame = FRAME_HEADER + page_size
        f.seek(0, 2)
        count = (f.tell() - HEADER) // frame

        def frame_at(n: int, length: int) -> bytes:
            f.seek(HEADER + (n - 1) * frame)
            return f.read(length)

        last = 0
        for n in range(accepted + 1, count + 1):
            _, commit, s1, s2 = struct.unpack(">4I", frame_at(n, 16))
            if commit and (s1, s2) == (salt1, salt2):
                last = n
        if not last:
            return None
        if last > 1:
            seed = list(struct.unpack(">2I", frame_at(last - 1, FRAME_HEADER)[16:]))
        data = frame_at(last, frame)
    valid = _checksum(data[:8] + data[24:], seed, magic & 1) == struct.unpack(">2I", data[16:24])
    return (accepted + 1, last, count) if valid else None


def _checksum(data: bytes, seed: list[int], big_endian: int) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    s0, s1 = seed
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & MASK
        s1 = (s1 + words[i + 1] + s0) & MASK
    return s0, s1
