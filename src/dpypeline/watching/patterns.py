"""Which files under a watch root belong to the pipeline: ``patterns`` minus ``ignore_patterns``.

The watcher, the rescan and ``dpypeline enqueue`` all ask one :class:`PathMatcher`, so a file
is taken or left alone the same way whichever route it arrives by. Paths are POSIX-style and
relative to the watch root, without a leading slash (``2020/01/ORCA_1m_T.nc``).

Glob syntax
    ``*`` matches any run of characters except ``/``; ``?`` one character except ``/``;
    ``[abc]``, ``[a-z]`` and ``[!abc]`` are character classes (never matching ``/``);
    ``\\`` makes the next character literal. ``**`` standing as a whole path segment matches
    zero or more directories: ``**/x.nc`` matches ``x.nc`` and ``a/b/x.nc``, ``a/**`` matches
    everything under ``a``, ``a/**/b`` matches ``a/b`` and ``a/x/y/b``. Elsewhere (``a**b``)
    it means the same as ``*``.

Anchoring (as in ``.gitignore``)
    A pattern without a ``/`` is matched against the file name at any depth: ``*.nc`` matches
    ``y/2020/f.nc``. A pattern containing a ``/`` is matched against the whole relative path;
    a leading ``/`` or ``./`` only marks it as anchored. A trailing ``/`` makes the pattern
    name a directory: ``tmp/`` in ``patterns`` matches every file under any directory
    called ``tmp``.

Ignoring
    A path is taken when it matches at least one of ``patterns`` and none of
    ``ignore_patterns``; an empty list, or an empty pattern, matches nothing. An ignore
    pattern without a ``/`` is tested against every component of the path, so ``.*`` ignores
    ``.hidden/f.nc`` as well as ``d/.f.nc.XYZ`` (rsync's temporary names). One with a ``/``
    is tested against the whole path and against each of its parent directories: ignoring a
    directory ignores everything under it, which lets a walk prune it
    (:meth:`PathMatcher.could_contain`).

``case_sensitive=False`` makes every comparison case-insensitive.

Each list is compiled into a single regular expression when the matcher is built, because
a rescan runs it on every file of trees holding a million of them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpypeline.config.model import WatchConfig

__all__ = ["PathMatcher", "watch_matcher"]

_ANY_DIRS = "(?:[^/]+/)*"  # what a whole "**" segment followed by more segments matches


def _translate_segment(seg: str) -> str:
    """Translate one ``/``-free glob segment into a regular expression."""
    out: list[str] = []
    i, n = 0, len(seg)
    while i < n:
        c = seg[i]
        i += 1
        if c == "*":
            while i < n and seg[i] == "*":
                i += 1
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i < n:
            out.append(re.escape(seg[i]))
            i += 1
        elif c == "[":
            j = i + 1 if i < n and seg[i] == "!" else i
            if j < n and seg[j] == "]":
                j += 1  # a "]" first in the class is a literal
            j = seg.find("]", j)
            if j < 0:
                out.append(re.escape(c))  # no closing bracket: a literal "["
                continue
            body, i = seg[i:j], j + 1
            negated = body.startswith("!")
            if negated:
                body = body[1:]
            body = re.sub(r"([\\&~|^\[\]])", r"\\\1", body)
            out.append(f"[^/{body}]" if negated else f"[{body}]")
        else:
            out.append(re.escape(c))
    return "".join(out)


def _split(pattern: str) -> tuple[list[str], bool, bool]:
    """Split a glob into segments; also say whether it is anchored and names a directory."""
    dir_only = pattern.endswith("/")
    anchored = pattern.startswith(("/", "./"))
    segs: list[str] = []
    for seg in pattern.split("/"):
        if seg in ("", ".") or (seg == "**" and segs and segs[-1] == "**"):
            continue
        segs.append(seg)
    return segs, anchored or len(segs) > 1, dir_only


def _path_regex(segs: list[str]) -> str:
    """Regex for an anchored pattern's segments, ``**`` crossing directories."""
    parts: list[str] = []
    for k, seg in enumerate(segs):
        if seg != "**":
            parts.append(_translate_segment(seg) + ("/" if k < len(segs) - 1 else ""))
        elif k < len(segs) - 1:
            parts.append(_ANY_DIRS)
        else:
            parts.append(".+")
    return "".join(parts)


def _alternatives(regexes: list[str]) -> str:
    return "(?:" + "|".join(regexes) + ")"


