"""Logging, configured once: structlog for our events, the standard library's loggers
(watchdog, persist-queue, s3fs, botocore, distributed) routed through the same processors,
so every line has the same shape.

``format: auto`` renders for a person on a TTY and JSON lines otherwise (one object per
line: ``event``, ``level``, ``timestamp`` and the event's fields).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

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


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
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
    if fmt != "console":
        final += [structlog.processors.dict_tracebacks]
    final.append(renderer)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.PositionalArgumentsFormatter()],
        processors=final,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    numeric = getattr(logging, level.upper())
    root.setLevel(numeric)
    for name in NOISY:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def get_logger(name: str = "dpypeline") -> Any:
    return structlog.stdlib.get_logger(name)
