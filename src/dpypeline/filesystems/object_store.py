"""The original's import path; the code is
:mod:`dpypeline.legacy.filesystems.object_store`."""

from dpypeline.legacy.filesystems.object_store import *  # noqa: F403
from dpypeline.legacy.filesystems.object_store import __all__  # noqa: F401
