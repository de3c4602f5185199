"""The watcher and settle rules, with real inotify events in tmp_path and the service
loop running in a thread of this process."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from conftest import runs, wait_for, write_config
from dpypeline.config.model import load_config
from dpypeline.loop.service import Service
from dpypeline.loop.timers import Timer
from dpypeline.pipeline import import_tasks
from dpypeline.state.ledger import Ledger


class Running:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.result: list[Any] = []
        self.thread = threading.Thread(
            target=lambda: self.result.append(service.run()), name="test-service"
        )

    def counts(self) -> dict[str, int]:
        ledger = Ledger(self.service.config.cache_dir)
        try:
            return ledger.counts()
        finally:
            ledger.close()


def settled(inbox: Path, log: Path, name: str = "zz-later.nc") -> list[str]:
    """Write one more file and wait for its job, then return the paths run. Whatever the
    service would still do about the files before it (a second job, a late event, a temp
    name taken) it has done by then: events settle in the order they arrive and jobs run
    in queue order. So a check that nothing more happened needs no fixed wait."""
    seen = len(runs(log))
    (inbox / name).write_bytes(b"later")
    wait_for(lambda: name in [r[0] for r in runs(log)[seen:]], message=f"the later {name}")
    return [r[0] for r in runs(log)]


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Any]:
    """Start a service over tmp_path/inbox; yields (inbox, log, start)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    log = tmp_path / "runs.log"
    started: list[Running] = []

    def start(**watch: Any) -> Running:
        cfg = write_config(
            tmp_path,
            {
                "cache_dir": str(tmp_path / "state"),
                "watch": [{"path": str(inbox), "settle": "300ms", "rescan_interval": 0, **watch}],
                "jobs": [
                    {
                        "name": "record",
                        "tasks": [{"task": "taskbox.record", "with": {"log": str(log)}}],
                    }
                ],
                "logging": {"format": "json"},
            },
        )
        config = load_config(cfg)
        jobs, setup = import_tasks(config)
        running = Running(Service(config, jobs, setup, once=False))
        running.thread.start()
        wait_for(lambda: running.service.status.value == "running", message="service running")
        started.append(running)
        return running

    yield inbox, log, start
    for running in started:
        running.service.request_stop()
        running.thread.join(20)
        assert not running.thread.is_alive()


def test_file_written_slowly_is_taken_only_after_close_and_once(pipeline: Any) -> None:
    inbox, log, start = pipeline
    svc = start()
    target = inbox / "slow.nc"
    with target.open("wb") as f:
        for _ in range(8):  # 1.6 s of writing, far longer than the 300 ms settle time
            f.write(b"x" * 1000)
            f.flush()
            time.sleep(0.2)
            assert runs(log) == [], "a file still being written was taken"
    wait_for(lambda: runs(log), message="the slow file to be processed")
    assert settled(inbox, log) == ["slow.nc", "zz-later.nc"]
    wait_for(lambda: svc.counts()["done"] == 2, message="2 jobs done")  # runs log first


def test_file_renamed_into_place_is_processed_once_and_temp_name_never(pipeline: Any) -> None:
    inbox, log, start = pipeline
    start()
    tmp = inbox / ".data.nc.Xy12ab"  # rsync's temp name; ignored by the default ".*"
    tmp.write_bytes(b"payload" * 100)
    assert settled(inbox, log, "a-before.nc") == ["a-before.nc"]  # the temp name settled too
    os.rename(tmp, inbox / "data.nc")
    wait_for(lambda: len(runs(log)) == 2, message="the renamed file to be processed")
    assert settled(inbox, log) == ["a-before.nc", "data.nc", "zz-later.nc"]


def test_file_moved_in_from_outside_the_tree_is_processed(pipeline: Any, tmp_path: Path) -> None:
    inbox, log, start = pipeline
    start()
    outside = tmp_path / "staging.nc"
    outside.write_bytes(b"1" * 500)
    os.rename(outside, inbox / "moved.nc")
    wait_for(lambda: runs(log), message="the moved-in file")
    assert [r[0] for r in runs(log)] == ["moved.nc"]


