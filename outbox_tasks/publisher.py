"""Publish batches of outbox messages to the broker without ever reordering an aggregate.

One :class:`BrokerPublisher` per worker process; its connection is opened on first use and
reused across batches. Two transports are supported:

* Redis (``redis://``, ``rediss://``): kombu's virtual exchange routing, but paid once per batch:
  one SMEMBERS of the binding table, then every LPUSH of the batch in one pipeline.
* AMQP (``amqp://``, ``amqps://``, ``pyamqp://``): RabbitMQ publisher confirms, awaited once per
  *wave* (at most one message per aggregate in flight), so a nack can still stop the rest of
  its aggregate.

Every broker or network error becomes :class:`~outbox_tasks.errors.BrokerUnavailable` and drops
the connection; the next call reconnects.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Final, Protocol

import redis.exceptions
from amqp.exceptions import PreconditionFailed
from kombu.connection import Connection
from kombu.entity import Exchange
from kombu.exceptions import OperationalError
from kombu.utils.json import dumps
from kombu.utils.url import maybe_sanitize_url

from outbox_tasks.envelope import CONTENT_ENCODING, CONTENT_TYPE, OutboundMessage
from outbox_tasks.errors import BrokerUnavailable, ConfigurationError

__all__ = ["BatchResult", "BrokerPublisher"]

_REDIS_SCHEMES: Final = frozenset({"redis", "rediss"})
_AMQP_SCHEMES: Final = frozenset({"amqp", "amqps", "pyamqp"})
# kombu's Redis "fanout" is PUB/SUB (lost when nobody listens) and it has no "headers" exchange.
_REDIS_EXCHANGE_TYPES: Final = frozenset({"topic", "direct"})
_AMQP_EXCHANGE_TYPES: Final = frozenset({"topic", "direct", "fanout", "headers"})

# kombu is only partly annotated: it is called through ``Any`` rather than through ignores.
_kombu_connection: Any = Connection
_kombu_exchange: Any = Exchange
_kombu_json_dumps: Any = dumps

_PERSISTENT: Final = 2
_ERROR_TEXT_MAX: Final = 200


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What happened to each message of one :meth:`BrokerPublisher.publish_batch` call."""

    published: list[str]
    """Event ids accepted by the broker, in send order (unroutable ones included)."""
    failed: dict[str, str]
    """Event id -> short error text, for failures that are the message's own fault."""
    skipped: list[str]
    """Event ids not sent because an earlier message of the same aggregate failed."""
    unroutable: int = 0
    """Published messages that matched no binding and were dropped by the exchange."""


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
        self._safe_url = maybe_sanitize_url(url)
        scheme = url.partition("://")[0].lower()
        if scheme in _REDIS_SCHEMES:
            allowed_types = _REDIS_EXCHANGE_TYPES
        elif scheme in _AMQP_SCHEMES:
            allowed_types = _AMQP_EXCHANGE_TYPES
        else:
            raise ConfigurationError(
                f"broker URL {self._safe_url!r}: expected a redis://, rediss://, amqp://, "
                "amqps:// or pyamqp:// URL"
            )
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
        self._is_amqp = scheme in _AMQP_SCHEMES
        self._conn: Any = None
        self._link: _Link | None = None
        # Built from the transport class only: no I/O, no connection yet.
        probe = _kombu_connection(url)
        self._broker_errors: tuple[type[BaseException], ...] = _broker_errors(
            tuple(probe.connection_errors) + tuple(probe.channel_errors)
        )

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

        Raises :class:`BrokerUnavailable` when the broker cannot be reached or does not answer
        within the timeout; then nothing of the batch may be assumed published.
        """
        if not messages:
            return BatchResult(published=[], failed={}, skipped=[])
        with self._broker_call("publishing a batch"):
            return self._ensure_link().publish(messages)

    def close(self) -> None:
        """Close the connection. Idempotent, and safe after a failure."""
        conn, self._conn, self._link = self._conn, None, None
        if conn is None:
            return
        try:
            conn.release()
        except Exception:
            # Closing must not fail: whatever the broker's state, just let the sockets go.
            _forget(conn, self._timeout)

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
            link = _AmqpLink(conn, self._exchange, self._exchange_type, self._timeout)
        else:
            link = _RedisLink(conn, self._exchange, self._exchange_type)
        link.declare()
        self._link = link
        return link

    def _drop(self) -> None:
        conn, self._conn, self._link = self._conn, None, None
        if conn is not None:
            _forget(conn, self._timeout)

    @contextmanager
    def _broker_call(self, what: str) -> Iterator[None]:
        """Translate driver errors into ours, dropping the connection so the next call is fresh."""
        try:
            yield
        except self._broker_errors as exc:
            self._drop()
            raise BrokerUnavailable(
                f"broker {self._safe_url} unavailable while {what}: {_describe(exc)}"
            ) from exc
        except BaseException:
            # Whatever broke mid-call (a bug, a ConfigurationError, Ctrl-C), the connection
            # may hold half-read frames or stray confirms: never reuse it.
            self._drop()
            raise


def _broker_errors(
    transport_errors: tuple[type[BaseException], ...],
) -> tuple[type[BaseException], ...]:
    # kombu's Redis transport lists KeyError among its connection errors; catching it would turn
    # our own bugs into "broker unavailable", so it is left out.
    kept = tuple(e for e in transport_errors if not issubclass(e, LookupError))
    return (
        *kept,
        OperationalError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        OSError,  # includes socket.timeout, ConnectionRefusedError, ConnectionResetError
    )


def _forget(conn: Any, timeout: float) -> None:
    """Release a connection without talking to the broker, which may be gone."""
    # Called while another error is being handled: never let cleanup hide it.
    with suppress(Exception):
        conn.collect(socket_timeout=timeout)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > _ERROR_TEXT_MAX:
        text = text[: _ERROR_TEXT_MAX - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _lanes(messages: Sequence[OutboundMessage]) -> list[deque[int]]:
    """Indexes of ``messages`` grouped by aggregate, in batch order within each group."""
    by_aggregate: dict[tuple[str, str], deque[int]] = {}
    for index, message in enumerate(messages):
        by_aggregate.setdefault(message.aggregate_key, deque()).append(index)
    return list(by_aggregate.values())


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


class _RedisLink:
    """kombu's Redis virtual channel, published to in bulk."""

    def __init__(self, conn: Any, exchange: str, exchange_type: str) -> None:
        # Creating the channel PINGs Redis, so a dead server shows up here.
        self._channel: Any = conn.channel()
        self._exchange = exchange
        self._exchange_type = exchange_type

    def alive(self) -> bool:
        # redis-py's pool already checks a pooled socket before reusing it.
        return True

    def declare(self) -> None:
        # Virtual exchanges live in the connection's memory; kombu needs the declaration to
        # know the exchange type when routing.
        _kombu_exchange(self._exchange, type=self._exchange_type, durable=True).declare(
            channel=self._channel
        )

    def publish(self, messages: Sequence[OutboundMessage]) -> BatchResult:
        channel = self._channel
        exchange = self._exchange
        router = channel.typeof(exchange)
        deadletter = channel.deadletter_queue
        # The one read of the binding table for the whole batch (kombu does it per message).
        table = channel.get_table(exchange)
        # Every message is sent with the default priority, so its list keys depend on the
        # routing key only: computed once per routing key per batch.
        priority = channel.default_priority
        routes: dict[str, list[str]] = {}
        # kombu draws a uuid4 per message for the delivery tag; one per batch plus the index
        # is just as unique and costs nothing per message.
        tag_prefix = uuid.uuid4().hex

        published: list[str] = []
        failed: dict[str, str] = {}
        skipped: list[str] = []
        unroutable = 0
        dead: set[tuple[str, str]] = set()
        pushes: dict[str, list[str]] = {}
        for index, message in enumerate(messages):
            if message.aggregate_key in dead:
                skipped.append(message.event_id)
                continue
            keys = routes.get(message.routing_key)
            if keys is None:
                matched = router.lookup(table, exchange, message.routing_key, None)
                # Unlike kombu, never fall back to the ``ae.undeliver`` queue: nobody reads it.
                keys = [
                    channel._q_for_pri(q, priority)
                    for q in sorted(q for q in matched if q and q != deadletter)
                ]
                routes[message.routing_key] = keys
            try:
                payload = _kombu_redis_payload(
                    channel, exchange, message, f"{tag_prefix}.{index}", priority
                )
            except Exception as exc:  # local encoding only, so the message's own fault
                failed[message.event_id] = f"cannot encode message: {_describe(exc)}"
                dead.add(message.aggregate_key)
                continue
            published.append(message.event_id)
            if not keys:
                unroutable += 1
            for key in keys:
                pushes.setdefault(key, []).append(payload)

        if pushes:
            # One round trip, one LPUSH per list with every payload of the batch in send order
            # (LPUSH k a b c leaves the list as three LPUSHes would). No automatic retry (kombu's
            # pool has none), so a failure is reported instead of silently duplicated.
            with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
                for key, payloads in pushes.items():
                    pipe.lpush(key, *payloads)
                pipe.execute()
        return BatchResult(published, failed, skipped, unroutable)


