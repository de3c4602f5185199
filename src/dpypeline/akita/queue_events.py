"""The original's import path; the code is
:mod:`dpypeline.legacy.akita.queue_events`."""

from dpypeline.legacy.akita.queue_events import *  # noqa: F403
from dpypeline.legacy.akita.queue_events import __all__  # noqa: F401