def test_files_in_new_nested_directories_are_processed(pipeline: Any) -> None:
    inbox, log, start = pipeline
    start()
    deep = inbox / "2024" / "01" / "daily"
    deep.mkdir(parents=True)
    (deep / "a.nc").write_bytes(b"a")  # written right after mkdir: races the new watch
    (inbox / "2024" / "b.nc").write_bytes(b"b")
    wait_for(lambda: len(runs(log)) >= 2, message="files in new directories")
    assert sorted(settled(inbox, log)) == ["2024/01/daily/a.nc", "2024/b.nc", "zz-later.nc"]


def test_directory_moved_in_with_files_is_processed(pipeline: Any, tmp_path: Path) -> None:
    inbox, log, start = pipeline
    start()
    staged = tmp_path / "batch"
    staged.mkdir()
    for i in range(3):
        (staged / f"f{i}.nc").write_bytes(b"z" * (i + 1))
    os.rename(staged, inbox / "batch")
    wait_for(lambda: len(runs(log)) >= 3, message="files of a moved-in directory")
    assert sorted(settled(inbox, log)) == [
        "batch/f0.nc",
        "batch/f1.nc",
        "batch/f2.nc",
        "zz-later.nc",
    ]


def test_ignored_and_unmatched_files_are_never_processed(pipeline: Any) -> None:
    inbox, log, start = pipeline
    start(patterns=["**/*.nc"], ignore_patterns=["*.tmp", ".*", "scratch/**"])
    (inbox / "keep.nc").write_bytes(b"k")
    (inbox / "notes.txt").write_bytes(b"t")
    (inbox / "part.nc.tmp").write_bytes(b"p")
    (inbox / ".hidden.nc").write_bytes(b"h")
    (inbox / "scratch").mkdir()
    (inbox / "scratch" / "x.nc").write_bytes(b"x")
    wait_for(lambda: runs(log), message="the matching file")
    assert settled(inbox, log) == ["keep.nc", "zz-later.nc"]


def test_files_present_at_start_are_processed_in_natural_path_order(pipeline: Any) -> None:
    inbox, log, start = pipeline
    names = ["f10.nc", "f2.nc", "f1.nc", "sub/f3.nc", "f20.nc"]
    for name in names:
        (inbox / name).parent.mkdir(exist_ok=True)
        (inbox / name).write_bytes(name.encode())
    start()
    wait_for(lambda: len(runs(log)) == 5, message="files present at start")
    assert [r[0] for r in runs(log)] == ["f1.nc", "f2.nc", "f10.nc", "f20.nc", "sub/f3.nc"]


def test_a_modified_file_is_a_new_version_and_an_unchanged_one_is_not(pipeline: Any) -> None:
    inbox, log, start = pipeline
    svc = start()
    f = inbox / "v.nc"
    f.write_bytes(b"one")
    wait_for(lambda: len(runs(log)) == 1, message="first version")
    os.utime(f)  # touch: new mtime -> new version
    f.chmod(0o600)  # metadata only, same (size, mtime): not a new version
    f.write_bytes(b"second version")
    wait_for(lambda: len(runs(log)) == 2, message="second version")
    assert settled(inbox, log) == ["v.nc", "v.nc", "zz-later.nc"]
    wait_for(lambda: svc.counts()["done"] == 3, message="3 jobs done")  # runs log first


def test_poll_mode_takes_stable_files_without_close_events(pipeline: Any) -> None:
    inbox, log, start = pipeline
    svc = start(mode="poll", poll_interval="200ms")
    assert svc.service._arrivals.specs[0].mode == "poll"
    (inbox / "p.nc").write_bytes(b"polled")
    wait_for(lambda: runs(log), message="the polled file")
    assert settled(inbox, log) == ["p.nc", "zz-later.nc"]


