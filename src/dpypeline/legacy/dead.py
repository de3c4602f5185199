"""What a script of the original's API is told about dead jobs when its run ends.

The original had no dead jobs: a failed file was logged and forgotten. Here a job that
failed for good stays ``dead`` in the ledger, and running the script again does not run it
again (it is done with, until retried), so the run's end says how many jobs of the ledger
are dead, not only those of this run, and how to act on them with the script's
``CACHE_DIR`` alone: ``dpypeline jobs --state dead`` and ``dpypeline retry --dead`` take it
from ``$CACHE_DIR`` when no config is given. A run that ends by itself (``monitor=False``)
returns 3 then, as ``dpypeline run --once`` exits, so ``sys.exit(consumer.run())`` shows
them in the script's exit status.
"""

from __future__ import annotations

import logging

from dpypeline.api import RunResult
from dpypeline.config.model import PipelineConfig
from dpypeline.loop.service import EXIT_JOBS_DEAD
from dpypeline.paths import shown
from dpypeline.state.ledger import Ledger
from dpypeline.state.transitions import JobState


def report_dead(config: PipelineConfig, result: RunResult, *, once: bool) -> RunResult:
    """*result*, with exit code 3 when a run that ended by itself leaves dead jobs; they are
    logged (how many, one of them, what to do) through the script's logging."""
    ledger = Ledger(config.cache_dir, read_only=True)
    try:
        dead = ledger.jobs(JobState.DEAD, -1)
    finally:
        ledger.close()
    if not dead:
        return result
    example = dead[0]
    cache = shown(str(config.cache_dir))
    logging.getLogger("dpypeline.legacy").warning(
        f"{len(dead)} job(s) are dead in the ledger in {cache} ({len(result.dead)} of them"
        f" in this run) and are not run again: e.g. job {example.id},"
        f" {shown(example.path)}: {example.error or 'no error recorded'}. List them with"
        f" `dpypeline jobs --state dead --cache-dir {cache}`; fix the cause, then"
        f" `dpypeline retry --dead --cache-dir {cache}` and run the script again"
        " (`dpypeline skip ID` accepts a gap instead)"
    )
    if once and int(result) == 0:
        return RunResult(EXIT_JOBS_DEAD, result.dead, result.outcomes)
    return result


__all__ = ["report_dead"]
