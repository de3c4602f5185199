"""What ``dpypeline enqueue PATH`` queues: what the watcher and the rescan would take there.

The same rules, from the same places: the watch's :func:`~dpypeline.watching.patterns.
watch_matcher`, regular files only, and :func:`~dpypeline.paths.refusal` for symbolic
links. A path is judged as the user spelled it below the watch root, not as its target: a
link the watch does not follow is refused (it is not silently replaced by what it points
to), a link a watch follows is taken under its own name, as the rescan takes it, and
nothing below a linked directory is taken (the watcher never enters one).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from dpypeline.config.model import WatchConfig
from dpypeline.paths import refusal, shown
from dpypeline.watching.patterns import watch_matcher
from dpypeline.watching.scan import FileVersion, scan

__all__ = ["Refused", "offer"]


class Refused(Exception):
    """``dpypeline enqueue`` does not take this path; the message says why."""


def offer(raw: str, watches: Sequence[WatchConfig]) -> tuple[str, list[FileVersion]]:
    """The watch root and the files ``dpypeline enqueue RAW`` queues. A directory gives
    its files that the rescan takes; a file must be one the rescan would take itself."""
    under: list[tuple[WatchConfig, str, str]] = []  # (watch, its root, the path below it)
    for watch in watches:
        below = _below(raw, watch)
        if below is not None:
            under.append((watch, *below))
    if not under:
        roots = ", ".join(shown(os.path.realpath(w.path)) for w in watches)
        raise Refused(f"{shown(raw)} is not under any watched directory ({roots})")
    w, root, path = under[0]
    if os.path.isdir(path):
        if os.path.realpath(path) != path:
            raise Refused(f"{shown(raw)}: {LINKED_DIRECTORY}")
        found = scan(root, watch_matcher(w), follow_symlinks=w.follow_symlinks).files
        return root, [f for f in found if path == root or f.path.startswith(path + os.sep)]
    try:
        st = os.stat(path)
    except OSError as exc:
        raise Refused(f"{shown(raw)}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{shown(raw)} is not a regular file")
    reasons = []
    for w, root, path in under:
        if not watch_matcher(w).matches(path[len(root) + 1 :]):
            continue
        reason = _refusal(path, w)
        if reason is None:
            return root, [FileVersion(path, st.st_size, st.st_mtime_ns)]
        reasons.append(reason)
    if reasons:
        raise Refused(f"{shown(raw)}: {reasons[0]}")
    watched = "; ".join(
        f"{shown(root)}: patterns {w.patterns}, ignore_patterns {w.ignore_patterns}"
        for w, root, _ in under
    )
    raise Refused(f"{shown(raw)} matches the patterns of no watch ({watched})")


LINKED_DIRECTORY = "its path goes through a symbolic link to a directory, never entered"


def _refusal(path: str, watch: WatchConfig) -> str | None:
    if os.path.realpath(os.path.dirname(path)) != os.path.dirname(path):
        return LINKED_DIRECTORY
    return refusal(path, follow_symlinks=watch.follow_symlinks)


def _below(raw: str, watch: WatchConfig) -> tuple[str, str] | None:
    """(the watch's resolved root, ``raw`` below it) if ``raw`` is under the watch: the
    part below the root as spelled (its links kept), the root as the watcher resolves it.
    A path that reaches the root by another way than the configured one is resolved."""
    root = os.path.realpath(watch.path)
    given = os.path.abspath(raw)
    for spelling in (root, os.path.abspath(watch.path)):
        if given == spelling:
            return root, root
        if given.startswith(spelling + os.sep):
            return root, root + given[len(spelling) :]
    resolved = os.path.realpath(raw)
    if resolved == root or resolved.startswith(root + os.sep):
        return root, resolved
    return None
