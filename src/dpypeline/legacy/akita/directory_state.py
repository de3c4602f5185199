"""``DirectoryState``: the files in a directory that match the patterns.

The original also pickled this list to ``CACHE_DIR`` each time it was read, to tell new
files from old ones at the next start; the ledger in ``CACHE_DIR`` does that now.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from typing import Any

from dpypeline.errors import Replaced


class DirectoryState:
    def __init__(
        self, path: str, patterns: str | list[str], glob_kwargs: Mapping[str, Any] | None = None
    ) -> None:
        self._path = path
        self._patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        self._glob_kwargs = dict(glob_kwargs) if glob_kwargs is not None else {}

    @property
    def stored_state(self) -> list[str]:
        raise Replaced(
            "DirectoryState.stored_state: the pickled directory state is replaced by the"
            " durable ledger in CACHE_DIR, which records every file taken; the service's"
            " start-up scan finds the files that are new"
        )

    @property
    def current_state(self) -> list[str]:
        """The matching files now, pattern by pattern, as ``glob.glob`` lists them."""
        found: list[str] = []
        for pattern in self._patterns:
            found.extend(glob.glob(os.path.join(self._path, pattern), **self._glob_kwargs))
        return found


__all__ = ["DirectoryState"]
