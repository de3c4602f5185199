"""CACHE_DIR itself: where it may live, who may read it, and which process owns it.

Everything the service knows lives in SQLite under CACHE_DIR, and SQLite's write-ahead log
is unsafe on network filesystems (where JASMIN's group workspaces are), so such a CACHE_DIR
is refused. The directory is private to its owner (0700): the CLI and the service share the
state through it and nothing else. One service per CACHE_DIR, enforced by a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any

from dpypeline.errors import StateError
from dpypeline.watching.fsinfo import require_local_filesystem

DB_FILE = "dpypeline.db"


def prepare_cache_dir(cache_dir: Path) -> None:
    """Create CACHE_DIR private to its owner, and refuse one on a network filesystem."""
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    require_local_filesystem(cache_dir, "CACHE_DIR")
    info = cache_dir.stat()
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
        cache_dir.chmod(0o700)


def lock_service(cache_dir: Path) -> int:
    """Hold an exclusive lock on CACHE_DIR for the life of the service process: two
    services on one CACHE_DIR would run every job twice. The kernel drops it at exit."""
    fd = os.open(cache_dir / "service.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateError(
            f"another dpypeline service (pid {holder}) is already using CACHE_DIR {cache_dir};"
            " stop it first, or give this pipeline its own cache_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def service_pid(cache_dir: Path) -> int | None:
    """The pid of the service using CACHE_DIR, or None when none runs."""
    try:
        fd = os.open(Path(cache_dir) / "service.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
    return None


EXECUTOR_FILE = "executor.json"


def write_executor_status(cache_dir: Path, info: dict[str, Any]) -> None:
    """What the service's executor looks like now (cluster address, workers, jobs in
    flight), for ``dpypeline status``; replaced atomically, removed when the service stops."""
    path = Path(cache_dir) / EXECUTOR_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, default=str))
    os.replace(tmp, path)


def read_executor_status(cache_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(cache_dir) / EXECUTOR_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def forget_executor_status(cache_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(cache_dir) / EXECUTOR_FILE).unlink()
