"""The original's import path; the code is
:mod:`dpypeline.legacy.etl_pipeline.thread_pipeline`."""

from dpypeline.legacy.etl_pipeline.thread_pipeline import *  # noqa: F403
from dpypeline.legacy.etl_pipeline.thread_pipeline import __all__  # noqa: F401
