"""The original's import path; the code is
:mod:`dpypeline.legacy.akita.event_handler`."""

from dpypeline.legacy.akita.event_handler import *  # noqa: F403
from dpypeline.legacy.akita.event_handler import __all__  # noqa: F401
