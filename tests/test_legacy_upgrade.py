"""Upgrading in place from the original dpypeline: what it finished is never repeated and
what it had queued is not lost, whichever way its users start ours (a script of its API,
``dpypeline -i`` on its tagged YAML, ``dpypeline migrate`` then ``run``).

``fixtures/original-cache/`` is a CACHE_DIR the original wrote itself, killed (SIGKILL)
while its job ran on the fourth of six files, and what the original did when run again
(``fixtures/make_original_cache.py`` makes both from its source).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs
import xarray as xr

from conftest import ROOT, TESTS, env_for_subprocess
from dpypeline.errors import ConfigError
from dpypeline.state.ledger import Ledger
from s3server import S3Server

FIXTURE = TESTS / "fixtures" / "original-cache"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
ORIGINAL_SRC = ROOT.parent / "shared" / "original" / "src"

sys.path.insert(0, str(TESTS / "fixtures"))
from make_original_cache import SCRIPT, TASKS  # noqa: E402 - the original's own script

TAGGED = """\
akita:
  &akita !Akita
  path: "2023/"
  patterns: "*.csv"
  ignore_patterns: null
  ignore_directories: true
  case_sensitive: true
  glob_kwargs: null
  monitor: false
jobs:
  - &job !Job
    name: "mark"
    tasks:
      - !Task
        function: fixture_tasks.mark
pipeline:
  &pipeline !ThreadPipeline
  jobs:
    - *job
event_consumer:
  !ConsumerSerial
  akita: *akita
  job_producer: *pipeline
"""


def upgraded(work: Path) -> Path:
    """The original's working directory as it was when it was killed: the inputs, its
    CACHE_DIR, the task module, its script and its tagged file."""
    for path in EXPECTED["inputs"]:
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text("STATION,TEMP\n1,50.0\n")
    shutil.copytree(FIXTURE / "cache", work / "cache")
    (work / "fixture_tasks.py").write_text(TASKS)
    (work / "script.py").write_text(SCRIPT)
    (work / "old.yaml").write_text(TAGGED)
    return work


def run(
    work: Path, *args: str, extra: dict[str, str] | None = None
) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """Run ``args`` (a python command line) in *work*; the files its tasks were called on."""
    (work / "calls.log").unlink(missing_ok=True)
    env = {**env_for_subprocess(), "CACHE_DIR": "cache", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(work), env["PYTHONPATH"]])
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    calls = (work / "calls.log").read_text().split() if (work / "calls.log").exists() else []
    return [os.path.relpath(c, work) if os.path.isabs(c) else c for c in calls], proc


def states(cache: Path) -> dict[str, str]:
    ledger = Ledger(cache.resolve())
    try:
        return {os.path.basename(j.path): j.state.value for j in ledger.jobs(limit=100)}
    finally:
        ledger.close()


def test_the_fixture_is_the_original_killed_mid_run_and_its_resume() -> None:
    assert EXPECTED["killed_run"] == EXPECTED["inputs"][:4]
    assert EXPECTED["resumed_run"] == EXPECTED["inputs"][3:]  # the one it was on, and after


@pytest.mark.parametrize(
    "command",
    [
        ["script.py"],
        ["-m", "dpypeline", "-i", "old.yaml"],
    ],
    ids=["api-script", "dash-i"],
)
def test_an_in_place_upgrade_resumes_where_the_original_stopped(
    tmp_path: Path, command: list[str]
) -> None:
    work = upgraded(tmp_path)
    calls, proc = run(work, *command)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls == EXPECTED["resumed_run"], proc.stdout + proc.stderr  # what the original did
    assert "3 finished file(s) recorded done" in proc.stdout + proc.stderr
    assert set(states(work / "cache").values()) == {"done"}
    assert len(states(work / "cache")) == len(EXPECTED["inputs"])

    calls, proc = run(work, *command)  # again: nothing is repeated, nothing carried twice
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls == []
    assert "recorded done" not in proc.stdout + proc.stderr


def test_migrate_carries_the_state_into_the_ledger_the_new_file_uses(tmp_path: Path) -> None:
    work = upgraded(tmp_path)
    calls, proc = run(work, "-m", "dpypeline", "migrate", "old.yaml", "-o", "pipeline.yaml")
    assert proc.returncode == 0, proc.stderr
    assert calls == []
    assert "3 finished file(s) recorded done (not processed again), 3 queued" in proc.stderr
    calls, proc = run(work, "-m", "dpypeline", "run", "-c", "pipeline.yaml")
    assert proc.returncode == 0, proc.stderr
    assert calls == EXPECTED["resumed_run"]


def test_a_pickle_the_original_never_wrote_is_refused_without_running_it(tmp_path: Path) -> None:
    """A pickle can call anything while it loads: only the original's classes are built."""
    from dpypeline.legacy.cache_state import read_paths

    proof = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {proof}",))

    hostile = tmp_path / "processed_events.pickle"
    hostile.write_bytes(pickle.dumps([Payload()]))
    with pytest.raises(ConfigError, match=r"processed_events\.pickle is not the original") as err:
        read_paths(hostile)
    assert "move it out of CACHE_DIR" in str(err.value)
    assert not proof.exists()
    assert read_paths(FIXTURE / "cache" / "queue_state.pickle") == EXPECTED["inputs"][3:]


