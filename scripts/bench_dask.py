"""The dask executor against the serial one, measured in the same run on the same files.

Usage: python scripts/bench_dask.py [--quick] [--workers N] [--json FILE] [--dir DIR]

Each figure comes from a real ``dpypeline run --once`` on files already present, with JSON
logs: the time from the ``files_enqueued`` event to the last ``job_done``, so start-up
(Python, the cluster's workers) and the settle time are left out and only the processing
of the queue is timed.

  cpu_bound     files/s with a task that holds a CPU for 0.2 s (``bench_tasks.burn``):
                dask with N worker processes (default 2) vs serial; target >= 1.6x on 2 cores
  noop_overhead seconds per job with a task that does nothing (``bench_tasks.noop``):
                dask vs serial; the difference is the dask executor's per-job overhead

``--quick`` uses a handful of files: it shows that the benchmark works, not how fast.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent

PIPELINE = """\
cache_dir: {cache}
monitor: false
watch: [{{path: {inbox}, settle: 100ms}}]
executor: {executor}
retry: {{max_attempts: 1, job_timeout: 10m}}
jobs: [{{name: bench, tasks: [{task}]}}]
logging: {{format: json, level: info}}
"""


def executor_yaml(kind: str, workers: int) -> str:
    if kind == "serial":
        return "{kind: serial}"
    options = f"n_workers: {workers}, threads_per_worker: 1, dashboard_address: null"
    return f"{{kind: dask, cluster: {{options: {{{options}}}}}}}"


def run_once(base: Path, kind: str, task: str, n: int, workers: int) -> float:
    """Seconds from enqueue to the last job done, for ``n`` files."""
    d = Path(tempfile.mkdtemp(prefix=f"bench-dask-{kind}-", dir=base))
    try:
        inbox = d / "inbox"
        inbox.mkdir()
        for i in range(n):
            (inbox / f"f{i:05d}.nc").write_bytes(b"x")
        config = d / "pipeline.yaml"
        config.write_text(
            PIPELINE.format(
                cache=d / "cache", inbox=inbox, executor=executor_yaml(kind, workers), task=task
            )
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH")) if p)
        env.pop("DPYPELINE_CONFIG", None)
        env.pop("CACHE_DIR", None)
        log_path = d / "service.log"
        with log_path.open("wb") as log:
            proc = subprocess.run(
                [sys.executable, "-m", "dpypeline", "run", "--once", "-c", str(config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=600,
                check=False,
            )
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{kind}: `dpypeline run --once` exited {proc.returncode}:\n{tail}")
        events = _events(log_path)
        enqueued = min(t for e, t in events if e == "files_enqueued")
        done = [t for e, t in events if e == "job_done"]
        if len(done) != n:
            raise RuntimeError(f"{kind}: {len(done)} of {n} jobs done")
        return max(done) - enqueued
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _events(log_path: Path) -> list[tuple[str, float]]:
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            out.append((record["event"], datetime.fromisoformat(record["timestamp"]).timestamp()))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def measure(base: Path, task: str, n: int, workers: int, repeats: int) -> dict[str, float]:
    """Best of ``repeats`` for each executor, interleaved so both see the same machine."""
    best = {"serial": float("inf"), "dask": float("inf")}
    for _ in range(repeats):
        for kind in ("serial", "dask"):
            best[kind] = min(best[kind], run_once(base, kind, task, n, workers))
    return best


def bench_dask_cpu(ctx: Any) -> Any:
    """The suite's row: files/s with the dask executor (2 workers) vs the serial executor,
    on a CPU-bound task (each file holds the CPU for 0.2 s; 0.05 s with --quick)."""
    from bench_common import Result, workdir

    n, repeats, burn = (4, 1, 0.05) if ctx.quick else (40, 2, 0.2)
    with workdir(ctx, "dask_cpu") as d:
        best = measure(d, f"{{task: bench_tasks.burn, with: {{seconds: {burn}}}}}", n, 2, repeats)
    ratio = best["serial"] / best["dask"]
    return Result(
        name="dask_cpu",
        ours=n / best["dask"],
        unit="files/s",
        baseline=n / best["serial"],
        baseline_unit="files/s (serial)",
        ratio=ratio,
        ratio_kind="rate",
        target=">= 1.6x rate",
        met=ratio >= 1.6,
        n=n,
        repeats=repeats,
    )


def bench_dask_overhead(ctx: Any) -> Any:
    """The suite's row: time per no-op job with the dask executor vs the serial one."""
    from bench_common import Result, workdir

    n, repeats = (6, 1) if ctx.quick else (300, 2)
    with workdir(ctx, "dask_overhead") as d:
        best = measure(d, "{task: bench_tasks.noop}", n, 2, repeats)
    ours, base = 1000 * best["dask"] / n, 1000 * best["serial"] / n
    return Result(
        name="dask_overhead",
        ours=ours,
        unit="ms/job",
        baseline=base,
        baseline_unit="ms/job (serial)",
        ratio=ours / base,
        ratio_kind="time",
        target="reported",
        met=None,
        n=n,
        repeats=repeats,
        notes=[f"+{ours - base:.2f} ms per job on the cluster"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of files: a smoke run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--dir", type=Path, help="work here (default: the temporary directory)")
    args = parser.parse_args(argv)
    base = args.dir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    cpu_n, noop_n, repeats = (6, 20, 1) if args.quick else (40, 300, 2)
    burn = 0.2
    started = time.perf_counter()
    burn_task = f"{{task: bench_tasks.burn, with: {{seconds: {burn}}}}}"
    cpu = measure(base, burn_task, cpu_n, args.workers, repeats)
    noop = measure(base, "{task: bench_tasks.noop}", noop_n, args.workers, repeats)
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "quick": args.quick,
        "cpu_bound": {
            "files": cpu_n,
            "cpu_seconds_per_file": burn,
            "serial_files_per_s": cpu_n / cpu["serial"],
            "dask_files_per_s": cpu_n / cpu["dask"],
            "speedup": cpu["serial"] / cpu["dask"],
            "target": 1.6,
        },
        "noop_overhead": {
            "files": noop_n,
            "serial_s_per_job": noop["serial"] / noop_n,
            "dask_s_per_job": noop["dask"] / noop_n,
            "ratio": noop["dask"] / noop["serial"],
            "dask_overhead_ms_per_job": 1000 * (noop["dask"] - noop["serial"]) / noop_n,
        },
    }
    c, o = results["cpu_bound"], results["noop_overhead"]
    mode = "quick" if args.quick else "full"
    took = time.perf_counter() - started
    cpus = os.cpu_count()
    print(f"dask executor vs serial ({args.workers} workers, {cpus} CPUs, {mode}, {took:.0f} s)")
    print(
        f"  cpu_bound      {c['dask_files_per_s']:8.2f} files/s vs serial"
        f" {c['serial_files_per_s']:.2f}: {c['speedup']:.2f}x (target >= {c['target']}x,"
        f" {'met' if c['speedup'] >= c['target'] else 'NOT met'}; {cpu_n} files of {burn}s CPU)"
    )
    print(
        f"  noop_overhead  {1000 * o['dask_s_per_job']:8.2f} ms/job vs serial"
        f" {1000 * o['serial_s_per_job']:.2f}: {o['ratio']:.2f}x"
        f" (+{o['dask_overhead_ms_per_job']:.2f} ms per job; {noop_n} files)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