def test_a_dead_watch_emitter_is_restarted_and_the_gap_rescanned(pipeline: Any) -> None:
    inbox, log, start = pipeline
    svc = start()
    watcher = svc.service._arrivals.watcher
    assert watcher is not None
    emitters = list(watcher._observer.emitters)  # type: ignore[union-attr]
    for emitter in emitters:
        emitter.stop()  # the emitter thread ends while the observer lives on
        emitter.join(5)
    (inbox / "missed.nc").write_bytes(b"written while nothing watched")
    svc.service._timers.due_now(Timer.HEALTH)  # the next loop pass checks health
    svc.service._inbox.wake.set()
    wait_for(lambda: runs(log), message="the file written while the emitter was dead")
    assert [r[0] for r in runs(log)] == ["missed.nc"]


def test_periodic_rescan_does_not_take_a_file_whose_writer_paused(pipeline: Any) -> None:
    inbox, log, start = pipeline
    start(rescan_interval="2500ms")  # a rescan mid-pause: longer than settle, not stale
    target = inbox / "paused.nc"
    with target.open("wb") as f:
        for _ in range(5):  # 5 s of writing: at least one rescan sees the open file
            f.write(b"y" * 100)
            f.flush()
            time.sleep(1.0)
            assert runs(log) == [], "the rescan took a file that was still open for writing"
    wait_for(lambda: runs(log), message="the file after its close")
    assert [r[0] for r in runs(log)] == ["paused.nc"]


def _poll(scanner: Any, spec: Any) -> list[str]:
    obs = scanner._scan(spec.target(), None, "poll")
    return [os.path.relpath(f.path, spec.root) for f in obs.files]


