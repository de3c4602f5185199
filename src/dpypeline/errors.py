"""The exceptions of dpypeline: one base class, failure kinds as types.

The worker decides what to do with a failed job from the exception's type alone:
``PermanentError`` ends the job ``dead`` at once, ``SkipFile`` ends it ``skipped``,
anything else is treated as transient and retried with backoff until
``retry.max_attempts``.
"""

from __future__ import annotations


class DpypelineError(Exception):
    """Base class of every error dpypeline raises on purpose."""


class ConfigError(DpypelineError):
    """The pipeline configuration is invalid; the message names the field and line.

    Start-up stops with exit code 2 (a restart would not help).
    """


class StateError(DpypelineError):
    """CACHE_DIR or its database cannot be used (network filesystem, permissions, corruption)."""


class LedgerRefused(StateError):
    """The ledger is damaged or lost (a CACHE_DIR that held one has none, or its write-ahead
    log is missing or damaged): carrying on would process files again. Start-up stops before
    READY with exit code 4, which the systemd units do not restart, and the message says
    how to restore a backup or start over."""


class TaskError(DpypelineError):
    """Base for failures raised from task code."""


class PermanentError(TaskError):
    """Retrying cannot help (corrupt input, schema mismatch, bad credentials): ``dead`` at once."""


class TransientError(TaskError):
    """Retrying later may help (network, throttling): the job waits out its backoff."""


class SkipFile(TaskError):
    """The file should not be processed (vanished, superseded): the job ends ``skipped``."""


class JobTimeout(BaseException):
    """Raised inside a job that ran past ``retry.job_timeout``.

    It derives from BaseException so that task code with a broad ``except Exception``
    cannot swallow it.
    """


class Unavailable(TransientError):
    """A service the job needs (the object store, say) is unreachable: an outage, not the
    file's fault. The job goes back to the queue without spending an attempt, and the worker
    pauses, with growing waits, until the service answers again."""


class Replaced(DpypelineError, NotImplementedError):
    """A part of the original dpypeline's API that this one does not carry; the message
    names what replaces it."""
