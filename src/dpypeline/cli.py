"""The command line: ``dpypeline run | validate | status | jobs | retry | skip | enqueue |
ledger | migrate``.

Exit codes: 0 ok, 1 runtime failure, 2 bad config or usage (so systemd's
``RestartPreventExitStatus=2`` stops a config error from restart-looping), 3 ``run --once``
finished but some job of the run ended dead (``service.EXIT_JOBS_DEAD``), 4 the ledger is
damaged or lost (``LedgerRefused``; also in ``RestartPreventExitStatus=``), 75 ``run
--max-runtime`` stopped at its time budget with work left (``service.EXIT_TIME_BUDGET``).
status, jobs, retry, skip and enqueue work while the service runs: they only touch the
ledger, through SQLite, and the service picks up what they changed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpypeline.commands.ledger import add_parser, cmd_ledger
from dpypeline.commands.report import cmd_jobs, cmd_status, error_of, iso
from dpypeline.commands.tasks import cmd_tasks
from dpypeline.config.durations import parse_duration
from dpypeline.config.model import PipelineConfig, load_config
from dpypeline.errors import ConfigError, LedgerRefused, StateError
from dpypeline.legacy import migrate
from dpypeline.paths import shown
from dpypeline.state.cachedir import service_pid
from dpypeline.state.ledger import JobState, Ledger

if TYPE_CHECKING:
    from dpypeline.pipeline import Job

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_LEDGER = 0, 1, 2, 4


def _duration(text: str) -> float:
    """An argparse type: ``90s``, ``11h``, ``1d``."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def config_candidates() -> list[Path]:
    """Where a config is looked for when neither -c nor $DPYPELINE_CONFIG names one: the
    current directory, then where ``deploy/install.sh --user`` and ``install.sh`` put it."""
    user = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [Path("pipeline.yaml"), user / "dpypeline/pipeline.yaml", SYSTEM_CONFIG]


def _config_path(arg: str | None) -> str:
    if arg or os.environ.get("DPYPELINE_CONFIG"):
        return arg or os.environ["DPYPELINE_CONFIG"]
    return str(next((p for p in config_candidates() if p.is_file()), "pipeline.yaml"))


