"""When the service restarts itself, and how: the two faults only a fresh process mends."""

from __future__ import annotations

import os
import sys


class StuckJob(RuntimeError):
    """A job ignored its timeout; only a restart of the process can reclaim its thread."""


class ClusterLost(RuntimeError):
    """The Dask scheduler or cluster is gone; a restart reconnects to it or rebuilds it."""


def reexec() -> None:
    """Replace this process with a fresh copy of itself (same PID, same arguments)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
