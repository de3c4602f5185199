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
NO_RATIO = {"ingest_noop_once", "reconcile_1m"}  # absolute targets: no baseline to divide by
# the benchmarks in groups run side by side (each group one run of the script), by the
# prefixes of their names; "others" takes the rest. The virtual rows read the same files as
# the local ORCA ones: one run makes them and imports what both need.
PREFIXES = {
    "orca_local": ("orca025_local_", "virtual_"),
    "orca_s3": ("orca025_s3_",),
    "zarr": ("zarr_",),
    "dask": ("dask_",),
}


def _every_benchmark() -> list[str]:
    """The script's benchmarks, as it lists them (those run only when named, left out)."""
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return [n for n in bench.NAMES if n not in bench.OPTIONAL]


ICECHUNK = "_icechunk"  # the Icechunk rows of both ORCA groups run as a group of their own
# the rows that start the service and wait for it run as a group of their own too
SERVICE = (
    "reconcile_1m",
    "ingest_noop_once",
    "ingest_history",
    "inotify_latency",
    "start_ready",
    "memory",
)


def _group(group: str) -> list[str]:
    names = _every_benchmark()
    if group == "icechunk":
        return [n for n in names if n.endswith(ICECHUNK)]
    names = [n for n in names if not n.endswith(ICECHUNK)]
    if group == "service":
        return [n for n in names if n in SERVICE]
    names = [n for n in names if n not in SERVICE]
    if group == "others":
        return [n for n in names if not n.startswith(sum(PREFIXES.values(), ()))]
    return [n for n in names if n.startswith(PREFIXES[group])]


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.parametrize("group", [*PREFIXES, "icechunk", "service", "others"])
def test_quick_suite_produces_every_figure(tmp_path: Path, group: str) -> None:
    names = _group(group)
    assert names, f"no benchmark in group {group}"
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
