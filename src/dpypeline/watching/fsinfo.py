"""What the kernel knows of a path: its filesystem, and whether a writer holds it open.

What kind of filesystem a path lives on is read from ``/proc/self/mountinfo``.

Two decisions depend on it. SQLite's write-ahead log needs shared memory and POSIX locks that
network filesystems do not provide reliably, so CACHE_DIR must be on a local disk
(:func:`require_local_filesystem`); JASMIN's group workspaces are NFS or Lustre mounts, and the
failure would otherwise show up weeks later as a corrupt queue. And inotify only reports changes
made through the local kernel, so a watch in ``mode: auto`` polls a network filesystem
(:func:`is_network_filesystem`).

The mount table is parsed by pure functions (:func:`parse_mountinfo`, :func:`mount_for`) so
that tests can feed it the lines of an NFS, Lustre or GPFS client without having one.

Whether a file is still open for writing is asked of the kernel with a read lease
(:func:`open_for_writing`): a file a writer paused on for longer than ``settle`` (or left
open across a restart of the service) would otherwise be taken half written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import structlog

from dpypeline.errors import StateError

__all__ = [
    "MOUNTINFO",
    "NETWORK_FILESYSTEMS",
    "Mount",
    "filesystem_type",
    "is_network_filesystem",
    "is_network_fstype",
    "mount_for",
    "open_for_writing",
    "parse_mountinfo",
    "require_local_filesystem",
]

MOUNTINFO = "/proc/self/mountinfo"
LOCKS = "/proc/locks"

log = structlog.stdlib.get_logger("dpypeline.watch")

#: Filesystem types whose files are shared with other machines (or served by a user-space
#: daemon). Every ``fuse`` and ``fuse.*`` type (sshfs, s3fs, gcsfuse, ...) counts as well.
NETWORK_FILESYSTEMS: frozenset[str] = frozenset(
    {
        "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "panfs", "ceph",
        "glusterfs", "beegfs", "9p", "afs", "coda", "ncpfs", "orangefs", "pvfs2",
    }
)  # fmt: skip

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of mountinfo: where a filesystem is mounted, its type and its source."""

    mount_point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` for a space, ``\\134`` for a backslash)."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse the text of ``/proc/<pid>/mountinfo`` (see proc(5)); malformed lines are skipped.

    A line reads ``ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
    SUPER_OPTIONS``; the number of optional fields varies, hence the search for `` - ``.
    """
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        mounts.append(
            Mount(
                mount_point=_unescape(fields[4]),
                fstype=_unescape(fields[sep + 1]),
                source=_unescape(fields[sep + 2]),
            )
        )
    return mounts


def mount_for(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount holding the absolute, symlink-free ``path``: the longest mount point above it.

    Of two mounts on the same point, the later one in the table hides the earlier one.
    """
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point
        inside = point in (path, "/") or path.startswith(point + "/")
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = mount
    return best


def _existing_real_path(path: str | os.PathLike[str]) -> str:
    """Absolute path with symlinks resolved, cut back to its nearest existing ancestor."""
    current = os.path.abspath(os.fspath(path))
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return os.path.realpath(current)


def filesystem_type(path: str | os.PathLike[str], mountinfo: str = MOUNTINFO) -> str:
    """The type of the filesystem holding ``path`` (``ext4``, ``nfs4``, ``fuse.sshfs``...).

    ``path`` need not exist yet: the answer is for the directory it would be created in.
    Returns ``"unknown"`` if the mount table cannot be read or lists no mount for it.
    """
    try:
        text = Path(mountinfo).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return "unknown"
    mount = mount_for(_existing_real_path(path), parse_mountinfo(text))
    return mount.fstype if mount is not None else "unknown"


def is_network_fstype(fstype: str) -> bool:
    """True for the types in :data:`NETWORK_FILESYSTEMS` and for every FUSE type."""
    return fstype in NETWORK_FILESYSTEMS or fstype == "fuse" or fstype.startswith("fuse.")


def is_network_filesystem(path: str | os.PathLike[str], mountinfo: str = MOUNTINFO) -> bool:
    """True if ``path`` is on a network (or FUSE) filesystem; False if local or unknown."""
    return is_network_fstype(filesystem_type(path, mountinfo))


def require_local_filesystem(
    path: str | os.PathLike[str], what: str, mountinfo: str = MOUNTINFO
) -> None:
    """Refuse, with :class:`StateError`, a state directory on a network filesystem.

    ``what`` names the setting in the message, e.g. ``"CACHE_DIR"``.
    """
    fstype = filesystem_type(path, mountinfo)
    if is_network_fstype(fstype):
        raise StateError(
            f"{what} {os.fspath(path)} is on a {fstype} filesystem; SQLite's write-ahead log is"
            " unsafe there and the queue could be corrupted. Put cache_dir (or $CACHE_DIR) on a"
            " local disk, e.g. /var/lib/dpypeline or ~/.local/state/dpypeline."
        )


# A lease is broken by the kernel with a signal to its holder, SIGIO unless told otherwise,
# and SIGIO's default action ends the process. A writer opening the file in the instant the
# lease is held must not kill the service: SIGURG is ignored unless a handler is installed.
_LEASE_BREAK_SIGNAL = signal.SIGURG
_refusals_told: set[tuple[int, int]] = set()  # (st_dev, errno) already logged


def open_for_writing(path: str, locks: str = LOCKS) -> bool | None:
    """Whether any process on this machine has ``path`` open for writing: True, False, or
    None when the kernel cannot be asked (then ``settle`` alone judges the file, as ever).

    The question is put as a read lease (fcntl(2) ``F_SETLEASE``), taken on a read-only
    descriptor and released at once: the kernel refuses it (EAGAIN) while any descriptor
    of the file is open for writing, whichever process holds it and whether or not it has
    written lately. A lease needs the service to own the file or to hold CAP_LEASE (root
    does), and a filesystem that grants leases (local ones do; NFS, FUSE and overlay may
    not; ``fs.leases-enable=0`` turns them off): otherwise the refusal (EACCES, EINVAL,
    ENOLCK...) is logged once per filesystem and cause, and the answer is None, unless
    ``/proc/locks`` shows a write lock on the file. That table lists locks, not open
    files, so it cannot say that nobody writes; but a writer that locks what it writes
    (netCDF-4/HDF5 do, with flock) is seen there by a service that may not take leases.
    Writers on other machines of a network filesystem are known to neither.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None  # gone or unreadable: the settle check or the job says so
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, _LEASE_BREAK_SIGNAL)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return True
        st = os.fstat(fd)
        _tell_refusal(path, st.st_dev, exc)
        return True if _write_locked(st, locks) else None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def _tell_refusal(path: str, dev: int, exc: OSError) -> None:
    key = (dev, exc.errno or 0)
    if key in _refusals_told:
        return
    _refusals_told.add(key)
    log.info(
        "lease_unavailable",
        file=path,
        fstype=filesystem_type(path),
        error=os.strerror(exc.errno or 0),
        action="files on this filesystem are judged complete by settle alone (and by"
        " /proc/locks); run the service as the files' owner or with CAP_LEASE, or give"
        " writers a settle longer than their pauses",
    )


def _write_locked(st: os.stat_result, locks: str = LOCKS) -> bool:
    """Whether ``locks`` (the kernel's table of file locks) holds a write lock on the file
    ``st`` describes. A line reads ``1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF``:
    the device as hex major:minor, then the inode; waiters (``->``) hold nothing yet."""
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open(locks, encoding="ascii", errors="replace") as table:
            for line in table:
                fields = line.split()
                held = len(fields) > 5 and fields[1] != "->" and fields[3] == "WRITE"
                if held and fields[5] == ident:
                    return True
    except OSError:
        return False
    return False
