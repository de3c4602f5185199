"""An inotify queue overflow must lead to a rescan, never to silence, whatever the log level
and whatever watchdog makes of it (6.0 drops it silently, 7.x logs a warning)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from watchdog.observers import inotify_c

from conftest import ServiceProcess, jobs, runs, status, wait_for, write_config
from dpypeline.config.model import WatchConfig
from dpypeline.watching import overflow
from dpypeline.watching.observations import Overflow, Writing
from dpypeline.watching.watch import Inbox, Watcher, build_specs
from test_service import SETTLE, Harness, make  # noqa: F401 - the fixture
from userns import (
    lower_watch_limit,
    own_user_namespace,
    require_user_namespaces,
    watches_in_use,
)

MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.fixture
def tiny_inotify_queue() -> Iterator[Callable[[], None]]:
    """Shrink the kernel's per-instance event queue. It is read when an inotify instance is
    made: the test puts it back (the function yielded) once its service's instance exists,
    so that the machine has it for a second, not for the whole test."""
    if not os.access(MAX_QUEUED, os.W_OK):
        pytest.skip(f"needs root to lower {MAX_QUEUED} (CI runs as root)")
    old = MAX_QUEUED.read_text()

    def restore() -> None:
        MAX_QUEUED.write_text(old)

    MAX_QUEUED.write_text("16")
    try:
        yield restore
    finally:
        restore()


@pytest.mark.slow
@pytest.mark.machine_wide
@pytest.mark.xdist_group("machine_wide")
@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_inotify_overflow_triggers_a_rescan_and_no_file_is_lost_at_every_log_level(
    tmp_path: Path,
    tiny_inotify_queue: Callable[[], None],
    service_processes: list[ServiceProcess],
    level: str,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    log = tmp_path / "runs.log"
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "settle": "100ms", "rescan_interval": 0}],
            "jobs": [
                {"name": "work", "tasks": [{"task": "taskbox.record", "with": {"log": str(log)}}]}
            ],
            "logging": {"format": "json", "level": level},
        },
    )
    svc = ServiceProcess(cfg)
    service_processes.append(svc)
    # above "info" the service says nothing when it is ready: a first file done proves it
    (inbox / "probe.nc").write_bytes(b"x")
    wait_for(lambda: runs(log), message="the first file", detail=svc.log.read_text)
    tiny_inotify_queue()  # the service's inotify instance has its tiny queue by now
    svc.signal(signal.SIGSTOP)  # events pile up in the kernel while nobody reads them
    n = 300
    for i in range(n):
        (inbox / f"f{i}.nc").write_bytes(b"x")
    svc.signal(signal.SIGCONT)
    # with no periodic rescan, only the rescan after the overflow finds the lost files
    wait_for(
        lambda: len(runs(log)) == n + 1,
        timeout=60,
        message="every file after the overflow",
        detail=svc.log.read_text,
    )
    events = [e["event"] for e in svc.events()]
    assert ("watch_overflow" in events) == (level != "error")  # a warning
    assert status(cfg)["done"] == n + 1
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0


def _parse(*events: tuple[int, int]) -> list[tuple[object, ...]]:
    """What watchdog's reader makes of these raw (wd, mask) events."""
    raw = b"".join(struct.pack("iIII", wd, mask, 0, 0) for wd, mask in events)
    reader = getattr(inotify_c, "InotifyFD", None) or inotify_c.Inotify  # type: ignore[attr-defined]
    return list(reader._parse_event_buffer(raw))


def test_the_kernels_overflow_event_reaches_the_service_whatever_watchdog_does_with_it() -> None:
    """The hook sits where watchdog parses the raw events read from the kernel."""
    seen: list[int] = []

    def listener() -> None:
        seen.append(1)

    overflow.install()
    overflow.listen(listener)
    try:
        _parse((1, 0x100))  # IN_CREATE
        assert seen == []
        assert len(_parse((1, 0x100), (-1, overflow.IN_Q_OVERFLOW), (1, 0x8))) == 3
        assert seen == [1]
    finally:
        overflow.unlisten(listener)
    _parse((-1, overflow.IN_Q_OVERFLOW))
    assert seen == [1]


