"""Tasks used by the tests' pipelines: each records every run it makes to a log file, and
behaves according to the file's name so one pipeline can mix good and bad inputs."""

from __future__ import annotations

import os
import signal
import threading
import time

from dpypeline import JobContext
from dpypeline.errors import PermanentError, TransientError, Unavailable


def _record(log: str, context: JobContext) -> None:
    line = f"{context.relpath}\t{context.job_id}\t{context.attempt}\t{context.job}\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def record(path: str, log: str, delay: float = 0.0, context: JobContext | None = None) -> str:
    """Record the run; sleep ``delay`` first (a job that takes time)."""
    assert context is not None
    if delay:
        time.sleep(delay)
    _record(log, context)
    return path


def behave(path: str, log: str, context: JobContext | None = None) -> str:
    """By file name: ``crash`` kills the process, ``hang`` blocks forever where no
    exception can reach it, ``spin`` loops in Python, ``flaky`` fails its first two
    attempts, ``bad`` raises a plain error, ``corrupt`` a permanent one."""
    assert context is not None
    name = os.path.basename(path)
    if "crash" in name:
        os.kill(os.getpid(), signal.SIGKILL)
    if "hang" in name:
        threading.Event().wait()
    if "spin" in name:
        while True:
            pass
    if "flaky" in name and context.attempt < 3:
        raise TransientError(f"flaky failure on attempt {context.attempt}")
    if "bad" in name:
        raise ValueError(f"cannot make sense of {name}")
    if "corrupt" in name:
        raise PermanentError(f"{name} is corrupt")
    _record(log, context)
    return path


def needs_service(path: str, log: str, down: str, context: JobContext | None = None) -> str:
    """Raise Unavailable while the file ``down`` exists (a service outage)."""
    assert context is not None
    if os.path.exists(down):
        raise Unavailable("object store unreachable (connection refused)")
    _record(log, context)
    return path


def noop(path: str) -> str:
    return path


def pause(seconds: float) -> None:
    """A setup task that takes its time (a slow start-up)."""
    time.sleep(seconds)


def try_write(path: str, log: str, context: JobContext | None = None) -> str:
    """Record whether a file can be written next to the input (a sandbox should say no)."""
    assert context is not None
    try:
        with open(path + ".written", "w") as out:
            out.write("x")
        outcome = "written"
    except OSError as exc:
        outcome = exc.strerror or type(exc).__name__
    with open(log, "a") as out:
        out.write(f"{context.relpath}\t{outcome}\n")
    return path


def killable(path: str, log: str, pids: str, context: JobContext | None = None) -> str:
    """The first run on a file writes "PID SLURM_JOB_ID" to ``pids/NAME.pid`` and waits to
    be killed; every later run records itself."""
    assert context is not None
    target = os.path.join(pids, os.path.basename(path) + ".pid")
    if not os.path.exists(target):
        with open(target + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {os.environ.get('SLURM_JOB_ID', '-')}")
        os.replace(target + ".tmp", target)
        time.sleep(60)
    _record(log, context)
    with open(os.path.join(pids, os.path.basename(path) + ".ran"), "w") as f:
        f.write(os.environ.get("SLURM_JOB_ID", "-"))
    return path


def burn(path: str, seconds: float = 0.2) -> str:
    """Hold the CPU (and the GIL) for ``seconds``: a CPU-bound job."""
    deadline = time.process_time() + seconds
    x = 0
    while time.process_time() < deadline:
        x += 1
    return path


def stamp(path: str, out: str, context: JobContext | None = None) -> str:
    """Write "PID START END" to ``out/JOB_ID``; odd job ids take 0.3 s, so a job often
    finishes this step before the job queued ahead of it."""
    assert context is not None
    start = time.time()
    if context.job_id % 2:
        time.sleep(0.3)
    with open(os.path.join(out, str(context.job_id)), "w") as f:
        f.write(f"{os.getpid()} {start} {time.time()}")
    return path


def leak(path: str, storage_options: dict, context: JobContext | None = None) -> str:
    """Fails with secrets all around it: its options, the objectstore's credentials file and
    the environment's secret in local variables, the key id in its message (as S3 errors
    quote it), and it logs its options itself (a careless task)."""
    from dpypeline.objectstore import load_credentials

    assert context is not None
    creds = load_credentials("store", context.objectstores["store"])
    file_secret, file_key = creds.secret, creds.key
    env_secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    assert file_secret
    assert env_secret
    context.log.warning("connecting", options=storage_options, using=file_key)
    raise PermissionError(f"access denied for key {storage_options['key']} ({env_secret!r})")
