"""The original's import path; the code is
:mod:`dpypeline.legacy.event_consumer.consumer_serial`."""

from dpypeline.legacy.event_consumer.consumer_serial import *  # noqa: F403
from dpypeline.legacy.event_consumer.consumer_serial import __all__  # noqa: F401
