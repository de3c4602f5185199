"""The benchmark suite: each figure as a ratio against a baseline measured in the same run.

Usage: python scripts/bench.py [--quick] [--only NAME ...] [--json FILE] [--dir DIR]

Every benchmark works in a fresh temporary directory under ``--dir`` (default: $TMPDIR, else
the system's temporary directory), and its baseline runs in the same place, interleaved with
the measurement, so the disk, the page cache and the machine's noise are shared and cancel
in the ratio. Times come from ``time.perf_counter``; each side is the best of 1 to 3 runs
depending on its cost. ``--quick`` runs small sizes once each in about a minute:
the ORCA and virtual sides in this process rather than a child each, one moto server for
the run's S3 rows, answering S3 only. It shows that the benchmarks still work, not how fast
anything is.

  enqueue_one             durable enqueue of one event per transaction (Ledger.enqueue)
                          vs raw sqlite3 (WAL, synchronous=FULL), one INSERT per transaction
  backfill_enqueue        new files through Ledger.unknown + Ledger.enqueue in batches of 1000
                          vs raw sqlite3, 100 rows per transaction
  claim_complete          Ledger.claim/finish as the service loop calls them
                          vs raw sqlite3 claim + ack, two transactions per item
  claim_complete_history  the same with a large finished history in the ledger
                          vs claim_complete (empty history), same run
  reconcile_known         scan() + Ledger.unknown() over a tree the ledger knows entirely
                          vs os.scandir walk + stat, known set loaded from SQLite, set difference
  reconcile_1m            the service's start-up scan of 1M files it knows: time and peak RSS
                          (scripts/bench_service.py)
  poll_cpu                CPU time of one poll cycle of a poll watch (100k files, no change)
                          vs one cycle of watchdog's PollingObserver (scripts/bench_scan.py)
  ingest_noop_once        `dpypeline run --once` on files already present, no-op task, end to end
                          (baseline shown: `python -c pass` start-up)
  ingest_history          files into a running service with 1M finished jobs in its ledger,
                          progress on a terminal and STATUS to a notify socket, vs the same
                          with an empty ledger (scripts/bench_history.py)
  inotify_latency         a 1,000-file burst into a watched directory: close -> in the ledger,
                          p50 and p99, vs the watch's settle time (scripts/bench_service.py)
  start_ready             spawn of `dpypeline run` (NetCDF -> Zarr job) to READY=1 on its
                          NOTIFY_SOCKET, vs `python -c pass` (scripts/bench_service.py)
  memory                  the service's VmRSS idle after start, and after 10k no-op jobs
                          (scripts/bench_service.py)
  zarr_*                  open_dataset + to_zarr appending NEMO files, small and large, to a
                          local and a moto S3 store, vs a hand-written xarray to_zarr append
                          (scripts/bench_zarr.py)

  dask_cpu                `run --once` with the dask executor (LocalCluster, 2 workers) on a
                          CPU-bound task vs the serial executor (scripts/bench_dask.py)
  dask_overhead           time per no-op job with the dask executor vs the serial executor
  orca025_*               the README's main job on 3 ORCA025 grid_T files (NEMO namnc4 chunks,
                          or one chunk per field), local and moto S3: seconds and peak RSS vs
                          hand-written xarray with the same store chunks (scripts/bench_orca.py)
  orca025_*_icechunk      the same job (namnc4) with `icechunk: true`, one commit per file,
                          local and moto S3, vs the same job into a plain Zarr store: seconds,
                          peak RSS and store size (scripts/bench_orca.py)
  virtual_orca025         virtualize on the 3 ORCA025 namnc4 files, per file, vs to_zarr (the
                          main job) in the same run: seconds and peak RSS; the repository's
                          size vs the NetCDF files' (target <= 1%) (scripts/bench_virtual.py)
  virtual_read_thetao     thetao read back through the references vs from the native Zarr store
  revert_first_of_three   `dpypeline revert` of the first of three ingested files, then `run
                          --once`, vs deleting the store and the ledger and `run --once`
                          (scripts/bench_versions.py)
  gc_after_20_replaced    `dpypeline gc` of an Icechunk repository after one file was written
                          again 20 times, vs one commit of that file (scripts/bench_versions.py)
  orca12                  one ORCA12 thetao step (4 GB), namnc4 chunks: seconds and peak RSS;
                          only with --only orca12 (a 1.5 GB file is generated once and kept)

The table's ratio is ours/baseline: for rates higher is better, for times lower is better;
the column says which. Exit status: 0 when every selected benchmark ran (whether or not it
met its target), 1 when one failed to run, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from dpypeline.state.ledger import JobState, Ledger
from dpypeline.watching.fsinfo import filesystem_type
from dpypeline.watching.patterns import PathMatcher
from dpypeline.watching.scan import FileVersion, scan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (
    Context,
    Result,
    check,
    interleaved,
    python_startup,
    service_env,
    workdir,
)
from bench_dask import bench_dask_cpu, bench_dask_overhead
from bench_history import bench_ingest_history
from bench_scan import bench_poll_cpu, build_tree
from bench_service import (
    bench_inotify_latency,
    bench_memory,
    bench_reconcile_1m,
    bench_start_ready,
)

ZARR_CASES = ("local_small", "local_large", "s3_small", "s3_large")
ORCA_CASES = (
    "orca025_local_namnc4",
    "orca025_local_whole",
    "orca025_s3_namnc4",
    "orca025_s3_whole",
    "orca12",
    "orca025_local_icechunk",
    "orca025_s3_icechunk",
)

NAMES = (
    "enqueue_one",
    "backfill_enqueue",
    "claim_complete",
    "claim_complete_history",
    "reconcile_known",
    "reconcile_1m",
    "poll_cpu",
    "ingest_noop_once",
    "ingest_history",
    "inotify_latency",
    "start_ready",
    "memory",
    *(f"zarr_{case}" for case in ZARR_CASES),
    "dask_cpu",
    "dask_overhead",
    *ORCA_CASES,
    "virtual_orca025",
    "virtual_read_thetao",
    "revert_first_of_three",
    "gc_after_20_replaced",
)
OPTIONAL = ("orca12",)  # run only when named with --only: one 4 GB field

JOB = "job"
MTIME0 = 1_700_000_000_000_000_000  # a plausible st_mtime_ns
IGNORE = [".*", "*.tmp", "*.part"]  # the config's default ignore_patterns


def versions(n: int, root: str = "/data/inbox", start: int = 0) -> list[FileVersion]:
    """``n`` distinct file versions, 1000 to a directory, in natural order."""
    return [
        FileVersion(f"{root}/d{i // 1000}/f{i}.nc", 1000 + i % 7, MTIME0 + i)
        for i in range(start, start + n)
    ]


# -- raw sqlite3: the baselines -------------------------------------------------------------

RAW_TABLE = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    job TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    UNIQUE (path, size, mtime_ns, job)
);
CREATE INDEX jobs_by_state ON jobs (state, id);
"""
RAW_INSERT = (
    "INSERT OR IGNORE INTO jobs (path, size, mtime_ns, job, state, created)"
    " VALUES (?, ?, ?, ?, 'queued', ?)"
)