def test_watchdog_is_hooked_once_however_often_it_is_set_up_and_watchers_start(
    tmp_path: Path,
) -> None:
    overflow.install()
    overflow.install()
    reader = getattr(inotify_c, "InotifyFD", None) or inotify_c.Inotify  # type: ignore[attr-defined]
    hook = reader._parse_event_buffer
    assert hook.notices_overflow
    assert not getattr(hook.__wrapped__, "notices_overflow", False)  # no hook in a hook
    inboxes = [Inbox(), Inbox()]
    watchers = [Watcher(build_specs([WatchConfig(path=tmp_path)]), inbox) for inbox in inboxes]
    try:
        for watcher in watchers:
            watcher.start()
        assert reader._parse_event_buffer is hook
        _parse((-1, overflow.IN_Q_OVERFLOW))
        for inbox in inboxes:
            assert [o.kind for o in inbox.drain() if o.kind == "overflow"] == ["overflow"]
    finally:
        for watcher in watchers:
            watcher.stop()
    _parse((-1, overflow.IN_Q_OVERFLOW))  # stopped watchers hear nothing
    assert [o for inbox in inboxes for o in inbox.drain() if o.kind == "overflow"] == []


def test_listening_without_the_hook_installed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    reader = getattr(inotify_c, "InotifyFD", None) or inotify_c.Inotify  # type: ignore[attr-defined]
    overflow.install()
    unhooked = reader._parse_event_buffer.__wrapped__
    monkeypatch.setattr(reader, "_parse_event_buffer", staticmethod(unhooked))
    with pytest.raises(RuntimeError, match="install"):
        overflow.listen(lambda: None)


HOLDER = """
import os, sys, time
from watchdog.observers import inotify_c
fd = inotify_c.inotify_init()
for d in sys.argv[1:]:
    assert inotify_c.inotify_add_watch(fd, d.encode(), inotify_c.InotifyConstants.IN_CREATE) >= 0
child = os.fork()  # shares the instance, as a pre-forking daemon's workers do
if child == 0:
    time.sleep(600)
    os._exit(0)
print(child, flush=True)
time.sleep(600)
"""


def test_watches_of_an_inotify_instance_two_processes_share_are_counted_once(
    tmp_path: Path,
) -> None:
    require_user_namespaces()
    dirs = [tmp_path / str(i) for i in range(50)]
    for d in dirs:
        d.mkdir()
    holder = subprocess.Popen(
        [*own_user_namespace(), sys.executable, "-c", HOLDER, *map(str, dirs)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    child = int(holder.stdout.readline())
    try:
        # the holder's namespace counts its watches alone: none of any other process
        assert watches_in_use(holder.pid) == len(dirs)
    finally:
        os.kill(child, signal.SIGKILL)
        holder.kill()
        holder.wait(10)


@pytest.mark.slow
def test_directories_inotify_cannot_watch_are_noticed_and_polled_instead(
    tmp_path: Path, service_processes: list[ServiceProcess]
) -> None:
    require_user_namespaces()
    inbox = tmp_path / "inbox"
    for sub in ("a", "b", "c"):
        (inbox / sub).mkdir(parents=True)
    log = tmp_path / "runs.log"
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [
                {
                    "path": str(inbox),
                    "settle": "100ms",
                    "poll_interval": "200ms",
                    "rescan_interval": 0,
                }
            ],
            "jobs": [
                {"name": "work", "tasks": [{"task": "taskbox.record", "with": {"log": str(log)}}]}
            ],
            "logging": {"format": "json"},
        },
    )
    # room for the root's watch only, not one per directory of the tree: the service runs
    # in a user namespace of its own, whose watch limit is lowered (the machine's is not)
    svc = ServiceProcess(cfg, prefix=own_user_namespace(watches=1))
    service_processes.append(svc)
    svc.wait_ready()
    wait_for(
        lambda: any(e.get("event") == "scan_done" for e in svc.events()),
        message="the start-up scan",
    )
    # watchdog (6.x and 7.x) gives up the whole tree when a subdirectory cannot be watched
    # as the watch is set up: the service polls it instead, and says so
    [failed] = svc.events("watch_failed")
    assert failed["watch"] == str(inbox)
    assert "polling" in failed["action"]
    assert "max_user_watches" in failed["action"]
    [ready] = svc.events("service_ready")
    assert [w["mode"] for w in ready["watches"]] == ["poll"]
    (inbox / "b" / "late.nc").write_bytes(b"x")
    wait_for(lambda: runs(log), message="the file, found by polling")
    assert [r[0] for r in runs(log)] == ["b/late.nc"]
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0


