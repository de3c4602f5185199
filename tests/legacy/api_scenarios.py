"""The original dpypeline's public API exercised through its own import paths, so that the
same calls can be run on the original (its source first on ``PYTHONPATH``) and on ours, and
their outcomes compared (``tests/test_legacy_surface.py``).

``python api_scenarios.py OUT WORKDIR S3_ENDPOINT BUCKET`` writes ``OUT``: a JSON object
of outcomes by name, each ``{"value": ...}`` or ``{"raised": "ExceptionType"}``, and under
``"api"`` the public API found (``tests/fixtures/make_original_api.py``). Paths are relative
to ``WORKDIR``, so both runs give the same text. ``CACHE_DIR`` must be set (the original
asserts it is).
"""

# ruff: noqa: PLW0108 - each call is wrapped so that record() sees what it raises
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpypeline.akita.core import Akita
from dpypeline.akita.directory_state import DirectoryState
from dpypeline.akita.event_handler import EventHandler
from dpypeline.akita.factory import AkitaFactory, get_akita_dependencies
from dpypeline.akita.queue_events import EventsQueue, Sentinel
from dpypeline.etl_pipeline.basic_pipeline import BasicPipeline
from dpypeline.etl_pipeline.core import ETLPipeline, Job, Task
from dpypeline.etl_pipeline.decorators import retry
from dpypeline.etl_pipeline.thread_pipeline import ThreadPipeline
from dpypeline.event_consumer.consumer_serial import ConsumerSerial

OUTCOMES: dict[str, dict[str, Any]] = {}


def record(name: str, call: Callable[[], Any]) -> None:
    try:
        OUTCOMES[name] = {"value": call()}
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        OUTCOMES[name] = {"raised": type(exc).__name__}


def add(a: Any, b: Any, c: Any = 0) -> Any:
    return a + b + c


def tag(value: str, label: str = "x") -> str:
    return f"{label}:{value}"


def tasks_and_jobs() -> None:
    task = Task(function=add, args=(10,), kwargs={"c": 100})
    record("task.fields", lambda: [task.function.__name__, list(task.args), task.kwargs])
    record("task.run", lambda: task.run(1))
    record("task.run.kwargs_override", lambda: task.run(1, c=0))
    record("task.run.args_first", lambda: Task(function=tag, args=("a",)).run(label="l"))
    record("task.run.list_args", lambda: Task(function=add, args=[1]).run(2))
    record("task.defaults", lambda: [Task(function=add).args, Task(function=add).kwargs])
    record("task.eq", lambda: Task(function=add, args=(1,)) == Task(function=add, args=(1,)))
    record("task.ne", lambda: Task(function=add, args=(1,)) == Task(function=add, args=(2,)))
    record("task.hash", lambda: hash(Task(function=add)))
    record("task.frozen", lambda: setattr(task, "args", ()))
    record("task.frozen_is_dataclass_error", lambda: _frozen_error(task))
    record("task.repr", lambda: repr(Task(function=len, args=(1,), kwargs={"k": 2})))

    job = Job()
    record("job.defaults", lambda: [job.name, job.tasks])
    one, two, three = Task(function=len), Task(function=add, args=(1,)), Task(function=str)
    job = Job(name="j")
    for t in (one, two, three):
        job.add_task(t)
    record(
        "job.add_task", lambda: [t is u for t, u in zip(job.tasks, (one, two, three), strict=True)]
    )
    record("job.run", lambda: job.run("abcd"))  # str(1 + len("abcd"))
    record("job.repr", lambda: repr(Job(name="r", tasks=[Task(function=len)])))
    record("job.eq", lambda: Job(name="e") == Job(name="e"))
    record("job.remove_task.index", lambda: job.remove_task(1) is two)
    record("job.remove_task.ignores_task", lambda: job.remove_task(0, task=three) is one)
    record("job.remove_task.left", lambda: [t is three for t in job.tasks])
    record("job.remove_task.class", lambda: job.remove_task(0, task=Task))
    record("job.run.empty", lambda: Job(name="e").run("x"))
    record("job.run.kwargs_to_first", lambda: Job("k", [Task(function=tag)]).run("v", label="y"))


def _frozen_error(task: Any) -> bool:
    try:
        task.kwargs = {}
    except dataclasses.FrozenInstanceError:
        return True
    return False


def pipelines() -> None:
    jobs = [Job("a", [Task(function=len)]), Job("b", [Task(function=str.upper)])]
    base = ETLPipeline()
    record("etl.jobs.default", lambda: base.jobs)
    record("etl.add_job.returns_jobs", lambda: base.add_job(jobs[0]) is base.jobs)
    record("etl.jobs.given_list_kept", lambda: ETLPipeline(jobs).jobs is jobs)
    record("etl.remove_job", lambda: base.remove_job(0) is jobs[0])
    record(
        "etl.remove_job.ignores_job", lambda: ETLPipeline(list(jobs)).remove_job(0, jobs[1]).name
    )
    record("etl.produce_jobs", lambda: base.produce_jobs("e"))
    basic = BasicPipeline(list(jobs))
    record("basic.produce_jobs", lambda: basic.produce_jobs("abc"))
    record("basic.add_job", lambda: [j.name for j in basic.add_job(Job("c"))])
    record("basic.is_etl", lambda: isinstance(basic, ETLPipeline))
    record("thread.produce_jobs", lambda: ThreadPipeline(list(jobs)).produce_jobs("xy"))
    record(
        "thread.is_basic",
        lambda: [issubclass(ThreadPipeline, BasicPipeline), ThreadPipeline is BasicPipeline],
    )