def raw_db(path: Path) -> sqlite3.Connection:
    """A connection set up as the ledger's is: WAL, synchronous=FULL, explicit transactions."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(RAW_TABLE)
    return db


def raw_rows(files: list[FileVersion], now: float) -> list[tuple[str, int, int, str, float]]:
    return [(f.path, f.size, f.mtime_ns, JOB, now) for f in files]


# -- 1. enqueue_one -----------------------------------------------------------------------


def bench_enqueue_one(ctx: Context) -> Result:
    n = ctx.size("enqueue_one")
    files = versions(n)
    root = "/data/inbox"

    def ours() -> float:
        with workdir(ctx, "enqueue_one") as d:
            ledger = Ledger(d / "cache")
            try:
                start = time.perf_counter()
                for f in files:
                    ledger.enqueue([f], root, [JOB], "watch", time.time())
                elapsed = time.perf_counter() - start
                check(ledger.counts()["queued"] == n, "queued jobs", ledger.counts())
            finally:
                ledger.close()
            return elapsed

    def baseline() -> float:
        with workdir(ctx, "enqueue_one-raw") as d:
            db = raw_db(d / "raw.db")
            try:
                rows = [(f.path, f.size, f.mtime_ns, JOB) for f in files]
                start = time.perf_counter()
                for row in rows:
                    db.execute("BEGIN IMMEDIATE")
                    db.execute(RAW_INSERT, (*row, time.time()))
                    db.execute("COMMIT")
                elapsed = time.perf_counter() - start
            finally:
                db.close()
            return elapsed

    repeats = ctx.repeats(3)
    base_s, ours_s = interleaved(repeats, baseline, ours)
    ratio = base_s / ours_s  # rate ratio
    return Result(
        name="enqueue_one",
        ours=n / ours_s,
        unit="events/s",
        baseline=n / base_s,
        baseline_unit="rows/s",
        ratio=ratio,
        ratio_kind="rate",
        target=">= 0.5x rate",
        met=ratio >= 0.5,
        n=n,
        repeats=repeats,
    )


# -- 2. backfill_enqueue --------------------------------------------------------------------


def bench_backfill_enqueue(ctx: Context) -> Result:
    n = ctx.size("backfill_enqueue")
    files = versions(n)
    root = "/data/inbox"
    batch = 1000
    split: dict[str, float] = {}

    def ours() -> float:
        with workdir(ctx, "backfill") as d:
            ledger = Ledger(d / "cache")
            try:
                now = time.time()
                start = time.perf_counter()
                new = [files[i] for i in ledger.unknown(files, [JOB])]
                mid = time.perf_counter()
                added = 0
                for i in range(0, len(new), batch):
                    added += ledger.enqueue(new[i : i + batch], root, [JOB], "scan", now)
                elapsed = time.perf_counter() - start
                check(added == n, "new jobs", added)
            finally:
                ledger.close()
            if elapsed < split.get("total", math.inf):
                split.update(total=elapsed, unknown=mid - start, enqueue=elapsed - (mid - start))
            return elapsed

    def baseline() -> float:
        with workdir(ctx, "backfill-raw") as d:
            db = raw_db(d / "raw.db")
            try:
                rows = raw_rows(files, time.time())
                start = time.perf_counter()
                for i in range(0, len(rows), 100):
                    db.execute("BEGIN IMMEDIATE")
                    db.executemany(RAW_INSERT, rows[i : i + 100])
                    db.execute("COMMIT")
                elapsed = time.perf_counter() - start
            finally:
                db.close()
            return elapsed

    repeats = ctx.repeats(3)
    base_s, ours_s = interleaved(repeats, baseline, ours)
    rate = n / ours_s
    result = Result(
        name="backfill_enqueue",
        ours=rate,
        unit="files/s",
        baseline=n / base_s,
        baseline_unit="rows/s",
        ratio=base_s / ours_s,
        ratio_kind="rate",
        target=">= 50,000 files/s",
        met=rate >= 50_000,
        n=n,
        repeats=repeats,
    )
    result.notes.append(
        f"unknown() {split['unknown']:.3f} s + enqueue() in batches of {batch}"
        f" {split['enqueue']:.3f} s"
    )
    return result


# -- 3./4. claim_complete, with and without history -----------------------------------------


def _insert_history(db_path: Path, count: int) -> float:
    """Add ``count`` finished jobs straight into the ledger's own table, in one transaction."""
    start = time.perf_counter()
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=OFF")
        now = time.time() - 86400
        rows = (
            (
                f"/data/history/y{i // 100_000}/d{i // 1000}/f{i:07d}.nc",
                1000,
                MTIME0 + i,
                JOB,
                "/data/history",
                now,
                now,
                now,
                now,
            )
            for i in range(count)
        )
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO jobs (path, size, mtime_ns, job, root, state, attempts, source,"
            " created, updated, started, finished)"
            " VALUES (?, ?, ?, ?, ?, 'done', 1, 'scan', ?, ?, ?, ?)",
            rows,
        )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return time.perf_counter() - start


