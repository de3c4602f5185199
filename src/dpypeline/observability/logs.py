"""Logging, configured once: structlog for our events, the standard library's loggers
(watchdog, s3fs, botocore, distributed) routed through the same processors, so every line
has the same shape.

``format: auto`` writes to the journal under systemd (each event one entry with indexed
fields: ``journalctl -u dpypeline DPYPELINE_STATE=dead``), renders for a person on a TTY,
and JSON lines otherwise (one object per line: ``event``, ``level``, ``timestamp`` and the
event's fields). JSON printed to stdout would reach the journal as one unindexed text
field, hence the journal's native protocol; without its socket, JSON lines on stderr.

On a terminal each event is one short line (``consolelog``); JSON and the journal keep every
field. One format per run: the Dask workers configure their logging the same way (a worker
plugin, ``executors.cluster.LogSetup``, calls ``configure`` with ``settings()``).

A traceback is text in the ``exception`` field, in every format, and never carries frame
locals (they hold storage options, credentials, whole datasets): structlog's
``ExceptionDictTransformer`` takes it apart, locals off, and it is printed as Python prints
it. It is short: the user's frames (the tasks', not dpypeline's machinery nor the standard
library's or installed libraries') and the error; at ``level: debug`` every frame. Last,
every rendered line is scrubbed of the secrets the pipeline knows of (``redact``),
whatever quoted them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import linecache
import logging
import os
import re
import socket
import struct
import sys
import sysconfig
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer

from dpypeline.observability.consolelog import ConsoleLine
from dpypeline.observability.redact import Scrubber
from dpypeline.paths import shown

NOISY = (
    "botocore",
    "aiobotocore",
    "s3fs",
    "fsspec",
    "urllib3",
    "asyncio",
    "distributed",
    "watchdog",
)


JOURNAL_SOCKET = "/run/systemd/journal/socket"
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
_FIELD = re.compile(r"[^A-Z0-9_]")
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # dpypeline/
_TASKS = os.path.join(_PACKAGE, "tasks")
_LIBRARIES = tuple(
    os.path.abspath(p) + os.sep
    for p in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)
MAX_FRAMES = 6  # of a short traceback: the first user frame, and the last five
MAX_CHAIN = 3  # exceptions of a chain (``raise ... from ...``)
MAX_MESSAGE = 1000  # characters of each exception's message
# every frame of every exception, never a local: which frames to show is decided below
_TRACE = ExceptionDictTransformer(show_locals=False, max_frames=sys.maxsize)
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


# every frame of every exception, never a local: which frames to show is decided below
_TRACE = ExceptionDictTransformer(show_locals=False, max_frames=sys.maxsize)


def format_exception(exc: BaseException, *, full: bool = False) -> str:
    """The traceback of *exc* as Python prints it, never with locals. Short unless *full*:
    only the user's frames are kept (not dpypeline's machinery — the loop, the executor, the
    chain of tasks — nor the standard library's or installed libraries'; the built-in tasks
    are the user's), or the last frame if none is, at most MAX_FRAMES of them, at most
    MAX_CHAIN exceptions of a chain, each message cut at MAX_MESSAGE characters."""
    parts: list[str] = []
    for one, separator in itertools.islice(_chain(exc), MAX_CHAIN):
        parts.append(separator)
        [stack, *_] = _TRACE((type(one), one, one.__traceback__))
        parts.append(_format_one(stack["frames"], one, full))
    return "".join(reversed(parts)).rstrip("\n")


def _chain(exc: BaseException) -> Iterator[tuple[BaseException, str]]:
    """The exceptions of the chain, the raised one first, as Python prints them: each with
    what is printed after it (it caused the one before, or was being handled by it)."""
    seen: set[int] = set()
    one: BaseException | None = exc
    after = ""
    while one is not None and id(one) not in seen:
        seen.add(id(one))
        yield one, after
        if one.__cause__ is not None:
            one, after = one.__cause__, _CAUSE
        elif one.__context__ is not None and not one.__suppress_context__:
            one, after = one.__context__, _CONTEXT
        else:
            one = None


def _format_one(frames: list[dict[str, Any]], exc: BaseException, full: bool) -> str:
    kept = frames if full else [f for f in frames if _users(f["filename"])] or frames[-1:]
    if not full and len(kept) > MAX_FRAMES:
        kept = kept[:1] + kept[-(MAX_FRAMES - 1) :]
    message = "".join(traceback.format_exception_only(exc))
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 4] + " ...\n"
    if not frames:
        return message
    left_out = len(frames) - len(kept)
    note = f"; {left_out} frames left out, all at logging level debug" if left_out else ""
    stack = ""
    for f in kept:  # Python's lines without the ^^^ markers under them
        stack += f'  File "{f["filename"]}", line {f["lineno"]}, in {f["name"]}\n'
        if line := linecache.getline(f["filename"], f["lineno"]).strip():
            stack += f"    {line}\n"
    return f"Traceback (most recent call last{note}):\n{stack}{message}"


def _users(filename: str) -> bool:
    """A frame of the user's code: a task (the built-in ones too), not dpypeline's
    machinery, the standard library or an installed library."""
    if filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return False
    path = os.path.abspath(filename)
    if path.startswith(_TASKS + os.sep):
        return True
    return not path.startswith((_PACKAGE + os.sep, *_LIBRARIES))


def _exception(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple):
        return exc_info[1] if len(exc_info) > 1 else None
    if exc_info:
        return sys.exc_info()[1]
    return None


def _traceback_processor(full: bool) -> Callable[[Any, str, dict[str, Any]], dict[str, Any]]:
    """``exc_info`` → an ``exception`` text field (see ``format_exception``), the same for
    every renderer, so that none of them formats it its own way (with locals)."""

    def render(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        exc = _exception(event.pop("exc_info", None))
        if exc is not None:
            event["exception"] = format_exception(exc, full=full)
        return event

    return render


def _scrub_processor(scrub: Scrubber) -> Callable[[Any, str, str], str]:
    def render(_logger: Any, _name: str, line: str) -> str:
        return scrub(line)

    return render


def under_journal(stream: TextIO) -> bool:
    """True when systemd connected ``stream`` to the journal (``$JOURNAL_STREAM``)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def journal_fields(event: Mapping[str, Any]) -> bytes:
    """One journal entry in the native protocol: MESSAGE, PRIORITY, and every field of the
    event as ``DPYPELINE_<NAME>`` (``job_id`` → ``DPYPELINE_JOB_ID``; the traceback of an
    exception as ``DPYPELINE_EXCEPTION``)."""
    name = str(event.get("event", ""))
    extra = {k: v for k, v in event.items() if k not in ("event", "level", "timestamp")}
    shown = " ".join(f"{k}={v}" for k, v in extra.items() if k not in ("exception", "logger"))
    fields: dict[str, str] = {
        "MESSAGE": f"{name} {shown}".strip(),
        "PRIORITY": str(PRIORITIES.get(str(event.get("level", "info")), 6)),
        "SYSLOG_IDENTIFIER": "dpypeline",
        "DPYPELINE_EVENT": name,
    }
    for key, value in extra.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        fields["DPYPELINE_" + _FIELD.sub("_", key.upper())] = text
    out = bytearray()
    for key, text in fields.items():
        data = text.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends each (JSON-rendered) record to journald as one entry with its fields."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()
            raise

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sock.send(journal_fields(json.loads(self.format(record))))
        except Exception:  # noqa: BLE001 - logging must never take the service down
            self.handleError(record)

    def close(self) -> None:
        self._sock.close()
        super().close()


