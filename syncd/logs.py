"""Logging setup, done once by the entry point: console lines on a terminal, JSON otherwise.

Libraries (APScheduler, Alembic, httpx) log through the standard library; their records go through
the same processors and renderer, so a JSON log stays JSON lines throughout.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog, and the warnings of libraries, to ``stream`` (default stderr)."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.addFilter(_not_an_interrupt)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # libraries: their warnings only


def _not_an_interrupt(record: logging.LogRecord) -> bool:
    """Drop a library's report of an exception that is an interrupt (a second Ctrl-C caught while
    SQLAlchemy's pool closed a connection, say): the command reports the interrupt itself, in one line."""
    exc = record.exc_info[1] if record.exc_info else None
    return exc is None or isinstance(exc, Exception)