def _claim_loop(ledger: Ledger, n: int, start_index: int) -> float:
    """Enqueue ``n`` jobs (not timed), then claim and finish them all; the seconds taken."""
    ledger.enqueue(versions(n, start=start_index), "/data/inbox", [JOB], "scan", time.time())
    done = 0
    start = time.perf_counter()
    while True:
        claim = ledger.claim(time.time())
        if claim is None:
            break
        ledger.finish(claim, JobState.DONE, time.time())
        done += 1
    elapsed = time.perf_counter() - start
    check(done == n, "jobs finished", done)
    return elapsed


def _raw_claim_loop(d: Path, n: int) -> float:
    db = raw_db(d / "raw.db")
    try:
        db.execute("BEGIN")
        db.executemany(RAW_INSERT, raw_rows(versions(n), time.time()))
        db.execute("COMMIT")
        done = 0
        start = time.perf_counter()
        while True:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1 WHERE id ="
                " (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1)"
                " RETURNING id"
            ).fetchone()
            db.execute("COMMIT")
            if row is None:
                break
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE jobs SET state = 'done' WHERE id = ?", row)
            db.execute("COMMIT")
            done += 1
        elapsed = time.perf_counter() - start
        check(done == n, "jobs finished", done)
    finally:
        db.close()
    return elapsed


