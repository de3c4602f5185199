"""``dpypeline history | revert | gc``: the operator's hands on the stores the pipeline
writes, as versions of files.

- ``history [STORE]``: each commit of an append store, newest first: the snapshot (an
  Icechunk store's; a plain Zarr store has none), when, the job, its file, the steps it
  wrote.
- ``revert N [--skip]``: the store goes back to just before job N's commit, and N and
  every later job of the store go back to the queue, to be written again in order with
  the config as it is now (with ``--skip``, N ends skipped). It refuses while the service
  runs: it holds the service's lock from its first check to its last write, so the
  service cannot start in between, and no job commits under it. The ledger's change and
  the store's reset are one step: the store is reset inside the ledger's transaction, so
  a failed reset (an outage, a conflict) leaves both as they were.
- ``gc [STORE]``: expire old snapshots (``snapshot_expiry``) and delete what no kept
  snapshot uses; safe while the service writes (see :mod:`dpypeline.tasks.versions`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from dpypeline.commands.report import iso
from dpypeline.errors import ConfigError, DpypelineError, PermanentError, Unavailable
from dpypeline.paths import shown
from dpypeline.state.cachedir import service_pid
from dpypeline.state.ledger import Ledger

if TYPE_CHECKING:
    import icechunk

    from dpypeline.config.model import PipelineConfig

EXIT_OK, EXIT_FAILURE = 0, 1  # cli's
REVERT_NOTE = "reverted by the operator (dpypeline revert --skip, {when}): the file is not written"
DAY = 86400.0


def add_parsers(command: Any) -> None:
    """The three commands, on ``cli``'s ``command(name, help)``."""
    history = command("history", "a store's commits, newest first: snapshot, time, job, file")
    history.add_argument("store", nargs="?", metavar="STORE", help="default: every store")
    history.add_argument("--json", action="store_true")
    revert = command(
        "revert",
        "take a store back to just before job N's commit; N and the later jobs of the store"
        " are written again (the service stopped)",
    )
    revert.add_argument("job_id", type=int, metavar="N")
    revert.add_argument(
        "--skip", action="store_true", help="N ends skipped: the later jobs are written without it"
    )
    gc = command(
        "gc",
        "expire snapshots older than snapshot_expiry and delete what no kept snapshot uses"
        " (safe while the service runs)",
    )
    gc.add_argument("store", nargs="?", metavar="STORE", help="default: every Icechunk store")
    gc.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    gc.add_argument("--json", action="store_true")


@dataclass(frozen=True)
class Target:
    """An append store the config writes: its URL, the pipeline jobs that write it and
    their ``to_zarr`` arguments."""

    url: str
    jobs: tuple[str, ...]
    kwargs: Mapping[str, Any]

    @property
    def icechunk(self) -> bool:
        return bool(self.kwargs.get("icechunk"))

    @property
    def append_dim(self) -> str | None:
        dim = self.kwargs.get("append_dim")
        return str(dim) if dim is not None else None


def targets(config: PipelineConfig) -> list[Target]:
    """The stores the config's ``to_zarr`` tasks write, in the order of the jobs."""
    from dpypeline.pipeline import import_tasks
    from dpypeline.tasks.zarr import store as zs
    from dpypeline.tasks.zarr.to_zarr import to_zarr

    found: dict[str, Target] = {}
    jobs, _ = import_tasks(config)
    for job in jobs:
        for task in job.tasks:
            if task.func is not to_zarr or not isinstance(task.kwargs.get("store"), str):
                continue
            url = zs.locate(task.kwargs["store"]).url
            had = found.get(url)
            names = (*had.jobs, job.name) if had else (job.name,)
            found[url] = Target(url, names, had.kwargs if had else task.kwargs)
    return list(found.values())


def _chosen(config: PipelineConfig, store: str | None) -> list[Target]:
    all_ = targets(config)
    if store is None:
        return all_
    from dpypeline.tasks.zarr import store as zs

    url = zs.locate(store).url
    chosen = [t for t in all_ if t.url == url]
    if not chosen:
        known = ", ".join(t.url for t in all_) or "none"
        raise ConfigError(f"no job of this config writes {store} with to_zarr (stores: {known})")
    return chosen


