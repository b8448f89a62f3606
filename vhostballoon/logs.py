"""structlog set-up: readable key=value lines by default, JSON for machines."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(fmt: str = "console", level: str = "info", stream=None, *, final: bool = False) -> None:
    """Configure structlog once for the process. ``fmt`` is "console" or "json".
    ``final``: nothing will configure it again (the daemon), so each logger
    may cache its configuration on first use: cheaper per call, and the
    debug calls on the per-buffer path cost next to nothing."""
    stream = stream or sys.stderr
    renderer: structlog.typing.Processor
    extra: list = []
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        extra = [structlog.processors.dict_tracebacks]  # keep log.exception()'s traceback
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        raise ValueError(f"unknown log format {fmt!r} (console or json)")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *extra,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=final,
    )
