"""The original dpypeline's whole public API (its ``akita``, ``etl_pipeline``,
``event_consumer`` and ``filesystems`` modules) imports from the same paths here, with the
same parameters, and behaves as the original does: the same calls are run on the original,
from its own source, and on ours, and their outcomes compared. Where ours differs on
purpose (its pickled queue, replaced by the ledger), the difference is listed here and in
docs/migrating.md."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, TESTS, env_for_subprocess, wait_for
from s3server import S3Server

ORIGINAL_SRC = ROOT.parent / "shared" / "original" / "src"
API_LIST = TESTS / "fixtures" / "original-api.json"
SCENARIOS = TESTS / "legacy"

sys.path.insert(0, str(TESTS / "fixtures"))
from make_original_api import kind, parameters  # noqa: E402

# Outcomes of tests/legacy/api_scenarios.py that differ from the original's, and ours.
DIFFERENCES = {
    # the pickled queue and directory state: the ledger in CACHE_DIR replaced them
    "queue.enqueue": {"raised": "Replaced"},
    "queue.queue_list": {"raised": "Replaced"},
    "queue.get_queue_size": {"raised": "Replaced"},
    "queue.peek": {"raised": "Replaced"},
    "queue.dequeue": {"raised": "Replaced"},
    "queue.remove": {"raised": "Replaced"},
    "queue.processed_events": {"raised": "Replaced"},
    "dirstate.stored": {"raised": "Replaced"},
    # Task(args=[...]) as a list: the original raised TypeError when the task ran
    "task.run.list_args": {"value": 3},
    # a missing credentials file raises its own error, not a bare Exception
    "os3.load_store_credentials.missing": {"raised": "FileNotFoundError"},
    # a file of one part lands at its name; the original left that key empty (.part0 had it)
    "os3.read_back": {"value": "a.nc"},
    "os3.read_back.filelike": {"value": "0123456789"},
    "os3.mapper": {"value": ["b", "p.nc", "x/a.nc"]},
    "os3.mapper.read": {"value": "a.nc"},
}


def original_env(**extra: str) -> dict[str, str]:
    env = env_for_subprocess()
    env["PYTHONPATH"] = os.pathsep.join([str(ORIGINAL_SRC), str(SCENARIOS)])
    return {**env, **extra}


def our_env(**extra: str) -> dict[str, str]:
    env = env_for_subprocess()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(SCENARIOS), env["PYTHONPATH"]])
    return {**env, **extra}


def resolve(module: str, name: str) -> tuple[Any, Any]:
    """The object at ``module.name`` (``Class.member`` for a member, read statically so a
    property is the property), and what its kind and parameters are judged on."""
    obj: Any = importlib.import_module(module)
    owner, _, member = name.partition(".")
    obj = getattr(obj, owner)
    if not member:
        return obj, obj
    raw = next((vars(k)[member] for k in obj.__mro__ if member in vars(k)), None)
    assert raw is not None, f"{module}.{name} is missing"
    func = raw.__func__ if isinstance(raw, staticmethod | classmethod) else raw
    return raw, func


@pytest.mark.parametrize(
    "row",
    json.loads(API_LIST.read_text()),
    ids=lambda row: f"{row['module'].removeprefix('dpypeline.')}.{row['name']}",
)
def test_every_public_name_of_the_original_imports_from_its_path_with_its_parameters(
    row: dict[str, Any],
) -> None:
    raw, func = resolve(row["module"], row["name"])
    if row["kind"] == "class":
        assert inspect.isclass(raw)
    elif row["kind"] == "function":
        assert inspect.isfunction(raw)
    else:
        assert kind(raw) == row["kind"]
    assert parameters(func) == row["params"]


def start_scenarios(env: dict[str, str], workdir: Path, endpoint: str) -> subprocess.Popen[str]:
    workdir.mkdir()
    return subprocess.Popen(
        [sys.executable, str(SCENARIOS / "api_scenarios.py"), str(workdir / "outcomes.json"),
         str(workdir), endpoint, f"legacy-{workdir.name}"],
        env={**env, "CACHE_DIR": str(workdir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def outcomes_of(proc: subprocess.Popen[str], workdir: Path) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    outcomes: dict[str, Any] = json.loads((workdir / "outcomes.json").read_text())
    outcomes["stdout"] = {"value": out}
    return outcomes


def test_the_api_behaves_as_the_originals_call_for_call(tmp_path: Path, s3: S3Server) -> None:
    """Both at once, each with a bucket of its own. The original's run also lists its
    public API afresh: the committed list must be all of it."""
    workdirs = {"original": tmp_path / "original", "ours": tmp_path / "ours"}
    envs = {"original": original_env(), "ours": our_env()}
    procs = {k: start_scenarios(envs[k], d, s3.endpoint_url) for k, d in workdirs.items()}
    original, ours = (outcomes_of(procs[k], workdirs[k]) for k in ("original", "ours"))
    assert original.pop("api")["value"] == json.loads(API_LIST.read_text())
    ours.pop("api")
    # the original's retry printed its arguments on every call (here: retry(len)("abc"))
    assert "3 5 ('abc',) {}" in original.pop("stdout")["value"]
    assert "('abc',)" not in ours.pop("stdout")["value"]
    assert sorted(ours) == sorted(original)
    assert len(original) > 90
    for name, outcome in DIFFERENCES.items():
        assert original[name] != outcome, f"{name}: the original did this too"
        assert ours[name] == outcome, name
    same = {k: v for k, v in ours.items() if k not in DIFFERENCES}
    assert same == {k: v for k, v in original.items() if k not in DIFFERENCES}


def start_consumer_script(env: dict[str, str], workdir: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCENARIOS / "consumer_scenario.py"), mode],
        cwd=workdir,
        env={**env, "CACHE_DIR": str(workdir / f"cache-{mode}")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_both(workdirs: dict[str, Path], *modes: str) -> None:
    """The script on the original and on ours at once, each in its own directory, in each
    of *modes* at once (each with a CACHE_DIR of its own)."""
    envs = {"original": original_env, "ours": our_env}
    procs = {
        (k, mode): start_consumer_script(envs[k](), d, mode)
        for k, d in workdirs.items()
        for mode in modes
    }
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, f"{name}:\n{out}"


def results(workdir: Path) -> tuple[Counter[str], dict[str, str]]:
    calls = Counter((workdir / "calls.log").read_text().splitlines())
    return calls, {p.name: p.read_text() for p in sorted((workdir / "out").iterdir())}


@pytest.mark.slow  # both implementations run end to end, each in processes
def test_a_consumer_script_does_on_our_engine_what_it_did_on_the_original(tmp_path: Path) -> None:
    workdirs = {"original": tmp_path / "original", "ours": tmp_path / "ours"}
    for workdir in workdirs.values():
        (workdir / "inbox").mkdir(parents=True)
        (workdir / "cache-basic").mkdir()
        (workdir / "cache-custom").mkdir()
        (workdir / "cache-parallel").mkdir()
        for name in ("a", "b", "c"):
            (workdir / "inbox" / f"{name}.txt").write_text(f"file {name}")
        (workdir / "inbox" / "x.csv").write_text("not a pattern")

    run_both(workdirs, "basic")
    first = results(workdirs["original"])
    assert results(workdirs["ours"]) == first
    assert first[0]["label b a.txt"] == 1  # Task(args=("b",)) came before the result

    for workdir in workdirs.values():
        (workdir / "inbox" / "d.txt").write_text("file d")
    run_both(workdirs, "basic")  # only the new file: a second run repeats nothing
    # an ETLPipeline of the user's own (its produce_jobs), and the jobs again on
    # ConsumerParallel with a Dask client, each with a CACHE_DIR of its own
    run_both(workdirs, "custom", "parallel")
    calls, outputs = results(workdirs["original"])
    assert results(workdirs["ours"]) == (calls, outputs)
    assert set(calls.values()) == {1}
    assert {c for c in calls if c.startswith("custom")} == {f"custom {n}.txt" for n in "abcd"}
    assert outputs["d.txt.up"] == outputs["d.txt.par"] == "FILE D"
    assert calls["parallel: label p d.txt"] == 1


def test_akita_stop_ends_the_run_of_a_consumer_that_monitors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dpypeline.akita.core import Akita
    from dpypeline.akita.factory import get_akita_dependencies
    from dpypeline.etl_pipeline.basic_pipeline import BasicPipeline
    from dpypeline.etl_pipeline.core import Job, Task
    from dpypeline.event_consumer.consumer_serial import ConsumerSerial

    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    inbox.mkdir()
    done.mkdir()
    akita = Akita(*get_akita_dependencies(str(inbox), ["*.txt"]), monitor=True)
    pipeline = BasicPipeline([Job("copy", [Task(function=mark_done, args=(str(done),))])])
    consumer = ConsumerSerial(queue=akita.queue, job_producer=pipeline)
    returned: list[int] = []
    runner = threading.Thread(target=lambda: returned.append(consumer.run()), name="consumer")
    runner.start()
    try:
        (inbox / "a.txt").write_text("a")
        wait_for((done / "a.txt").exists, timeout=30, message="the file taken while watching")
        assert runner.is_alive()  # monitor=True: it keeps watching
    finally:
        akita.stop()
        runner.join(30)
    assert not runner.is_alive()
    assert returned == [0]


def mark_done(directory: str, path: str) -> str:
    target = os.path.join(directory, os.path.basename(path))
    Path(target).write_text("done")
    return target


def test_what_the_ledger_replaced_says_so_and_cache_dir_need_not_be_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dpypeline.akita.directory_state import DirectoryState
    from dpypeline.akita.queue_events import EventsQueue
    from dpypeline.errors import Replaced
    from dpypeline.event_consumer.consumer_serial import ConsumerSerial

    monkeypatch.delenv("CACHE_DIR", raising=False)  # the original asserted it was set
    queue = EventsQueue()
    for call in (lambda: queue.enqueue("a.nc"), lambda: queue.queue_list, queue.dequeue):
        with pytest.raises(Replaced, match=r"EventsQueue\.\w+: .*durable ledger in CACHE_DIR"):
            call()
    with pytest.raises(Replaced, match="ledger"):
        _ = DirectoryState(str(tmp_path), "*.nc").stored_state
    with pytest.raises(Replaced, match=r"queue=akita\.queue"):
        ConsumerSerial(queue=object(), job_producer=None)  # type: ignore[arg-type]


def test_a_task_of_the_original_api_declares_the_commit_its_kwargs_make() -> None:
    """The service orders appends to one Zarr store by the commit a task declares from its
    keyword arguments: an original-style Task must declare the same as today's."""
    from dpypeline.etl_pipeline.core import Task
    from dpypeline.pipeline import Task as EngineTask

    kwargs = {"store": "/data/n06.zarr", "append_dim": "time_counter"}
    task = Task(function="to_zarr", kwargs=kwargs)
    assert task.commit is not None
    assert task.commit == EngineTask("to_zarr", **kwargs).commit
    assert task.kwargs is kwargs  # kept as given, as the original's dataclass kept it
    assert Task(function="os.path.basename").run("/data/a.nc") == "a.nc"  # a dotted path


def test_write_file_to_bucket_writes_a_file_of_one_part_to_its_name(
    tmp_path: Path, s3: S3Server
) -> None:
    """The original wrote it to NAME.part0 and left NAME empty (see DIFFERENCES)."""
    from dpypeline.filesystems.object_store import ObjectStoreS3

    store = ObjectStoreS3(
        store_credentials_json=str(s3.credentials_file(tmp_path)), skip_instance_cache=True
    )
    store.create_bucket("kept")
    (tmp_path / "a.nc").write_bytes(b"netcdf")
    store.write_file_to_bucket(str(tmp_path / "a.nc"), "kept", "a.nc")
    assert store.cat("kept/a.nc") == b"netcdf"
    assert store.ls("kept") == ["kept/a.nc"]