def _kombu_redis_payload(
    channel: Any, exchange: str, message: OutboundMessage, delivery_tag: str, priority: int
) -> str:
    """The JSON kombu would LPUSH for ``message``, built in one step.

    Mirrors kombu 5.7's ``Producer.publish`` -> ``prepare_message`` -> virtual ``basic_publish``
    (``_inplace_augment_message``) -> Redis ``_put``, key for key, so consumers cannot tell the
    difference; only the delivery tag is drawn differently (unique all the same).
    """
    body, body_encoding = channel.encode_body(message.body, channel.body_encoding)
    wire = {
        "body": body,
        "content-encoding": CONTENT_ENCODING,
        "content-type": CONTENT_TYPE,
        "headers": message.headers,
        "properties": {
            "delivery_mode": _PERSISTENT,
            "message_id": message.event_id,
            "delivery_info": {"exchange": exchange, "routing_key": message.routing_key},
            "priority": priority,
            "body_encoding": body_encoding,
            "delivery_tag": delivery_tag,
        },
    }
    payload: str = _kombu_json_dumps(wire)
    return payload


# --------------------------------------------------------------------------------------------
# AMQP
# --------------------------------------------------------------------------------------------


class _AmqpLink:
    """A py-amqp channel in confirm mode: the only place that talks py-amqp directly."""

    def __init__(self, conn: Any, exchange: str, exchange_type: str, timeout: float) -> None:
        self._raw: Any = conn.connection
        # py-amqp puts the socket back in blocking mode after connecting; give every later read
        # and write (channel open, declare, publish) a bound so a silent broker cannot hang us.
        self._raw.transport.sock.settimeout(timeout)
        self._channel: Any = conn.channel()
        self._exchange = exchange
        self._exchange_type = exchange_type
        self._timeout = timeout
        self._channel.confirm_select()
        self._channel.events["basic_ack"].add(self._on_ack)
        self._channel.events["basic_nack"].add(self._on_nack)
        self._channel.events["basic_return"].add(self._on_return)
        # Confirm delivery tags count publishes on the channel from 1.
        self._next_tag = 1
        self._unconfirmed: dict[int, int] = {}  # delivery tag -> message index
        self._nacked: set[int] = set()  # message indexes
        self._returned: set[str] = set()  # event ids sent back as unroutable

    def alive(self) -> bool:
        # Handle whatever the broker said while we were idle (e.g. it closed the connection),
        # so a dead connection is replaced before any message is sent on it.
        try:
            self._raw.drain_events(timeout=0)
        except TimeoutError:
            return True
        except Exception:  # whatever it is, this connection is not worth keeping
            return False
        return True

    def declare(self) -> None:
        try:
            _kombu_exchange(self._exchange, type=self._exchange_type, durable=True).declare(
                channel=self._channel
            )
        except PreconditionFailed as exc:
            # The exchange exists with another type or durability: retrying cannot help.
            raise ConfigurationError(
                f"exchange {self._exchange!r} exists with settings other than "
                f"type={self._exchange_type!r}, durable=True: {exc}"
            ) from exc

    def publish(self, messages: Sequence[OutboundMessage]) -> BatchResult:
        wires: list[Any] = []
        errors: dict[int, str] = {}
        for index, message in enumerate(messages):
            wire, error = self._prepare(message)
            wires.append(wire)
            if error is not None:
                errors[index] = error

        published: list[str] = []
        failed: dict[str, str] = {}
        skipped: list[str] = []
        unroutable = 0
        lanes = _lanes(messages)
        self._returned.clear()
        while lanes:
            wave: list[int] = []
            alive: list[deque[int]] = []
            for lane in lanes:
                index = lane.popleft()
                if index in errors:
                    failed[messages[index].event_id] = errors[index]
                    skipped.extend(messages[i].event_id for i in lane)
                    continue
                wave.append(index)
                if lane:
                    alive.append(lane)
            wave.sort()
            nacked = self._send_wave(wave, messages, wires)
            lanes = []
            for lane in alive:
                if messages[lane[0]].aggregate_key in nacked:
                    skipped.extend(messages[i].event_id for i in lane)
                else:
                    lanes.append(lane)
            for index in wave:
                event_id = messages[index].event_id
                if messages[index].aggregate_key in nacked:
                    failed[event_id] = "rejected by the broker (basic.nack)"
                else:
                    published.append(event_id)
                    if event_id in self._returned:
                        unroutable += 1
        return BatchResult(published, failed, skipped, unroutable)

    def _prepare(self, message: OutboundMessage) -> tuple[Any, str | None]:
        wire = self._channel.prepare_message(
            message.body,
            0,
            CONTENT_TYPE,
            CONTENT_ENCODING,
            message.headers,
            {"delivery_mode": _PERSISTENT, "message_id": message.event_id},
        )
        try:
            # py-amqp encodes the properties only while writing the frame, and an encoding error
            # there is reported as a connection error. Encoding beforehand (private helper)
            # keeps a bad header this message's own failure.
            encoded = wire._serialize_properties()
        except Exception as exc:  # local encoding only, so the message's own fault
            return wire, f"cannot encode message: {_describe(exc)}"
        # ... and the frame writer reuses these bytes instead of encoding them a second time
        # (the properties are the bulk of py-amqp's CPU time per message).
        wire._serialize_properties = lambda: encoded
        return wire, None

    def _send_wave(
        self, wave: list[int], messages: Sequence[OutboundMessage], wires: list[Any]
    ) -> set[tuple[str, str]]:
        """Publish one message per aggregate, wait for every confirm; return nacked aggregates."""
        if not wave:
            return set()
        self._nacked.clear()
        for index in wave:
            self._unconfirmed[self._next_tag] = index
            self._next_tag += 1
            self._channel.basic_publish(
                wires[index],
                exchange=self._exchange,
                routing_key=messages[index].routing_key,
                # Unroutable messages come back as basic.return before their ack: we only
                # count them, they are dropped exactly as without the flag.
                mandatory=True,
            )
        deadline = time.monotonic() + self._timeout
        while self._unconfirmed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Reported by the caller as BrokerUnavailable, with the URL.
                raise TimeoutError(
                    f"{len(self._unconfirmed)} of {len(wave)} publisher confirms not received "
                    f"within {self._timeout:g}s"
                )
            with suppress(TimeoutError):
                self._raw.drain_events(timeout=remaining)
        return {messages[index].aggregate_key for index in self._nacked}

    def _settle(self, delivery_tag: int, multiple: bool, nacked: bool) -> None:
        if multiple:
            # Tags are inserted in increasing order, so the settled ones are a prefix.
            settled = []
            for tag in self._unconfirmed:
                if tag > delivery_tag:
                    break
                settled.append(tag)
        else:
            settled = [delivery_tag] if delivery_tag in self._unconfirmed else []
        for tag in settled:
            index = self._unconfirmed.pop(tag)
            if nacked:
                self._nacked.add(index)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, nacked=False)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, nacked=True)

    def _on_return(self, exc: object, exchange: str, routing_key: str, message: Any) -> None:
        event_id = message.properties.get("message_id")
        if isinstance(event_id, str):
            self._returned.add(event_id)
