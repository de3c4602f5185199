"""The benchmark suite still runs: ``scripts/bench.py --quick`` end to end.

Only that every benchmark produces a figure is checked; how fast anything is depends on the
machine, so the targets are reported by the suite and never asserted here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, env_for_subprocess

BENCH = ROOT / "scripts" / "bench.py"
# every benchmark, in groups run side by side (each group is one run of the script)
GROUPS = {
    "ledger": [
        "enqueue_one",
        "backfill_enqueue",
        "claim_complete",
        "claim_complete_history",
        "reconcile_known",
        "reconcile_1m",
        "poll_cpu",
    ],
    "service": ["ingest_noop_once", "inotify_latency", "start_ready", "memory"],
    "orca_local": ["orca025_local_namnc4", "orca025_local_whole"],
    "orca_s3": ["orca025_s3_namnc4", "orca025_s3_whole"],
    "zarr": ["zarr_local_small", "zarr_local_large", "zarr_s3_small", "zarr_s3_large"],
    "dask": ["dask_cpu", "dask_overhead"],
}
NO_RATIO = {"ingest_noop_once", "reconcile_1m"}  # absolute targets: no baseline to divide by


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_the_groups_name_every_benchmark_of_the_suite() -> None:
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    names = [n for group in GROUPS.values() for n in group]
    assert len(names) == len(set(names))
    assert set(names) == set(bench.NAMES) - set(bench.OPTIONAL)


@pytest.mark.slow
@pytest.mark.parametrize("group", GROUPS)
def test_quick_suite_produces_every_figure(tmp_path: Path, group: str) -> None:
    names = GROUPS[group]
    report = tmp_path / "bench.json"
    work = tmp_path / "work"
    argv = [str(BENCH), "--quick", "--only", *names, "--json", str(report), "--dir", str(work)]
    proc = subprocess.run(
        [sys.executable, *argv],
        cwd=tmp_path,
        env=env_for_subprocess(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["failures"] == {}
    results = {r["name"]: r for r in data["results"]}
    assert set(results) == set(names)
    for name, r in results.items():
        assert _positive(r["ours"]), (name, r)
        assert _positive(r["baseline"]), (name, r)
        if name not in NO_RATIO:
            assert _positive(r["ratio"]), (name, r)
    for name in names:
        assert name in proc.stdout  # the table names every benchmark
    assert list(work.iterdir()) == []  # every temporary directory was removed
