"""A bad input never takes the service down: a running service, fed every kind of bad file
and name an operator meets, stays up, does every good file, and ends each bad one dead or
skipped with a reason, or leaves it alone (not a regular file, a link, not matching).

The service loop runs in a thread of this process: an input that took it down would end
the loop (or this very process) as it would end ``dpypeline run``. Unreadable files are
also tried with a real process, one that runs without the capabilities that let root read
them: a process's capabilities cannot be dropped for a thread of this one."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ROOT, ServiceThread, cli, jobs, status, wait_for, write_config
from dpypeline.paths import shown

NEMO = ROOT / "examples" / "data" / "nemo-gyre"
GRID_T = NEMO / "nemo4.0-GYRE_1y_00010101_00011230_grid_T.nc"
GRID_U = NEMO / "nemo4.0-GYRE_1y_00010101_00011230_grid_U.nc"
GARBAGE = b"this is not NetCDF\n" * 10


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


def _symlink(target: Callable[[Path], Path]) -> Callable[[Path], None]:
    return lambda p: p.symlink_to(target(p))


def _renamed_link(target: Path) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        staging = p.parent.parent.parent / f"staging-{p.parent.name}"
        staging.symlink_to(target)
        staging.rename(p)

    return make


def _unreadable(p: Path) -> None:
    p.write_bytes(GARBAGE)
    p.chmod(0)


def _in_unreadable_dir(p: Path) -> None:
    p.parent.mkdir()
    p.write_bytes(GARBAGE)
    p.parent.chmod(0)


def _mtime(ns: int) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        p.write_bytes(GARBAGE)
        os.utime(p, ns=(ns, ns))

    return make


def _sparse(p: Path) -> None:
    with p.open("wb") as f:
        f.truncate(1 << 30)  # 1 GiB of holes


def _in_dir(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    def inner(p: Path) -> None:
        p.parent.mkdir(exist_ok=True)
        make(p)

    return inner


# name (relative to one test directory), how to make it, and how it must end:
# "done", "dead" (with a reason), "skipped", "ignored" (no job at all) or "refused" (no job,
# and the log says why)
KINDS: list[tuple[str, Callable[[Path], None], str]] = [
    ("good1.nc", lambda p: shutil.copy(GRID_T, p), "done"),
    ("sub/good2.nc", _in_dir("sub", lambda p: shutil.copy(GRID_T, p)), "done"),
    ("hardlink.nc", lambda p: os.link(p.parent / "good1.nc", p), "done"),
    ("empty.nc", _write(b""), "dead"),
    ("truncated.nc", _write(GRID_T.read_bytes()[:5000]), "dead"),
    ("corrupt.nc", _write(b"CDF\x01" + os.urandom(4000)), "dead"),
    ("hdf5-header-only.nc", _write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100), "dead"),
    ("text.nc", _write(GARBAGE), "dead"),
    ("wrong-grid.nc", lambda p: shutil.copy(GRID_U, p), "dead"),
    ("sparse-1GiB.nc", _sparse, "dead"),
    (os.fsdecode(b"bad\xff.nc"), _write(GARBAGE), "dead"),
    (os.fsdecode(b"latin1-\xe9t\xe9.nc"), lambda p: shutil.copy(GRID_T, p), "dead"),
    (os.fsdecode(b"d\xfe/in-bad-dir.nc"), _in_dir("", _write(GARBAGE)), "dead"),
    ("x" * 252 + ".nc", _write(GARBAGE), "dead"),  # 255 bytes: the longest name
    ("new\nline.nc", _write(GARBAGE), "dead"),
    ('tab\tcr\rquote"back\\slash.nc', _write(GARBAGE), "dead"),
    ("   .nc", _write(GARBAGE), "dead"),
    ("-rf.nc", _write(GARBAGE), "dead"),
    ("[glob]*?.nc", _write(GARBAGE), "dead"),
    ("🌊 wave.nc", _write(GARBAGE), "dead"),
    ("year-2100.nc", _mtime(4_102_444_800 * 10**9), "dead"),
    # year 2360: more nanoseconds than SQLite's integers hold, so no job can be recorded
    ("year-2360.nc", _mtime(4_102_444_800 * 10**9 * 3), "refused"),
    ("before-1970.nc", _mtime(-86_400 * 10**9), "dead"),
    ("unreadable.nc", _unreadable, "dead"),  # root reads it anyway: garbage, dead
    ("locked/in-unreadable-dir.nc", _in_unreadable_dir, "dead"),
    ("fifo.nc", os.mkfifo, "ignored"),
    ("chardev.nc", lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3)), "ignored"),
    ("loop.nc", _symlink(lambda p: p), "ignored"),
    ("dangling.nc", _symlink(lambda p: p.parent / "nowhere"), "ignored"),
    ("alias.nc", _symlink(lambda p: p.parent / "good1.nc"), "ignored"),
    ("dirloop", _symlink(lambda p: p.parent), "ignored"),
    ("a-directory.nc", lambda p: p.mkdir(), "ignored"),
    ("UPPER.NC", lambda p: shutil.copy(GRID_T, p), "ignored"),  # patterns are case-sensitive
    (".hidden.nc", lambda p: shutil.copy(GRID_T, p), "ignored"),
    ("partial.nc.part", _write(GARBAGE), "ignored"),
    ("vanished.nc", lambda p: (p.write_bytes(GARBAGE), p.unlink()), "ignored"),
]


def make_all(directory: Path, secret: Path) -> dict[str, str]:
    """Every kind in ``directory``; returns the expected end of each (shown path -> end)."""
    directory.mkdir()
    kinds = [*KINDS, ("credentials.nc", _renamed_link(secret), "ignored")]
    expected = {}
    for name, make, end in kinds:
        make(directory / name)
        expected[shown(str(directory / name))] = end
    return expected


@pytest.mark.slow
def test_a_running_service_survives_every_kind_of_bad_input_and_does_every_good_file(
    tmp_path: Path, service_threads: list[ServiceThread]
) -> None:
    if os.getuid() != 0:
        pytest.skip("makes a device file and reads chmod 000 files as root")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    secret = tmp_path / "credentials.json"
    secret.write_text('{"token": "t", "secret": "s"}')
    secret.chmod(0o600)
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "patterns": ["**/*.nc"], "settle": "200ms"}],
            "retry": {"max_attempts": 2, "backoff": {"initial": "100ms", "max": "200ms"}},
            "jobs": [
                {
                    "name": "ingest",
                    "tasks": [
                        {"task": "open_dataset"},
                        {"task": "taskbox.same_grid", "with": {"reference": str(GRID_T)}},
                    ],
                }
            ],
            "logging": {"format": "json"},
        },
    )
    expected = make_all(inbox / "before", secret)  # found by the start-up scan
    svc = ServiceThread(cfg)
    service_threads.append(svc)
    svc.wait_ready()
    expected |= make_all(inbox / "after", secret)  # seen by inotify
    junk = inbox / "after" / "junk"
    junk.mkdir()
    for i in range(10_000):  # matching no pattern
        (junk / f"junk{i}.txt").write_bytes(b"j")
    jobbed = {e: end for e, end in expected.items() if end not in ("ignored", "refused")}

    def ended() -> dict[str, str]:
        return {
            j["path"]: j["state"] for j in jobs(cfg) if j["state"] in ("done", "dead", "skipped")
        }

    wait_for(
        lambda: not svc.running() or set(ended()) >= set(jobbed),
        timeout=120,
        interval=0.5,
        message="every file to end",
        detail=lambda: f"{sorted(set(jobbed) - set(ended()))}\n{svc.log_text()[-3000:]}",
    )
    assert svc.running(), svc.log_text()[-5000:]
    report = status(cfg)
    assert report["service_pid"] == svc.pid
    assert report["queued"] == report["running"] == report["retrying"] == 0
    listed = jobs(cfg)
    assert {j["path"]: j["state"] for j in listed} == jobbed
    for j in listed:
        if j["state"] != "done":
            assert j["error"], j
    refused = {e["file"] for e in svc.events() if e.get("event") == "file_refused"}
    assert refused == {e for e, end in expected.items() if end == "refused"}
    # the link to the service's credentials was never opened as an input
    assert not any(j["path"].endswith("credentials.nc") for j in listed)
    svc.stop()
    assert svc.wait(30) == 0
    # the unreadable directory, back to normal for tmp_path's clean-up
    for d in ("before", "after"):
        (inbox / d / "locked").chmod(0o755)
    assert cli("status", "-c", str(cfg)).returncode == 0


@pytest.mark.slow
def test_unreadable_files_and_directories_end_dead_or_logged_when_permissions_really_apply(
    tmp_path: Path,
) -> None:
    """Root reads a chmod 000 file anyway: the service runs here without the capabilities
    that let it (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), as an
    unprivileged service user would. An unreadable file ends dead with the reason, an
    unreadable directory is logged and skipped, the good file is done, the run ends."""
    import subprocess

    from conftest import env_for_subprocess

    setpriv = shutil.which("setpriv")
    if os.getuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv (util-linux) to drop the override capabilities")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(GRID_T, inbox / "good.nc")
    _unreadable(inbox / "unreadable.nc")
    _in_unreadable_dir(inbox / "locked" / "inside.nc")
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "patterns": ["**/*.nc"], "settle": "200ms"}],
            "retry": {"max_attempts": 2, "backoff": {"initial": "100ms"}},
            "jobs": [{"name": "ingest", "tasks": [{"task": "open_dataset"}]}],
            "logging": {"format": "json"},
        },
    )
    drop = "-dac_override,-dac_read_search"
    unprivileged = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", "--"]
    proc = subprocess.run(
        [*unprivileged, sys.executable, "-m", "dpypeline", "run", "--once", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_for_subprocess(),
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]  # ran to the end; a job ended dead
    states = {Path(j["path"]).name: j for j in jobs(cfg)}
    assert states["good.nc"]["state"] == "done"
    assert states["unreadable.nc"]["state"] == "dead"
    assert "permission denied" in states["unreadable.nc"]["error"]
    assert states["unreadable.nc"]["attempts"] == 1  # permanent: no retry
    assert "inside.nc" not in states  # its directory cannot be listed: logged, not fatal
    assert "locked" in proc.stderr
    assert '"service_failed"' not in proc.stderr
