"""The :class:`BrokerPublisher`: validates its settings, owns the connection, picks the link."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Final, Protocol

from kombu.connection import Connection

from outbox_tasks.broker import (
    AMQP_SCHEMES,
    broker_call,
    broker_errors,
    broker_scheme,
    forget,
    release,
)
from outbox_tasks.envelope import OutboundMessage
from outbox_tasks.errors import ConfigurationError
from outbox_tasks.publisher.amqp_link import AmqpLink
from outbox_tasks.publisher.redis_link import RedisLink
from outbox_tasks.publisher.results import FAILURE_TEXT_MAX, BatchResult

__all__ = ["BrokerPublisher"]

# kombu's Redis "fanout" is PUB/SUB (lost when nobody listens) and it has no "headers" exchange.
_REDIS_EXCHANGE_TYPES: Final = frozenset({"topic", "direct"})
_AMQP_EXCHANGE_TYPES: Final = frozenset({"topic", "direct", "fanout", "headers"})

# kombu is only partly annotated: it is called through ``Any`` rather than through ignores.
_kombu_connection: Any = Connection


class _Link(Protocol):
    """An open connection + channel of one transport, ready to publish."""

    def alive(self) -> bool: ...

    def declare(self) -> None: ...

    def publish(self, messages: Sequence[OutboundMessage]) -> BatchResult: ...


class BrokerPublisher:
    """Publishes outbox messages to one exchange, keeping per-aggregate order.

    Not thread-safe. Connects lazily; after a :class:`BrokerUnavailable` the next call
    reconnects by itself.
    """

    def __init__(
        self,
        url: str,
        exchange: str,
        *,
        timeout_seconds: float = 10.0,
        exchange_type: str = "topic",
    ) -> None:
        scheme = broker_scheme(url)
        self._is_amqp = scheme in AMQP_SCHEMES
        allowed_types = _AMQP_EXCHANGE_TYPES if self._is_amqp else _REDIS_EXCHANGE_TYPES
        if exchange_type not in allowed_types:
            raise ConfigurationError(
                f"exchange type {exchange_type!r} is not supported on {scheme}://; "
                f"expected one of {sorted(allowed_types)}"
            )
        if not exchange:
            raise ConfigurationError("the broker exchange name must not be empty")
        if not math.isfinite(timeout_seconds) or timeout_seconds <= 0:
            raise ConfigurationError(
                f"broker timeout must be a positive number of seconds, got {timeout_seconds!r}"
            )
        self._url = url
        self._exchange = exchange
        self._exchange_type = exchange_type
        self._timeout = float(timeout_seconds)
        self._conn: Any = None
        self._link: _Link | None = None
        self._broker_errors = broker_errors(url)

    @property
    def is_amqp(self) -> bool:
        """True for RabbitMQ (AMQP 0-9-1), False for Redis."""
        return self._is_amqp

    def declare(self) -> None:
        """Declare the exchange (durable). Idempotent; also done on every (re)connection."""
        with self._broker_call("declaring the exchange"):
            self._ensure_link().declare()

    def publish_batch(self, messages: Sequence[OutboundMessage]) -> BatchResult:
        """Publish ``messages`` in order; see :class:`BatchResult` for the outcome of each.

        Raises :class:`BrokerUnavailable` when the broker cannot be reached, does not answer
        within the timeout or refuses every message (``broker.publish_outage``); then nothing
        of the batch may be assumed published. Any other exception (a frame py-amqp cannot
        encode, RabbitMQ's 406 for one message, a Redis error reply) is raised as it is: the
        caller cannot tell which message of the batch caused it (``broker.publish_fault``).
        """
        if not messages:
            return BatchResult(published=[], failed={}, skipped=[])
        with self._broker_call("publishing a batch"):
            return self._ensure_link().publish(messages)

    def close(self) -> None:
        """Close the connection. Idempotent, and safe after a failure."""
        conn, self._conn, self._link = self._conn, None, None
        if conn is not None:
            release(conn, self._timeout)

    def _ensure_link(self) -> _Link:
        link = self._link
        if link is not None:
            if link.alive():
                return link
            # Dead before anything was sent: reconnecting now is safe.
            self._drop()
        conn = _kombu_connection(
            self._url,
            connect_timeout=self._timeout,
            transport_options=(
                {}
                if self._is_amqp
                else {
                    "socket_timeout": self._timeout,
                    "socket_connect_timeout": self._timeout,
                }
            ),
        )
        self._conn = conn
        # One attempt only: retrying (and sleeping) is the caller's circuit breaker's job.
        conn.ensure_connection(max_retries=0)
        if self._is_amqp:
            link = AmqpLink(conn, self._exchange, self._exchange_type, self._timeout)
        else:
            link = RedisLink(conn, self._exchange, self._exchange_type)
        link.declare()
        self._link = link
        return link

    def _drop(self) -> None:
        conn, self._conn, self._link = self._conn, None, None
        if conn is not None:
            forget(conn, self._timeout)

    def _broker_call(self, what: str) -> AbstractContextManager[None]:
        # Whatever broke mid-call (an outage, a bug, a ConfigurationError, Ctrl-C), the
        # connection may hold half-read frames or stray confirms: never reuse it.
        return broker_call(
            self._url,
            what,
            errors=self._broker_errors,
            on_failure=self._drop,
            limit=FAILURE_TEXT_MAX,
            publishing=True,
        )