def _compile_patterns(patterns: list[str], flags: int) -> re.Pattern[str] | None:
    """One regex, used with ``fullmatch``, for the patterns a file must match."""
    names: list[str] = []
    paths: list[str] = []
    for pattern in patterns:
        segs, anchored, dir_only = _split(pattern)
        if not segs:
            continue
        if segs == ["**"]:
            paths.append(".+")
        elif not anchored and not dir_only:
            names.append(_translate_segment(segs[0]))
        else:
            if not anchored:
                segs = ["**", *segs]
            if dir_only and segs[-1] != "**":
                segs = [*segs, "**"]
            paths.append(_path_regex(segs))
    branches = []
    if names:
        branches.append("(?:.*/)?" + _alternatives(names))
    if paths:
        branches.append(_alternatives(paths))
    return re.compile("|".join(branches), flags) if branches else None


def _compile_ignores(patterns: list[str], flags: int) -> re.Pattern[str] | None:
    """One regex, used with ``search``, that finds an ignored component or parent directory.

    Every branch ends at a ``/`` or at the end of the path, so a directory that matches
    (tested as ``"dir/"``) also matches every path below it.
    """
    names: list[str] = []  # any component
    dir_names: list[str] = []  # any directory component
    paths: list[str] = []  # the path or one of its parents
    dir_paths: list[str] = []  # one of the path's parent directories
    for pattern in patterns:
        segs, anchored, dir_only = _split(pattern)
        if len(segs) > 1 and segs[-1] == "**":
            segs, dir_only = segs[:-1], True  # "a/**" ignores what "a/" ignores
        if not segs:
            continue
        if segs == ["**"]:
            names.append("[^/]+")
        elif not anchored:
            (dir_names if dir_only else names).append(_translate_segment(segs[0]))
        else:
            (dir_paths if dir_only else paths).append(_path_regex(segs))
    branches = []
    if names:
        branches.append("(?:^|/)" + _alternatives(names) + r"(?:/|\Z)")
    if dir_names:
        branches.append("(?:^|/)" + _alternatives(dir_names) + "/")
    if paths:
        branches.append("^" + _alternatives(paths) + r"(?:/|\Z)")
    if dir_paths:
        branches.append("^" + _alternatives(dir_paths) + "/")
    return re.compile("|".join(branches), flags) if branches else None


class PathMatcher:
    """Decide, for a path relative to a watch root, whether the pipeline takes it.

    Built once per watch from its ``patterns``, ``ignore_patterns`` and ``case_sensitive``
    settings; the rules are in this module's docstring. A glob that cannot be compiled
    (``[z-a]``) raises ``ValueError`` naming it.
    """

    __slots__ = ("_ignore", "_include", "case_sensitive", "ignore_patterns", "patterns")

    def __init__(
        self,
        patterns: list[str],
        ignore_patterns: list[str] | None = None,
        case_sensitive: bool = True,
    ) -> None:
        self.patterns = list(patterns)
        self.ignore_patterns = list(ignore_patterns or [])
        self.case_sensitive = case_sensitive
        flags = re.DOTALL | (0 if case_sensitive else re.IGNORECASE)
        for pattern in (*self.patterns, *self.ignore_patterns):
            try:
                _compile_patterns([pattern], flags)
            except re.error as exc:
                raise ValueError(f"invalid glob pattern {pattern!r}: {exc}") from None
        self._include = _compile_patterns(self.patterns, flags)
        self._ignore = _compile_ignores(self.ignore_patterns, flags)

    def matches(self, relpath: str) -> bool:
        """True if ``relpath`` (POSIX, relative to the watch root) is to be processed."""
        if self._include is None or self._include.fullmatch(relpath) is None:
            return False
        return self._ignore is None or self._ignore.search(relpath) is None

    def could_contain(self, reldir: str) -> bool:
        """False if every path under directory ``reldir`` is ignored, so a walk can skip it.

        ``""`` is the watch root itself. ``True`` does not promise that a match lies below.
        """
        if not reldir or self._ignore is None:
            return True
        return self._ignore.search(reldir + "/") is None

    def __repr__(self) -> str:
        return (
            f"PathMatcher(patterns={self.patterns!r}, ignore_patterns={self.ignore_patterns!r}, "
            f"case_sensitive={self.case_sensitive!r})"
        )


def watch_matcher(watch: WatchConfig) -> PathMatcher:
    """The matcher of a configured watch: the one the watcher, the rescan and ``dpypeline
    enqueue`` all use, built the same way for each."""
    return PathMatcher(watch.patterns, watch.ignore_patterns, watch.case_sensitive)