@pytest.mark.slow
def test_a_new_directory_refused_a_watch_after_start_is_polled_at_once(
    tmp_path: Path, service_processes: list[ServiceProcess]
) -> None:
    require_user_namespaces()
    inbox = tmp_path / "inbox"
    (inbox / "old").mkdir(parents=True)
    log = tmp_path / "runs.log"
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [
                {
                    "path": str(inbox),
                    "settle": "100ms",
                    "poll_interval": "200ms",
                    "rescan_interval": "1h",  # far beyond the test: no rescan finds the file
                }
            ],
            "jobs": [
                {"name": "work", "tasks": [{"task": "taskbox.record", "with": {"log": str(log)}}]}
            ],
            "logging": {"format": "json"},
        },
    )
    svc = ServiceProcess(cfg, prefix=own_user_namespace())  # a watch limit of its own
    service_processes.append(svc)
    svc.wait_ready()
    wait_for(lambda: svc.events("scan_done"), message="the start-up scan")
    # not one watch more in the service's namespace (the machine's limit is not touched)
    lower_watch_limit(svc.proc.pid, watches_in_use(svc.proc.pid))
    (inbox / "new").mkdir()
    wait_for(
        lambda: [e for e in svc.events("scan_done") if e["reason"] == "new directory"],
        message="the new directory to be scanned",
        detail=svc.log.read_text,
    )
    # written after the new directory's scan: no event and no scan but a poll can find it
    (inbox / "new" / "late.nc").write_bytes(b"x")
    (inbox / "old" / "evented.nc").write_bytes(b"y")  # the rest of the tree keeps its events
    wait_for(
        lambda: len(runs(log)) == 2,
        timeout=10,
        message="the file in the directory refused a watch (the next rescan is an hour away)",
        detail=svc.log.read_text,
    )
    assert sorted(r[0] for r in runs(log)) == ["new/late.nc", "old/evented.nc"]
    [polled] = svc.events("directory_polled")
    assert polled["directory"] == str(inbox / "new")
    assert "max_user_watches" in polled["action"]
    assert {j["path"]: j["source"] for j in jobs(cfg)} == {
        str(inbox / "new" / "late.nc"): "watch",
        str(inbox / "old" / "evented.nc"): "watch",
    }
    svc.signal(signal.SIGTERM)
    assert svc.wait(30) == 0


def test_directories_refused_a_watch_are_polled_from_the_topmost_and_not_counted_as_watched(
    tmp_path: Path,
) -> None:
    [spec] = build_specs([WatchConfig(path=tmp_path)])
    root = str(tmp_path)
    spec.directories = 10  # the last full scan's count, the root included
    spec.unwatched = {f"{root}/a": 3, f"{root}/a/b": 1, f"{root}/ab": 1, f"{root}/c/d": 2}
    assert spec.polled_directories() == [f"{root}/a", f"{root}/ab", f"{root}/c/d"]
    assert spec.polled_count() == 6  # a/b is in a's three already


def test_a_files_events_from_before_an_overflow_do_not_undo_the_rescan(
    make: Callable[..., Harness],  # noqa: F811 - the fixture imported above
) -> None:
    """The kernel's overflow event reaches the service as watchdog reads it, before the
    events read with it (one of them: a file's open for writing, its close lost in the
    overflow) are handed on. The rescan finds the file complete; the late "writing" must
    not leave it waiting for a close that will never come."""
    h = make()
    h.steps_until(lambda: h.service._arrivals.pending_scans == 0, "the start-up scan")
    (h.inbox / "f5.nc").write_bytes(b"x")
    h.service._inbox.put(Overflow("inotify queue overflow"))
    h.steps_until(lambda: h.service._arrivals.pending_scans == 0, "the rescan after it")
    h.service._inbox.put(Writing(0, str(h.inbox / "f5.nc")))  # late
    h.step()
    h.clock.advance(SETTLE)
    h.steps_until(lambda: "f5.nc" in h.jobs(), "the file's job")
