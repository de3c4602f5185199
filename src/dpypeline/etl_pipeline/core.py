"""The original's import path; the code is
:mod:`dpypeline.legacy.etl_pipeline.core`."""

from dpypeline.legacy.etl_pipeline.core import *  # noqa: F403
from dpypeline.legacy.etl_pipeline.core import __all__  # noqa: F401
