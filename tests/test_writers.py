"""A file a process still holds open for writing is not taken, whatever the settle time says:
the kernel is asked (a read lease) when a file found by a scan, or any file, has settled.
Where the lease cannot be asked, settle alone judges, as before, and /proc/locks shows the
writers that lock what they write."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ServiceProcess, env_for_subprocess, jobs, runs, wait_for, write_config
from dpypeline.watching.fsinfo import open_for_writing

HALF = 5000
NOBODY = 65534

# Writes half the file and holds it open (with an flock if asked, as netCDF-4/HDF5
# writers do) until a line comes on stdin; then writes the rest and closes it.
WRITER = """
import fcntl, os, sys
path, lock, owner = sys.argv[1], sys.argv[2] == "lock", int(sys.argv[3])
f = open(path, "wb")
if owner >= 0:
    os.fchown(f.fileno(), owner, owner)
if lock:
    fcntl.flock(f, fcntl.LOCK_EX)
f.write(b"a" * 5000)
f.flush()
print("ready", flush=True)
sys.stdin.readline()
f.write(b"b" * 5000)
f.close()
"""


class Writer:
    """A real writer process holding a half-written file open."""

    def __init__(self, path: Path, *, lock: bool = False, owner: int = -1) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), "lock" if lock else "-", str(owner)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "ready\n", "the writer did not start"

    def finish(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        assert self.proc.wait(10) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def writers() -> Iterator[list[Writer]]:
    started: list[Writer] = []
    yield started
    for w in started:
        w.kill()


def config(tmp_path: Path, inbox: Path, log: Path) -> Path:
    return write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "settle": "100ms", "rescan_interval": 0}],
            "jobs": [
                {"name": "work", "tasks": [{"task": "taskbox.record", "with": {"log": str(log)}}]}
            ],
            "logging": {"format": "json"},
        },
    )


def sizes(cfg: Path) -> list[tuple[str, int]]:
    return sorted((os.path.basename(j["path"]), j["size"]) for j in jobs(cfg))


@pytest.mark.slow
def test_a_file_held_open_by_its_writer_across_a_restart_is_taken_once_whole_after_close(
    tmp_path: Path, service_processes: list[ServiceProcess], writers: list[Writer]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    log = tmp_path / "runs.log"
    cfg = config(tmp_path, inbox, log)
    writers.append(writer := Writer(inbox / "held.nc"))  # at work before the service starts
    svc = ServiceProcess(cfg)
    service_processes.append(svc)
    # the start-up scan finds the file, silent for far longer than settle
    wait_for(
        lambda: runs(log) or svc.events("file_open_for_writing"),
        message="the half-written file to be judged",
        detail=svc.log.read_text,
    )
    assert runs(log) == [], f"a file still open for writing was taken: {sizes(cfg)}"
    [held] = svc.events("file_open_for_writing")
    assert (held["file"], held["size"]) == (str(inbox / "held.nc"), HALF)
    writer.finish()
    wait_for(lambda: runs(log), message="the whole file, after its writer closed it")
    assert [r[0] for r in runs(log)] == ["held.nc"]
    assert sizes(cfg) == [("held.nc", 2 * HALF)]
    assert len(svc.events("file_open_for_writing")) == 1  # said once, however often looked at
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0
    assert [r[0] for r in runs(log)] == ["held.nc"]


LEASELESS = ["setpriv", "--bounding-set=-lease"]


class LeaselessService(ServiceProcess):
    """``dpypeline run`` as root without CAP_LEASE (dropped from its capability bounding
    set): it may not take a lease on a file it does not own, as a service run as its own
    user may not on the files the instruments' users write."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.parent / "service.log"
        self._err = self.log.open("a")
        self.proc = subprocess.Popen(
            [*LEASELESS, sys.executable, "-m", "dpypeline", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            env=env_for_subprocess(),
        )


def _leaseless_possible() -> str | None:
    if os.geteuid() != 0:
        return "needs root to write files owned by another user (CI runs as root)"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux) to drop CAP_LEASE"
    return None


@pytest.mark.slow
def test_where_no_lease_may_be_taken_settle_alone_judges_but_a_locked_writer_is_seen(
    tmp_path: Path, service_processes: list[ServiceProcess], writers: list[Writer]
) -> None:
    reason = _leaseless_possible()
    if reason:
        pytest.skip(reason)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    log = tmp_path / "runs.log"
    cfg = config(tmp_path, inbox, log)
    writers.append(plain := Writer(inbox / "plain.nc", owner=NOBODY))
    writers.append(locking := Writer(inbox / "locking.nc", lock=True, owner=NOBODY))
    svc = LeaselessService(cfg)
    service_processes.append(svc)
    # the lease is refused (EACCES): the silent file is taken after settle, as ever
    wait_for(lambda: runs(log), message="the plain file, by settle", detail=svc.log.read_text)
    wait_for(lambda: svc.events("file_open_for_writing"), message="the locked file to be held")
    [refused] = svc.events("lease_unavailable")
    assert refused["error"] == os.strerror(13)  # EACCES
    assert [e["file"] for e in svc.events("file_open_for_writing")] == [str(inbox / "locking.nc")]
    assert sizes(cfg) == [("plain.nc", HALF)]
    locking.finish()
    plain.finish()
    wait_for(lambda: len(runs(log)) == 3, message="both whole files")
    assert sizes(cfg) == [("locking.nc", 2 * HALF), ("plain.nc", HALF), ("plain.nc", 2 * HALF)]
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0


def test_the_kernel_says_whether_a_file_is_open_for_writing(
    tmp_path: Path, writers: list[Writer]
) -> None:
    path = tmp_path / "f.nc"
    writers.append(writer := Writer(path))
    assert open_for_writing(str(path)) is True
    with path.open("rb"):  # readers do not count
        assert open_for_writing(str(path)) is True
    writer.finish()
    with path.open("rb"):
        assert open_for_writing(str(path)) is False
    assert open_for_writing(str(tmp_path / "gone.nc")) is None


def test_a_writer_opening_the_file_while_the_lease_is_held_does_not_end_the_service(
    tmp_path: Path,
) -> None:
    """The kernel breaks a lease with a signal to its holder, SIGIO by default, whose
    default action ends the process: a writer opening the file in the instant between
    open_for_writing's two calls must not end the service. Here the instant is held open:
    the lease is taken as open_for_writing takes it, and released only once the kernel
    has begun to break it for the writer (and signalled)."""
    path = tmp_path / "f.nc"
    path.write_bytes(b"x")
    code = f"""
import fcntl, os, subprocess, sys, time
from dpypeline.watching import fsinfo
fd = os.open({str(path)!r}, os.O_RDONLY)
fcntl.fcntl(fd, fcntl.F_SETSIG, fsinfo._LEASE_BREAK_SIGNAL)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
writer = subprocess.Popen([sys.executable, "-c", "open({str(path)!r}, 'ab').close()"])
while fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_UNLCK:  # broken: the signal is sent
    time.sleep(0.01)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
assert writer.wait(10) == 0
print("alive")
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=env_for_subprocess(),
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (0, "alive\n"), done.stderr
