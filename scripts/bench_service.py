"""Benchmarks of the running service: a real ``dpypeline run`` process, a real inotify watch.

The service runs as a child process with ``NOTIFY_SOCKET`` pointing at a datagram socket
this benchmark owns, so readiness is the service's own ``READY=1``, as systemd sees it. Its
ledger is read (read-only, beside the running service, as ``dpypeline status`` does) to
learn when jobs were enqueued and finished; its memory is read from ``/proc/PID/status``.

  start_ready        spawn of `dpypeline run` (the main NetCDF -> Zarr job, empty inbox) to
                     READY=1, vs `python -c pass`
  inotify_latency    a burst of files written into a watched directory: from each file's
                     close (recorded here) to its job's row in the ledger (``created``,
                     stamped by the loop step that commits it), vs the watch's settle time
  memory             VmRSS of the service idle after start, and after N no-op jobs
                     arrived through the watch and finished
  reconcile_1m       the start-up reconciliation of a tree of 1M files the ledger already
                     knows: READY=1 to the ``scan_done`` log line, and the peak RSS (VmHWM)
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_common import (
    SIZES,
    Context,
    Result,
    check,
    python_startup,
    service_env,
    workdir,
)
from bench_scan import build_tree

from dpypeline.state.ledger import Ledger
from dpypeline.watching.patterns import PathMatcher
from dpypeline.watching.scan import scan

JOB = "noop"
_SOCKETS = itertools.count()

NOOP_YAML = """\
name: bench
cache_dir: {cache}
watch:
  - path: {inbox}
    patterns: ["**/*.nc"]
    mode: inotify
    settle: {settle}
    rescan_interval: 0
jobs:
  - name: noop
    tasks:
      - task: bench_tasks.noop
logging: {{format: json, level: info}}
"""

# The main job of examples/netcdf-to-zarr.yaml, on an empty inbox: what start-up costs
# when the tasks are the heavy ones.
ZARR_YAML = """\
name: bench-zarr
cache_dir: {cache}
watch:
  - path: {inbox}
    patterns: ["*_grid_T.nc"]
    settle: 1s
jobs:
  - name: to-zarr
    tasks:
      - task: open_dataset
        with: {{chunks: {{time_counter: 1}}}}
      - task: clean_dataset
        with: {{missing_value: 1.0e20}}
      - task: to_zarr
        with: {{store: {store}, append_dim: time_counter}}
