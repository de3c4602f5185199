"""The original's import path; the code is
:mod:`dpypeline.legacy.akita.factory`."""

from dpypeline.legacy.akita.factory import *  # noqa: F403
from dpypeline.legacy.akita.factory import __all__  # noqa: F401
