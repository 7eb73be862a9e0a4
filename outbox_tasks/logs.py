"""Structured logs: one JSON object per line, with a stable ``action`` key per kind of event.

Loggers are ordinary ``logging`` loggers; fields travel in ``extra={"action": ..., ...}``. The
formatter is opt-in (``configure()``, done by the worker and the CLI) so an application that embeds
the producer keeps its own logging setup.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from outbox_tasks.redaction import redact_text

_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record. A URL's password never reaches the log: the whole line
    (message, fields, traceback) goes through ``redaction.redact_text``."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return redact_text(json.dumps(data, default=str))


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"outbox_tasks.{name}")


def event(logger: logging.Logger, level: int, action: str, msg: str, **fields: Any) -> None:
    """Log one event with its stable ``action`` and fields. Never raises."""
    with contextlib.suppress(Exception):  # logging must never break the relay
        logger.log(level, msg, extra={"action": action, **fields})


def configure(level: str | int = "INFO") -> None:
    """JSON lines on stderr for the ``outbox_tasks`` loggers."""
    logger = logging.getLogger("outbox_tasks")
    if any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        return
    # sys.__stderr__: Celery swaps sys.stderr for a logging proxy that would re-log every line.
    handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