def test_a_poll_reports_only_new_and_changed_files_in_natural_order(tmp_path: Path) -> None:
    from dpypeline.config.model import WatchConfig
    from dpypeline.watching.scanner import Scanner
    from dpypeline.watching.watch import Inbox, build_specs

    root = tmp_path / "tree"
    for rel in ("y10/f1.nc", "y2/f10.nc", "y2/f9.nc", "skip.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    [spec] = build_specs([WatchConfig(path=root, patterns=["**/*.nc"], mode="poll")])
    scanner = Scanner(Inbox())
    assert _poll(scanner, spec) == ["y2/f9.nc", "y2/f10.nc", "y10/f1.nc"]
    assert _poll(scanner, spec) == []
    (root / "y10/f1.nc").write_bytes(b"longer")
    (root / "y2/f2.nc").write_bytes(b"new")
    (root / "y2/f10.nc").unlink()
    assert _poll(scanner, spec) == ["y2/f2.nc", "y10/f1.nc"]
    assert sorted(scanner.last_poll[spec.index]) == sorted(
        str(root / rel) for rel in ("y10/f1.nc", "y2/f2.nc", "y2/f9.nc")
    )
    (root / "y2/f9.nc").unlink()
    (root / "y2/f3.nc").write_bytes(b"x")  # as many files as before, one of them new
    assert _poll(scanner, spec) == ["y2/f3.nc"]
    assert _poll(scanner, spec) == []


def test_only_poll_watches_keep_the_last_look(tmp_path: Path) -> None:
    from dpypeline.config.model import WatchConfig
    from dpypeline.watching.scanner import Scanner
    from dpypeline.watching.watch import Inbox, build_specs

    (tmp_path / "f.nc").write_bytes(b"x")
    specs = build_specs(
        [
            WatchConfig(path=tmp_path, patterns=["*.nc"], mode="inotify"),
            WatchConfig(path=tmp_path, patterns=["*.nc"], mode="poll"),
        ]
    )
    scanner = Scanner(Inbox())
    for spec in specs:
        assert len(scanner._scan(spec.target(), None, "startup").files) == 1
    assert scanner.last_poll[0] == {}
    assert list(scanner.last_poll[1]) == [str(tmp_path / "f.nc")]


def test_the_scan_thread_works_on_a_copy_and_reports_what_it_learnt(tmp_path: Path) -> None:
    """The loop thread alone owns the watch specs: a scan request carries a copy of what the
    walk needs, and the number of directories found comes back in the observation."""
    from dpypeline.config.model import WatchConfig
    from dpypeline.watching.scanner import Scanner
    from dpypeline.watching.watch import Inbox, build_specs

    for rel in ("a/f.nc", "b/c/g.nc"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    [spec] = build_specs([WatchConfig(path=tmp_path, patterns=["**/*.nc"], mode="poll")])
    inbox = Inbox()
    scanner = Scanner(inbox)
    scanner.start()
    try:
        target = spec.target()
        spec.mode = "inotify"  # the loop changes its spec after the request: not the scan's
        scanner.request(target, "startup")
        wait_for(inbox.wake.is_set, timeout=10, message="the scan's report")
        [obs] = inbox.drain()
    finally:
        scanner.stop()
        scanner.join(5)
    assert (obs.full, obs.directories, len(obs.files)) == (True, 4, 2)  # the root, a, b, b/c
    assert spec.directories == 0  # set by the loop from the observation, never by the scan
    assert list(scanner.last_poll[spec.index]) != []  # a poll watch's first look, kept


def break_scans(monkeypatch: pytest.MonkeyPatch, count: int) -> list[str]:
    """Make the next ``count`` walks fail with an unexpected error; returns their roots."""
    import dpypeline.watching.scanner

    real, broken = dpypeline.watching.scanner.scan, []

    def scan(root: str, *args: Any, **kwargs: Any) -> Any:
        if len(broken) < count:
            broken.append(str(root))
            raise RuntimeError("the walk broke")
        return real(root, *args, **kwargs)

    monkeypatch.setattr(dpypeline.watching.scanner, "scan", scan)
    return broken


def service_for(tmp_path: Path, once: bool, **watch: Any) -> tuple[Service, Path, Path]:
    inbox, log = tmp_path / "inbox", tmp_path / "runs.log"
    inbox.mkdir()
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "settle": "100ms", "rescan_interval": 0, **watch}],
            "jobs": [
                {"name": "r", "tasks": [{"task": "taskbox.record", "with": {"log": str(log)}}]}
            ],
        },
    )
    config = load_config(cfg)
    jobs, setup = import_tasks(config)
    return Service(config, jobs, setup, once=once), inbox, log


def test_a_failed_scan_reports_its_end_so_run_once_still_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = break_scans(monkeypatch, 1)
    service, inbox, _ = service_for(tmp_path, once=True)
    running = Running(service)
    with capture_logs() as logs:
        running.thread.start()
        running.thread.join(20)
        if running.thread.is_alive():
            service.request_stop()
            running.thread.join(20)
            pytest.fail("run --once did not end after a failed scan")
    assert running.result == [0]
    assert broken == [str(inbox)]
    [failed] = [e for e in logs if e["event"] == "scan_failed"]
    assert failed["path"] == str(inbox)
    assert failed["error"] == "RuntimeError: the walk broke"


def test_a_poll_watch_keeps_polling_after_failed_scans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = break_scans(monkeypatch, 3)  # the start-up scan and two polls
    service, inbox, log = service_for(tmp_path, once=False, mode="poll", poll_interval="100ms")
    running = Running(service)
    running.thread.start()
    try:
        wait_for(lambda: len(broken) == 3, message="three failed scans")
        (inbox / "late.nc").write_bytes(b"x")
        wait_for(lambda: runs(log), message="the file, found by a later poll")
        assert [r[0] for r in runs(log)] == ["late.nc"]
    finally:
        service.request_stop()
        running.thread.join(20)
    assert running.result == [0]