def _claim_complete_empty(ctx: Context) -> dict[str, float]:
    """Best seconds for n jobs: the ledger as the service drives it, and the raw baseline.
    Computed once per run."""
    if "claim_empty" in ctx.cache:
        return ctx.cache["claim_empty"]  # type: ignore[no-any-return]
    n = ctx.size("claim_complete")

    def ours() -> float:
        with workdir(ctx, "claim") as d:
            Ledger(d / "cache").close()  # the same steps as with history, minus its rows
            ledger = Ledger(d / "cache", service=True)
            try:
                return _claim_loop(ledger, n, 0)
            finally:
                ledger.close()

    def baseline() -> float:
        with workdir(ctx, "claim-raw") as d:
            return _raw_claim_loop(d, n)

    repeats = ctx.repeats(3)
    base_s, ours_s = interleaved(repeats, baseline, ours)
    ctx.cache["claim_empty"] = {
        "n": n,
        "repeats": repeats,
        "baseline": base_s,
        "ours": ours_s,
    }
    return ctx.cache["claim_empty"]  # type: ignore[no-any-return]


def bench_claim_complete(ctx: Context) -> Result:
    m = _claim_complete_empty(ctx)
    n = int(m["n"])
    ratio = m["baseline"] / m["ours"]
    return Result(
        name="claim_complete",
        ours=n / m["ours"],
        unit="jobs/s",
        baseline=n / m["baseline"],
        baseline_unit="items/s",
        ratio=ratio,
        ratio_kind="rate",
        target=">= 0.4x rate",
        met=ratio >= 0.4,
        n=n,
        repeats=int(m["repeats"]),
    )


