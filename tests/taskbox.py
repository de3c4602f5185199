"""Tasks used by the tests' pipelines: each records every run it makes to a log file, and
behaves according to the file's name so one pipeline can mix good and bad inputs."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from dpypeline import JobContext
from dpypeline.errors import PermanentError, TransientError, Unavailable


def _record(log: str, context: JobContext) -> None:
    line = f"{context.relpath}\t{context.job_id}\t{context.attempt}\t{context.job}\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, os.fsencode(line))  # names need not be UTF-8
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


def record_gated(path: str, log: str, gate: str, context: JobContext | None = None) -> str:
    """As ``record``, once the file ``gate`` exists: a job that runs until the test lets
    it end, however busy the machine."""
    assert context is not None
    while not os.path.exists(gate):
        time.sleep(0.05)
    return record(path, log, context=context)


def record_held(path: str, log: str, context: JobContext | None = None) -> str:
    """As ``record``; but the first attempt on a file named ``*held*`` holds on for a
    minute first: a job surely running when the test strikes."""
    assert context is not None
    if "held" in os.path.basename(path) and context.attempt == 1:
        time.sleep(60)
    return record(path, log, context=context)


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


def read(path: str, log: str, context: JobContext | None = None) -> str:
    """Record the run with what the file holds (proof that the real file was opened)."""
    assert context is not None
    with open(path, "rb") as f:
        data = f.read()
    line = f"{context.relpath}\t{data.hex()}\n"
    with open(log, "ab") as out:
        out.write(os.fsencode(line))
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


def stamp(path: str, out: str, overtake: bool = False, context: JobContext | None = None) -> str:
    """Write "PID START END" to ``out/JOB_ID``. With ``overtake``, an odd job id ends this
    step only once the job queued after it has written its own (at most a minute): run side
    by side, the later job finishes first."""
    assert context is not None
    start = time.time()
    if overtake and context.job_id % 2:
        after = os.path.join(out, str(context.job_id + 1))
        deadline = time.monotonic() + 60
        while not os.path.exists(after) and time.monotonic() < deadline:
            time.sleep(0.01)
    with open(os.path.join(out, str(context.job_id)), "w") as f:
        f.write(f"{os.getpid()} {start} {time.time()}")
    return path


def fail_once(
    value: str, marks: str, match: str, delay: float = 0.0, context: JobContext | None = None
) -> str:
    """Raise a plain error on the first run for a file whose name contains ``match``
    (a transient fault: a full disk, a store that hung once), after ``delay`` seconds;
    run normally after."""
    assert context is not None
    name = os.path.basename(context.path)
    mark = os.path.join(marks, name + ".failed")
    if match in name and not os.path.exists(mark):
        time.sleep(delay)
        open(mark, "w").close()
        raise OSError(f"no space left writing {name}")
    return value


def broken_while(value: str, flag: str, match: str, context: JobContext | None = None) -> str:
    """A permanent error for a file whose name contains ``match``, while ``flag`` exists
    (a cause the operator fixes by removing it)."""
    assert context is not None
    name = os.path.basename(context.path)
    if match in name and os.path.exists(flag):
        raise PermanentError(f"{name} needs fixing")
    return value


def same_grid(ds: Any, reference: str) -> Any:
    """Refuse a dataset whose horizontal grid differs from ``reference``'s (a permanent error,
    as a store refuses a file of another grid)."""
    import numpy as np
    import xarray as xr

    with xr.open_dataset(reference) as ref:
        if "nav_lat" not in ds or not np.array_equal(ds["nav_lat"].values, ref["nav_lat"].values):
            raise PermanentError("wrong grid: nav_lat differs from the reference file's")
    return ds


def leak(path: str, storage_options: dict, context: JobContext | None = None) -> str:
    """Fails with secrets all around it: its options, the objectstore's credentials file and
    the environment's secret in local variables, the key id in its message (as S3 errors
    quote it), and it logs its options itself (a careless task)."""
    from dpypeline.config.credentials import load_credentials

    assert context is not None
    creds = load_credentials("store", context.objectstores["store"])
    file_secret, file_key = creds.secret, creds.key
    env_secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    assert file_secret
    assert env_secret
    context.log.warning("connecting", options=storage_options, using=file_key)
    raise PermissionError(f"access denied for key {storage_options['key']} ({env_secret!r})")


def work(path: str, log: str, seconds: float, context: JobContext | None = None) -> str:
    """Record the run after ``seconds`` of work in short waits, timed on the monotonic
    clock: a job that takes that long whatever the wall clock does, and that a timeout
    interrupts between two waits. The first attempt on a file named ``*flaky*`` fails."""
    assert context is not None
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        threading.Event().wait(0.02)
    _record(log, context)
    if "flaky" in os.path.basename(path) and context.attempt == 1:
        raise TransientError(f"flaky failure on attempt {context.attempt}")
    return path


def offset(ds: Any, variable: str, by: float) -> Any:
    """``variable`` plus ``by``: a correction a fixed config applies to the files it
    writes again."""
    return ds.assign({variable: ds[variable] + by})
