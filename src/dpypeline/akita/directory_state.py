"""The original's import path; the code is
:mod:`dpypeline.legacy.akita.directory_state`."""

from dpypeline.legacy.akita.directory_state import *  # noqa: F403
from dpypeline.legacy.akita.directory_state import __all__  # noqa: F401