def bench_claim_complete_history(ctx: Context) -> Result:
    empty = _claim_complete_empty(ctx)
    n = int(empty["n"])
    history = ctx.size("history")
    repeats = int(empty["repeats"])
    with workdir(ctx, "claim-history") as d:
        Ledger(d / "cache").close()  # creates the real schema
        fill_s = _insert_history(d / "cache" / "dpypeline.db", history)
        ledger = Ledger(d / "cache", service=True)
        try:
            best = min(_claim_loop(ledger, n, r * n) for r in range(repeats))
        finally:
            ledger.close()
    ratio = empty["ours"] / best
    result = Result(
        name="claim_complete_history",
        ours=n / best,
        unit="jobs/s",
        baseline=n / empty["ours"],
        baseline_unit="jobs/s (empty history)",
        ratio=ratio,
        ratio_kind="rate",
        target=">= 0.8x rate",
        met=ratio >= 0.8,
        n=n,
        repeats=repeats,
    )
    result.notes.append(
        f"{history:,} finished jobs in history (inserted in {fill_s:.1f} s);"
        " baseline is claim_complete's ledger figure from this run"
    )
    return result


# -- 5. reconcile_known ---------------------------------------------------------------------


def walk_versions(root: str) -> set[tuple[str, int, int]]:
    """The baseline walk: list every directory, stat every file, keep (path, size, mtime)."""
    found = set()
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    found.add((entry.path, st.st_size, st.st_mtime_ns))
    return found


def bench_reconcile_known(ctx: Context) -> Result:
    n = ctx.size("reconcile_known")
    split: dict[str, float] = {}
    with workdir(ctx, "reconcile") as d:
        root = str(d / "tree")
        os.mkdir(root)
        build_s = time.perf_counter()
        dirs = build_tree(root, n, 1000)
        build_s = time.perf_counter() - build_s
        matcher = PathMatcher(["**/*.nc"], IGNORE, case_sensitive=True)
        ledger = Ledger(d / "cache")
        db = sqlite3.connect(d / "cache" / "dpypeline.db", isolation_level=None)
        try:
            files = scan(root, matcher).files
            check(len(files) == n, "files found", len(files))
            for i in range(0, n, 10_000):
                ledger.enqueue(files[i : i + 10_000], root, [JOB], "scan", time.time())
            db.execute("UPDATE jobs SET state = 'done', attempts = 1, finished = updated")

            def ours() -> float:
                start = time.perf_counter()
                result = scan(root, matcher)
                mid = time.perf_counter()
                missing = ledger.unknown(result.files, [JOB])
                elapsed = time.perf_counter() - start
                check(not missing and len(result.files) == n, "unknown files", len(missing))
                if elapsed < split.get("total", math.inf):
                    split.update(total=elapsed, scan=mid - start, unknown=elapsed - (mid - start))
                return elapsed

            def baseline() -> float:
                start = time.perf_counter()
                on_disk = walk_versions(root)
                known = set(
                    db.execute("SELECT path, size, mtime_ns FROM jobs WHERE job = ?", (JOB,))
                )
                new = on_disk - known
                elapsed = time.perf_counter() - start
                check(not new and len(on_disk) == n, "unknown files", len(new))
                return elapsed

            repeats = ctx.repeats(3)
            base_s, ours_s = interleaved(repeats, baseline, ours)
        finally:
            db.close()
            ledger.close()
    ratio = ours_s / base_s
    result = Result(
        name="reconcile_known",
        ours=ours_s,
        unit="s",
        baseline=base_s,
        baseline_unit="s",
        ratio=ratio,
        ratio_kind="time",
        target="<= 5x time",
        met=ratio <= 5.0,
        n=n,
        repeats=repeats,
    )
    result.notes.append(
        f"scan() {split['scan']:.3f} s + unknown() {split['unknown']:.3f} s;"
        f" {n:,} files in {dirs} directories (built in {build_s:.1f} s),"
        " warm cache"
    )
    return result


# -- 6. ingest_noop_once --------------------------------------------------------------------

PIPELINE_YAML = """\
name: bench
cache_dir: {cache}
monitor: false
watch:
  - path: {inbox}
    patterns: ["**/*.nc"]
    settle: 100ms
jobs:
  - name: noop
    tasks:
      - task: bench_tasks.noop
logging: {{format: json, level: info}}
"""


