"""``run --once --max-runtime``: a run from cron or a batch system stops at its time budget
without losing or repeating anything, and says by its exit status that work is left."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, dpypeline, env_for_subprocess, runs, status, write_config

EXIT_TIME_BUDGET = 75


def _pipeline(tmp_path: Path, delay: float) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cfg = write_config(
        tmp_path,
        {
            "cache_dir": str(tmp_path / "state"),
            "watch": [{"path": str(inbox), "settle": "100ms"}],
            "stop_grace": "60s",
            "jobs": [
                {
                    "name": "work",
                    "tasks": [
                        {
                            "task": "taskbox.record",
                            "with": {"log": str(tmp_path / "runs.log"), "delay": delay},
                        }
                    ],
                }
            ],
            "logging": {"format": "json"},
        },
    )
    return cfg, inbox


@pytest.mark.slow
def test_the_time_budget_stops_new_jobs_lets_running_ones_finish_and_exits_75(
    tmp_path: Path,
) -> None:
    cfg, inbox = _pipeline(tmp_path, delay=2.0)
    for n in range(4):
        (inbox / f"f{n}.dat").write_bytes(b"x")
    first = dpypeline("run", "--once", "--max-runtime", "1s", "-c", str(cfg), timeout=120)
    assert first.returncode == EXIT_TIME_BUDGET, first.stderr[-3000:]
    events = [json.loads(line) for line in first.stderr.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names.count("time_budget_reached") == 1
    # no job starts after the budget ran out; the one running then finished (stop_grace)
    after = names[names.index("time_budget_reached") :]
    assert "job_started" not in after
    assert names.count("job_started") == names.count("job_done") < 4
    [stopped] = [e for e in events if e["event"] == "service_stopped"]
    assert stopped["exit_code"] == EXIT_TIME_BUDGET
    assert "next run" in stopped["action"]
    counts = status(cfg)
    assert counts["running"] == 0
    assert counts["done"] + counts["queued"] == 4
    # the next run takes up the rest; nothing runs twice
    second = dpypeline("run", "--once", "-c", str(cfg), timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(rel for rel, _, _ in runs(tmp_path / "runs.log")) == [
        f"f{n}.dat" for n in range(4)
    ]
    assert status(cfg)["done"] == 4


def test_a_budget_that_is_not_reached_changes_nothing(tmp_path: Path) -> None:
    cfg, inbox = _pipeline(tmp_path, delay=0.0)
    (inbox / "a.dat").write_bytes(b"x")
    proc = dpypeline("run", "--once", "--max-runtime", "10m", "-c", str(cfg), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "time_budget_reached" not in proc.stderr
    assert status(cfg)["done"] == 1


def test_a_budget_that_is_not_a_duration_is_a_usage_error(tmp_path: Path) -> None:
    cfg, _ = _pipeline(tmp_path, delay=0.0)
    proc = dpypeline("run", "--once", "--max-runtime", "soon", "-c", str(cfg))
    assert proc.returncode == 2
    assert "--max-runtime" in proc.stderr
    assert "not a duration: 'soon'" in proc.stderr


def test_the_shipped_crontab_line_runs_its_command(tmp_path: Path) -> None:
    """The command inside deploy/jasmin/crontab's crontamer line, run as cron would (a
    shell, HOME set), against a config where the line says."""
    line = next(
        ln for ln in (ROOT / "deploy/jasmin/crontab").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    )  # fmt: skip
    fields = line.split(None, 5)
    assert fields[5].startswith("crontamer ")
    command = shlex.split(fields[5])[-1]
    assert command.startswith("dpypeline run --once --max-runtime ")
    home = tmp_path / "home"
    (home / ".config/dpypeline").mkdir(parents=True)
    cfg, inbox = _pipeline(tmp_path, delay=0.0)
    (home / ".config/dpypeline/pipeline.yaml").write_text(cfg.read_text())
    (inbox / "a.dat").write_bytes(b"x")
    proc = subprocess.run(
        ["sh", "-c", command.replace("dpypeline", f"{sys.executable} -m dpypeline", 1)],
        env={**env_for_subprocess(), "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert status(cfg)["done"] == 1
