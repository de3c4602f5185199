"""Logging, configured once: structlog for our events, the standard library's loggers
(watchdog, persist-queue, s3fs, botocore, distributed) routed through the same processors,
so every line has the same shape.

``format: auto`` writes to the journal under systemd (each event one entry with indexed
fields: ``journalctl -u dpypeline DPYPELINE_STATE=dead``), renders for a person on a TTY,
and JSON lines otherwise (one object per line: ``event``, ``level``, ``timestamp`` and the
event's fields). JSON printed to stdout would reach the journal as one unindexed text
field, hence the journal's native protocol; without its socket, JSON lines on stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog

from dpypeline.paths import shown

NOISY = (
    "botocore",
    "aiobotocore",
    "s3fs",
    "fsspec",
    "urllib3",
    "asyncio",
    "distributed",
    "persistqueue",
    "watchdog",
)


JOURNAL_SOCKET = "/run/systemd/journal/socket"
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
_FIELD = re.compile(r"[^A-Z0-9_]")


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


def configure(
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "journald" if under_journal(stream) else "console" if stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        printable_paths,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
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
    final: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt == "json":
        final += [structlog.processors.dict_tracebacks]
    elif fmt == "journald":
        final += [structlog.processors.format_exc_info]  # the traceback as one text field
    final.append(renderer)
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
    numeric = getattr(logging, level.upper())
    root.setLevel(numeric)
    for name in NOISY:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def get_logger(name: str = "dpypeline") -> Any:
    return structlog.stdlib.get_logger(name)
