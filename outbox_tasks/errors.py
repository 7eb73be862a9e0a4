"""The errors ``outbox_tasks`` raises, in one small hierarchy.

Driver errors (psycopg, SQLAlchemy, kombu, redis-py, py-amqp) are translated at the module
boundary that talks to the driver (``db``, ``store``, ``broker``), so callers only ever catch
these. The original exception is kept as ``__cause__``. :func:`describe_error` is the one way
an error is put into words (logs, stored failures, dead-letter headers).

    OutboxError
    ├── ConfigurationError      a setting is missing or malformed (names the env var)
    ├── InvalidMessage          an outbox message was refused before it was stored
    │   └── PayloadTooLarge
    ├── DatabaseUnavailable     PostgreSQL cannot be reached or timed out; safe to retry later
    ├── BrokerUnavailable       the broker cannot be reached or timed out; opens the circuit
    ├── LeaseLost               a partition lease expired or was taken over; stop writing
    ├── NotFound                an id given by an operator does not exist
    ├── InvalidEvent            consumer: a message that is not an outbox envelope
    ├── PartitionLost           consumer: this process no longer holds its partition
    ├── EventDeadLettered       consumer in Celery: the event was dead-lettered (the task fails)
    └── EmbeddedServiceError    demo: an embedded service (PostgreSQL, Redis) would not start

``ConfigurationError``, ``InvalidMessage`` and ``InvalidEvent`` are also ``ValueError``s;
``NotFound`` is also a ``LookupError``.
"""

from __future__ import annotations

from typing import Final

ERROR_TEXT_MAX: Final = 2000
"""Default bound, in characters, of :func:`describe_error`'s text."""


class OutboxError(Exception):
    """Base class of every error raised by outbox_tasks."""


class ConfigurationError(OutboxError, ValueError):
    """A setting is missing or malformed. The message names the variable and what is expected."""


class InvalidMessage(OutboxError, ValueError):
    """An outbox message was refused when it was built; nothing was stored."""


class PayloadTooLarge(InvalidMessage):
    """The serialized payload is over the hard limit."""


class DatabaseUnavailable(OutboxError):
    """PostgreSQL could not be reached, or a statement timed out. Nothing was half-written."""


class BrokerUnavailable(OutboxError):
    """The broker could not be reached or did not answer in time.

    Not the message's fault: it never spends a message's retry budget.
    """


class LeaseLost(OutboxError):
    """The partition lease this worker held has expired or been granted to another worker."""


class NotFound(OutboxError, LookupError):
    """An id given by an operator does not exist."""


class InvalidEvent(OutboxError, ValueError):
    """A message that is not an outbox envelope; it goes to the dead-letter queue as is."""


class PartitionLost(OutboxError):
    """This process no longer holds the partition it was consuming (ordered groups)."""


class EventDeadLettered(OutboxError):
    """The event exhausted its attempts (or was not an outbox envelope) and was dead-lettered."""


class EmbeddedServiceError(OutboxError):
    """An embedded service could not be started (the message says what to do)."""


def describe_error(exc: BaseException, *, limit: int = ERROR_TEXT_MAX) -> str:
    """``"TypeName: message"`` on one line (whitespace collapsed), at most ``limit`` characters
    of message (cut with ``...``); just the type name when the error has no message or its
    message is the type name."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
