"""The original's import path; the code is
:mod:`dpypeline.legacy.akita.core`."""

from dpypeline.legacy.akita.core import *  # noqa: F403
from dpypeline.legacy.akita.core import __all__  # noqa: F401
