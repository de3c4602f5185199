"""The original's import path; the code is
:mod:`dpypeline.legacy.event_consumer.core`."""

from dpypeline.legacy.event_consumer.core import *  # noqa: F403
from dpypeline.legacy.event_consumer.core import __all__  # noqa: F401
