"""Structured logging: JSON in production, readable in a devstack.

Every line carries what is bound in the context (``job_id``/``execution_id`` while an event of
that job is handled, see :func:`shoal_common.tracing.traced_handler`) and, while tracing is on,
the current ``trace_id``/``span_id``, so a log line leads to its trace and back.
"""

from __future__ import annotations

import logging
import sys

import structlog

from shoal_common.tracing import add_trace_ids


def shared_processors() -> list[structlog.types.Processor]:
    """What every log line goes through before it is rendered."""
    return [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure_logging(*, level: str = "INFO", json: bool = False) -> None:
    """Configure structlog and the stdlib root logger once per process."""
    processors = shared_processors()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*processors, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(name)s %(message)s")
    for noisy in ("uvicorn.access", "nats", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
