"""``get_akita_dependencies``: the arguments of ``Akita``, in its order.

The original built a watchdog handler and observer here; the service now builds its own
watcher, so this only gathers what to watch for ``Akita(*deps, monitor=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from dpypeline.legacy.akita.core import Patterns


class AkitaDependencies(NamedTuple):
    path: str | os.PathLike[str]
    patterns: Patterns
    ignore_patterns: Patterns
    ignore_directories: bool
    case_sensitive: bool
    glob_kwargs: Mapping[str, Any] | None


def get_akita_dependencies(  # noqa: PLR0917 - the original's signature, order and all
    path: str | os.PathLike[str],
    patterns: Patterns = None,
    ignore_patterns: Patterns = None,
    ignore_directories: bool = True,
    case_sensitive: bool = True,
    glob_kwargs: Mapping[str, Any] | None = None,
) -> AkitaDependencies:
    return AkitaDependencies(
        path, patterns, ignore_patterns, ignore_directories, case_sensitive, glob_kwargs
    )


__all__ = ["AkitaDependencies", "get_akita_dependencies"]
