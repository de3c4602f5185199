"""What ``dpypeline status`` and ``dpypeline jobs`` print: the ledger's counts, the oldest
waiting job, recent errors, holds and the executor, as text for a person or as JSON.

Both only read the ledger (through SQLite), so they work while the service runs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from dpypeline.config import PipelineConfig
from dpypeline.executors.ordering import Hold, held_summary
from dpypeline.paths import shown
from dpypeline.state.cachedir import read_executor_status, service_pid
from dpypeline.state.ledger import JobRecord, JobState, Ledger

EXIT_OK = 0  # cli.EXIT_OK


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


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
        "error": r.error,
        "source": r.source,
        "created": iso(r.created),
        "updated": iso(r.updated),
        "retry_at": iso(r.not_before),
    }


def cmd_status(config: PipelineConfig, args: argparse.Namespace) -> int:
    if getattr(args, "watch", False):
        from dpypeline.progress import watch

        once = argparse.Namespace(**{**vars(args), "watch": False})
        return watch(lambda: cmd_status(config, once), json=args.json)
    ledger = Ledger(config.cache_dir)
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
        print(f"  #{r.id} {r.state.value}: {shown(r.path)}: {r.error}")
    return EXIT_OK


def _by_job(held: list[Hold]) -> dict[int, Hold]:
    return {h.job_id: h for h in held}


def cmd_jobs(config: PipelineConfig, args: argparse.Namespace) -> int:
    ledger = Ledger(config.cache_dir)
    try:
        records = ledger.jobs(JobState(args.state) if args.state else None, args.limit)
        held = _by_job(ledger.held())
    finally:
        ledger.close()
    if args.json:
        print(json.dumps([_job_dict(r, held) for r in records], indent=2))
        return EXIT_OK
    for r in records:
        line = f"{r.id:>7} {r.state.value:<8} {r.attempts:>2} {r.job:<16} {shown(r.path)}"
        note = held[r.id].reason if r.id in held else r.error
        print(line + (f"\n        {note}" if note else ""))
    return EXIT_OK
