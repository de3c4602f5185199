"""Inotify watch limits without touching the machine's: a process in a user namespace of its
own has its watches counted there as well, under that namespace's limit
(/proc/sys/user/max_inotify_watches as seen from inside, Linux 4.9+). A test lowers that one,
so every other process on the machine (other tests, other checkouts) keeps its watches.

Run as ``python userns.py PID`` inside a namespace (``in_namespace_of``), it prints the watches
in use there.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# what a process sees here is the limit of its own user namespace
USER_WATCHES = Path("/proc/sys/user/max_inotify_watches")


def own_user_namespace(watches: int | None = None) -> list[str]:
    """A command prefix: what follows runs in a new user namespace (root mapped to root,
    files and signals as before), its watch limit lowered to ``watches`` first if given.
    The command is exec'd: its pid is the one Popen returns."""
    lower = f"echo {watches} > {USER_WATCHES} && " if watches is not None else ""
    return ["unshare", "--user", "--map-root-user", "sh", "-c", f'{lower}exec "$@"', "sh"]


def in_namespace_of(pid: int, *cmd: str) -> str:
    """Run ``cmd`` in the user namespace of process ``pid``; its output."""
    return subprocess.run(
        ["nsenter", "--user", f"--target={pid}", *cmd],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def watches_in_use(pid: int) -> int:
    """The inotify watches counted in the user namespace of process ``pid``."""
    return int(in_namespace_of(pid, sys.executable, __file__))


def lower_watch_limit(pid: int, limit: int) -> None:
    """Set the watch limit of the user namespace of process ``pid``."""
    in_namespace_of(pid, "sh", "-c", f"echo {limit} > {USER_WATCHES}")


def require_user_namespaces() -> None:
    """Skip unless this machine lets a process make a user namespace and enter it."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs unshare and nsenter (util-linux)")
    probe = subprocess.run(
        [*own_user_namespace(watches=8), "cat", str(USER_WATCHES)],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0 or probe.stdout.strip() != "8":
        pytest.skip(f"user namespaces with their own inotify limits are not available: {probe}")


def _in_use_here() -> int:
    """Watches counted in this process's user namespace, as the kernel counts them against
    its limit: one less than the lowest limit under which a watch can still be added (a
    binary search, the limit put back after). Adding up the watches listed in
    /proc/*/fdinfo miscounts: an inotify instance shared by processes (a fork inherits it)
    is listed once per process."""
    from watchdog.observers import inotify_c

    old = USER_WATCHES.read_text()
    fd = inotify_c.inotify_init()
    assert fd >= 0, f"no inotify instance: {os.strerror(ctypes.get_errno())}"

    def room_under(limit: int) -> bool:
        USER_WATCHES.write_text(str(limit))
        wd = inotify_c.inotify_add_watch(fd, b"/", inotify_c.InotifyConstants.IN_DELETE_SELF)
        if wd < 0:
            assert ctypes.get_errno() == errno.ENOSPC, os.strerror(ctypes.get_errno())
            return False
        inotify_c.inotify_rm_watch(fd, wd)
        return True

    try:
        low, high = 1, int(old)  # the lowest limit with room is in [low, high]
        if not room_under(high):
            return high
        while low < high:
            mid = (low + high) // 2
            if room_under(mid):
                high = mid
            else:
                low = mid + 1
        return low - 1
    finally:
        os.close(fd)
        USER_WATCHES.write_text(old)


if __name__ == "__main__":
    print(_in_use_here())
