"""The Python API builds the same service as the YAML and the CLI."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT, env_for_subprocess, wait_for
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


def test_run_returns_the_exit_code_with_the_jobs_that_ended_dead(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "good.csv").write_text("STATION,TEMP\n1,50.0\n")
    (inbox / "bad.csv").write_text("STATION,WIND\n1,3.0\n")  # no TEMP column: dead at once
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from gsod_tasks import read_csv, to_celsius
    finally:
        sys.path.remove(str(ROOT / "examples"))

    pipeline = Pipeline(
        watch=[{"path": str(inbox), "settle": "100ms"}],
        jobs=[Job("to-celsius", [Task(read_csv), Task(to_celsius, col="TEMP")])],
        cache_dir=str(tmp_path / "state"),
    )
    result = pipeline.run(once=True)
    assert isinstance(result, int)
    assert result == 3  # what `run --once` exits with
    assert [(Path(j.path).name, j.job, j.state.value) for j in result.dead] == [
        ("bad.csv", "to-celsius", "dead")
    ]
    assert "no column 'TEMP'" in (result.dead[0].error or "")
    assert result.outcomes == {"done": 1, "dead": 1}


SCRIPT = """
import sys
from dpypeline import Job, Pipeline, Task

def parse(path):
    local_secret = "LOCAL-VARIABLE-VALUE"  # a frame local: never in the log
    if path.endswith("bad.txt"):
        raise ValueError(f"cannot parse {path}")
    return path

pipeline = Pipeline(
    watch=[{"path": "inbox", "settle": "100ms"}],
    jobs=[Job("parse", [Task(parse)])],
    cache_dir="state",
    retry={"max_attempts": 1},
    logging={"format": "console"},
)
result = pipeline.run(once=True)
"""


def _script(tmp_path: Path, ending: str) -> subprocess.CompletedProcess[str]:
    """SCRIPT over one good file and one bad, then ``ending``; in a process of its own,
    whose logging is its own."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "good.txt").write_text("ok")
    (tmp_path / "inbox" / "bad.txt").write_text("not ok")
    (tmp_path / "script.py").write_text(SCRIPT + ending)
    return subprocess.run(
        [sys.executable, "script.py"],
        check=False,
        cwd=tmp_path,
        env=env_for_subprocess(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_failing_job_logs_one_line_to_stderr_as_the_service_does(tmp_path: Path) -> None:
    """Logging as `dpypeline run` sets it up: one console line per event on stderr, the
    error named; no traceback at level info, and never a frame's local variables."""
    proc = _script(tmp_path, "sys.exit(result)\n")
    everything = proc.stdout + proc.stderr
    assert "LOCAL-VARIABLE-VALUE" not in everything, everything[-3000:]
    assert "Traceback" not in everything, everything[-3000:]
    dead = [ln for ln in proc.stderr.splitlines() if "job_dead" in ln]
    assert len(dead) == 1, proc.stderr
    assert "bad.txt" in dead[0]
    assert "cannot parse" in dead[0]
    assert len(everything.splitlines()) < 20, everything  # one line an event
    assert proc.returncode == 3, everything[-3000:]


def test_the_readme_script_pattern_lists_the_dead_job_and_exits_with_its_status(
    tmp_path: Path,
) -> None:
    proc = _script(
        tmp_path,
        'print("dead:", *[j.path.rsplit("/", 1)[-1] for j in result.dead])\nsys.exit(result)\n',
    )
    assert proc.stdout.strip() == "dead: bad.txt", proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 3


def test_pipeline_stop_from_another_thread_ends_a_watching_run(tmp_path: Path) -> None:
    """``stop()`` from another thread ends ``run()`` (a watching one, which would go on
    until SIGTERM), with its exit code."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    pipeline = Pipeline(
        watch=[str(inbox)], jobs=[Job("copy", [Task(str)])], cache_dir=str(tmp_path / "c")
    )
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(pipeline.run()), name="api-run")
    runner.start()
    try:
        wait_for(lambda: pipeline._service is not None and pipeline._service.status.value
                 == "running", message="the service running")  # fmt: skip
        assert runner.is_alive()
    finally:
        pipeline.stop()
        runner.join(30)
    assert not runner.is_alive()
    assert codes == [0]
