"""What the original's Akita took, as this dpypeline's watch patterns.

The original found files two ways. At start-up, ``glob.glob(os.path.join(path, pattern))``
for each pattern: matched from the top of ``path``, ``**`` a single directory level (as
``*``) unless ``glob_kwargs: {recursive: true}``. With ``monitor: true``, also a watchdog
observer on the whole tree, whose pattern handler (watchdog 5 and later) matches the path
relative to ``path`` in full, ``**`` any number of directories.

Here one set of patterns serves the start-up scan and the watcher alike: each pattern is
anchored at the watched directory (``./*.csv``: a file at its top, not ``celsius/a.csv``
below it), and ``**`` is any number of directories with ``monitor: true`` or a recursive
glob, a single level otherwise. With ``monitor: true`` a ``**`` pattern also takes, at
start-up, files deeper down that the original's glob left out (its watcher took only
files created later).

This matters most when a job writes its outputs inside the watched tree: the original
never took ``celsius/a.csv`` for ``*.csv``, and neither does this.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def _segments(pattern: str, recursive: bool) -> list[str]:
    """The pattern's parts; ``**`` as a non-recursive glob reads it (one level, as ``*``)
    unless *recursive*."""
    parts = [p for p in pattern.strip("/").split("/") if p not in ("", ".")]
    return [("*" if p == "**" and not recursive else p) for p in parts]


def as_the_original_took(
    patterns: Iterable[str], *, monitor: bool, glob_kwargs: Mapping[str, Any] | None = None
) -> list[str]:
    """The original's *patterns* as watch patterns that take the same files (see above)."""
    recursive = monitor or bool((glob_kwargs or {}).get("recursive"))
    return ["./" + "/".join(_segments(pattern, recursive)) for pattern in patterns]


def watch_entry(entry: dict[str, Any], akita: Any) -> dict[str, Any]:
    """A legacy Akita's ``watch`` entry with the patterns that take what it took."""
    if "patterns" not in entry:
        return entry
    state = getattr(akita, "_directory_state", None)
    return {
        **entry,
        "patterns": as_the_original_took(
            entry["patterns"],
            monitor=bool(getattr(akita, "monitor", True)),
            glob_kwargs=getattr(state, "_glob_kwargs", None),
        ),
    }


__all__ = ["as_the_original_took", "watch_entry"]
