"""Structured logging for Forge.

The library only gets loggers from structlog and never configures logging at import time. The
`forge` command and the server call `configure_logging` once at start-up.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def get_logger(name: str | None = None, **initial_values: Any) -> Any:
    """Return a lazy structlog logger bound to `logger_name=name`.

    The logger takes its configuration on first use, so loggers created at import time follow
    a `configure_logging` call made later.
    """
    if name is not None:
        initial_values["logger_name"] = name
    return structlog.get_logger(**initial_values)


def configure_logging(level: str = "INFO", json_output: bool = False) -> None:
    """Route structlog and the standard library's logging to stderr at `level`."""
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"invalid log level {level!r}; use DEBUG, INFO, WARNING or ERROR")

    renderer: Any
    if json_output:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=numeric_level, stream=sys.stderr, format="%(name)s %(message)s")
    if numeric_level > logging.DEBUG:
        # aiokafka logs every failed reconnect at ERROR, about 100 lines a second while a broker
        # is down. Forge's consumers and producer log the outage themselves, once per retry.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
