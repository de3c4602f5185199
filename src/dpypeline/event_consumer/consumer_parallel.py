"""The original's import path; the code is
:mod:`dpypeline.legacy.event_consumer.consumer_parallel`."""

from dpypeline.legacy.event_consumer.consumer_parallel import *  # noqa: F403
from dpypeline.legacy.event_consumer.consumer_parallel import __all__  # noqa: F401
