"""The Python API builds the same service as the YAML and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from dpypeline import Job, Pipeline, Task
from dpypeline.state.ledger import Ledger
from taskbox import record


def test_pipeline_built_in_python_runs_once_with_chained_tasks(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("b.txt", "a.txt"):
        (inbox / name).write_text(name)
    seen: list[str] = []

    def upper(path: str) -> str:
        return Path(path).read_text().upper()

    def keep(text: str, suffix: str) -> str:
        seen.append(text + suffix)
        return text

    pipeline = Pipeline(
        watch=[{"path": str(inbox), "settle": "100ms"}],
        jobs=[
            Job("shout", [Task(upper), Task(keep, suffix="!")]),
            Job("log", [Task(record, log=str(tmp_path / "runs.log"))]),
        ],
        cache_dir=str(tmp_path / "state"),
    )
    assert pipeline.run(once=True) == 0
    assert seen == ["A.TXT!", "B.TXT!"]
    ledger = Ledger(tmp_path / "state")
    try:
        assert ledger.counts()["done"] == 4  # two files x two jobs
    finally:
        ledger.close()


def test_pipeline_from_yaml_loads_and_imports_tasks() -> None:
    pipeline = Pipeline.from_yaml(ROOT / "examples" / "gsod-celsius.yaml")
    assert [j.name for j in pipeline.jobs] == ["to-celsius"]
    assert [t.name for t in pipeline.jobs[0].tasks] == [
        "gsod_tasks.read_csv",
        "gsod_tasks.to_celsius",
        "gsod_tasks.write_csv",
    ]
    assert pipeline.jobs[0].tasks[2].wants_context


def test_setup_tasks_run_once_before_any_job(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.txt").write_text("a")
    calls: list[str] = []

    def make_bucket(bucket: str) -> None:
        calls.append(f"setup {bucket}")

    def work(path: str) -> str:
        calls.append(f"job {Path(path).name}")
        return path

    pipeline = Pipeline(
        watch=[{"path": str(inbox), "settle": "100ms"}],
        jobs=[Job("work", [Task(work)])],
        setup=[Task(make_bucket, bucket="nemo")],
        cache_dir=str(tmp_path / "state"),
    )
    assert pipeline.run(once=True) == 0
    assert calls == ["setup nemo", "job a.txt"]


def test_a_failing_setup_task_stops_start_up_and_runs_no_job(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.txt").write_text("a")
    ran: list[str] = []

    def broken_setup() -> None:
        raise ConnectionError("object store unreachable")

    pipeline = Pipeline(
        watch=[str(inbox)],
        jobs=[Job("work", [Task(ran.append)])],
        setup=[Task(broken_setup)],
        cache_dir=str(tmp_path / "state"),
    )
    with pytest.raises(ConnectionError, match="unreachable"):
        pipeline.run(once=True)
    assert ran == []
