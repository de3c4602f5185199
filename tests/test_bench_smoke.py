"""The benchmark suite still runs: ``scripts/bench.py --quick`` end to end.

Only that every benchmark produces a figure is checked; how fast anything is depends on the
machine, so the targets are reported by the suite and never asserted here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, env_for_subprocess

BENCH = ROOT / "scripts" / "bench.py"
NAMES = {
    "enqueue_one",
    "backfill_enqueue",
    "claim_complete",
    "claim_complete_history",
    "reconcile_known",
    "reconcile_1m",
    "poll_cpu",
    "ingest_noop_once",
    "inotify_latency",
    "start_ready",
    "orca025_local_namnc4",
    "orca025_local_whole",
    "orca025_s3_namnc4",
    "orca025_s3_whole",
    "memory",
    "zarr_local_small",
    "zarr_local_large",
    "zarr_s3_small",
    "zarr_s3_large",
    "dask_cpu",
    "dask_overhead",
}
NO_RATIO = {"ingest_noop_once", "reconcile_1m"}  # absolute targets: no baseline to divide by


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_quick_suite_produces_every_figure(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(report), "--dir", str(work)],
        cwd=tmp_path,
        env=env_for_subprocess(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["failures"] == {}
    results = {r["name"]: r for r in data["results"]}
    assert set(results) == NAMES
    for name, r in results.items():
        assert _positive(r["ours"]), (name, r)
        assert _positive(r["baseline"]), (name, r)
        if name not in NO_RATIO:
            assert _positive(r["ratio"]), (name, r)
    for name in NAMES:
        assert name in proc.stdout  # the table names every benchmark
    assert list(work.iterdir()) == []  # every temporary directory was removed