def test_task_args_come_before_the_previous_result_as_in_the_original(tmp_path: Path) -> None:
    """The same job run by the original (from its source) and by ours."""
    job = (
        "job = Job(name='join')\n"
        "job.add_task(Task(function=os.path.basename))\n"
        "job.add_task(Task(function=os.path.join, args=('out',)))\n"
        "job.add_task(Task(function=os.path.join, args=('top',)))\n"
        "print(job.run('/data/2023/a.csv'))\n"
    )
    code = "import os\nfrom dpypeline.etl_pipeline.core import Job, Task\n" + job
    original = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ORIGINAL_SRC)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert original == "top/out/a.csv"

    from dpypeline.etl_pipeline.core import Job, Task  # ours

    namespace = {"Job": Job, "Task": Task, "os": os}
    job_lines = job.replace("print(job.run(", "result = (job.run(")
    exec(job_lines, namespace)  # the same source text as the original ran
    assert namespace["result"] == original


GYRE_T = ROOT / "examples" / "data" / "nemo-gyre" / "nemo4.0-GYRE_1y_00010101_00011230_grid_T.nc"
EXAMPLE_2 = ["means/1958/ORCA0083-N06_1958m01T.nc", "means/1958/ORCA0083-N06_1958m02T.nc"]


def run_example_2(work: Path, original: bool) -> subprocess.CompletedProcess[str]:
    """``dpypeline -i example_2_serial.yaml``, by the original (from its source) or ours."""
    env = {**env_for_subprocess(), "CACHE_DIR": "cache"}
    if original:
        env["PYTHONPATH"] = os.pathsep.join([str(ORIGINAL_SRC), str(work)])
        entry = "from dpypeline.cli.main_cli import dpypeline; dpypeline()"
        command = [sys.executable, "-c", entry, "-i", "example_2_serial.yaml"]
    else:
        command = [sys.executable, "-m", "dpypeline", "--input", "example_2_serial.yaml"]
    return subprocess.run(
        command, cwd=work, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def example_2(work: Path, s3: S3Server) -> Path:
    work.mkdir()
    shutil.copy(TESTS / "legacy_yaml" / "example_2_serial.yaml", work)
    shutil.copytree(TESTS / "legacy_yaml" / "dpypelinetools", work / "dpypelinetools")
    s3.credentials_file(work, "credentials.json")
    (work / "cache").mkdir()
    for name in EXAMPLE_2:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(GYRE_T, work / name)
    return work


def bucket(s3: S3Server) -> dict[str, bytes]:
    fs = s3fs.S3FileSystem(**s3.storage_options())
    return {key: fs.cat(key) for key in sorted(fs.find("netcdf-files-repo"))}


def dataset(data: bytes) -> xr.Dataset:
    return xr.open_dataset(io.BytesIO(data), engine="h5netcdf").load()


@pytest.mark.slow  # both implementations run end to end, each in processes
def test_example_2_tasks_get_the_object_store_itself_as_the_original_passed_it(
    tmp_path: Path, s3: S3Server
) -> None:
    proc = run_example_2(example_2(tmp_path / "original", s3), original=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("has been consumed successfully") == len(EXAMPLE_2)  # its log
    theirs = bucket(s3)
    names = [f"netcdf-files-repo/{Path(n).name}" for n in EXAMPLE_2]
    assert [k for k in theirs if k.endswith(".nc")] == names
    assert sorted(k for k, data in theirs.items() if data) == [f"{n}.part0" for n in names]

    s3.reset()
    proc = run_example_2(example_2(tmp_path / "ours", s3), original=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ours = bucket(s3)
    # the same datasets; ours where the task named them (ObjectStoreS3 here writes a file
    # of one part to NAME itself, where the original left NAME empty and the data in .part0)
    assert sorted(ours) == names
    for key in names:
        xr.testing.assert_identical(dataset(ours[key]), dataset(theirs[f"{key}.part0"]))
    # where the original logged, ours does: stdout, in plain lines (`> output 2> errors`)
    done = [line for line in proc.stdout.splitlines() if "job_done" in line]
    assert len(done) == len(EXAMPLE_2), proc.stdout
    assert not any(line.startswith("{") for line in proc.stdout.splitlines())
    assert "job_done" not in proc.stderr


DEAD_SCRIPT = """
import logging, os, sys
from fixture_tasks import mark
from dpypeline.akita.core import Akita
from dpypeline.akita.factory import get_akita_dependencies
from dpypeline.etl_pipeline.core import Job, Task
from dpypeline.etl_pipeline.thread_pipeline import ThreadPipeline
from dpypeline.event_consumer.consumer_serial import ConsumerSerial

logging.basicConfig(level=logging.INFO)
akita = Akita(*get_akita_dependencies(path="2023/", patterns=["*.csv"]), monitor=False)
pipeline = ThreadPipeline()
consumer = ConsumerSerial(queue=akita.queue, job_producer=pipeline)
job = Job(name="mark")
broken = os.environ.get("BROKEN") == "1"  # an argument mark() does not take
job.add_task(Task(function=mark, kwargs={"prefix": "out/"} if broken else {}))
pipeline.add_job(job)
akita.run()
sys.exit(consumer.run())
"""


def dpypeline_cli(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**env_for_subprocess(), "CACHE_DIR": "cache"}
    return subprocess.run(
        [sys.executable, "-m", "dpypeline", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow  # both implementations run end to end, each in processes
def test_a_script_sees_its_dead_jobs_and_retries_them_with_its_cache_dir_alone(
    tmp_path: Path,
) -> None:
    work = upgraded(tmp_path)
    shutil.rmtree(work / "cache")  # a fresh start: no state of the original's
    (work / "dead.py").write_text(DEAD_SCRIPT)
    calls, proc = run(work, "dead.py", extra={"BROKEN": "1"})
    assert proc.returncode == 3, proc.stderr  # as `dpypeline run --once` exits
    assert "6 job(s) are dead in the ledger" in proc.stderr
    assert "dpypeline retry --dead --cache-dir" in proc.stderr

    calls, proc = run(work, "dead.py")  # fixed, run again: the dead jobs are still dead
    assert proc.returncode == 3, proc.stderr
    assert calls == []
    assert "6 job(s) are dead in the ledger" in proc.stderr

    listed = dpypeline_cli(work, "jobs", "--state", "dead")  # no config: $CACHE_DIR
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("dead") >= 6
    skipped = dpypeline_cli(work, "skip", "1", "--cache-dir", "cache")
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    retried = dpypeline_cli(work, "retry", "--dead")
    assert retried.returncode == 0, retried.stderr
    assert "5 dead job(s) queued again" in retried.stdout

    calls, proc = run(work, "dead.py")
    assert proc.returncode == 0, proc.stderr
    assert sorted(calls) == EXPECTED["inputs"][1:]  # the skipped one stays skipped
    assert "are dead" not in proc.stderr
