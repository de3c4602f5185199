"""A script written against the original dpypeline's consumer API, run unchanged on the
original and on ours (``tests/test_legacy_surface.py``): ``python consumer_scenario.py
basic|custom|parallel`` in a directory holding ``inbox/``, with ``CACHE_DIR`` set.

``basic``: a ``BasicPipeline`` of two jobs (one with ``Task(args=...)``, which come before
the previous task's result) on every ``*.txt`` file; ``custom``: an ``ETLPipeline``
subclass whose own ``produce_jobs`` is called on every file; ``parallel``: the jobs of
``basic`` on a ``ConsumerParallel`` with a Dask client of its own (their lines in
``calls.log`` start ``parallel:``, their outputs end ``.par``/``.p``). Each call is noted in
``calls.log``; outputs go to ``out/``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from dpypeline.akita.core import Akita
from dpypeline.akita.factory import get_akita_dependencies
from dpypeline.etl_pipeline.basic_pipeline import BasicPipeline
from dpypeline.etl_pipeline.core import ETLPipeline, Job, Task
from dpypeline.event_consumer.consumer_parallel import ConsumerParallel
from dpypeline.event_consumer.consumer_serial import ConsumerSerial

PREFIX = "parallel: " if sys.argv[1:] == ["parallel"] else ""


def note(line: str) -> None:
    with open("calls.log", "a") as log:
        log.write(PREFIX + line + "\n")


def shout(path: str, suffix: str) -> str:
    name = os.path.basename(path)
    with open(path) as f, open(os.path.join("out", name + suffix), "w") as out:
        out.write(f.read().upper())
    note(f"shout {name}")
    return name


def label(tag: str, name: str) -> str:
    with open(os.path.join("out", f"{name}.{tag}"), "w") as out:
        out.write(tag)
    note(f"label {tag} {name}")
    return name


class Counting(ETLPipeline):
    """A pipeline of the user's own: what runs on an event is its produce_jobs."""

    def produce_jobs(self, event: Any) -> Any:
        note(f"custom {os.path.basename(event)}")
        return event


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    os.makedirs("out", exist_ok=True)
    deps = get_akita_dependencies(path="inbox/", patterns=["*.txt"], ignore_directories=True)
    akita = Akita(*deps, monitor=False)
    if sys.argv[1] == "custom":
        pipeline: ETLPipeline = Counting()
    else:
        parallel = sys.argv[1] == "parallel"
        pipeline = BasicPipeline()
        suffix = ".par" if parallel else ".up"
        pipeline.add_job(Job(name="shout", tasks=[Task(function=shout, kwargs={"suffix": suffix})]))
        lab = Job(name="label")
        lab.add_task(Task(function=os.path.basename))
        lab.add_task(Task(function=label, args=("p" if parallel else "b",)))
        pipeline.add_job(lab)
    if sys.argv[1] == "parallel":
        from dask.distributed import Client, LocalCluster

        with (
            LocalCluster(n_workers=2, processes=False, dashboard_address=":0") as cluster,
            Client(cluster) as client,
        ):
            consumer = ConsumerParallel(
                cluster_client=client, workers_per_event=1, queue=akita.queue,
                job_producer=pipeline,
            )  # fmt: skip
            akita.run()
            consumer.run()
        return
    consumer = ConsumerSerial(queue=akita.queue, job_producer=pipeline)
    akita.run()
    consumer.run()


if __name__ == "__main__":
    main()
