"""Ingest with a long history: does the service slow down as its ledger grows?

  ingest_history     files written into a watched directory of a running service whose
                     ledger holds a million finished jobs, progress shown (a terminal's live
                     line) and STATUS sent to a notify socket read here, as systemd reads it:
                     jobs/s from the first write to the last job_done, vs the same service
                     with an empty ledger, the two measured in turn

Both services run side by side, started before the measurement: while one ingests, the
other is idle (it sleeps until a write or a timer). What the progress and STATUS cost is
what a large ledger could change: the jobs themselves cost the same in both.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

from bench_common import Context, Result, check, workdir
from bench_service import JOB, NOOP_YAML, ServiceProcess

from dpypeline.state.ledger import Ledger

JOB_DONE = b'"job_done"'
TIMEOUT = 120.0  # seconds a batch may take; a slower one is measured over what finished


class TerminalService(ServiceProcess):
    """The service with its output on a pseudo-terminal (so the live progress line is up),
    copied to its log here, counting each ``job_done`` line as it arrives."""

    def _spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        self.master = master
        self.done = 0
        self.done_at: float | None = None  # when ``done`` reached ``wanted``
        self.wanted = -1
        self._counted = threading.Condition()
        proc = subprocess.Popen(
            argv,
            env={**env, "TERM": "xterm-256color"},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        threading.Thread(target=self._copy, daemon=True).start()
        return proc

    def _copy(self) -> None:
        tail = b""
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the service closed its terminal
                return
            if not data:
                return
            try:
                self._log.write(data)
            except ValueError:  # the log was closed: the service was stopped
                return
            seen = tail + data
            tail = seen[-(len(JOB_DONE) - 1) :]
            with self._counted:
                self.done += seen.count(JOB_DONE)
                if self.done >= self.wanted >= 0 and self.done_at is None:
                    self.done_at = time.perf_counter()
                    self._counted.notify_all()

    def ingest(self, inbox: Path, names: list[str]) -> tuple[float, int]:
        """Write the files (open, write 100 bytes, close) and wait for their jobs' ends:
        the seconds from the first write to the last ``job_done``, and how many ended."""
        with self._counted:
            self.wanted, self.done_at = self.done + len(names), None
        start = time.perf_counter()
        for name in names:
            fd = os.open(inbox / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, b"x" * 100)
            os.close(fd)
        with self._counted:
            self._counted.wait_for(lambda: self.done_at is not None, TIMEOUT)
            ended = self.done - (self.wanted - len(names))
            end = self.done_at or time.perf_counter()
        if self.proc.poll() is not None:
            raise RuntimeError(f"service exited {self.proc.returncode}:\n{self.tail()}")
        return end - start, ended

    def stop(self) -> None:
        super().stop()
        os.close(self.master)


def fill_history(db_path: Path, count: int) -> float:
    """Add ``count`` jobs finished a day ago, of another watch root (the start-up prune of
    the watched one leaves them), straight into the ledger's table in one transaction."""
    start = time.perf_counter()
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=OFF")
        then = time.time() - 86400
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO jobs (path, size, mtime_ns, job, root, state, attempts, source,"
            " created, updated, started, finished)"
            f" VALUES (?, 100, ?, '{JOB}', '/data/history', 'done', 1, 'scan', ?, ?, ?, ?)",
            (
                (f"/data/history/d{i // 1000}/f{i:07d}.nc", i, then, then, then, then)
                for i in range(count)
            ),
        )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return time.perf_counter() - start


def bench_ingest_history(ctx: Context) -> Result:
    n, history = ctx.size("ingest_history"), ctx.size("history")
    repeats = ctx.repeats(3)
    best = {"empty": float("inf"), "history": float("inf")}
    short: list[str] = []
    with workdir(ctx, "ingest-history") as d:
        services: dict[str, tuple[TerminalService, Path]] = {}
        fill_s = 0.0
        try:
            for kind in best:
                inbox, cache = d / kind / "inbox", d / kind / "cache"
                inbox.mkdir(parents=True)
                if kind == "history":
                    Ledger(cache).close()  # the real schema, at the version under test
                    fill_s = fill_history(cache / "dpypeline.db", history)
                config = d / kind / "pipeline.yaml"
                config.write_text(NOOP_YAML.format(cache=cache, inbox=inbox, settle="100ms"))
                services[kind] = (TerminalService(d / kind, config), inbox)
            for service, _ in services.values():
                service.wait_ready(120)
                service.wait_quiet()  # start-up done: its scan and prune
            for r in range(repeats):
                for kind, (service, inbox) in services.items():
                    names = [f"r{r}-f{i:05d}.nc" for i in range(n)]
                    seconds, ended = service.ingest(inbox, names)
                    check(ended > 0, f"jobs ended within {TIMEOUT:.0f} s ({kind})", ended)
                    if ended < n:
                        short.append(f"{kind}: {ended:,} of {n:,} in {seconds:.0f} s")
                    best[kind] = min(best[kind], seconds / ended)
            statuses = sum("STATUS=" in m for _, m in services["history"][0].messages)
        finally:
            for service, _ in services.values():
                service.stop()
    ratio = best["empty"] / best["history"]
    result = Result(
        name="ingest_history",
        ours=1 / best["history"],
        unit="jobs/s",
        baseline=1 / best["empty"],
        baseline_unit="jobs/s (empty ledger)",
        ratio=ratio,
        ratio_kind="rate",
        target=">= 0.8x rate",
        met=ratio >= 0.8,
        n=n,
        repeats=repeats,
    )
    result.notes.append(
        f"{history:,} finished jobs in the ledger (inserted in {fill_s:.1f} s); progress line"
        f" on a pseudo-terminal; {statuses} STATUS= messages read from the notify socket"
    )
    if short:
        result.notes.append(f"not all jobs ended within {TIMEOUT:.0f} s: " + "; ".join(short))
    return result


__all__ = ["bench_ingest_history"]