def bench_ingest_noop_once(ctx: Context) -> Result:
    n = ctx.size("ingest_noop_once")
    timeout = 120.0 if ctx.quick else 300.0
    startup_s = python_startup(ctx.repeats(3))
    with workdir(ctx, "ingest") as d:
        inbox = d / "inbox"
        inbox.mkdir()
        build_tree(str(inbox), n, 1000)
        config = d / "pipeline.yaml"
        config.write_text(PIPELINE_YAML.format(cache=d / "cache", inbox=inbox))
        env = service_env()
        cmd = [sys.executable, "-m", "dpypeline"]
        log_path = d / "service.log"
        with open(log_path, "wb") as log:
            start = time.perf_counter()
            try:
                proc = subprocess.run(
                    [*cmd, "run", "--once", "-c", str(config)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"`dpypeline run --once` did not finish {n} files in {timeout:.0f} s"
                ) from None
            wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"`dpypeline run --once` exited {proc.returncode}:\n{tail}")
        status = subprocess.run(
            [*cmd, "status", "--json", "-c", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        counts = json.loads(status.stdout)
        if counts.get("done") != n:
            states = ("queued", "running", "retrying", "done", "dead", "skipped")
            raise RuntimeError(
                f"expected done == {n}, status says "
                + ", ".join(f"{s} {counts.get(s)}" for s in states)
            )
        done_at = _job_done_times(log_path)
    rate = n / wall
    result = Result(
        name="ingest_noop_once",
        ours=rate,
        unit="files/s",
        baseline=startup_s,
        baseline_unit="s (python -c pass)",
        ratio=None,
        ratio_kind="",
        target=">= 500 files/s",
        met=rate >= 500,
        n=n,
        repeats=1,
    )
    result.notes.append(f"{wall:.2f} s from launch to exit (status: done {n:,}); settle 100ms")
    quarter = len(done_at) // 4
    if quarter >= 2:
        first = (quarter - 1) / (done_at[quarter - 1] - done_at[0] or math.inf)
        last = (quarter - 1) / (done_at[-1] - done_at[-quarter] or math.inf)
        result.notes.append(
            f"from the log: {first:,.0f} jobs/s over the first quarter of the"
            f" jobs, {last:,.0f} jobs/s over the last"
        )
    return result


def _job_done_times(log_path: Path) -> list[float]:
    """When each job_done line was logged (the service logs JSON lines when not on a TTY)."""
    times = []
    with log_path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if '"job_done"' not in line:
                continue
            try:
                record = json.loads(line)
                if record.get("event") == "job_done":
                    times.append(datetime.fromisoformat(record["timestamp"]).timestamp())
            except (ValueError, KeyError, TypeError):
                continue
    return sorted(times)


BENCHMARKS: dict[str, Callable[[Context], Result]] = {
    "enqueue_one": bench_enqueue_one,
    "backfill_enqueue": bench_backfill_enqueue,
    "claim_complete": bench_claim_complete,
    "claim_complete_history": bench_claim_complete_history,
    "reconcile_known": bench_reconcile_known,
    "reconcile_1m": bench_reconcile_1m,
    "poll_cpu": bench_poll_cpu,
    "ingest_noop_once": bench_ingest_noop_once,
    "ingest_history": bench_ingest_history,
    "inotify_latency": bench_inotify_latency,
    "start_ready": bench_start_ready,
    "memory": bench_memory,
}


def _zarr(case: str) -> Callable[[Context], Result]:
    def run(ctx: Context) -> Result:
        from bench_zarr import bench_zarr  # imports xarray: only when a zarr row is wanted

        return bench_zarr(ctx, case)

    return run


BENCHMARKS.update({f"zarr_{case}": _zarr(case) for case in ZARR_CASES})
BENCHMARKS.update({"dask_cpu": bench_dask_cpu, "dask_overhead": bench_dask_overhead})


def _orca(case: str) -> Callable[[Context], Result]:
    def run(ctx: Context) -> Result:
        from bench_orca import bench_orca  # imports xarray: only when an orca row is wanted

        return bench_orca(ctx, case)

    return run


BENCHMARKS.update({case: _orca(case) for case in ORCA_CASES})


def _virtual(name: str) -> Callable[[Context], Result]:
    def run(ctx: Context) -> Result:
        from bench_virtual import bench_virtual  # imports xarray: only when wanted

        return bench_virtual(ctx, name)

    return run


def _versions(name: str) -> Callable[[Context], Result]:
    def run(ctx: Context) -> Result:
        import bench_versions  # imports xarray and icechunk: only when such a row is wanted

        bench = bench_versions.bench_revert if name == "revert" else bench_versions.bench_gc
        return bench(ctx)

    return run


BENCHMARKS.update({name: _virtual(name) for name in ("virtual_orca025", "virtual_read_thetao")})
BENCHMARKS.update(
    {"revert_first_of_three": _versions("revert"), "gc_after_20_replaced": _versions("gc")}
)


# -- output ---------------------------------------------------------------------------------


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit.startswith("s"):
        return f"{value:.3f} {unit}"
    if value < 100:
        return f"{value:.1f} {unit}"
    return f"{value:,.0f} {unit}"


def _ratio(r: Result) -> str:
    if r.ratio is None:
        return "n/a"
    return f"{r.ratio:.2f}x {r.ratio_kind}"


def table(results: list[Result], failures: dict[str, str]) -> str:
    header = ("benchmark", "ours", "baseline", "ratio", "target", "met")
    rows = [
        (
            r.name,
            _figure(r.ours, r.unit),
            _figure(r.baseline, r.baseline_unit),
            _ratio(r),
            r.target,
            "-" if r.met is None else "yes" if r.met else "NO",
        )
        for r in results
    ]
    rows += [(name, "FAILED", "", "", "", "") for name in failures]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    lines += [
        " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.append(
        "ratio = ours / baseline: of rates (x rate, higher is better) or of times"
        " (x time, lower is better)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=NAMES,
        metavar="NAME",
        help=f"run only these ({', '.join(NAMES)})",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results here")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the temporary directories go (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    selected = [
        name for name in NAMES if (name in args.only if args.only else name not in OPTIONAL)
    ]
    base = args.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    fstype = filesystem_type(base)
    ctx = Context(base=base, quick=args.quick)

    print(
        f"dpypeline benchmarks ({'quick' if args.quick else 'full'}): Python"
        f" {platform.python_version()}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs;"
        f" temporary directories in {base} ({fstype})",
        flush=True,
    )
    if fstype in ("tmpfs", "ramfs"):
        print(
            "warning: a memory filesystem makes fsync free; the figures say little about a disk",
            flush=True,
        )

    started = time.perf_counter()
    results: list[Result] = []
    failures: dict[str, str] = {}
    with ctx.resources:
        for name in selected:
            print(f"  {name} ...", end="", flush=True)
            t0 = time.perf_counter()
            try:
                result = BENCHMARKS[name](ctx)
            except Exception as exc:  # noqa: BLE001  (report it, go on with the others)
                failures[name] = f"{type(exc).__name__}: {exc}"
                print(" FAILED", flush=True)
                traceback.print_exc()
                continue
            result.seconds = time.perf_counter() - t0
            results.append(result)
            print(f" {result.seconds:.1f} s", flush=True)
    total = time.perf_counter() - started

    print()
    print(table(results, failures))
    print()
    for r in results:
        print("; ".join([f"{r.name}: n={r.n:,}, best of {r.repeats}", *r.notes]))
    for name, error in failures.items():
        print(f"{name}: FAILED: {error}")
    print(f"\ntotal {total:.1f} s")

    if args.json:
        report = {
            "quick": args.quick,
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "cpus": os.cpu_count(),
            "dir": str(base),
            "fstype": fstype,
            "seconds": total,
            "results": [asdict(r) for r in results],
            "failures": failures,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
