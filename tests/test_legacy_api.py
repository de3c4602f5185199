"""The original dpypeline's Python API runs its users' scripts unchanged, on our engine:
its example 1 (GSOD CSVs, °F -> °C) as scripts with the old imports, serial and on a Dask
client, each a real process with CACHE_DIR set; a second run repeats nothing."""

from __future__ import annotations

import itertools
import queue
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, TESTS, env_for_subprocess, wait_for
from dpypeline.state.ledger import Ledger

GSOD = ROOT.parent / "shared" / "data" / "gsod-2023-sample"
SCRIPTS = TESTS / "legacy"
FILES = 4  # station files per run: enough to see order and parallelism, fast to convert


def gsod(workdir: Path, start: int, count: int) -> list[str]:
    """Copy ``count`` station files into ``workdir/2023/``, the original example's layout."""
    names = sorted(p.name for p in GSOD.glob("*.csv"))[start : start + count]
    (workdir / "2023").mkdir(exist_ok=True)
    for name in names:
        shutil.copyfile(GSOD / name, workdir / "2023" / name)
    return names


def start_script(workdir: Path, script: str, monitor: bool = False) -> subprocess.Popen[str]:
    env = {**env_for_subprocess(), "CACHE_DIR": str(workdir / "cache_temp")}
    if monitor:
        env["AKITA_MONITOR"] = "1"
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / script)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_script(workdir: Path, script: str) -> str:
    proc = start_script(workdir, script)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    return out


def assert_converted(workdir: Path, names: list[str]) -> None:
    for name in names:
        fahrenheit = pd.read_csv(GSOD / name)["TEMP"]
        celsius = pd.read_csv(workdir / "celsius_2023" / name)["TEMP"]
        assert celsius.tolist() == pytest.approx(((fahrenheit - 32) * 5 / 9).tolist())
        assert celsius.min() < fahrenheit.min()  # °C, not the °F values copied through


def ledger_counts(workdir: Path) -> dict[str, int]:
    ledger = Ledger(workdir / "cache_temp")
    try:
        return {state: n for state, n in ledger.counts().items() if n}
    finally:
        ledger.close()


def outputs(workdir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (workdir / "celsius_2023").iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("script", ["example_1_serial.py", "example_1_parallel.py"])
def test_original_example_1_converts_every_file_once_and_a_rerun_repeats_nothing(
    tmp_path: Path, script: str
) -> None:
    names = gsod(tmp_path, 0, FILES)
    log = run_script(tmp_path, script)
    assert log.count("INFO | event='job_done'") == FILES  # through the script's basicConfig
    assert_converted(tmp_path, names)
    assert sorted(outputs(tmp_path)) == names
    assert ledger_counts(tmp_path) == {"done": FILES}
    written = outputs(tmp_path)

    new = gsod(tmp_path, FILES, 2)  # the second run takes only the files added since
    log = run_script(tmp_path, script)
    assert log.count("INFO | event='job_done'") == 2
    assert_converted(tmp_path, names + new)
    assert {n: t for n, t in outputs(tmp_path).items() if n in written} == written
    assert ledger_counts(tmp_path) == {"done": FILES + 2}  # one job per file, ever


@pytest.mark.slow
def test_monitoring_akita_takes_new_files_until_sigterm(tmp_path: Path) -> None:
    names = gsod(tmp_path, 0, 2)
    proc = start_script(tmp_path, "example_1_serial.py", monitor=True)
    try:
        out = tmp_path / "celsius_2023"
        wait_for(lambda: out.is_dir() and len(list(out.iterdir())) == 2, message="first files")
        new = gsod(tmp_path, 2, 1)
        wait_for((out / new[0]).exists, message="a file that arrived while watching")
        assert proc.poll() is None  # monitor=True keeps watching
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log
    assert_converted(tmp_path, names + new)
    assert ledger_counts(tmp_path) == {"done": 3}


def test_the_in_memory_queue_and_celery_pipeline_name_their_replacements(tmp_path: Path) -> None:
    from dpypeline.akita.core import Akita
    from dpypeline.akita.factory import get_akita_dependencies
    from dpypeline.errors import Replaced
    from dpypeline.etl_pipeline.basic_pipeline import BasicPipeline
    from dpypeline.etl_pipeline.celery_pipeline import CeleryPipeline
    from dpypeline.event_consumer.consumer_serial import ConsumerSerial

    akita = Akita(*get_akita_dependencies(str(tmp_path), ["*.csv"]), monitor=False)
    with pytest.raises(Replaced, match="CACHE_DIR"):
        akita.queue.get()
    with pytest.raises(Replaced, match="ConsumerParallel"):
        CeleryPipeline()
    with pytest.raises(Replaced, match=r"akita\.queue"):
        ConsumerSerial(queue=queue.Queue(), job_producer=BasicPipeline())
    deps = get_akita_dependencies(str(tmp_path), ["*.csv"], glob_kwargs={"root_dir": "elsewhere"})
    with pytest.raises(Replaced, match="start-up scan"):
        Akita(*deps)


def note_span(path: str, log: str) -> str:
    """A task that takes a moment and notes which Dask worker ran it, and when."""
    from distributed import get_worker

    start = time.monotonic()
    time.sleep(0.2)
    with open(log, "a") as out:
        out.write(f"{get_worker().address}\t{start}\t{time.monotonic()}\n")
    return path


def start(span: list[str]) -> float:
    return float(span[1])


def test_consumer_parallel_runs_on_the_callers_client_honours_workers_per_event_and_leaves_it_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client, LocalCluster

    from dpypeline.akita.core import Akita
    from dpypeline.akita.factory import get_akita_dependencies
    from dpypeline.etl_pipeline.basic_pipeline import BasicPipeline
    from dpypeline.etl_pipeline.core import Job, Task
    from dpypeline.event_consumer.consumer_parallel import ConsumerParallel

    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    inbox, log = tmp_path / "inbox", tmp_path / "spans.log"
    inbox.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (inbox / name).write_text(name)
    job = Job(name="note")
    job.add_task(Task(function=note_span, kwargs={"log": str(log)}))
    pipeline = BasicPipeline(jobs=[job])
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        akita = Akita(*get_akita_dependencies(str(inbox), ["*.txt"]), monitor=False)
        consumer = ConsumerParallel(
            cluster_client=client, workers_per_event=2, queue=akita.queue, job_producer=pipeline
        )
        akita.run()
        assert consumer.run() == 0
        assert client.submit(sum, [1, 2]).result() == 3  # still the caller's, still open
        workers = set(client.scheduler_info()["workers"])
    spans = sorted((line.split("\t") for line in log.read_text().splitlines()), key=start)
    assert len(spans) == 3
    assert {address for address, _, _ in spans} <= workers
    # two workers, two workers per event: one file at a time
    assert all(float(a[2]) <= float(b[1]) for a, b in itertools.pairwise(spans))
