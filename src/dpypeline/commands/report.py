"""What ``dpypeline status`` and ``dpypeline jobs`` print: the ledger's counts, the oldest
waiting job, recent errors, holds and the executor, as text for a person or as JSON.

Both only read the ledger (through SQLite), so they work while the service runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from dpypeline.config.model import PipelineConfig
from dpypeline.ordering import Hold, held_summary
from dpypeline.paths import shown
from dpypeline.state.cachedir import read_executor_status, service_pid
from dpypeline.state.ledger import JobRecord, JobState, Ledger

EXIT_OK = 0  # cli.EXIT_OK


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


# what a dead job's error tells the operator to do, which a job that ended otherwise
# (skipped by the operator, say) no longer asks for
_RETRY_ADVICE = re.compile(
    r" \(permanent; fix the cause, then run: dpypeline retry \d+\)"
    r"|\.? Fix the cause, then run: dpypeline retry \d+"
)


def error_of(r: JobRecord) -> str | None:
    """The job's error as shown: without the advice to retry unless the job is dead."""
    if r.error is None or r.state is JobState.DEAD:
        return r.error
    return _RETRY_ADVICE.sub("", r.error)


def _job_dict(r: JobRecord, held: dict[int, Hold] | None = None) -> dict[str, Any]:
    hold = (held or {}).get(r.id)
    return {
        "id": r.id,
        "state": r.state.value,
        "held_behind": hold.behind if hold else None,
        "held": hold.reason if hold else None,
        "job": r.job,
        "path": shown(r.path),
        "size": r.size,
        "mtime_ns": r.mtime_ns,
        "attempts": r.attempts,
        "error": error_of(r),
        "source": r.source,
        "created": iso(r.created),
        "updated": iso(r.updated),
        "retry_at": iso(r.not_before),
    }


def cmd_status(config: PipelineConfig, args: argparse.Namespace) -> int:
    if getattr(args, "watch", False):
        from dpypeline.loop.progress import watch

        once = argparse.Namespace(**{**vars(args), "watch": False})
        return watch(lambda: cmd_status(config, once), json=args.json)
    ledger = Ledger(config.cache_dir, read_only=True)
    try:
        counts = ledger.counts()
        oldest = ledger.oldest_waiting()
        errors = ledger.recent_errors()
        held = ledger.held()
    finally:
        ledger.close()
    pid = service_pid(config.cache_dir)
    executor = read_executor_status(config.cache_dir) if pid else None
    report: dict[str, Any] = {
        **counts,
        "name": config.name,
        "cache_dir": str(config.cache_dir),
        "service_pid": pid,
        "executor": executor,
        "oldest_waiting": _job_dict(oldest, _by_job(held)) if oldest else None,
        "recent_errors": [_job_dict(r) for r in errors],
        "held": [asdict(h) for h in held],
        "held_summary": held_summary(held) or None,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(f"{config.name}: service {f'running, pid {pid}' if pid else 'not running'}")
    if executor:
        print(
            f"  dask cluster {executor.get('address')}: {executor.get('workers')} workers,"
            f" {executor.get('in_flight')} of {executor.get('slots')} slots in flight,"
            f" dashboard {executor.get('dashboard')}"
        )
    print("  " + "  ".join(f"{s.value} {counts[s.value]}" for s in JobState))
    if oldest:
        age = time.time() - oldest.created
        where = shown(oldest.path)
        print(f"  oldest waiting: #{oldest.id} {where} ({oldest.state.value}, {age:.0f}s)")
    if held:
        print(f"  held: {held_summary(held)}")
    for r in errors:
        print(f"  #{r.id} {r.state.value}: {shown(r.path)}: {error_of(r)}")
    return EXIT_OK


def _by_job(held: list[Hold]) -> dict[int, Hold]:
    return {h.job_id: h for h in held}


def cmd_jobs(config: PipelineConfig, args: argparse.Namespace) -> int:
    ledger = Ledger(config.cache_dir, read_only=True)
    try:
        # one more than shown tells whether the list was cut; SQLite reads LIMIT -1 as none
        records = ledger.jobs(
            JobState(args.state) if args.state else None, args.limit + 1 if args.limit > 0 else -1
        )
        held = _by_job(ledger.held())
    finally:
        ledger.close()
    cut = 0 < args.limit < len(records)
    records = records[: args.limit] if cut else records
    if args.json:
        print(json.dumps([_job_dict(r, held) for r in records], indent=2))
    else:
        print(jobs_table(records, held), end="")
    if cut:
        print(
            f"dpypeline jobs: only the newest {args.limit} shown, there are more:"
            " --limit N shows N, --limit 0 all",
            file=sys.stderr,
        )
    return EXIT_OK


JOB_COLUMNS = ("ID", "STATE", "TRIES", "JOB", "UPDATED", "FILE")


def jobs_table(records: list[JobRecord], held: dict[int, Hold]) -> str:
    """A header and one row per job, columns as wide as their widest value; a job's error
    (or why it is held) on its own line below its row, indented, where it may be long."""
    rows = [
        (
            str(r.id),
            r.state.value,
            str(r.attempts),
            r.job,
            _local(r.updated),
            shown(r.path),
        )
        for r in records
    ]
    widths = [max(len(c) for c in column) for column in zip(JOB_COLUMNS, *rows, strict=False)]
    right = {0, 2}  # numbers

    def line(cells: tuple[str, ...]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip() + "\n"

    text = line(JOB_COLUMNS)
    for r, cells in zip(records, rows, strict=True):
        text += line(cells)
        note = held[r.id].reason if r.id in held else error_of(r)
        if note:
            text += f"{'':>{widths[0]}}  {note}\n"
    return text


def _local(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M") if ts else "-"
