"""The errors ``outbox_tasks`` raises, in one small hierarchy.

Driver errors (psycopg, SQLAlchemy, kombu, redis-py, py-amqp) are translated at the module
boundary that talks to the driver (``db``, ``store``, ``publisher``), so callers only ever catch
these. The original exception is kept as ``__cause__``.

    OutboxError
    ├── ConfigurationError      a setting is missing or malformed (names the env var)
    ├── InvalidMessage          an outbox message was refused before it was stored
    │   └── PayloadTooLarge
    ├── DatabaseUnavailable     PostgreSQL cannot be reached or timed out; safe to retry later
    ├── BrokerUnavailable       the broker cannot be reached or timed out; opens the circuit
    ├── LeaseLost               a partition lease expired or was taken over; stop writing
    └── NotFound                an id given by an operator does not exist
"""

from __future__ import annotations


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
