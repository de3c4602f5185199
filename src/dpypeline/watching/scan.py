"""The reconciliation scan: every matching file under a watch root, as it is right now.

Events can be lost (inotify overflow, files written while the service was stopped, polling
between two looks), so the service also lists the whole tree at start-up and every
``rescan_interval``, and lets the ledger decide what is new. Trees on JASMIN hold hundreds of
thousands of files, so the walk stays close to the cost of the bare ``os.scandir`` calls: one
``scandir`` per directory, one ``lstat`` per *matching* file, plain strings, no ``Path``
objects.

What the walk takes, and why:

- Regular files only. Symbolic links are skipped, to files as well as to directories: a link's
  target may lie outside the watch (the service's own credentials, say), be shared by several
  links, or change underneath without any event under the watch root, so "this version of
  this file" would not be well defined. A watch with ``follow_symlinks: true`` takes links to
  regular files (never to directories).
- Directories that :meth:`PathMatcher.could_contain` rules out (``.git``, ``.snapshot``) are
  not entered at all.
- The tree changes while it is walked. An entry that vanishes between being listed and being
  looked at is simply not there (counted in ``vanished``); any other failure to read a
  directory or a file is recorded in ``errors`` and the walk goes on with the rest.

Files come back sorted by :func:`natural_key` of their path relative to the root, so that
``y2/f2.nc`` is processed before ``y10/f10.nc`` as a person (and an appending Zarr sink)
expects.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Container
from dataclasses import dataclass, field
from operator import itemgetter

from dpypeline.watching.patterns import PathMatcher

__all__ = ["FileVersion", "ScanResult", "natural_key", "scan"]

_DIGIT_RUNS = re.compile(r"[0-9]+")
_FREED = ("", 0, 0)


@dataclass(frozen=True, slots=True)
class FileVersion:
    """One version of one file; a new size or mtime is a new version to process."""

    path: str  # absolute
    size: int
    mtime_ns: int


@dataclass(slots=True)
class ScanResult:
    """What a scan found: the matching files in natural order, and what it could not read."""

    files: list[FileVersion] = field(default_factory=list)
    errors: list[tuple[str, OSError]] = field(default_factory=list)
    vanished: int = 0
    directories: int = 0  # listed (the root included): what a recursive watch must cover


def _number(match: re.Match[str]) -> str:
    digits = match.group().lstrip("0")
    # NUL sorts below every character a file name can hold, so the number compares against
    # the other path's text as the boundary between text and number would; then the shorter
    # (smaller) number first, then digit by digit.
    return "\x00" + chr(len(digits) + 1) + digits


def _encode(text: str) -> str:
    """``text`` with every digit run rewritten so that plain string order is natural order."""
    return _DIGIT_RUNS.sub(_number, text)


def natural_key(path: str) -> str:
    """Sort key in which digit runs compare as numbers: ``f2.nc`` < ``f10.nc``, ``y2/`` < ``y10/``.

    Text compares case-sensitively by code point. Keys that would tie (``f02`` and ``f2``) are
    ordered by the plain string, so the order never depends on the order of the input. The key
    is a single string, because comparing strings is what makes sorting a million paths cheap.
    """
    return _encode(path) + "\x00\x00" + path


def scan(  # noqa: PLR0915  (one hot loop, inline: a call per file costs a tenth of the walk)
    root: str | os.PathLike[str],
    matcher: PathMatcher,
    *,
    sort: bool = True,
    known: Container[str] = frozenset(),
    follow_symlinks: bool = False,
) -> ScanResult:
    """Walk ``root`` and return the matching regular files, sorted by relative natural order.

    A root that cannot be listed (missing, not a directory, no permission) is reported in
    ``errors`` like any other directory; the result is then empty.

    For the repeated walks of a poll watch: ``sort=False`` leaves the files in walk order
    (no sort keys are made: the caller sorts what changed, with :func:`natural_key`), and
    ``known`` holds absolute paths that matched before, which are taken without asking the
    matcher again (its answer depends on the path alone).

    ``follow_symlinks=True`` (a watch's ``follow_symlinks``) also takes links to regular
    files, as the version of their target; links to directories are never entered.
    """
    top = os.path.abspath(os.fspath(root))
    result = ScanResult()
    # (natural_key of the relative path, size, mtime_ns): the path itself is rebuilt from
    # the key after the sort, so a million-file walk never holds a key and a path at once
    found: list[tuple[str, int, int]] = []
    unsorted: list[FileVersion] = []  # sort=False
    # Each entry: an absolute directory, its path relative to the root plus "/" ("" for the
    # root), and that prefix already encoded for natural_key, so only names are encoded per file.
    stack: list[tuple[str, str, str]] = [(top, "", "")]
    matches = matcher.matches
    could_contain = matcher.could_contain
    renumber, number = _DIGIT_RUNS.sub, _number  # _encode, inlined for speed
    is_regular = stat.S_ISREG
    while stack:
        directory, prefix, encoded_prefix = stack.pop()
        try:
            with os.scandir(directory) as entries:
                result.directories += 1
                for entry in entries:
                    name = entry.name
                    path = entry.path
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            rel = prefix + name
                            if could_contain(rel):
                                encoded = encoded_prefix + renumber(number, name) + "/"
                                stack.append((path, rel + "/", encoded if sort else ""))
                            continue
                        if not entry.is_file(follow_symlinks=follow_symlinks):
                            continue
                        if path not in known and not matches(prefix + name):
                            continue
                        st = entry.stat(follow_symlinks=follow_symlinks)
                    except FileNotFoundError:
                        result.vanished += 1
                        continue
                    except OSError as exc:
                        result.errors.append((path, exc))
                        continue
                    if not is_regular(st.st_mode):  # it may have been replaced since the listing
                        continue
                    if sort:
                        key = encoded_prefix + renumber(number, name) + "\x00\x00" + prefix + name
                        found.append((key, st.st_size, st.st_mtime_ns))
                    else:
                        unsorted.append(FileVersion(path, st.st_size, st.st_mtime_ns))
        except FileNotFoundError as exc:
            if prefix:
                result.vanished += 1
            else:
                result.errors.append((directory, exc))  # the root itself is missing
        except OSError as exc:
            result.errors.append((directory, exc))
    if not sort:
        result.files = unsorted
        return result
    found.sort(key=itemgetter(0))
    top_slash = top if top.endswith("/") else top + "/"
    files = result.files
    for i, (key, size, mtime_ns) in enumerate(found):
        found[i] = _FREED  # each key is freed as its path is made: the peak holds one of them
        files.append(FileVersion(top_slash + key[key.index("\x00\x00") + 2 :], size, mtime_ns))
    return result