def printable_paths(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """File names that are not valid UTF-8 shown as ``bad\\xff.dat`` in every sink (JSON,
    the journal and the console would show a lone surrogate, or fail on it)."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = shown(value)
    return event


_settings: dict[str, Any] = {}


def settings() -> dict[str, Any]:
    """What ``configure`` was last called with, its format resolved (``auto`` → what it
    chose): ``configure(**settings())`` in another process logs there as here."""
    return dict(_settings)


def configure(
    fmt: str = "auto",
    level: str = "info",
    *,
    stream: TextIO | None = None,
    journal_socket: str = JOURNAL_SOCKET,
    secrets: Iterable[str] = (),
    roots: Iterable[str] = (),
) -> None:
    """Logging for the whole process; *secrets* are blanked out of every line; on the
    console, files are shown relative to the watch *roots* they are under."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "journald" if under_journal(stream) else "console" if stream.isatty() else "json"
    secrets, roots = tuple(secrets), tuple(str(r) for r in roots)
    _settings.clear()
    _settings.update(
        fmt=fmt, level=level, journal_socket=journal_socket, secrets=secrets, roots=roots
    )
    debug = level.lower() == "debug"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        printable_paths,
    ]
    renderer: Any = (
        ConsoleLine(roots, debug=debug, colors=_isatty(stream))
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    final: list[Any] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        _traceback_processor(full=debug),
        renderer,
        _scrub_processor(Scrubber(secrets)),  # last: the rendered line, whatever is in it
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.PositionalArgumentsFormatter()],
        processors=final,
    )
    handler: logging.Handler = logging.StreamHandler(stream)
    if fmt == "journald":
        with contextlib.suppress(OSError):  # no journal socket: JSON lines on the stream
            handler = JournalHandler(journal_socket)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(getattr(logging, level.upper()))
    quiet_libraries()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _not_a_task_failure(record: logging.LogRecord) -> bool:
    """Drops a Dask worker's "Compute Failed" error (with the whole traceback in one
    field): the service logs the same failure as the job's own event, its traceback
    trimmed, below the job's line."""
    return not str(record.msg).startswith("Compute Failed")


def quiet_libraries() -> None:
    """The libraries' loggers (``NOISY``) at WARNING, or at the configured level if higher:
    their INFO lines are noise in a service's log; and through our handler, not handlers
    of their own (distributed prints ``distributed.worker - INFO - ...`` lines otherwise).
    ``configure`` calls it; call it again after importing a library that sets up its own
    loggers as it is imported (distributed does)."""
    level = max(logging.getLogger().level, logging.WARNING)
    for name in NOISY:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if _settings:  # ``configure`` ran: one handler, ours, at the root
            logger.handlers.clear()
            logger.propagate = True
    worker = logging.getLogger("distributed.worker")
    if level > logging.DEBUG and _not_a_task_failure not in worker.filters:
        worker.addFilter(_not_a_task_failure)


def get_logger(name: str = "dpypeline") -> Any:
    return structlog.stdlib.get_logger(name)


def into_host_logging() -> None:
    """Our events through the standard library's logging as the host script set it up
    (``logging.basicConfig``: its handlers, format and level), for dpypeline run inside
    someone else's program. Changes nothing if logging is configured already, or if the
    script set up no handler (the events then print as structlog's default does)."""
    if structlog.is_configured() or not logging.getLogger().handlers:
        return
    processors: list[Any] = [
        structlog.stdlib.filter_by_level,
        structlog.contextvars.merge_contextvars,
        printable_paths,
        structlog.processors.format_exc_info,
        structlog.processors.KeyValueRenderer(key_order=["event"]),
    ]
    structlog.configure(
        processors=processors,
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
