"""What the benchmark modules share: results, the run's context, scratch directories, timing.

``scripts/bench.py`` runs the suite; the benchmarks themselves live there and in the
``bench_*.py`` modules next to it, each a function ``(Context) -> Result``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent

# name -> (full size, quick size)
SIZES = {
    "enqueue_one": (2_000, 50),
    "backfill_enqueue": (100_000, 2_000),
    "claim_complete": (2_000, 50),
    "history": (1_000_000, 2_000),
    "reconcile_known": (100_000, 1_500),
    "reconcile_1m": (1_000_000, 1_500),
    "poll_cpu": (100_000, 1_500),
    "ingest_noop_once": (20_000, 100),
    "ingest_history": (2_000, 30),
    "inotify_burst": (1_000, 30),
    "memory_jobs": (10_000, 30),
}


@dataclass
class Result:
    name: str
    ours: float
    unit: str
    baseline: float | None
    baseline_unit: str
    ratio: float | None  # ours / baseline, in the same unit
    ratio_kind: str  # "rate": higher is better; "time": lower is better; "": no ratio
    target: str  # as printed
    met: bool | None
    n: int
    repeats: int
    seconds: float = 0.0  # wall time of the whole benchmark, set-up included
    notes: list[str] = field(default_factory=list)


@dataclass
class Context:
    base: Path
    quick: bool
    cache: dict[str, Any] = field(default_factory=dict)  # results shared between benchmarks
    # what outlives one benchmark (--quick: one moto server for all): closed at the end
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def size(self, key: str) -> int:
        full, quick = SIZES[key]
        return quick if self.quick else full

    def repeats(self, full: int) -> int:
        return 1 if self.quick else full


@contextlib.contextmanager
def workdir(ctx: Context, name: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"dpypeline-bench-{name}-", dir=ctx.base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def interleaved(repeats: int, *runs: Callable[[], float]) -> list[float]:
    """Run each callable ``repeats`` times, alternating between them; the best (lowest)
    time of each, in the order given."""
    best = [math.inf] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            best[i] = min(best[i], run())
    return best


def check(ok: bool, what: str, got: object) -> None:
    """Stop a benchmark whose work did not come out as expected (its figure would lie)."""
    if not ok:
        raise RuntimeError(f"unexpected {what}: {got!r}")


def service_env() -> dict[str, str]:
    """The environment for a ``python -m dpypeline`` child: this one, with the benchmark
    tasks (``bench_tasks``) importable and no inherited config or cache dir."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH")) if p)
    env.pop("DPYPELINE_CONFIG", None)
    env.pop("CACHE_DIR", None)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    return env


def python_startup(repeats: int) -> float:
    """Best seconds of ``python -c pass``: the floor under any command's start-up."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        best = min(best, time.perf_counter() - start)
    return best