logging: {{format: json, level: info}}
"""


class ServiceProcess:
    """``dpypeline run -c CONFIG`` as a child, with a notify socket of our own."""

    def __init__(self, d: Path, config: Path) -> None:
        self.dir = d
        # an abstract socket name: a path under a deep temporary directory can exceed
        # the 108 bytes a socket path may have
        name = f"dpypeline-bench-{os.getpid()}-{next(_SOCKETS)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name)
        # Read every notification as systemd does: an unread socket fills up, and the
        # service's next notification would then block its loop.
        self.ready = threading.Event()
        self.closed = False
        self.messages: list[tuple[float, str]] = []
        threading.Thread(target=self._read_notifications, daemon=True).start()
        env = service_env()
        env["NOTIFY_SOCKET"] = "@" + name
        self.log_path = d / "service.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop())
        self.spawned = time.perf_counter()
        self.proc = self._spawn([sys.executable, "-m", "dpypeline", "run", "-c", str(config)], env)

    def _spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def _read_notifications(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:  # closed by stop()
                return
            if self.closed:
                return
            message = data.decode(errors="replace")
            self.messages.append((time.perf_counter(), message))
            if "READY=1" in message.split("\n"):
                self.ready.set()

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from spawn to READY=1."""
        deadline = time.perf_counter() + timeout
        while not self.ready.wait(0.1):
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited {self.proc.returncode}:\n{self.tail()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no READY=1 within {timeout:.0f} s:\n{self.tail()}")
        ready_at = next(t for t, m in self.messages if "READY=1" in m.split("\n"))
        return ready_at - self.spawned

    def status(self, field: str = "VmRSS") -> int:
        """A memory figure of the service process from /proc, in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/{self.proc.pid}/status")

    def cpu_ticks(self) -> int:
        """User + system CPU time of the service process so far, in clock ticks."""
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat(5))

    def wait_quiet(self, quiet: float = 0.3, timeout: float = 60.0) -> float:
        """Wait until the service has used no CPU for ``quiet`` seconds; when that began."""
        deadline = time.perf_counter() + timeout
        ticks, since = self.cpu_ticks(), time.perf_counter()
        while time.perf_counter() - since < quiet:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the service was still busy after {timeout:.0f} s")
            time.sleep(0.05)
            now = self.cpu_ticks()
            if now != ticks:
                ticks, since = now, time.perf_counter()
        return since

    def log_events(self, event: str) -> list[dict]:
        records = []
        with self.log_path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if f'"{event}"' in line:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if record.get("event") == event:
                        records.append(record)
        return records

    def tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.closed = True
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader
        self.sock.close()


def wait_until(what: str, predicate: object, timeout: float, service: ServiceProcess) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if service.proc.poll() is not None:
            raise RuntimeError(f"service exited {service.proc.returncode}:\n{service.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}:\n{service.tail()}")
        time.sleep(0.02)


def ledger_query(cache: Path, sql: str) -> list[tuple]:
    """Read the service's ledger beside it (read-only; WAL lets readers in at any time)."""
    db = sqlite3.connect(f"file:{cache / 'dpypeline.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def done_count(cache: Path) -> int:
    return int(ledger_query(cache, "SELECT count(*) FROM jobs WHERE state = 'done'")[0][0])


def noop_service(d: Path, settle: str) -> tuple[ServiceProcess, Path, Path]:
    inbox, cache = d / "inbox", d / "cache"
    inbox.mkdir()
    config = d / "pipeline.yaml"
    config.write_text(NOOP_YAML.format(cache=cache, inbox=inbox, settle=settle))
    return ServiceProcess(d, config), inbox, cache


def write_files(directory: Path, n: int) -> dict[str, float]:
    """Write ``n`` small files as a writer would (open, write, close); path -> close time."""
    closed = {}
    for i in range(n):
        path = os.path.join(directory, f"f{i:05d}.nc")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"x" * 100)
        os.close(fd)
        closed[path] = time.time()
    return closed


# -- start_ready ----------------------------------------------------------------------------


def bench_start_ready(ctx: Context) -> Result:
    repeats = ctx.repeats(3)
    startup_s = python_startup(repeats)
    times: dict[str, float] = {}
    for kind in ("zarr", "noop"):
        best = float("inf")
        for _ in range(repeats):
            with workdir(ctx, "ready") as d:
                inbox = d / "inbox"
                inbox.mkdir()
                config = d / "pipeline.yaml"
                if kind == "zarr":
                    text = ZARR_YAML.format(cache=d / "cache", inbox=inbox, store=d / "out.zarr")
                else:
                    text = NOOP_YAML.format(cache=d / "cache", inbox=inbox, settle="1s")
                config.write_text(text)
                service = ServiceProcess(d, config)
                try:
                    best = min(best, service.wait_ready())
                finally:
                    service.stop()
        times[kind] = best
    ours = times["zarr"]
    result = Result(
        name="start_ready",
        ours=ours,
        unit="s",
        baseline=startup_s,
        baseline_unit="s (python -c pass)",
        ratio=ours / startup_s,
        ratio_kind="time",
        target="<= 1.5 s",
        met=ours <= 1.5,
        n=1,
        repeats=repeats,
    )
    result.notes.append(
        f"spawn to READY=1 with the NetCDF -> Zarr job on an empty inbox; with a no-op task:"
        f" {times['noop']:.3f} s"
    )
    return result


# -- inotify_latency ------------------------------------------------------------------------


def bench_inotify_latency(ctx: Context) -> Result:
    n = ctx.size("inotify_burst")
    settle = 0.5
    with workdir(ctx, "inotify") as d:
        service, inbox, cache = noop_service(d, f"{settle * 1000:.0f}ms")
        try:
            service.wait_ready()
            wait_until("the start-up scan", lambda: service.log_events("scan_done"), 30, service)
            burst = inbox / "burst"
            burst.mkdir()
            time.sleep(0.2)  # the new directory's watch is in place
            start = time.perf_counter()
            closed = write_files(burst, n)
            burst_s = time.perf_counter() - start
            wait_until("every job done", lambda: done_count(cache) == n, 60, service)
        finally:
            service.stop()
        created = dict(ledger_query(cache, "SELECT path, created FROM jobs"))
    check(set(created) == set(closed), "jobs", len(created))
    delays = sorted(created[p] - closed[p] for p in closed)
    p50 = statistics.median(delays)
    p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
    over50, over99 = (p50 - settle) * 1000, (p99 - settle) * 1000
    result = Result(
        name="inotify_latency",
        ours=p50,
        unit="s p50",
        baseline=settle,
        baseline_unit="s (settle)",
        ratio=p50 / settle,
        ratio_kind="time",
        target="p50 <= settle + 50 ms, p99 <= settle + 200 ms",
        met=over50 <= 50 and over99 <= 200,
        n=n,
        repeats=1,
    )
    result.notes.append(
        f"close -> in the ledger: p50 settle {over50:+.0f} ms, p99 settle {over99:+.0f} ms,"
        f" max settle {(delays[-1] - settle) * 1000:+.0f} ms, min settle"
        f" {(delays[0] - settle) * 1000:+.0f} ms; burst written in {burst_s * 1000:.0f} ms"
    )
    return result


# -- memory ---------------------------------------------------------------------------------


def bench_memory(ctx: Context) -> Result:
    n = ctx.size("memory_jobs")
    with workdir(ctx, "memory") as d:
        service, inbox, cache = noop_service(d, "100ms")
        try:
            service.wait_ready()
            wait_until("the start-up scan", lambda: service.log_events("scan_done"), 30, service)
            pause = 0.2 if ctx.quick else 1.0
            time.sleep(pause)
            idle = service.status("VmRSS")
            after = []
            for batch in range(2):
                directory = inbox / f"batch{batch}"
                directory.mkdir()
                time.sleep(0.2)  # the new directory's watch is in place
                write_files(directory, n)
                total = n * (batch + 1)
                finished = lambda t=total: done_count(cache) == t  # noqa: E731
                wait_until(f"{total} jobs done", finished, 120, service)
                time.sleep(pause)  # idle again
                after.append(service.status("VmRSS"))
            peak = service.status("VmHWM")
            overflows = len(service.log_events("watch_overflow"))
        finally:
            service.stop()
    mb = 1024 * 1024
    growth = after[0] / idle
    second = after[1] / after[0]
    result = Result(
        name="memory",
        ours=after[0] / mb,
        unit="MB after jobs",
        baseline=idle / mb,
        baseline_unit="MB idle after start",
        ratio=growth,
        ratio_kind="time",
        target="idle <= 150 MB; after jobs <= 1.1x idle",
        met=idle <= 150 * mb and growth <= 1.10,
        n=n,
        repeats=1,
    )
    result.notes.append(
        f"VmRSS of the service: idle {idle / mb:.1f} MB, after {n:,} jobs {after[0] / mb:.1f} MB,"
        f" after {2 * n:,} jobs {after[1] / mb:.1f} MB ({second:.2f}x the first {n:,});"
        f" peak (VmHWM) {peak / mb:.1f} MB; {overflows} inotify overflow(s), each a rescan of"
        " the whole inbox"
    )
    return result


# -- reconcile_1m ---------------------------------------------------------------------------


def _fill_ledger(cache: Path, root: str) -> int:
    """Record every file under ``root`` as done, as after an earlier full ingest."""
    ledger = Ledger(cache)
    try:
        files = scan(root, PathMatcher(["**/*.nc"], [], case_sensitive=True)).files
        for i in range(0, len(files), 50_000):
            ledger.enqueue(files[i : i + 50_000], root, [JOB], "scan", time.time())
    finally:
        ledger.close()
    db = sqlite3.connect(cache / "dpypeline.db", isolation_level=None)
    try:
        db.execute("UPDATE jobs SET state = 'done', attempts = 1, finished = updated")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return len(files)


def bench_reconcile_1m(ctx: Context) -> Result:
    n = ctx.size("reconcile_1m")
    with workdir(ctx, "reconcile1m") as d:
        inbox, cache = d / "inbox", d / "cache"
        inbox.mkdir()
        t0 = time.perf_counter()
        build_tree(str(inbox), n, 1000)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        known = _fill_ledger(cache, str(inbox.resolve()))
        fill_s = time.perf_counter() - t0
        check(known == n, "files known", known)
        config = d / "pipeline.yaml"
        config.write_text(NOOP_YAML.format(cache=cache, inbox=inbox, settle="1s"))
        service = ServiceProcess(d, config)
        try:
            ready_s = service.wait_ready(120)
            ready_at = service.spawned + ready_s
            wait_until("the start-up scan", lambda: service.log_events("scan_done"), 120, service)
            scanned_at = time.perf_counter()
            idle_at = service.wait_quiet()  # what follows the scan (pruning) is done
            peak = service.status("VmHWM")
            rss = service.status("VmRSS")
            scan_done = service.log_events("scan_done")[0]
        finally:
            service.stop()
        check(scan_done["files"] == n and scan_done["new"] == 0, "scan", scan_done)
    elapsed = scanned_at - ready_at
    mb = 1024 * 1024
    result = Result(
        name="reconcile_1m",
        ours=elapsed,
        unit="s",
        baseline=peak / mb,
        baseline_unit="MB peak RSS",
        ratio=None,
        ratio_kind="",
        target="<= 10 s, <= 300 MB RSS",
        met=elapsed <= 10 and peak <= 300 * mb,
        n=n,
        repeats=1,
    )
    result.notes.append(
        f"the service's start-up scan of {n:,} known files, READY=1 to scan_done (polled every"
        f" 20 ms); {idle_at - ready_at:.1f} s to idle, pruning included;"
        f" peak RSS (VmHWM) {peak / mb:.0f} MB, {rss / mb:.0f} MB after; READY=1 after"
        f" {ready_s:.2f} s;"
        f" tree built in {build_s:.1f} s, ledger filled in {fill_s:.1f} s"
    )
    return result


__all__ = [
    "SIZES",
    "bench_inotify_latency",
    "bench_memory",
    "bench_reconcile_1m",
    "bench_start_ready",
]
