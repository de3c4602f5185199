"""What kind of filesystem a path lives on, read from ``/proc/self/mountinfo``.

Two decisions depend on it. SQLite's write-ahead log needs shared memory and POSIX locks that
network filesystems do not provide reliably, so CACHE_DIR must be on a local disk
(:func:`require_local_filesystem`); JASMIN's group workspaces are NFS or Lustre mounts, and the
failure would otherwise show up weeks later as a corrupt queue. And inotify only reports changes
made through the local kernel, so a watch in ``mode: auto`` polls a network filesystem
(:func:`is_network_filesystem`).

The mount table is parsed by pure functions (:func:`parse_mountinfo`, :func:`mount_for`) so
that tests can feed it the lines of an NFS, Lustre or GPFS client without having one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dpypeline.errors import StateError

__all__ = [
    "MOUNTINFO",
    "NETWORK_FILESYSTEMS",
    "Mount",
    "filesystem_type",
    "is_network_filesystem",
    "is_network_fstype",
    "mount_for",
    "parse_mountinfo",
    "require_local_filesystem",
]

MOUNTINFO = "/proc/self/mountinfo"

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