def decorators() -> None:
    calls: list[int] = []

    @retry(max_retries=3, sleep_time=0)
    def flaky(n: int) -> int:
        """Fails twice, then returns n."""
        calls.append(n)
        if len(calls) < 3:
            raise OSError("not yet")
        return n

    record("retry.succeeds", lambda: [flaky(7), len(calls)])
    record("retry.wraps", lambda: [flaky.__name__, flaky.__doc__])

    def never() -> None:
        raise ValueError("no")

    record("retry.gives_up", lambda: retry(never, max_retries=2, sleep_time=0)())
    record("retry.gives_up.message", lambda: _message(retry(never, max_retries=2, sleep_time=0)))
    record("retry.bare", lambda: retry(len)("abc"))


def _message(call: Callable[[], Any]) -> str:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - its message is compared
        return str(exc)
    return ""


def queue_and_state(workdir: Path) -> None:
    sentinel = Sentinel()
    record("sentinel.default", lambda: sentinel())
    record("sentinel.set_state", lambda: [sentinel.set_state(True), sentinel(1, k=2)])
    record("sentinel.active", lambda: Sentinel(active=True)())

    EventsQueue.clear_instance()
    queue = EventsQueue()
    record("queue.singleton", lambda: EventsQueue() is queue and EventsQueue(5) is queue)
    record("queue.sentinel", lambda: [queue.sentinel(), queue.set_sentinel_state(True)])
    record("queue.sentinel.after", lambda: queue.sentinel())
    record("queue.enqueue", lambda: queue.enqueue("a.nc"))
    record("queue.queue_list", lambda: queue.queue_list)
    record("queue.get_queue_size", lambda: queue.get_queue_size())
    record("queue.peek", lambda: queue.peek())
    record("queue.dequeue", lambda: queue.dequeue())
    record("queue.remove", lambda: queue.remove("a.nc"))
    record("queue.processed_events", lambda: queue.processed_events)
    EventsQueue.clear_instance()
    record("queue.clear_instance", lambda: EventsQueue() is not queue)

    tree = workdir / "tree"
    (tree / "sub").mkdir(parents=True)
    for name in ("a.nc", "b.nc", "c.txt", "sub/d.nc"):
        (tree / name).write_text(name)

    def rel(paths: list[str]) -> list[str]:
        return sorted(os.path.relpath(p, workdir) for p in paths)

    flat = DirectoryState(str(tree), "*.nc")
    record("dirstate.current", lambda: rel(flat.current_state))
    deep = DirectoryState(str(tree), ["**/*.nc", "*.txt"], {"recursive": True})
    record("dirstate.current.recursive", lambda: rel(deep.current_state))
    record("dirstate.stored", lambda: deep.stored_state)


