"""The log as a person at a terminal reads it: one short line per event.

``17:03:04 CET info    job_done        2023/a.nc  work#12  0.52s``

Local time with its zone, the level, the event, the file relative to its watch root, the
job (name and id), the duration and the error, always in that order. An event of the
service's own (not about one job) also shows its counts (``files_enqueued files=20
jobs=20``), and a warning or an error says why and what to do (``reason``, ``action``).
Every other field of the event (attempt, state, logger, ...) is shown only at ``level:
debug``, after these, in the order the event gave them: the JSON and journal outputs carry
them all, at every level. A traceback (the ``exception`` field, already trimmed by
``logs``) follows on its own lines at ``level: debug``; at other levels the line's error
says what happened, and the JSON and journal outputs keep the traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import datetime
from typing import Any

SHOWN = ("timestamp", "level", "event", "file", "job", "job_id", "duration", "error")
TO_ACT_ON = ("reason", "action")  # shown on warnings and errors: what the operator must read
HIDDEN_ALWAYS = ("exception",)  # printed below the line
LEVELS = {"warning": "warn", "exception": "error"}
COLORS = {
    "debug": "\x1b[2m",
    "info": "\x1b[32m",
    "warn": "\x1b[33m",
    "error": "\x1b[31;1m",
    "critical": "\x1b[31;1m",
}
RESET = "\x1b[0m"
EVENT_WIDTH = 15


def local_time(timestamp: Any) -> str:
    """``2026-12-01T16:03:04.123Z`` (UTC, as the JSON has it) as ``17:03:04 CET``."""
    try:
        when = datetime.fromisoformat(str(timestamp).replace("Z", "+00:00"))
    except ValueError:
        return str(timestamp)
    return when.astimezone().strftime("%H:%M:%S %Z")


def relative(path: str, roots: Iterable[str]) -> str:
    """``path`` relative to the deepest watch root it is under; as given if under none."""
    best = ""
    for given in roots:
        root = given.rstrip(os.sep)
        if path.startswith(root + os.sep) and len(root) > len(best):
            best = root
    return path[len(best) + 1 :] if best else path


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if not text or any(c in text for c in " \"'=\n\t"):
        return json.dumps(text, ensure_ascii=False)
    return text


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value != 0


class ConsoleLine:
    """A structlog renderer: the event dict → one short line (plus a traceback, if any)."""

    def __init__(self, roots: Iterable[str] = (), *, debug: bool = False, colors: bool = False):
        self.roots = tuple(str(r) for r in roots)
        self.debug = debug
        self.colors = colors

    def __call__(self, _logger: Any, _name: str, event: dict[str, Any]) -> str:
        level = str(event.get("level", "info"))
        level = LEVELS.get(level, level)
        shown = f"{level:<7}"
        if self.colors and level in COLORS:
            shown = f"{COLORS[level]}{shown}{RESET}"
        name = str(event.get("event", ""))
        parts = [local_time(event.get("timestamp", "")), shown, f"{name:<{EVENT_WIDTH}}"]
        if "file" in event:
            parts.append(_value(relative(str(event["file"]), self.roots)))
        if "job" in event or "job_id" in event:
            job = f"{event.get('job', '')}" + (f"#{event['job_id']}" if "job_id" in event else "")
            parts.append(job)
        if isinstance(event.get("duration"), int | float):
            parts.append(f"{event['duration']:.2f}s")
        elif "duration" in event:
            parts.append(f"duration={_value(event['duration'])}")
        if event.get("error"):
            parts.append(f"error={_value(event['error'])}")
        skip = set(SHOWN) | set(HIDDEN_ALWAYS)
        if "job_id" not in event:  # the service's own events: their counts are the news
            counts = [k for k, v in event.items() if _count(v) and k not in skip]
            parts += [f"{k}={event[k]}" for k in counts]
            skip |= set(counts)
        if level not in ("debug", "info"):
            parts += [f"{k}={_value(event[k])}" for k in TO_ACT_ON if k in event]
            skip |= set(TO_ACT_ON)
        if self.debug:
            parts += [f"{k}={_value(v)}" for k, v in event.items() if k not in skip]
        line = " ".join(p for p in parts if p).rstrip()
        if event.get("exception") and self.debug:  # JSON and the journal always have it
            line += "\n" + str(event["exception"])
        return line
