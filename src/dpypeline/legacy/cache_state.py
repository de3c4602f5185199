"""The original dpypeline's state in ``CACHE_DIR``, carried into the ledger on upgrade.

The original kept two pickle files there: ``processed_events.pickle``, the paths it had
finished, and ``queue_state.pickle``, the paths still waiting in its queue (a
``collections.deque``), both written after every change, so they survive a ``kill -9``.
Upgrading in place must repeat none of the finished files and lose none of the queued
ones: the finished become ``done`` jobs (never run), the queued become ``queued`` jobs in
the order they waited, ahead of anything the start-up scan finds.

The pickles are read by an unpickler that builds nothing but what the original wrote
(lists, a deque, strings): a pickle can name any callable, and ``CACHE_DIR`` is not a
place whose every file the service would trust with code execution. The paths in them
are as the original saw them: relative ones are relative to the directory it ran in,
which the carrying process must share. The pickles are left as they were (the original
can still run on them); a marker records what was carried, so it happens once, and again
only if the original ran since.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpypeline.config.model import PipelineConfig
from dpypeline.errors import ConfigError
from dpypeline.paths import shown
from dpypeline.state.ledger import Ledger
from dpypeline.watching.offer import Refused, offer
from dpypeline.watching.scan import FileVersion

FINISHED = "processed_events.pickle"
QUEUED = "queue_state.pickle"
MARK = "original-state-carried"  # in CACHE_DIR: the pickles' mtimes when they were carried
_LARGEST = 512 * 1024 * 1024  # more paths than any directory the original watched held


class _OriginalUnpickler(pickle.Unpickler):
    """Admits only the one class the original's pickles name; strings and lists are
    opcodes of their own and need none."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "deque"):
            return collections.deque
        raise pickle.UnpicklingError(
            f"it names {module}.{name}, which the original dpypeline never wrote"
        )


@dataclass
class Carried:
    """What was carried over: counts of jobs added and of paths that could not be."""

    done: int = 0
    queued: int = 0
    not_found: list[str] = field(default_factory=list)  # paths named but not there now
    not_watched: list[str] = field(default_factory=list)  # queued, but no watch takes them

    def summary(self, cache_dir: Path) -> str:
        text = (
            f"carried the original dpypeline's state in {shown(str(cache_dir))} into the"
            f" ledger: {self.done} finished file(s) recorded done (not processed again),"
            f" {self.queued} queued file(s) queued"
        )
        if self.not_found:
            text += (
                f"; {len(self.not_found)} file(s) it named are not there now (relative paths"
                " are read from the working directory: run from the directory the original"
                f" ran in), e.g. {shown(self.not_found[0])}"
            )
        if self.not_watched:
            text += (
                f"; {len(self.not_watched)} queued file(s) are under no watch or match its"
                f" patterns no more, e.g. {shown(self.not_watched[0])}"
            )
        return text


def read_paths(path: Path) -> list[str]:
    """The paths in one of the original's pickles, in their order. ConfigError, naming
    the file and what to do, when it is not one the original wrote."""
    try:
        data = path.read_bytes()
        if len(data) > _LARGEST:
            raise pickle.UnpicklingError(f"it is {len(data)} bytes, larger than any it wrote")
        value = _OriginalUnpickler(io.BytesIO(data)).load()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged pickle raises
        raise ConfigError(
            f"{path} is not the original dpypeline's state ({exc}): move it out of"
            " CACHE_DIR and start again; its files are then processed as new"
        ) from None
    if not isinstance(value, (list, collections.deque)) or not all(
        isinstance(p, str) for p in value
    ):
        raise ConfigError(
            f"{path} is not the original dpypeline's state (not a list of paths): move it"
            " out of CACHE_DIR and start again; its files are then processed as new"
        )
    return list(value)


def pending(cache_dir: Path) -> dict[str, Path]:
    """The original's pickles in *cache_dir* not carried yet (by kind: finished, queued)."""
    found = {kind: cache_dir / name for kind, name in (("finished", FINISHED), ("queued", QUEUED))}
    found = {kind: p for kind, p in found.items() if p.is_file()}
    if not found:
        return {}
    try:
        carried = (cache_dir / MARK).read_text().split()
    except OSError:
        return found
    return {} if carried == _stamp(found) else found


def _stamp(files: dict[str, Path]) -> list[str]:
    return [f"{kind}:{p.stat().st_mtime_ns}" for kind, p in sorted(files.items())]


def carry_over(
    config: PipelineConfig, source: Path | None = None, *, now: float | None = None
) -> Carried | None:
    """Record the original's state found in *source* (the config's ``cache_dir`` when
    None) in the config's ledger, once; None when there is nothing to carry."""
    source = config.cache_dir if source is None else source
    found = pending(source)
    if not found:
        return None
    finished = read_paths(found["finished"]) if "finished" in found else []
    queued = read_paths(found["queued"]) if "queued" in found else []
    names = [job.name for job in config.jobs]
    carried = Carried()
    when = time.time() if now is None else now
    batches: list[tuple[str, list[FileVersion], bool]] = []  # runs of one root, in order
    for paths, done in ((finished, True), (queued, False)):
        for raw in dict.fromkeys(paths):  # the original listed a file again if re-queued
            if not os.path.lexists(raw):
                carried.not_found.append(raw)
                continue
            try:
                root, files = offer(raw, config.watch)
            except Refused:
                if not done:
                    carried.not_watched.append(raw)
                continue
            if batches and batches[-1][0] == root and batches[-1][2] == done:
                batches[-1][1].extend(files)
            else:
                batches.append((root, list(files), done))
    ledger = Ledger(config.cache_dir)
    try:
        for root, files, done in batches:
            added = ledger.enqueue(files, root, names, "original", when, done=done) // len(names)
            if done:
                carried.done += added
            else:
                carried.queued += added
    finally:
        ledger.close()
    (source / MARK).write_text("\n".join(_stamp(found)) + "\n")
    return carried


def report_carried(config: PipelineConfig) -> None:
    """``carry_over`` for a script of the original's API: its summary in the script's log,
    where the original wrote what it found in CACHE_DIR."""
    carried = carry_over(config)
    if carried is not None:
        logging.getLogger("dpypeline.legacy").info(carried.summary(config.cache_dir))


__all__ = [
    "FINISHED",
    "MARK",
    "QUEUED",
    "Carried",
    "carry_over",
    "pending",
    "read_paths",
    "report_carried",
]