class Collected:
    """A user's own queue, as the EventHandler protocol allows."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def enqueue(self, event: Any) -> bool:
        self.events.append(event)
        return True


def handlers(workdir: Path) -> None:
    from watchdog.events import FileCreatedEvent, FileDeletedEvent, PatternMatchingEventHandler

    collected = Collected()
    handler = EventHandler(collected, patterns=["*.nc"], ignore_patterns=["*tmp*"])
    record("handler.is_watchdog", lambda: isinstance(handler, PatternMatchingEventHandler))
    record(
        "handler.options",
        lambda: [
            handler.patterns,
            handler.ignore_patterns,
            handler.ignore_directories,
            handler.case_sensitive,
        ],
    )
    new = workdir / "tree" / "a.nc"
    record("handler.is_file_size_stable", lambda: EventHandler.is_file_size_stable(str(new), 0))
    deleted = FileDeletedEvent(str(new))
    record("handler.on_deleted", lambda: handler.on_deleted(deleted) is deleted)
    record("handler.on_modified", lambda: handler.on_modified(deleted) is deleted)
    record("handler.on_moved", lambda: handler.on_moved(deleted) is deleted)
    handler.dispatch(FileCreatedEvent(str(workdir / "tree" / "c.txt")))  # not a pattern
    handler.dispatch(FileCreatedEvent(str(new)))  # waits for a stable size: about 1 s
    record(
        "handler.dispatch.enqueued", lambda: [os.path.relpath(e, workdir) for e in collected.events]
    )

    factory = AkitaFactory(path="tree/", patterns=["*.csv"], ignore_patterns=["x*"])
    queue = factory.get_queue()
    record("factory.queue_is_the_singleton", lambda: queue is EventsQueue())
    made = factory.get_event_handler(queue)
    record(
        "factory.handler",
        lambda: [
            type(made).__name__,
            made.patterns,
            made.ignore_patterns,
            made.ignore_directories,
            made.case_sensitive,
        ],
    )
    other = factory.get_event_handler(queue, patterns=["*.nc"], case_sensitive=False)
    record("factory.handler.overrides", lambda: [other.patterns, other.case_sensitive])
    record("factory.defaults", lambda: AkitaFactory().get_event_handler(queue).patterns)
    record("factory.observer", lambda: type(factory.get_polling_observer()).__name__)
    state = factory.get_directory_state()
    record("factory.directory_state", lambda: [type(state).__name__, state.current_state])
    record(
        "factory.directory_state.path",
        lambda: factory.get_directory_state(path="tree", patterns="*.nc").current_state,
    )

    deps = get_akita_dependencies(path="tree/", patterns=["*.nc"])
    record("deps.types", lambda: [type(d).__name__ for d in deps])
    record("deps.path_and_queue", lambda: [deps[0], deps[1] is EventsQueue()])
    akita = Akita(*deps, monitor=False)
    record("akita.queue", lambda: akita.queue is deps[1])
    record("akita.stop.before_run", lambda: akita.stop())
    record("akita.run", lambda: akita.run(enqueue_new_files=False))
    record("akita.run.sentinel", lambda: deps[1].sentinel())
    record("akita.enqueue_new_files", lambda: akita.enqueue_new_files())
    consumer = ConsumerSerial(queue=akita.queue, job_producer=BasicPipeline())
    record("consumer.made", lambda: type(consumer).__name__)

    def delete_queue() -> Any:
        del akita.queue
        return akita.queue

    record("akita.queue.deleter", delete_queue)


def object_store(workdir: Path, endpoint: str, bucket: str) -> None:
    from dpypeline.filesystems.object_store import ObjectStoreS3

    creds = workdir / "creds.json"
    creds.write_text(json.dumps({"token": "k", "secret": "s", "endpoint_url": endpoint}))
    partial = workdir / "partial.json"
    partial.write_text(json.dumps({"token": "k"}))
    record("os3.load_store_credentials", lambda: ObjectStoreS3.load_store_credentials(str(partial)))
    record(
        "os3.load_store_credentials.missing", lambda: ObjectStoreS3.load_store_credentials("nope")
    )
    store = ObjectStoreS3(store_credentials_json=str(creds), skip_instance_cache=True)
    record("os3.remote_options", lambda: store.get_remote_options())
    record("os3.create_bucket", lambda: store.create_bucket(bucket))
    record("os3.create_bucket.again", lambda: store.create_bucket(bucket))
    record("os3.bucket_list", lambda: bucket in store.get_bucket_list())
    data = workdir / "tree" / "a.nc"
    record("os3.write_file", lambda: store.write_file_to_bucket(str(data), bucket, "x/a.nc"))
    record("os3.read_back", lambda: store.cat(f"{bucket}/x/a.nc").decode())
    buffer = io.BytesIO(b"0123456789")
    record("os3.write_filelike", lambda: store.write_file_to_bucket(buffer, bucket, "b"))
    record("os3.read_back.filelike", lambda: store.cat(f"{bucket}/b").decode())
    record(
        "os3.write.parallel",
        lambda: store.write_file_to_bucket(str(data), bucket, "p.nc", parallel=True),
    )
    record("os3.write.no_bucket", lambda: store.write_file_to_bucket(str(data), "nobucket", "a"))
    record(
        "os3.write.not_a_file",
        lambda: store.write_file_to_bucket(str(workdir), bucket, "a"),
    )
    record("os3.write.not_filelike", lambda: store.write_file_to_bucket(3, bucket, "a"))
    record("os3.mapper", lambda: sorted(store.get_mapper(bucket)))
    record("os3.mapper.read", lambda: store.get_mapper(bucket)["p.nc"].decode())
    from_args = ObjectStoreS3(key="k", secret="s", endpoint_url=endpoint, skip_instance_cache=True)
    record("os3.from_args", lambda: bucket in from_args.get_bucket_list())
    record(
        "os3.chunks",
        lambda: {str(k): v for k, v in store._create_chunks_offsets_lengths(10, 4).items()},
    )


def main() -> None:
    out, workdir = Path(sys.argv[1]), Path(sys.argv[2])
    logging.basicConfig(level=logging.CRITICAL)  # keep the original's prints apart from logs
    os.chdir(workdir)
    tasks_and_jobs()
    pipelines()
    decorators()
    queue_and_state(workdir)
    handlers(workdir)
    object_store(workdir, sys.argv[3], sys.argv[4])
    sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures"))
    from make_original_api import public_api

    OUTCOMES["api"] = {"value": public_api()}
    out.write_text(json.dumps(OUTCOMES, indent=1, sort_keys=True, default=repr))


if __name__ == "__main__":
    main()
