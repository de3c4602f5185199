"""The original's import path; the code is
:mod:`dpypeline.legacy.etl_pipeline.decorators`."""

from dpypeline.legacy.etl_pipeline.decorators import *  # noqa: F403
from dpypeline.legacy.etl_pipeline.decorators import __all__  # noqa: F401