SYSTEM_CONFIG = Path("/etc/dpypeline/pipeline.yaml")
CONFIG_HELP = (
    "pipeline YAML (default: $DPYPELINE_CONFIG, then ./pipeline.yaml,"
    " ~/.config/dpypeline/pipeline.yaml, /etc/dpypeline/pipeline.yaml)"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpypeline",
        description=("Run a pipeline exactly once in effect on every complete new file."),
    )
    p.add_argument("-v", "--version", action="version", version=f"dpypeline {version('dpypeline')}")
    p.add_argument("-c", "--config", dest="config_first", metavar="CONFIG", help=CONFIG_HELP)
    p.add_argument(
        "-i",
        dest="legacy_config",
        metavar="FILE",
        help="the original dpypeline's form: same as `run -c FILE`; also reads the"
        " original's tagged YAML (convert it with `migrate`)",
    )
    sub = p.add_subparsers(dest="command")
    migrate = sub.add_parser(
        "migrate",
        help="write the new form of the original dpypeline's tagged YAML",
        description="write the new form of the original dpypeline's tagged YAML",
    )
    migrate.add_argument("old", metavar="OLD.yaml")
    migrate.add_argument("-o", "--output", metavar="NEW.yaml", help="default: stdout")
    tasks_help = "list the tasks a config may name by short name, with their parameters"
    tasks = sub.add_parser("tasks", help=tasks_help, description=tasks_help)
    tasks.add_argument("--json", action="store_true")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("-c", "--config", help=CONFIG_HELP)
        return sp

    run = command("run", "run the service")
    run.add_argument(
        "--once",
        action="store_true",
        help="process what is there (and what arrives meanwhile), then exit",
    )
    run.add_argument(
        "--max-runtime",
        metavar="DURATION",
        type=_duration,
        help="a time budget (e.g. 11h): after it no new job starts, running jobs get"
        " stop_grace, and the run exits 75 if work is left (cron, SLURM)",
    )
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no live progress line (it is shown only when stderr is a terminal)",
    )
    validate = command(
        "validate", "parse the config, import every task, check paths and credentials"
    )
    validate.add_argument("--json", action="store_true")
    validate.add_argument(
        "--sample",
        metavar="FILE",
        help="also run each job's tasks before to_zarr on FILE and print the chunks and codec"
        " a new store would get",
    )
    status = command("status", "counts per state, oldest waiting job, recent errors")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true", help="redraw every second; Ctrl-C ends")
    jobs = command("jobs", "list jobs, newest first")
    jobs.add_argument("--state", choices=[s.value for s in JobState])
    jobs.add_argument(
        "--limit", type=int, default=50, help="how many, newest first (default 50; 0: all)"
    )
    jobs.add_argument("--json", action="store_true")
    retry = command("retry", "move dead jobs back to the queue with fresh attempts")
    retry.add_argument("job_ids", nargs="*", type=int, metavar="JOB_ID")
    retry.add_argument("--dead", action="store_true", help="every dead job")
    skip = command(
        "skip", "accept that dead jobs are never written: they end skipped, held jobs go on"
    )
    skip.add_argument("job_ids", nargs="+", type=int, metavar="JOB_ID")
    enqueue = command("enqueue", "queue files (or directories) by hand, deduplicated")
    enqueue.add_argument("paths", nargs="+", metavar="PATH")
    add_parser(command("ledger", "back up the ledger, restore a copy, or start over"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.legacy_config:
        args.command, args.config, args.once = "run", args.legacy_config, False
    if args.command is None:  # a usage error, as argparse's own: exit 2, help on stderr
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    args.config = getattr(args, "config", None) or args.config_first  # -c before the command
    if args.command == "retry" and not (args.job_ids or args.dead):
        print("dpypeline retry: give JOB_ID... or --dead", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "migrate":
        return _migrate(args.old, args.output)
    if args.command == "tasks":
        return cmd_tasks(args.json)
    path = _config_path(args.config)
    try:
        if args.legacy_config:
            config, warning = migrate.load_any(path)
            if warning:
                print(f"dpypeline: warning: {warning}", file=sys.stderr)
        else:
            config = load_config(path)
        return int(COMMANDS[args.command](config, args))
    except ConfigError as exc:
        print(f"dpypeline: invalid config {path}:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LedgerRefused as exc:
        print(f"dpypeline: {exc}", file=sys.stderr)
        return EXIT_LEDGER
    except StateError as exc:
        print(f"dpypeline: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _migrate(old: str, new: str | None) -> int:
    try:
        return migrate.migrate(old, new)
    except ConfigError as exc:
        print(f"dpypeline: cannot convert {old}:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_run(config: PipelineConfig, args: argparse.Namespace) -> int:
    from dpypeline.commands.preflight import preflight
    from dpypeline.loop.progress import TerminalProgress, wanted
    from dpypeline.loop.restart import ClusterLost, StuckJob, reexec
    from dpypeline.loop.service import Service
    from dpypeline.observability import logs
    from dpypeline.observability.redact import known_secrets
    from dpypeline.pipeline import import_tasks

    logs.configure(
        config.logging.format,
        config.logging.level,
        secrets=known_secrets(config),
        roots=[str(w.path) for w in config.watch],
    )
    jobs, setup = import_tasks(config)
    preflight(config, jobs, setup)  # what validate refuses, run refuses: exit 2
    progress = (TerminalProgress(),) if wanted(getattr(args, "no_progress", False)) else ()
    service = Service(
        config,
        jobs,
        setup,
        once=True if args.once else None,
        observers=progress,
        max_runtime=getattr(args, "max_runtime", None),
    )
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
    from dpypeline.commands.preflight import preflight
    from dpypeline.pipeline import import_tasks, task_modules
    from dpypeline.watching.fsinfo import require_local_filesystem

    jobs, setup = import_tasks(config)
    modules = task_modules([*(t for job in jobs for t in job.tasks), *setup])
    problems = []
    try:
        preflight(config, jobs, setup)
    except ConfigError as exc:
        problems.append(str(exc))
    cluster = config.executor.cluster
    if config.executor.kind == "dask" and cluster is not None:
        from dpypeline.executors.cluster import cluster_class

        try:
            cluster_class(cluster.class_)
        except ConfigError as exc:
            where = config.where("executor", "cluster", "class_")
            problems.append(f"{where}: {str(exc).removeprefix('executor.cluster.class: ')}")
    tls = config.executor.tls
    if config.executor.kind == "dask" and tls is not None:
        from dpypeline.executors.cluster import tls_security

        try:
            tls_security(tls)  # the files exist, and nobody else can read the key
        except ConfigError as exc:
            field, _, text = str(exc).partition(": ")
            problems.append(f"{config.where(*field.split('.'))}: {text}")
    if problems:
        raise ConfigError("\n".join(problems))
    parent = next(p for p in (config.cache_dir, *config.cache_dir.parents) if p.exists())
    require_local_filesystem(parent, "CACHE_DIR")
    paths = _resolved_paths(config, jobs)
    if args.json:
        report = {
            "ok": True,
            "paths": paths,
            "name": config.name,
            "watches": len(config.watch),
            "jobs": len(jobs),
            "tasks": sum(len(j.tasks) for j in jobs),
            "setup_tasks": len(setup),
            "objectstores": len(config.objectstores),
            "cache_dir": str(config.cache_dir),
            "task_modules": modules,
        }
        if args.sample:
            layouts = _layouts(jobs, args.sample)
            if layouts is None:
                return EXIT_CONFIG
            report["layouts"] = {job: rows for job, (_, rows) in layouts.items()}
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(
        f"ok: {config.name}: {len(config.watch)} watch(es), "
        f"{len(jobs)} job(s) of {sum(len(j.tasks) for j in jobs)} task(s), "
        f"{len(setup)} setup task(s), {len(config.objectstores)} object store(s);"
        f" state in {config.cache_dir}"
    )
    for where, resolved in paths.items():
        print(f"  {where}: {resolved}")
    for name, file in modules.items():  # the code the config runs, as the service's user
        print(f"imported task module {name} from {file}")
    if getattr(args, "sample", None):
        return _print_layouts(jobs, args.sample)
    return EXIT_OK


def _resolved_paths(config: PipelineConfig, jobs: list[Job]) -> dict[str, str]:
    """Every path of the config as the service will use it (relative ones are relative to
    the config file), by field: what validate prints."""
    from dpypeline.pipeline import local_path_arguments

    paths = {"cache_dir": str(config.cache_dir)}
    paths.update({f"watch[{w}].path": str(watch.path) for w, watch in enumerate(config.watch)})
    for j, job in enumerate(jobs):
        for t, task in enumerate(job.tasks):
            for key, value in local_path_arguments(task).items():
                paths[f"jobs[{j}].tasks[{t}].with.{key}"] = value
    return paths


def _layouts(jobs: list[Job], sample: str) -> dict[str, tuple[Any, list[Any] | None]] | None:
    """Per job, its ``to_zarr`` store and the layout it would give a new store for
    ``sample`` (None: no to_zarr task); None if the sample cannot be read (said on stderr)."""
    from dpypeline.errors import PermanentError
    from dpypeline.tasks.zarr.to_zarr import plan_layout, to_zarr

    layouts: dict[str, tuple[Any, list[Any] | None]] = {}
    for job in jobs:
        split = next((i for i, t in enumerate(job.tasks) if t.func is to_zarr), None)
        if split is None:
            layouts[job.name] = (None, None)
            continue
        try:
            value = job.run_tasks(0, split, sample, None)
            rows = plan_layout(value, **job.tasks[split].kwargs)
        except (PermanentError, ConfigError, OSError) as exc:
            print(f"{job.name}: {sample}: {exc}", file=sys.stderr)
            return None
        layouts[job.name] = (job.tasks[split].kwargs.get("store"), rows)
    return layouts


def _print_layouts(jobs: list[Job], sample: str) -> int:
    """The store layout each job's ``to_zarr`` would give a new store for ``sample``."""
    layouts = _layouts(jobs, sample)
    if layouts is None:
        return EXIT_CONFIG
    for name, (store, rows) in layouts.items():
        if rows is None:
            print(f"{name}: no to_zarr task")
            continue
        print(f"{name}: a new store {store} gets (an existing store keeps its own):")
        print(f"  {'variable':<22} {'chunks as read':<32} {'store chunks':<32} {'MiB':>7}  codec")
        for r in rows:
            read = "x".join(map(str, r["read_chunks"].values())) or "-"
            chunks = "x".join(map(str, r["store_chunks"].values()))
            mib = r["chunk_bytes"] / 2**20
            print(f"  {r['variable']:<22} {read:<32} {chunks:<32} {mib:>7.1f}  {r['codec']}")
    return EXIT_OK


def _ledger(config: PipelineConfig) -> Ledger:
    return Ledger(config.cache_dir)


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


def cmd_skip(config: PipelineConfig, args: argparse.Namespace) -> int:
    """The operator's decision that a dead job's file is never written: recorded in the
    ledger (the job ends ``skipped``, the reason says so) and logged; the later jobs of
    its resource that were held behind it go on."""
    from dpypeline.observability import logs

    logs.configure(config.logging.format, config.logging.level)
    log = logs.get_logger("dpypeline.cli")
    failed = 0
    ledger = _ledger(config)
    try:
        for job_id in args.job_ids:
            now = time.time()
            note = (
                f"skipped by the operator (dpypeline skip, {iso(now)}): the file is not"
                " written and a gap in its store is accepted; it had failed with: "
            )
            rec = ledger.skip(job_id, now, note)
            if rec is None:
                current = ledger.get(job_id)
                why = f"it is {current.state.value}" if current else "there is no such job"
                print(f"not skipped: job {job_id}: only a dead job can be skipped; {why}")
                failed += 1
                continue
            log.warning(
                "job_skipped",
                job_id=rec.id,
                file=rec.path,
                job=rec.job,
                state=rec.state.value,
                error=error_of(rec),
                by="operator",
            )
            print(f"job {rec.id} skipped ({shown(rec.path)}); jobs held behind it go on")
    finally:
        ledger.close()
    return EXIT_FAILURE if failed else EXIT_OK


def cmd_enqueue(config: PipelineConfig, args: argparse.Namespace) -> int:
    from dpypeline.watching.offer import Refused, offer

    names = [j.name for j in config.jobs]
    failed = added = offered = 0
    ledger = _ledger(config)
    try:
        for raw in args.paths:
            try:
                root, files = offer(raw, config.watch)
            except Refused as exc:
                print(f"not queued: {exc}", file=sys.stderr)
                failed += 1
                continue
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
    "skip": cmd_skip,
    "enqueue": cmd_enqueue,
    "ledger": cmd_ledger,
}
