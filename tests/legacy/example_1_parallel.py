"""The original dpypeline's example 1, parallel: the same job run on the workers of the
user's own Dask client (a LocalCluster of threads here, to keep the test light)."""

import logging
import os

from dask.distributed import Client, LocalCluster
from example_1_tasks import convert_fahrenheit_to_celsius, read_csv, write_csv

from dpypeline.akita.core import Akita
from dpypeline.akita.factory import get_akita_dependencies
from dpypeline.etl_pipeline.basic_pipeline import BasicPipeline
from dpypeline.etl_pipeline.core import Job, Task
from dpypeline.event_consumer.consumer_parallel import ConsumerParallel

if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s | %(message)s", level=logging.INFO)
    akita_dep = get_akita_dependencies(
        path="2023/",
        patterns=["*.csv"],
        ignore_patterns=None,
        ignore_directories=True,
        case_sensitive=True,
        glob_kwargs=None,
    )
    akita = Akita(*akita_dep, monitor=os.environ.get("AKITA_MONITOR") == "1")
    etl_pipeline = BasicPipeline()

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
    )
    client = Client(cluster)
    event_consumer = ConsumerParallel(
        cluster_client=client,
        workers_per_event=1,
        queue=akita.queue,
        job_producer=etl_pipeline,
    )

    job = Job(name="convert_from_fahrenheit_to_celsius")
    job.add_task(Task(function=read_csv))
    job.add_task(Task(function=convert_fahrenheit_to_celsius, kwargs={"col_temp": "TEMP"}))
    job.add_task(Task(function=write_csv, kwargs={"prefix": "celsius_2023/"}))
    etl_pipeline.add_job(job)

    akita.run()
    event_consumer.run()