@contextmanager
def opened(config: PipelineConfig, target: Target, what: str) -> Iterator[icechunk.Repository]:
    """The Icechunk repository of ``target``, reached as ``to_zarr`` reaches it (locally
    or through its ``objectstore:``; one that is not there is refused, never made), with
    Icechunk's failures inside translated (an outage: Unavailable)."""
    from dpypeline.tasks import repository

    context = SimpleNamespace(objectstores=config.objectstores)
    place = repository.locate(target.url, target.kwargs.get("objectstore"), context)
    with repository.classified(place, what):
        yield repository.open_repository(place, create=False)


# -- history ------------------------------------------------------------------------------


def cmd_history(config: PipelineConfig, args: argparse.Namespace) -> int:
    try:
        return _print_history(config, args)
    except DpypelineError as exc:
        if isinstance(exc, ConfigError):
            raise
        print(f"dpypeline history: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _print_history(config: PipelineConfig, args: argparse.Namespace) -> int:
    rows = []
    ledger = Ledger(config.cache_dir, read_only=True)
    try:
        for target in _chosen(config, args.store):
            rows += [{"store": target.url, **r} for r in _history(config, target, ledger)]
    finally:
        ledger.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for store in dict.fromkeys(r["store"] for r in rows):
        print(f"{store}:")
        print(f"  {'snapshot':<20}  {'time':<25}  {'job':>6}  {'steps':<9}  file")
        for r in (r for r in rows if r["store"] == store):
            steps = "{}..{}".format(r["steps"][0], r["steps"][1] - 1) if r["steps"] else "?"
            job = r["job_id"] if r["job_id"] is not None else "-"
            print(
                f"  {r['snapshot'] or '-':<20}  {r['time'] or '-':<25}  {job:>6}  {steps:<9}"
                f"  {shown(r['file'] or '-')}"
            )
    return EXIT_OK


def _history(config: PipelineConfig, target: Target, ledger: Ledger) -> list[dict[str, Any]]:
    if target.icechunk:
        from dpypeline.tasks.versions import versions

        with opened(config, target, "reading the history of") as repo:
            return [v.as_dict() for v in versions(repo, target.append_dim)]
    from dpypeline.tasks.zarr import history as zh
    from dpypeline.tasks.zarr import store as zs

    location = zs.locate(target.url, _storage_options(config, target))
    state = zs.open_store(location.open(), target.url)
    if state is None:
        return []
    rows = []
    for c in reversed(zh.commits(state.attrs)):
        rec = ledger.get(c.job_id)
        rows.append(
            {
                "snapshot": None,
                "time": iso(rec.finished) if rec else None,
                "job_id": c.job_id,
                "file": os.path.relpath(rec.path, rec.root) if rec else None,
                "steps": [c.start, c.stop],
                "message": None,
            }
        )
    return rows


# -- revert -------------------------------------------------------------------------------


def cmd_revert(config: PipelineConfig, args: argparse.Namespace) -> int:
    from dpypeline.observability import logs

    logs.configure(config.logging.format, config.logging.level)
    log = logs.get_logger("dpypeline.cli")
    n = args.job_id
    if (pid := service_pid(config.cache_dir)) is not None:
        print(
            f"dpypeline revert: the service is running (pid {pid}): stop it first; a revert"
            " rewrites the store and the queue, which the service must not do meanwhile",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    ledger = Ledger(config.cache_dir, service=True)  # the lock: no service starts meanwhile
    try:
        record = ledger.get(n)
        if record is None:
            missing = f"dpypeline revert: job {n} does not exist (see `dpypeline jobs`)"
            print(missing, file=sys.stderr)
            return EXIT_FAILURE
        target = next((t for t in targets(config) if record.job in t.jobs), None)
        if target is None or target.append_dim is None:
            print(
                f"dpypeline revert: job {n} ({record.job}) writes no append store with"
                " to_zarr in this config: there is nothing to revert",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        now = time.time()
        note = REVERT_NOTE.format(when=iso(now)) if args.skip else None
        try:
            undo = _prepare(config, target, n)
            moved = ledger.revert(n, target.jobs, now, withdraw=note, before_commit=undo)
        except (PermanentError, Unavailable) as exc:
            print(f"dpypeline revert: {exc}; nothing was changed", file=sys.stderr)
            return EXIT_FAILURE
    finally:
        ledger.close()
    done = undo.result
    queued = [r.id for r in moved if r.id != n or not args.skip]
    log.warning(
        "store_reverted",
        store=target.url,
        job_id=n,
        to=done,
        skipped=n if args.skip else None,
        queued=queued,
        by="operator",
    )
    print(f"{target.url} is back to just before job {n} ({done})")
    if args.skip:
        print(f"job {n} skipped ({shown(record.path)})")
    print(
        f"{len(queued)} job(s) queued to be written again in order"
        f"{': ' + ', '.join(map(str, queued)) if queued else ''}; they run when the service starts"
    )
    return EXIT_OK


class _Undo:
    """The store's reset, run by the ledger inside its transaction (``before_commit``)."""

    def __init__(self, run: Any) -> None:
        self._run, self.result = run, ""

    def __call__(self) -> None:
        self.result = self._run()


def _prepare(config: PipelineConfig, target: Target, n: int) -> _Undo:
    """Check that job ``n`` committed to the store (refused otherwise, before anything
    changes) and return the reset to run."""
    if target.icechunk:
        from dpypeline.tasks import versions

        with opened(config, target, "reading") as repo:
            tip, _, parent = versions.find_commit(repo, n)

        def reset() -> str:
            with opened(config, target, "reverting") as repo:
                tag = versions.revert(repo, n, tip, parent)
            return f"branch main reset to snapshot {parent}; the old tip is tagged {tag}"

        return _Undo(reset)
    from dpypeline.tasks.zarr import history as zh
    from dpypeline.tasks.zarr import store as zs

    location = zs.locate(target.url, _storage_options(config, target))
    state = zs.open_store(location.open(), location.url)
    mine = [c for c in zh.commits(state.attrs if state else {}) if c.job_id == n]
    if not mine:
        raise PermanentError(
            f"job {n} has no commit recorded in {target.url}: it never appended steps to it"
        )

    def cut() -> str:
        commit, _ = zh.cut_back(location, n)
        return f"cut to its first {commit.start} step(s) along {target.append_dim}"

    return _Undo(cut)


def _storage_options(config: PipelineConfig, target: Target) -> dict[str, Any] | None:
    from dpypeline.tasks.zarr.to_zarr import _storage_options as options

    context = SimpleNamespace(objectstores=config.objectstores)
    return options(target.kwargs.get("objectstore"), target.kwargs.get("storage_options"), context)


# -- gc -----------------------------------------------------------------------------------


def grace(config: PipelineConfig) -> float:
    """How old an unreferenced object must be before gc deletes it: longer than any ingest
    can take between writing its first chunk and its commit (twice the job timeout), and
    at least a day."""
    return max(DAY, 2 * (config.retry.job_timeout or DAY))


def cmd_gc(config: PipelineConfig, args: argparse.Namespace) -> int:
    try:
        return _gc(config, args)
    except (PermanentError, Unavailable) as exc:
        print(f"dpypeline gc: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _gc(config: PipelineConfig, args: argparse.Namespace) -> int:
    from dpypeline.tasks.versions import collect

    chosen = [t for t in _chosen(config, args.store) if t.icechunk]
    if args.store and not chosen:
        print(f"dpypeline gc: {args.store} is a plain Zarr store: it keeps no old versions")
        return EXIT_FAILURE
    now = dt.datetime.now(dt.UTC)
    report = {}
    for target in chosen:
        with opened(config, target, "collecting the garbage of") as repo:
            expiry, keep = config.snapshot_expiry, grace(config)
            done = collect(repo, now, expiry, keep, dry_run=args.dry_run)
        report[target.url] = done.as_dict()
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    for url, r in report.items():
        verb = "would delete" if args.dry_run else "deleted"
        print(
            f"{url}: {r['expired']} snapshot(s) expired; {verb} {r['snapshots_deleted']}"
            f" snapshot(s), {r['manifests_deleted']} manifest(s), {r['chunks_deleted']}"
            f" chunk(s), {r['bytes_deleted']} bytes"
        )
    if not report:
        print("no Icechunk store in this config")
    return EXIT_OK
