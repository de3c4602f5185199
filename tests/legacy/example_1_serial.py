"""The original dpypeline's example 1, serial, written against its Python API: GSOD CSVs in
2023/ get TEMP converted from Fahrenheit to Celsius into celsius_2023/.

``AKITA_MONITOR=1`` keeps watching (stop it with SIGTERM); otherwise it stops once every
file is done, as ``monitor=False`` did.
"""

import logging
import os

from example_1_tasks import convert_fahrenheit_to_celsius, read_csv, write_csv

from dpypeline.akita.core import Akita
from dpypeline.akita.factory import get_akita_dependencies
from dpypeline.etl_pipeline.core import Job, Task
from dpypeline.etl_pipeline.thread_pipeline import ThreadPipeline
from dpypeline.event_consumer.consumer_serial import ConsumerSerial

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
    etl_pipeline = ThreadPipeline()
    event_consumer = ConsumerSerial(queue=akita.queue, job_producer=etl_pipeline)

    job = Job(name="convert_from_fahrenheit_to_celsius")
    job.add_task(Task(function=read_csv))
    job.add_task(Task(function=convert_fahrenheit_to_celsius, kwargs={"col_temp": "TEMP"}))
    job.add_task(Task(function=write_csv, kwargs={"prefix": "celsius_2023/"}))
    etl_pipeline.add_job(job)

    akita.run()
    event_consumer.run()
