"""The command line: ``dpypeline run | validate | status | jobs | retry | enqueue``.

Exit codes: 0 ok, 1 runtime failure, 2 bad config or usage (so systemd's
``RestartPreventExitStatus=2`` stops a config error from restart-looping), 3 ``run --once``
finished but some job of the run ended dead (``service.EXIT_JOBS_DEAD``). status, jobs,
retry and enqueue work while the service runs: they only touch the ledger, through
SQLite, and the service picks up what they changed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

from dpypeline.cachedir import read_executor_status, service_pid
from dpypeline.config import PipelineConfig, load_config
from dpypeline.errors import ConfigError, StateError
from dpypeline.ledger import JobRecord, JobState, Ledger

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _config_path(arg: str | None) -> str:
    return arg or os.environ.get("DPYPELINE_CONFIG") or "pipeline.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpypeline",
        description=("Run a pipeline exactly once in effect on every complete new file."),
    )
    p.add_argument("--version", action="version", version=f"dpypeline {version('dpypeline')}")
    p.add_argument(
        "-i",
        dest="legacy_config",
        metavar="FILE",
        help="the original dpypeline's form: same as `run -c FILE`",
    )
    sub = p.add_subparsers(dest="command")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument(
            "-c",
            "--config",
            help="pipeline YAML (default: $DPYPELINE_CONFIG, then ./pipeline.yaml)",
        )
        return sp

    run = command("run", "run the service")
    run.add_argument(
        "--once",
        action="store_true",
        help="process what is there (and what arrives meanwhile), then exit",
    )
    command("validate", "parse the config, import every task, check paths and credentials")
    status = command("status", "counts per state, oldest waiting job, recent errors")
    status.add_argument("--json", action="store_true")
    jobs = command("jobs", "list jobs, newest first")
    jobs.add_argument("--state", choices=[s.value for s in JobState])
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--json", action="store_true")
    retry = command("retry", "move dead jobs back to the queue with fresh attempts")
    retry.add_argument("job_ids", nargs="*", type=int, metavar="JOB_ID")
    retry.add_argument("--dead", action="store_true", help="every dead job")
    enqueue = command("enqueue", "queue files (or directories) by hand, deduplicated")
    enqueue.add_argument("paths", nargs="+", metavar="PATH")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.legacy_config:
        args.command, args.config, args.once = "run", args.legacy_config, False
    if args.command is None:
        parser.print_usage(sys.stderr)
        return EXIT_CONFIG
    if args.command == "retry" and not (args.job_ids or args.dead):
        print("dpypeline retry: give JOB_ID... or --dead", file=sys.stderr)
        return EXIT_CONFIG
    path = _config_path(args.config)
    try:
        config = load_config(path)
        return int(COMMANDS[args.command](config, args))
    except ConfigError as exc:
        print(f"dpypeline: invalid config {path}:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StateError as exc:
        print(f"dpypeline: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_run(config: PipelineConfig, args: argparse.Namespace) -> int:
    from dpypeline import logs
    from dpypeline.pipeline import import_tasks
    from dpypeline.preflight import preflight
    from dpypeline.redact import known_secrets
    from dpypeline.service import ClusterLost, Service, StuckJob, reexec

    logs.configure(config.logging.format, config.logging.level, secrets=known_secrets(config))
    jobs, setup = import_tasks(config)
    preflight(config, jobs, setup)  # what validate refuses, run refuses: exit 2
    service = Service(config, jobs, setup, once=True if args.once else None)
    _set_stop_handlers(service.on_signal)  # a stop before the loop runs: its first step sees it
    try:
        return service.run()
    except (StuckJob, ClusterLost):
        if service.stop_requested:
            return EXIT_FAILURE
        reexec()  # does not return: the same command starts over in this process
        return EXIT_FAILURE
    except (ConfigError, StateError):
        raise
    except Exception as exc:  # noqa: BLE001 - the last word on an unexpected failure, for the journal
        logs.get_logger().exception("service_failed", error=str(exc))
        return EXIT_FAILURE
    finally:
        # the service has closed: a late stop signal has nothing left to stop, and must not
        # turn a clean exit into death by signal while the interpreter shuts down
        _set_stop_handlers(signal.SIG_IGN)


def _set_stop_handlers(handler: Any) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def cmd_validate(config: PipelineConfig, args: argparse.Namespace) -> int:
    from dpypeline.fsinfo import require_local_filesystem
    from dpypeline.pipeline import import_tasks
    from dpypeline.preflight import preflight

    jobs, setup = import_tasks(config)
    problems = []
    try:
        preflight(config, jobs, setup)
    except ConfigError as exc:
        problems.append(str(exc))
    cluster = config.executor.cluster
    if config.executor.kind == "dask" and cluster is not None:
        from dpypeline.dask_executor import cluster_class

        try:
            cluster_class(cluster.class_)
        except ConfigError as exc:
            where = config.where("executor", "cluster", "class_")
            problems.append(f"{where}: {str(exc).removeprefix('executor.cluster.class: ')}")
    if problems:
        raise ConfigError("\n".join(problems))
    parent = next(p for p in (config.cache_dir, *config.cache_dir.parents) if p.exists())
    require_local_filesystem(parent, "CACHE_DIR")
    print(
        f"ok: {config.name}: {len(config.watch)} watch(es), "
        f"{len(jobs)} job(s) of {sum(len(j.tasks) for j in jobs)} task(s), "
        f"{len(setup)} setup task(s), {len(config.objectstores)} object store(s);"
        f" state in {config.cache_dir}"
    )
    return EXIT_OK


def _ledger(config: PipelineConfig) -> Ledger:
    return Ledger(config.cache_dir)


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


def _job_dict(r: JobRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "state": r.state.value,
        "job": r.job,
        "path": r.path,
        "size": r.size,
        "mtime_ns": r.mtime_ns,
        "attempts": r.attempts,
        "error": r.error,
        "source": r.source,
        "created": _iso(r.created),
        "updated": _iso(r.updated),
        "retry_at": _iso(r.not_before),
    }


def cmd_status(config: PipelineConfig, args: argparse.Namespace) -> int:
    ledger = _ledger(config)
    try:
        counts = ledger.counts()
        oldest = ledger.oldest_waiting()
        errors = ledger.recent_errors()
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
        "oldest_waiting": _job_dict(oldest) if oldest else None,
        "recent_errors": [_job_dict(r) for r in errors],
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
        print(f"  oldest waiting: #{oldest.id} {oldest.path} ({oldest.state.value}, {age:.0f}s)")
    for r in errors:
        print(f"  #{r.id} {r.state.value}: {r.path}: {r.error}")
    return EXIT_OK


def cmd_jobs(config: PipelineConfig, args: argparse.Namespace) -> int:
    ledger = _ledger(config)
    try:
        records = ledger.jobs(JobState(args.state) if args.state else None, args.limit)
    finally:
        ledger.close()
    if args.json:
        print(json.dumps([_job_dict(r) for r in records], indent=2))
        return EXIT_OK
    for r in records:
        line = f"{r.id:>7} {r.state.value:<8} {r.attempts:>2} {r.job:<16} {r.path}"
        print(line + (f"\n        {r.error}" if r.error else ""))
    return EXIT_OK


def cmd_retry(config: PipelineConfig, args: argparse.Namespace) -> int:
    ledger = _ledger(config)
    refused = []
    try:
        if args.dead:
            moved = ledger.retry(None, time.time())
        else:
            moved = 0
            for job_id in args.job_ids:
                if ledger.retry([job_id], time.time()):
                    moved += 1
                else:
                    refused.append(_why_not_retried(ledger, job_id))
    finally:
        ledger.close()
    for reason in refused:
        print(f"not retried: {reason}", file=sys.stderr)
    print(f"{moved} dead job(s) queued again")
    return EXIT_FAILURE if refused else EXIT_OK


def _why_not_retried(ledger: Ledger, job_id: int) -> str:
    record = ledger.get(job_id)
    if record is None:
        return f"job {job_id} does not exist (see `dpypeline jobs`)"
    return (
        f"job {job_id} is {record.state.value}, not dead: only dead jobs can be retried"
        f" ({record.path})"
    )


def cmd_enqueue(config: PipelineConfig, args: argparse.Namespace) -> int:
    from dpypeline.patterns import PathMatcher
    from dpypeline.scan import FileVersion, scan

    names = [j.name for j in config.jobs]
    roots = [(os.path.realpath(w.path), w) for w in config.watch]
    failed = added = offered = 0
    ledger = _ledger(config)
    try:
        for raw in args.paths:
            path = os.path.realpath(raw)
            root, watch = next(
                ((r, w) for r, w in roots if path == r or path.startswith(r + os.sep)), (None, None)
            )
            if root is None or watch is None:
                print(
                    f"not queued: {raw} is not under any watched directory "
                    f"({', '.join(r for r, _ in roots)})",
                    file=sys.stderr,
                )
                failed += 1
                continue
            if os.path.isdir(path):
                matcher = PathMatcher(watch.patterns, watch.ignore_patterns, watch.case_sensitive)
                files = [
                    f
                    for f in scan(root, matcher).files
                    if path == root or f.path.startswith(path + os.sep)
                ]
            else:
                try:
                    st = os.stat(path)
                except OSError as exc:
                    print(f"not queued: {raw}: {exc.strerror}", file=sys.stderr)
                    failed += 1
                    continue
                files = [FileVersion(path, st.st_size, st.st_mtime_ns)]
            offered += len(files)
            added += ledger.enqueue(files, root, names, "cli", time.time())
    finally:
        ledger.close()
    running = service_pid(config.cache_dir)
    print(
        f"{added} new job(s) from {offered} file(s); "
        f"{'the service picks them up now' if running else 'they run when the service starts'}"
    )
    return EXIT_FAILURE if failed else EXIT_OK


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "status": cmd_status,
    "jobs": cmd_jobs,
    "retry": cmd_retry,
    "enqueue": cmd_enqueue,
}