@pytest.mark.parametrize("follow", [False, True])
def test_enqueue_takes_exactly_the_files_the_rescan_takes_under_their_own_names(
    tmp_path: Path, follow: bool
) -> None:
    from dpypeline.config.model import WatchConfig
    from dpypeline.watching.offer import Refused, offer
    from dpypeline.watching.patterns import watch_matcher
    from dpypeline.watching.scan import scan

    root, outside = tmp_path / "inbox", tmp_path / "outside"
    for rel in ("a.nc", ".hidden.nc", "b.nc.tmp", "notes.txt", "sub/c.nc", ".git/d.nc"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    outside.mkdir()
    (outside / "x.nc").write_bytes(b"outside")
    (root / "link-in.nc").symlink_to(root / "a.nc")
    (root / "link-out.nc").symlink_to(outside / "x.nc")
    (root / "dangling.nc").symlink_to(root / "gone.nc")
    (root / "linkdir").symlink_to(root / "sub")
    os.mkfifo(root / "fifo.nc")
    watch = WatchConfig(path=root, patterns=["*.nc"], follow_symlinks=follow)
    rescan = {f.path: f for f in scan(root, watch_matcher(watch), follow_symlinks=follow).files}
    candidates = [Path(d, name) for d, dirs, files in os.walk(root) for name in dirs + files]
    candidates.append(root / "linkdir" / "c.nc")
    taken = {}
    for path in candidates:
        try:
            where, files = offer(str(path), [watch])
        except Refused:
            continue
        if not path.is_dir() or path.is_symlink():
            [taken[str(path)]] = files
            assert where == str(root)
    assert taken == rescan
    expected = {"a.nc", "sub/c.nc"} | ({"link-in.nc", "link-out.nc"} if follow else set())
    assert {os.path.relpath(p, root) for p in rescan} == expected
    assert offer(str(root / "sub"), [watch]) == (str(root), [rescan[str(root / "sub/c.nc")]])
    with pytest.raises(Refused, match="symbolic link to a directory"):
        offer(str(root / "linkdir"), [watch])


@pytest.mark.parametrize("follow", [False, True])
def test_enqueue_refuses_what_the_watcher_ignores_and_takes_what_it_takes(
    tmp_path: Path, follow: bool
) -> None:
    from dpypeline.config.model import WatchConfig
    from dpypeline.loop import intake
    from dpypeline.watching.offer import Refused, offer
    from dpypeline.watching.watch import Inbox, Watcher, build_specs

    root, outside = tmp_path / "inbox", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    outside.mkdir()
    (outside / "x.nc").write_bytes(b"outside")
    watch = WatchConfig(path=root, patterns=["*.nc"], follow_symlinks=follow)
    inbox = Inbox()
    watcher = Watcher(build_specs([watch]), inbox)
    watcher.start()
    seen: list[str] = []
    try:
        for rel in ("a.nc", ".hidden.nc", "b.nc.tmp", "notes.txt", "sub/c.nc", ".git/d.nc"):
            (root / rel).write_bytes(b"x")
        (root / "link-in.nc").symlink_to(root / "a.nc")
        (root / "link-out.nc").symlink_to(outside / "x.nc")
        (root / "zz-last.nc").write_bytes(b"x")  # events of one watch arrive in order

        def last_seen() -> bool:
            seen.extend(o.path for o in inbox.drain() if o.kind == "complete")
            return str(root / "zz-last.nc") in seen

        wait_for(last_seen, message="the watcher to see the last file")
    finally:
        watcher.stop()

    class Seen:
        def __init__(self, path: str) -> None:
            self.path, self.root = path, str(root)

    watched = {f.path for f in intake.allowed([Seen(p) for p in seen], lambda _root: follow)}
    enqueued = set()
    for path in (p for p in root.rglob("*") if not p.is_dir() or p.is_symlink()):
        with contextlib.suppress(Refused):
            enqueued |= {f.path for f in offer(str(path), [watch])[1]}
    assert enqueued == watched
    links = {"link-in.nc", "link-out.nc"} if follow else set()
    assert {os.path.relpath(p, root) for p in watched} == {"a.nc", "sub/c.nc", "zz-last.nc"} | links
