"""Consumer groups: idempotent, optionally ordered handling of outbox events (DESIGN 6).

A *consumer group* is a name, binding patterns (``Order.*``) and a handler
``on_event(event, session)``. Every event is handled in ONE database transaction that also
inserts the group's receipt for the event id; the broker message is acknowledged only after that
commit. A redelivered event finds its receipt and is skipped (outcome ``duplicate``), so the
handler's effects happen once even though delivery is at least once.

* **Unordered groups** share one durable queue ``outbox.consumer.<group>``; any number of
  processes read it.
* **Ordered groups** (``partitions=N``) have N queues ``outbox.consumer.<group>.p<k>``, each
  bound with the group's patterns, so each holds every event. One process at a time consumes a
  partition queue: it holds a PostgreSQL advisory lock for (group, k) on a dedicated connection
  (RabbitMQ queues are also single-active-consumer), and handles only the events whose aggregate
  falls in partition k, acknowledging the others without effect. A per-aggregate high-water mark
  (``outbox_consumer_position``) drops stale redeliveries (outcome ``stale``).
* **Failures** are retried in-process with capped exponential backoff, then the message goes to
  the plain durable queue ``outbox.consumer.<group>.dead``. An ordered group then parks the
  aggregate: its later events follow it to the dead-letter queue, in order, until
  :func:`replay_dead_letters` has handled them or an operator calls :func:`unpark`.

Runnable as a process (``outbox-tasks consume``, :class:`Consumer`) or, for unordered groups,
inside Celery workers (``outbox_tasks.consumer_celery``). This module does not import Celery,
and imports kombu and redis only when it talks to a broker: handler modules can import
:class:`Event` cheaply. docs/consumers.md is the user guide.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, Protocol

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from outbox_tasks.envelope import CONTENT_ENCODING, CONTENT_TYPE, H_ATTEMPT, H_REDELIVERED
from outbox_tasks.errors import (
    BrokerUnavailable,
    ConfigurationError,
    DatabaseUnavailable,
    OutboxError,
)
from outbox_tasks.logs import event as log_event
from outbox_tasks.logs import get_logger
from outbox_tasks.partitioning import partition_of, slot_of
from outbox_tasks.retry import backoff_delay
from outbox_tasks.settings import SLOT_COUNT, Settings, env_var

__all__ = [
    "DEAD_LETTERED",
    "DUPLICATE",
    "HANDLED",
    "INVALID",
    "OTHER_PARTITION",
    "OUTCOMES",
    "PARKED",
    "REQUEUED",
    "STALE",
    "Consumer",
    "ConsumerGroup",
    "ConsumerMetrics",
    "Delivery",
    "Event",
    "EventHandler",
    "GroupProcessor",
    "InvalidEvent",
    "Lag",
    "ParkedAggregate",
    "PartitionLost",
    "add_consume_parser",
    "declare_topology",
    "delete_topology",
    "lag",
    "load_handler",
    "parked_aggregates",
    "parse_event",
    "replay_dead_letters",
    "unpark",
]

log = get_logger("consumer")

QUEUE_PREFIX: Final = "outbox.consumer."

# Headers the consumer adds to a dead-lettered copy, and to a replayed one.
H_CONSUMER_GROUP: Final = "outbox-consumer-group"
H_CONSUMER_REASON: Final = "outbox-consumer-reason"
H_CONSUMER_ERROR: Final = "outbox-consumer-error"
H_CONSUMER_ATTEMPTS: Final = "outbox-consumer-attempts"
H_CONSUMER_DEAD_AT: Final = "outbox-consumer-dead-lettered-at"
H_CONSUMER_REPLAYED: Final = "outbox-consumer-replayed"
DEAD_LETTER_HEADERS: Final = frozenset(
    {H_CONSUMER_GROUP, H_CONSUMER_REASON, H_CONSUMER_ERROR, H_CONSUMER_ATTEMPTS, H_CONSUMER_DEAD_AT}
)

# One outcome per message (the ``outcome`` label of outbox_consumer_messages_total).
HANDLED: Final = "handled"  # the handler ran and its transaction committed
DUPLICATE: Final = "duplicate"  # the group's receipt for this event id exists: skipped
STALE: Final = "stale"  # ordered: sequence not above the aggregate's high-water mark: dropped
OTHER_PARTITION: Final = "other_partition"  # ordered: another partition's event: acked, no effect
DEAD_LETTERED: Final = "dead_lettered"  # retries exhausted: sent to the dead-letter queue
PARKED: Final = "parked"  # ordered: its aggregate is parked: sent to the dead-letter queue
INVALID: Final = "invalid"  # not an outbox envelope: sent to the dead-letter queue
REQUEUED: Final = "requeued"  # given back to the broker unhandled (shutdown, partition lost)
OUTCOMES: Final = (
    HANDLED,
    DUPLICATE,
    STALE,
    OTHER_PARTITION,
    DEAD_LETTERED,
    PARKED,
    INVALID,
    REQUEUED,
)

_GROUP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
_BINDING = re.compile(r"^[^\s]{1,255}$")
_ERROR_TEXT_MAX: Final = 2000
_REDIS_SCHEMES: Final = frozenset({"redis", "rediss"})
_AMQP_SCHEMES: Final = frozenset({"amqp", "amqps", "pyamqp"})

# Advisory locks of a group are (group key, n): n < SLOT_COUNT is a partition; MEMBER_BASE + N is
# the shared "member of this group, running with N partitions" lock; INSTANCE_BASE + i is one
# process's liveness lock (unordered groups on Redis).
MEMBER_BASE: Final = 1_000_000
INSTANCE_BASE: Final = 1_100_000_000
INSTANCE_SPAN: Final = 1_000_000_000


# --------------------------------------------------------------------------------------------
# The event and the group
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One outbox event as a handler sees it: the envelope (DESIGN 4.4), typed.

    ``redelivered`` is True when the relay marked the message as re-sent
    (``outbox-redelivered``) or the broker delivered it before; it is a hint only: idempotency
    does not depend on it. ``attempt`` is this consumer's attempt at handling it (1 first, 2 after
    one failure...); ``publish_attempt`` is the relay's (``outbox-attempt``).
    """

    id: uuid.UUID
    aggregate_type: str
    aggregate_id: str
    event_type: str
    occurred_at: datetime
    schema_version: int
    sequence: int
    payload: Any
    headers: Mapping[str, Any]
    redelivered: bool = False
    attempt: int = 1

    @property
    def aggregate_key(self) -> tuple[str, str]:
        return (self.aggregate_type, self.aggregate_id)

    @property
    def publish_attempt(self) -> int:
        value = self.headers.get(H_ATTEMPT, 1)
        return value if isinstance(value, int) and not isinstance(value, bool) else 1


EventHandler = Callable[[Event, Session], None]
"""``on_event(event, session)``: do the work with ``session``; never commit it (the consumer
commits, together with the receipt). Raise to fail the attempt."""


class InvalidEvent(OutboxError, ValueError):
    """A message that is not an outbox envelope; it goes to the dead-letter queue as is."""


class PartitionLost(OutboxError):
    """This process no longer holds the partition it was consuming (ordered groups)."""


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _whole(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEvent(f"envelope field {name!r} must be an integer, got {value!r}")
    return value


def _text_field(data: Mapping[str, Any], name: str) -> str:
    value = data[name]
    if not isinstance(value, str) or not value:
        raise InvalidEvent(f"envelope field {name!r} must be a non-empty string, got {value!r}")
    return value


_ENVELOPE_FIELDS: Final = (
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "occurred_at",
    "schema_version",
    "sequence",
    "payload",
)


def parse_event(
    body: bytes | str,
    headers: Mapping[str, Any] | None = None,
    *,
    redelivered: bool = False,
    attempt: int = 1,
) -> Event:
    """The typed view of one message body (JSON envelope) and its headers.

    Raises :class:`InvalidEvent` when the body is not an outbox envelope.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidEvent(f"body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidEvent("body is not a JSON object")
    missing = [name for name in _ENVELOPE_FIELDS if name not in data]
    if missing:
        raise InvalidEvent("envelope lacks " + ", ".join(missing))
    try:
        event_id = uuid.UUID(str(data["id"]))
    except ValueError:
        raise InvalidEvent(f"envelope id {data['id']!r} is not a UUID") from None
    occurred = data["occurred_at"]
    try:
        occurred_at = datetime.fromisoformat(str(occurred))
    except ValueError:
        raise InvalidEvent(f"envelope occurred_at {occurred!r} is not an ISO 8601 time") from None
    if occurred_at.tzinfo is None:
        occurred_at = occurred_at.replace(tzinfo=UTC)
    header_map = dict(headers or {})
    return Event(
        id=event_id,
        aggregate_type=_text_field(data, "aggregate_type"),
        aggregate_id=_text_field(data, "aggregate_id"),
        event_type=_text_field(data, "event_type"),
        occurred_at=occurred_at,
        schema_version=_whole(data["schema_version"], "schema_version"),
        sequence=_whole(data["sequence"], "sequence"),
        payload=data["payload"],
        headers=header_map,
        redelivered=redelivered or _truthy(header_map.get(H_REDELIVERED)),
        attempt=attempt,
    )


def load_handler(spec: str) -> EventHandler:
    """``"package.module:function"`` (or ``package.module:Class.method``) -> the callable."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"handler {spec!r} is not valid: expected 'package.module:function'"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigurationError(
            f"handler {spec!r}: cannot import {module_name}: {error}"
        ) from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(
                f"handler {spec!r}: {module_name} has no attribute {attribute}"
            ) from None
    if not callable(target):
        raise ConfigurationError(f"handler {spec!r} is not callable")
    handler: EventHandler = target
    return handler


@dataclass(frozen=True, slots=True)
class ConsumerGroup:
    """What a group consumes, how it handles it, and how hard it retries.

    ``partitions=0`` (default): unordered, one shared queue. ``partitions=N``: ordered per
    aggregate, N partition queues, one active process per partition (keep N small: every event
    is delivered to each of the N queues). Retries: ``max_attempts`` attempts in all, waiting
    ``backoff_base_seconds`` doubling up to ``backoff_max_seconds`` (with jitter) between them.
    ``prefetch``: unacknowledged messages a process may hold per queue (RabbitMQ).
    """

    name: str
    bindings: tuple[str, ...]
    handler: EventHandler
    partitions: int = 0
    max_attempts: int = 5
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    prefetch: int = 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "bindings", tuple(self.bindings))
        if not isinstance(self.name, str) or not _GROUP_NAME.match(self.name):
            raise ConfigurationError(
                f"consumer group name {self.name!r} is not valid: expected 1-100 letters, "
                "digits, '_' or '-'"
            )
        if not self.bindings:
            raise ConfigurationError(
                f"consumer group {self.name}: give at least one binding pattern (e.g. 'Order.*')"
            )
        for pattern in self.bindings:
            if not isinstance(pattern, str) or not _BINDING.match(pattern):
                raise ConfigurationError(
                    f"consumer group {self.name}: binding {pattern!r} is not a topic pattern "
                    "like 'Order.*' or 'Order.OrderPaid' or '#'"
                )
        if not callable(self.handler):
            raise ConfigurationError(f"consumer group {self.name}: the handler is not callable")
        _check_int(self.name, "partitions", self.partitions, 0, SLOT_COUNT)
        _check_int(self.name, "max_attempts", self.max_attempts, 1, 1000)
        _check_int(self.name, "prefetch", self.prefetch, 1, 65535)
        for label, value in (
            ("backoff_base_seconds", self.backoff_base_seconds),
            ("backoff_max_seconds", self.backoff_max_seconds),
        ):
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigurationError(
                    f"consumer group {self.name}: {label}={value!r} is not a number of seconds >= 0"
                )
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ConfigurationError(
                f"consumer group {self.name}: backoff_max_seconds ({self.backoff_max_seconds}) "
                f"is below backoff_base_seconds ({self.backoff_base_seconds})"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | ConsumerGroup) -> ConsumerGroup:
        """A group from a mapping: ``name``, ``bind`` (or ``bindings``), ``handler`` (a callable
        or ``"module:function"``), and optionally the other fields by name."""
        if isinstance(config, ConsumerGroup):
            return config
        values = dict(config)
        bindings = values.pop("bind", None) or values.pop("bindings", None) or ()
        if isinstance(bindings, str):
            bindings = (bindings,)
        handler = values.pop("handler", None)
        if isinstance(handler, str):
            handler = load_handler(handler)
        if "name" not in values:
            raise ConfigurationError(f"consumer group config {config!r} has no 'name'")
        try:
            return cls(bindings=tuple(bindings), handler=handler, **values)
        except TypeError as error:
            raise ConfigurationError(f"consumer group config {config!r}: {error}") from None

    @property
    def ordered(self) -> bool:
        return self.partitions > 0

    @property
    def queue(self) -> str:
        """The shared queue of an unordered group."""
        return f"{QUEUE_PREFIX}{self.name}"

    def partition_queue(self, partition: int) -> str:
        return f"{QUEUE_PREFIX}{self.name}.p{partition}"

    @property
    def dead_letter_queue(self) -> str:
        return f"{QUEUE_PREFIX}{self.name}.dead"

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues events arrive in (not the dead-letter queue)."""
        if self.ordered:
            return tuple(self.partition_queue(k) for k in range(self.partitions))
        return (self.queue,)

    def partition_of(self, aggregate_type: str, aggregate_id: str) -> int:
        return partition_of(slot_of(aggregate_type, aggregate_id), self.partitions)

    def queue_for(self, aggregate_type: str, aggregate_id: str) -> str:
        """Where a replayed event of this aggregate goes."""
        if self.ordered:
            return self.partition_queue(self.partition_of(aggregate_type, aggregate_id))
        return self.queue


def _check_int(group: str, label: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(
            f"consumer group {group}: {label}={value!r} is not an integer from {low} to {high}"
        )


def _no_handler(event: Event, session: Session) -> None:
    raise ConfigurationError("this consumer group was built for administration, not handling")


def _admin_group(group: ConsumerGroup | str, partitions: int | None) -> ConsumerGroup:
    """A group for queue names and administration; a name alone means unordered unless
    ``partitions`` says otherwise."""
    if isinstance(group, ConsumerGroup):
        if partitions is not None and partitions != group.partitions:
            return replace(group, partitions=partitions)
        return group
    return ConsumerGroup(group, ("#",), _no_handler, partitions=partitions or 0)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


class ConsumerMetrics:
    """Counters and gauges named as in ``outbox_tasks.metrics.METRIC_CATALOG``.

    Every update is guarded: a metrics failure never breaks handling.
    """

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge

        target = REGISTRY if registry is None else registry
        self.messages = Counter(
            "outbox_consumer_messages_total",
            "Messages a consumer group finished with, by outcome (handled, duplicate, stale, "
            "other_partition, dead_lettered, parked, invalid, requeued).",
            ["group", "outcome"],
            registry=target,
        )
        self.lag_messages = Gauge(
            "outbox_consumer_lag_messages",
            "Ready messages in the group's queues (partition queues summed).",
            ["group"],
            multiprocess_mode="max",
            registry=target,
        )
        self.oldest_age = Gauge(
            "outbox_consumer_oldest_message_age_seconds",
            "Age (now - occurred_at) of the oldest ready message in the group's queues.",
            ["group"],
            multiprocess_mode="max",
            registry=target,
        )

    def count(self, group: str, outcome: str) -> None:
        with contextlib.suppress(Exception):
            self.messages.labels(group, outcome).inc()

    def set_lag(self, group: str, value: Lag) -> None:
        """Set the lag gauges: age 0 when nothing waits, NaN when it cannot be measured."""
        age = value.oldest_age_seconds
        if age is None:
            age = 0.0 if value.messages == 0 else math.nan
        with contextlib.suppress(Exception):
            self.lag_messages.labels(group).set(value.messages)
            self.oldest_age.labels(group).set(age)


_default_metrics: list[ConsumerMetrics] = []
_metrics_lock = threading.Lock()


def default_metrics() -> ConsumerMetrics | None:
    """The process-wide metrics in the default registry (None if they cannot be created)."""
    with _metrics_lock:
        if not _default_metrics:
            try:
                _default_metrics.append(ConsumerMetrics())
            except Exception:  # e.g. names already registered by someone else
                log_event(log, logging.WARNING, "metrics_unavailable", "consumer metrics are off")
                return None
        return _default_metrics[0]


# --------------------------------------------------------------------------------------------
# Handling one message: idempotency, order, retries, dead letters (transport-independent)
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Delivery:
    """One message as received from a broker, with the way to settle it."""

    body: bytes
    headers: Mapping[str, Any]
    redelivered: bool
    ack: Callable[[], None]
    requeue: Callable[[], None]
    message_id: str | None = None


class DeadLetterSink(Protocol):
    def send(self, queue: str, body: bytes, headers: Mapping[str, Any], message_id: str) -> None:
        """Publish persistently (confirmed on RabbitMQ); raise BrokerUnavailable on failure."""


Fence = Callable[[Session], bool]
"""Inside the handling transaction: does this process still hold the partition?"""

_INSERT_RECEIPT = text(
    "INSERT INTO outbox_consumer_receipt (consumer_group, event_id) VALUES (:group, :event_id) "
    "ON CONFLICT DO NOTHING RETURNING 1"
)
_SELECT_POSITION = text(
    "SELECT last_sequence, parked_at IS NOT NULL AS parked, parked_event_id, dead_sequence "
    "FROM outbox_consumer_position "
    "WHERE consumer_group = :group AND aggregate_type = :type AND aggregate_id = :id "
    "FOR UPDATE"
)
_CREATE_POSITION = text(
    "INSERT INTO outbox_consumer_position (consumer_group, aggregate_type, aggregate_id, "
    "last_sequence) VALUES (:group, :type, :id, 0) ON CONFLICT DO NOTHING"
)
_ADVANCE_POSITION = text(
    "UPDATE outbox_consumer_position SET last_sequence = :sequence, updated_at = now(), "
    "parked_event_id = CASE WHEN :resolve THEN NULL ELSE parked_event_id END, "
    "parked_error = CASE WHEN :resolve THEN NULL ELSE parked_error END, "
    "parked_at = CASE WHEN :unpark THEN NULL ELSE parked_at END "
    "WHERE consumer_group = :group AND aggregate_type = :type AND aggregate_id = :id"
)
_PARK = text(
    "INSERT INTO outbox_consumer_position AS p (consumer_group, aggregate_type, aggregate_id, "
    "last_sequence, parked_at, parked_event_id, parked_error, dead_sequence) "
    "VALUES (:group, :type, :id, 0, now(), :event_id, :error, :sequence) "
    "ON CONFLICT (consumer_group, aggregate_type, aggregate_id) DO UPDATE SET "
    "parked_at = coalesce(p.parked_at, now()), "
    "parked_event_id = CASE WHEN :cause THEN :event_id ELSE p.parked_event_id END, "
    "parked_error = CASE WHEN :cause THEN :error ELSE p.parked_error END, "
    "dead_sequence = greatest(coalesce(p.dead_sequence, 0), :sequence), updated_at = now()"
)


class _Position(NamedTuple):
    last_sequence: int
    parked: bool
    parked_event_id: uuid.UUID | None
    dead_sequence: int | None


@dataclass(frozen=True, slots=True)
class _Verdict:
    outcome: str
    error: str | None = None


class GroupProcessor:
    """Handles deliveries of one group: the same rules in the process form and in Celery.

    ``sleep(seconds)`` waits between attempts and returns False when the process is stopping
    (the message is then given back to the broker instead of retried).
    """

    def __init__(
        self,
        group: ConsumerGroup,
        engine: Engine,
        sink: DeadLetterSink,
        *,
        metrics: ConsumerMetrics | None = None,
        sleep: Callable[[float], bool] | None = None,
        jitter: Callable[[], float] = random.random,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self.group = group
        self.engine = engine
        self.sink = sink
        self.metrics = metrics
        self._sleep = sleep or _plain_sleep
        self._jitter = jitter
        self._on_outcome = on_outcome

    def process(
        self, delivery: Delivery, *, partition: int | None = None, fence: Fence | None = None
    ) -> str:
        """Handle and settle one delivery; returns its outcome.

        Raises :class:`PartitionLost` (nothing settled: requeue it) when ``fence`` says this
        process lost the partition, and BrokerUnavailable / DatabaseUnavailable when a dead
        letter could not be written (nothing settled either).
        """
        try:
            event = parse_event(delivery.body, delivery.headers, redelivered=delivery.redelivered)
        except InvalidEvent as error:
            self._send_dead_letter(delivery, None, INVALID, str(error), 0)
            delivery.ack()
            return self._done(INVALID, None, error=str(error))
        if partition is not None and self.group.ordered:
            mine = self.group.partition_of(event.aggregate_type, event.aggregate_id)
            if mine != partition:
                delivery.ack()
                return self._done(OTHER_PARTITION, event)
        replayed = _truthy(delivery.headers.get(H_CONSUMER_REPLAYED))
        failures = 0
        outages = 0
        while True:
            try:
                verdict = self._attempt(replace(event, attempt=failures + 1), replayed, fence)
            except PartitionLost:
                raise
            except Exception as error:
                if not self._database_reachable():
                    outages += 1
                    delay = self._delay(outages)
                    log_event(
                        log,
                        logging.WARNING,
                        "database_unavailable",
                        "database unavailable while handling an event; waiting",
                        group=self.group.name,
                        event_id=str(event.id),
                        error=_describe(error),
                        retry_in_seconds=round(delay, 3),
                    )
                    if not self._sleep(delay):
                        delivery.requeue()
                        return self._done(REQUEUED, event)
                    continue
                failures += 1
                text_error = _describe(error)
                if failures >= self.group.max_attempts:
                    return self._give_up(delivery, event, text_error, failures, fence)
                delay = self._delay(failures)
                log_event(
                    log,
                    logging.WARNING,
                    "event_retry",
                    "handler failed; retrying",
                    group=self.group.name,
                    event_id=str(event.id),
                    aggregate_type=event.aggregate_type,
                    attempt=failures,
                    max_attempts=self.group.max_attempts,
                    error=text_error,
                    retry_in_seconds=round(delay, 3),
                )
                if not self._sleep(delay):
                    delivery.requeue()
                    return self._done(REQUEUED, event)
                continue
            if verdict.outcome == PARKED:
                self._send_dead_letter(delivery, event, PARKED, "aggregate is parked", 0)
                self._park(event, cause=False, error=None, fence=fence)
                delivery.ack()
                return self._done(PARKED, event)
            delivery.ack()
            return self._done(verdict.outcome, event)

    # -- one attempt: one transaction ---------------------------------------------------------

    def _attempt(self, event: Event, replayed: bool, fence: Fence | None) -> _Verdict:
        group = self.group
        resumes = False
        with Session(self.engine) as session, session.begin():
            inserted = session.execute(
                _INSERT_RECEIPT, {"group": group.name, "event_id": event.id}
            ).first()
            if inserted is None:
                return _Verdict(DUPLICATE)
            position: _Position | None = None
            if group.ordered:
                position = self._lock_position(session, event)
                if fence is not None and not fence(session):
                    raise PartitionLost(f"group {group.name}: partition lost")
                if event.sequence <= position.last_sequence:
                    session.rollback()
                    return _Verdict(STALE)
                if position.parked and not (
                    replayed
                    and (position.parked_event_id is None or position.parked_event_id == event.id)
                ):
                    session.rollback()
                    return _Verdict(PARKED)
            group.handler(event, session)
            if position is not None:
                resumes = position.parked and (
                    position.dead_sequence is None or event.sequence >= position.dead_sequence
                )
                session.execute(
                    _ADVANCE_POSITION,
                    {
                        "group": group.name,
                        "type": event.aggregate_type,
                        "id": event.aggregate_id,
                        "sequence": event.sequence,
                        "resolve": position.parked,
                        "unpark": resumes,
                    },
                )
        if resumes:  # logged once committed
            log_event(
                log,
                logging.INFO,
                "aggregate_unparked",
                "replay handled the last dead-lettered event; aggregate resumes",
                group=group.name,
                aggregate_type=event.aggregate_type,
                aggregate_id=event.aggregate_id,
            )
        return _Verdict(HANDLED)

    def _lock_position(self, session: Session, event: Event) -> _Position:
        key = {"group": self.group.name, "type": event.aggregate_type, "id": event.aggregate_id}
        row = session.execute(_SELECT_POSITION, key).first()
        if row is None:
            session.execute(_CREATE_POSITION, key)
            row = session.execute(_SELECT_POSITION, key).one()
        return _Position(int(row[0]), bool(row[1]), row[2], None if row[3] is None else int(row[3]))

    # -- failures -------------------------------------------------------------------------------

    def _give_up(
        self, delivery: Delivery, event: Event, error: str, attempts: int, fence: Fence | None
    ) -> str:
        self._send_dead_letter(delivery, event, DEAD_LETTERED, error, attempts)
        if self.group.ordered:
            self._park(event, cause=True, error=error, fence=fence)
        delivery.ack()
        return self._done(DEAD_LETTERED, event, error=error, attempts=attempts)

    def _park(self, event: Event, *, cause: bool, error: str | None, fence: Fence | None) -> None:
        with Session(self.engine) as session, session.begin():
            if fence is not None and not fence(session):
                raise PartitionLost(f"group {self.group.name}: partition lost")
            session.execute(
                _PARK,
                {
                    "group": self.group.name,
                    "type": event.aggregate_type,
                    "id": event.aggregate_id,
                    "event_id": event.id,
                    "error": error,
                    "sequence": event.sequence,
                    "cause": cause,
                },
            )

    def _send_dead_letter(
        self, delivery: Delivery, event: Event | None, reason: str, error: str, attempts: int
    ) -> None:
        headers = {k: v for k, v in delivery.headers.items() if k not in DEAD_LETTER_HEADERS}
        headers.update(
            {
                H_CONSUMER_GROUP: self.group.name,
                H_CONSUMER_REASON: reason,
                H_CONSUMER_ERROR: error[:_ERROR_TEXT_MAX],
                H_CONSUMER_ATTEMPTS: attempts,
                H_CONSUMER_DEAD_AT: datetime.now(UTC).isoformat(),
            }
        )
        message_id = str(event.id) if event is not None else (delivery.message_id or "")
        self.sink.send(self.group.dead_letter_queue, delivery.body, headers, message_id)

    def _database_reachable(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    def _delay(self, failures: int) -> float:
        return backoff_delay(
            failures,
            base_seconds=self.group.backoff_base_seconds,
            max_seconds=self.group.backoff_max_seconds,
            jitter=self._jitter(),
        )

    def _done(
        self, outcome: str, event: Event | None, *, error: str | None = None, attempts: int = 0
    ) -> str:
        if self.metrics is not None:
            self.metrics.count(self.group.name, outcome)
        if self._on_outcome is not None:
            with contextlib.suppress(Exception):
                self._on_outcome(outcome)
        fields: dict[str, Any] = {"group": self.group.name, "outcome": outcome}
        if event is not None:
            fields.update(
                event_id=str(event.id),
                aggregate_type=event.aggregate_type,
                event_type=event.event_type,
                sequence=event.sequence,
            )
        if outcome in (DEAD_LETTERED, INVALID):
            log_event(
                log,
                logging.ERROR,
                f"event_{outcome}",
                "event sent to the dead-letter queue",
                error=error,
                attempts=attempts,
                aggregate_id=event.aggregate_id if event is not None else None,
                **fields,
            )
        elif outcome in (PARKED, STALE, REQUEUED):
            log_event(log, logging.INFO, f"event_{outcome}", f"event {outcome}", **fields)
        else:
            log_event(log, logging.DEBUG, f"event_{outcome}", f"event {outcome}", **fields)
        return outcome


def _plain_sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True


def _describe(error: BaseException) -> str:
    text_ = " ".join(str(error).split()) or type(error).__name__
    if len(text_) > _ERROR_TEXT_MAX:
        text_ = text_[: _ERROR_TEXT_MAX - 3] + "..."
    return f"{type(error).__name__}: {text_}" if text_ != type(error).__name__ else text_


# --------------------------------------------------------------------------------------------
# Broker plumbing (kombu and redis are imported here only)
# --------------------------------------------------------------------------------------------


def _kombu(path: str) -> Any:
    """A kombu class or function, imported on first use (kombu is untyped: called as Any)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _connection(url: str, **options: Any) -> Any:
    return _kombu("kombu.connection.Connection")(url, **options)


def _queue(name: str, **options: Any) -> Any:
    return _kombu("kombu.entity.Queue")(name, **options)


def _scheme(url: str) -> str:
    scheme = url.partition("://")[0].lower()
    if scheme not in _REDIS_SCHEMES | _AMQP_SCHEMES:
        raise ConfigurationError(
            "broker URL: expected a redis://, rediss://, amqp://, amqps:// or pyamqp:// URL"
        )
    return scheme


def _is_amqp(url: str) -> bool:
    return _scheme(url) in _AMQP_SCHEMES


def _safe(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def _broker_errors(url: str) -> tuple[type[BaseException], ...]:
    import redis.exceptions
    from kombu.exceptions import OperationalError

    probe: Any = _connection(url)
    errors = tuple(probe.connection_errors) + tuple(probe.channel_errors)
    kept = tuple(e for e in errors if not issubclass(e, LookupError))
    return (
        *kept,
        OperationalError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        OSError,
    )


def _kombu_queues(group: ConsumerGroup, exchange: str, amqp: bool) -> list[Any]:
    """The kombu Queue objects of the group: event queues (bound) and the dead-letter queue."""

    topic: Any = _kombu("kombu.entity.Exchange")(exchange, type="topic", durable=True)
    bindings = [
        _kombu("kombu.entity.binding")(topic, routing_key=pattern) for pattern in group.bindings
    ]
    arguments = {"x-single-active-consumer": True} if amqp and group.ordered else None
    queues: list[Any] = [
        _queue(name, bindings=bindings, durable=True, queue_arguments=arguments)
        for name in group.queues
    ]
    queues.append(_queue(group.dead_letter_queue, durable=True))
    return queues


def _declare(channel: Any, queues: Sequence[Any]) -> None:
    from amqp.exceptions import PreconditionFailed

    for queue in queues:
        try:
            queue(channel).declare()
        except PreconditionFailed as error:
            raise ConfigurationError(
                f"queue {queue.name!r} exists with other arguments than this consumer group "
                f"needs (ordered queues are single-active-consumer): {error}. Delete it or use "
                "another group name."
            ) from error


class _BrokerWriter:
    """A connection of its own for dead-letter and replay publishes (RabbitMQ: confirmed).

    Separate from the consuming connection so that waiting for a confirm never delivers
    another message into a handler that is still running.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.amqp = _is_amqp(url)
        self._conn: Any = None
        self._producer: Any = None
        self._errors = _broker_errors(url)
        self._declared: dict[str, Any] = {}

    def _ensure(self) -> Any:
        if self._producer is None:
            options: dict[str, Any] = (
                {
                    "confirm_publish": True,
                    "read_timeout": self.timeout,
                    "write_timeout": self.timeout,
                }
                if self.amqp
                else {"socket_timeout": self.timeout, "socket_connect_timeout": self.timeout}
            )
            conn: Any = _connection(
                self.url, connect_timeout=self.timeout, transport_options=options
            )
            self._conn = conn
            conn.ensure_connection(max_retries=0)
            self._producer = _kombu("kombu.messaging.Producer")(conn.channel())
        return self._producer

    def send(
        self,
        queue: str,
        body: bytes,
        headers: Mapping[str, Any],
        message_id: str,
        *,
        declare: Any = None,
    ) -> None:

        try:
            producer = self._ensure()
            entity = declare if declare is not None else _queue(queue, durable=True)
            producer.publish(
                body,
                exchange="",
                routing_key=queue,
                headers=dict(headers),
                content_type=CONTENT_TYPE,
                content_encoding=CONTENT_ENCODING,
                delivery_mode=2,
                message_id=message_id or None,
                declare=[entity],
                retry=False,
                timeout=self.timeout,
            )
        except self._errors as error:
            self.close()
            raise BrokerUnavailable(
                f"broker {_safe(self.url)} unavailable while publishing to {queue}: "
                f"{_describe(error)}"
            ) from error
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect(socket_timeout=self.timeout)


def _decode_redis_item(item: bytes) -> tuple[bytes, dict[str, Any], bool, str | None]:
    """A message as kombu's Redis transport stores it -> (body, headers, redelivered, id)."""
    try:
        raw = json.loads(item)
        props = raw.get("properties") or {}
        body = raw.get("body", "")
        if props.get("body_encoding") == "base64":
            data = base64.b64decode(body)
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
        headers = raw.get("headers") or {}
        info = props.get("delivery_info") or {}
        redelivered = bool(info.get("redelivered") or raw.get("redelivered"))
        message_id = props.get("message_id")
        return data, dict(headers), redelivered, message_id if isinstance(message_id, str) else None
    except (ValueError, TypeError, AttributeError):
        return item, {}, False, None


def _mark_redelivered(item: bytes) -> bytes:
    try:
        raw = json.loads(item)
        raw.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
        return json.dumps(raw).encode()
    except (ValueError, TypeError, AttributeError):
        return item


class _Source(Protocol):
    def connect(self) -> None: ...
    def declare(self, queues: Sequence[Any]) -> None: ...
    def open(self, queue: str, partition: int | None) -> None: ...
    def close_queue(self, queue: str) -> None: ...
    def drain(self, timeout: float) -> None: ...
    def shutdown(self) -> None: ...


OnDelivery = Callable[[Delivery, int | None], None]


class _AmqpSource:
    """RabbitMQ through kombu: one channel per open queue, so closing it requeues exactly that
    queue's unacknowledged messages (in their original positions)."""

    def __init__(self, url: str, prefetch: int, on_delivery: OnDelivery, timeout: float) -> None:
        self.url = url
        self.prefetch = prefetch
        self.on_delivery = on_delivery
        self.timeout = timeout
        self._conn: Any = None
        self._open: dict[str, tuple[Any, Any]] = {}
        self._queues: dict[str, Any] = {}

    def connect(self) -> None:

        conn: Any = _connection(self.url, connect_timeout=self.timeout)
        self._conn = conn
        conn.ensure_connection(max_retries=0)

    def declare(self, queues: Sequence[Any]) -> None:
        channel = self._conn.channel()
        try:
            _declare(channel, queues)
        finally:
            with contextlib.suppress(Exception):
                channel.close()
        self._queues = {q.name: q for q in queues}

    def open(self, queue: str, partition: int | None) -> None:

        channel = self._conn.channel()
        channel.basic_qos(prefetch_size=0, prefetch_count=self.prefetch, a_global=False)

        def on_message(message: Any) -> None:
            delivery = Delivery(
                body=_as_bytes(message.body),
                headers=dict(message.headers or {}),
                redelivered=bool(message.delivery_info.get("redelivered")),
                ack=message.ack,
                requeue=lambda: message.reject(requeue=True),
                message_id=message.properties.get("message_id"),
            )
            self.on_delivery(delivery, partition)

        consumer: Any = _kombu("kombu.messaging.Consumer")(
            channel, queues=[self._queues[queue]], on_message=on_message, auto_declare=False
        )
        consumer.consume()
        self._open[queue] = (channel, consumer)

    def close_queue(self, queue: str) -> None:
        entry = self._open.pop(queue, None)
        if entry is not None:
            # Closing the channel requeues its unacknowledged messages; deliveries that arrive
            # while it closes are dropped by py-amqp (and requeued by the broker).
            entry[0].close()

    def drain(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            self._conn.drain_events(timeout=timeout)

    def shutdown(self) -> None:
        conn, self._conn = self._conn, None
        self._open.clear()
        if conn is not None:
            try:
                conn.release()
            except Exception:
                with contextlib.suppress(Exception):
                    conn.collect(socket_timeout=self.timeout)


def _as_bytes(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, bytearray | memoryview):
        return bytes(body)
    return json.dumps(body).encode()


class _RedisSource:
    """Redis as a reliable queue: LMOVE each message into an in-flight list, LREM it on ack.

    kombu's own Redis consumer gives unacknowledged messages back only after its visibility
    timeout (an hour by default) and re-routes them through the exchange (into every bound
    queue). Here each message waits in an in-flight list owned by the partition (ordered) or
    by the process (unordered) and goes back to the front of its own queue at once when the
    owner is known to be gone (PostgreSQL advisory lock free).
    """

    def __init__(self, url: str, group: ConsumerGroup, on_delivery: OnDelivery, timeout: float):
        self.url = url
        self.group = group
        self.on_delivery = on_delivery
        self.timeout = timeout
        self.instance: int | None = None
        self._client: Any = None
        self._kombu: Any = None
        self._open: dict[str, tuple[str, int | None]] = {}
        self._turn = 0

    def inflight_key(self, queue: str, partition: int | None) -> str:
        if partition is not None:
            return f"{queue}.inflight"
        return f"{queue}.inflight.{self.instance}"

    @property
    def instances_key(self) -> str:
        return f"{self.group.queue}.instances"

    def connect(self) -> None:
        import redis

        client: Any = redis.Redis.from_url(
            self.url, socket_timeout=self.timeout + 5, socket_connect_timeout=self.timeout
        )
        self._client = client
        client.ping()

    def declare(self, queues: Sequence[Any]) -> None:

        conn: Any = _connection(
            self.url,
            transport_options={
                "socket_timeout": self.timeout,
                "socket_connect_timeout": self.timeout,
            },
        )
        try:
            channel = conn.channel()
            _declare(channel, queues)
        finally:
            with contextlib.suppress(Exception):
                conn.release()

    def register_instance(self, instance: int) -> None:
        self.instance = instance
        self._client.sadd(self.instances_key, str(instance))

    def instances(self) -> list[int]:
        members = self._client.smembers(self.instances_key)
        return [int(m) for m in members if str(m, "ascii").isdigit()]

    def reclaim_instance(self, instance: int) -> int:
        """Give a dead process's in-flight messages back to the front of the queue."""
        inflight = f"{self.group.queue}.inflight.{instance}"
        moved = self._restore(inflight, self.group.queue)
        self._client.srem(self.instances_key, str(instance))
        return moved

    def _restore(self, inflight: str, queue: str) -> int:
        moved = 0
        while True:
            # Newest first to the front, so the oldest ends up first in line.
            item = self._client.lmove(inflight, queue, "LEFT", "RIGHT")
            if item is None:
                return moved
            moved += 1

    def open(self, queue: str, partition: int | None) -> None:
        inflight = self.inflight_key(queue, partition)
        restored = self._restore(inflight, queue)
        if restored:
            log_event(
                log,
                logging.WARNING,
                "inflight_restored",
                "messages left in flight by a previous holder went back to the queue",
                group=self.group.name,
                queue=queue,
                messages=restored,
            )
        self._open[queue] = (inflight, partition)

    def close_queue(self, queue: str) -> None:
        entry = self._open.pop(queue, None)
        if entry is not None:
            self._restore(entry[0], queue)

    def drain(self, timeout: float) -> None:
        queues = list(self._open.items())
        if not queues:
            time.sleep(timeout)
            return
        count = len(queues)
        for i in range(count):
            queue, (inflight, partition) = queues[(self._turn + i) % count]
            item = self._client.lmove(queue, inflight, "RIGHT", "LEFT")
            if item is not None:
                self._turn = (self._turn + i + 1) % count
                self._dispatch(item, queue, inflight, partition)
                return
        queue, (inflight, partition) = queues[self._turn % count]
        self._turn = (self._turn + 1) % count
        wait = timeout if count == 1 else min(timeout, 0.05)
        item = self._client.blmove(queue, inflight, wait, "RIGHT", "LEFT")
        if item is not None:
            self._dispatch(item, queue, inflight, partition)

    def _dispatch(self, item: bytes, queue: str, inflight: str, partition: int | None) -> None:
        body, headers, redelivered, message_id = _decode_redis_item(item)
        client = self._client

        def ack() -> None:
            client.lrem(inflight, 1, item)

        def requeue() -> None:
            with client.pipeline(transaction=True) as pipe:
                pipe.lrem(inflight, 1, item)
                pipe.rpush(queue, _mark_redelivered(item))
                pipe.execute()

        self.on_delivery(
            Delivery(body, headers, redelivered, ack, requeue, message_id=message_id), partition
        )

    def shutdown(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            for queue in list(self._open):
                self.close_queue(queue)
            if self.instance is not None:
                client.srem(self.instances_key, str(self.instance))
        except Exception:  # broker gone: whoever takes over restores the in-flight list
            pass
        finally:
            self._client = None
            self._open.clear()
            with contextlib.suppress(Exception):
                client.close()


# --------------------------------------------------------------------------------------------
# Partition ownership: PostgreSQL advisory locks on a dedicated connection
# --------------------------------------------------------------------------------------------


def group_lock_key(group: str) -> int:
    """The first advisory-lock key of a group (31-bit, stable across processes and hosts)."""
    return zlib.crc32(f"outbox.consumer:{group}".encode()) & 0x7FFFFFFF


_FENCE = text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = :pid "
    "AND classid::bigint = :key AND objid::bigint = :n AND objsubid = 2 "
    "AND mode = 'ExclusiveLock' AND granted)"
)


class _Locks:
    """Session-level advisory locks held on one autocommit connection: they live exactly as long
    as this process's connection, so a killed process frees its partitions at once."""

    def __init__(self, settings: Settings, group: ConsumerGroup) -> None:
        self.settings = settings
        self.group = group
        self.key = group_lock_key(group.name)
        self.pid = 0
        self._conn: Any = None

    def connect(self) -> None:
        import psycopg

        from outbox_tasks.db import connect_args

        args = connect_args(self.settings, "outbox_tasks.consumer.locks")
        try:
            conn = psycopg.connect(
                self.settings.libpq_url,
                autocommit=True,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
                **args,
            )
        except psycopg.Error as error:
            raise DatabaseUnavailable(f"consumer locks: {_describe(error)}") from error
        self._conn = conn
        self.pid = int(self._one("SELECT pg_backend_pid()"))

    def _one(self, sql: str, *params: int) -> Any:
        import psycopg

        try:
            row = self._conn.execute(sql, params).fetchone()
        except psycopg.Error as error:
            raise DatabaseUnavailable(f"consumer locks: {_describe(error)}") from error
        return None if row is None else row[0]

    def join(self, partitions: int) -> None:
        """Announce this process as a member running with ``partitions`` (0: unordered), after
        checking that no member runs the group with another partition count."""
        others = self._one(
            "SELECT array_agg(DISTINCT objid::bigint - %s) FROM pg_locks "
            "WHERE locktype = 'advisory' AND classid::bigint = %s AND objsubid = 2 "
            "AND objid::bigint BETWEEN %s AND %s",
            MEMBER_BASE,
            self.key,
            MEMBER_BASE,
            MEMBER_BASE + SLOT_COUNT,
        )
        conflicting = sorted(set(others or ()) - {partitions})
        if conflicting:
            raise ConfigurationError(
                f"consumer group {self.group.name} already runs with partitions="
                f"{conflicting[0]} (this process: {partitions}); stop every process of the group "
                "before changing its partition count"
            )
        self._one(
            "SELECT pg_advisory_lock_shared(%s::int4, %s::int4)", self.key, MEMBER_BASE + partitions
        )

    def members(self, partitions: int) -> int:
        return int(
            self._one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 2",
                self.key,
                MEMBER_BASE + partitions,
            )
        )

    def try_lock(self, n: int) -> bool:
        return bool(self._one("SELECT pg_try_advisory_lock(%s::int4, %s::int4)", self.key, n))

    def unlock(self, n: int) -> None:
        self._one("SELECT pg_advisory_unlock(%s::int4, %s::int4)", self.key, n)

    def fence(self, n: int) -> Fence:
        def holds(session: Session) -> bool:
            params = {"pid": self.pid, "key": self.key, "n": n}
            return bool(session.execute(_FENCE, params).scalar())

        return holds

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


# --------------------------------------------------------------------------------------------
# The consumer process
# --------------------------------------------------------------------------------------------


class Consumer:
    """Runs one consumer group in this process until :meth:`stop` (or the ``stop`` event).

    Single-threaded: one message at a time. Stopping finishes the message in hand (a retry wait
    is cut short and the message is given back to the broker), then gives back what was
    prefetched and releases the partitions. Broker and database outages are waited out with
    backoff; nothing is acknowledged before the handler's transaction has committed.
    """

    def __init__(
        self,
        group: ConsumerGroup,
        settings: Settings,
        *,
        engine: Engine | None = None,
        url: str | None = None,
        metrics: ConsumerMetrics | None = None,
        export_lag: bool = False,
        rebalance_interval_seconds: float = 1.0,
        reclaim_interval_seconds: float = 5.0,
        lag_interval_seconds: float = 15.0,
        poll_seconds: float = 0.2,
    ) -> None:
        self.group = group
        self.settings = settings
        self.url = url or settings.effective_publish_url
        self.amqp = _is_amqp(self.url)
        self.metrics = metrics if metrics is not None else default_metrics()
        self.export_lag = export_lag
        self.rebalance_interval = rebalance_interval_seconds
        self.reclaim_interval = reclaim_interval_seconds
        self.lag_interval = lag_interval_seconds
        self.poll_seconds = poll_seconds
        self.instance = random.randrange(INSTANCE_SPAN)
        self.outcomes: Counter[str] = Counter()
        self.ready = threading.Event()
        self._engine = engine
        self._stop = threading.Event()
        self._source: _AmqpSource | _RedisSource | None = None
        self._locks: _Locks | None = None
        self._held: set[int] = set()
        self._processor: GroupProcessor | None = None

    @property
    def held_partitions(self) -> frozenset[int]:
        return frozenset(self._held)

    def stop(self) -> None:
        self._stop.set()

    def run(self, stop: threading.Event | None = None) -> None:
        if stop is not None:
            self._stop = stop
        owns_engine = self._engine is None
        from outbox_tasks.db import make_engine

        engine = self._engine or make_engine(
            self.settings, application_name="outbox_tasks.consumer", pool_size=2
        )
        timeout = self.settings.broker_timeout_seconds
        writer = _BrokerWriter(self.url, timeout)
        self._processor = GroupProcessor(
            self.group,
            engine,
            writer,
            metrics=self.metrics,
            sleep=lambda seconds: not self._stop.wait(seconds),
            on_outcome=self._count,
        )
        log_event(
            log,
            logging.INFO,
            "consumer_started",
            "consumer starting",
            group=self.group.name,
            bindings=list(self.group.bindings),
            partitions=self.group.partitions,
            broker=_safe(self.url),
            pid=os.getpid(),
        )
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self._connected()
                except ConfigurationError:
                    raise
                except Exception as error:
                    failures += 1
                    delay = backoff_delay(
                        failures, base_seconds=0.5, max_seconds=10.0, jitter=random.random()
                    )
                    known = isinstance(
                        error, (BrokerUnavailable, DatabaseUnavailable, *_broker_errors(self.url))
                    )
                    log_event(
                        log,
                        logging.WARNING if known else logging.ERROR,
                        "consumer_disconnected",
                        "consumer lost its broker or database; reconnecting",
                        group=self.group.name,
                        error=_describe(error),
                        retry_in_seconds=round(delay, 3),
                        exc_info=not known,
                    )
                    self._teardown()
                    self._stop.wait(delay)
                else:
                    failures = 0
        finally:
            self._teardown()
            writer.close()
            if owns_engine:
                engine.dispose()
            log_event(
                log,
                logging.INFO,
                "consumer_stopped",
                "consumer stopped",
                group=self.group.name,
                outcomes=dict(self.outcomes),
            )

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def _connected(self) -> None:
        group = self.group
        timeout = self.settings.broker_timeout_seconds
        source: _AmqpSource | _RedisSource
        if self.amqp:
            source = _AmqpSource(self.url, group.prefetch, self._on_delivery, timeout)
        else:
            source = _RedisSource(self.url, group, self._on_delivery, timeout)
        self._source = source
        source.connect()
        source.declare(_kombu_queues(group, self.settings.exchange, self.amqp))
        if group.ordered or not self.amqp:
            locks = _Locks(self.settings, group)
            self._locks = locks
            locks.connect()
            locks.join(group.partitions)
            if not group.ordered and isinstance(source, _RedisSource):
                if not locks.try_lock(INSTANCE_BASE + self.instance):
                    raise DatabaseUnavailable("consumer instance lock is taken; retrying")
                source.register_instance(self.instance)
        if not group.ordered:
            source.open(group.queue, None)
        next_rebalance = 0.0
        next_reclaim = 0.0
        next_lag = time.monotonic() + 1.0
        announced = False
        while not self._stop.is_set():
            now = time.monotonic()
            if group.ordered and now >= next_rebalance:
                self._rebalance()
                next_rebalance = now + self.rebalance_interval
            if isinstance(source, _RedisSource) and not group.ordered and now >= next_reclaim:
                self._reclaim(source)
                next_reclaim = now + self.reclaim_interval
            if self.export_lag and now >= next_lag:
                self._export_lag()
                next_lag = now + self.lag_interval
            if not announced:
                announced = True
                self.ready.set()
                log_event(
                    log,
                    logging.INFO,
                    "consumer_ready",
                    "consumer ready",
                    group=group.name,
                    queues=list(group.queues),
                    partitions_held=sorted(self._held),
                    pid=os.getpid(),
                )
            source.drain(self.poll_seconds)

    def _on_delivery(self, delivery: Delivery, partition: int | None) -> None:
        processor = self._processor
        assert processor is not None
        if self._stop.is_set() or (partition is not None and partition not in self._held):
            delivery.requeue()
            return
        fence = self._locks.fence(partition) if self._locks and partition is not None else None
        try:
            processor.process(delivery, partition=partition, fence=fence)
        except PartitionLost:
            with contextlib.suppress(Exception):
                delivery.requeue()
            processor._done(REQUEUED, None)
            assert partition is not None
            log_event(
                log,
                logging.WARNING,
                "partition_lost",
                "this process no longer holds the partition; stopped consuming it",
                group=self.group.name,
                partition=partition,
            )
            self._drop(partition)
            # The lock connection is suspect: reconnect everything.
            raise DatabaseUnavailable("partition lock lost") from None
        except BaseException:
            with contextlib.suppress(Exception):
                delivery.requeue()
            raise

    def _rebalance(self) -> None:
        locks, source = self._locks, self._source
        assert locks is not None and source is not None
        n = self.group.partitions
        members = max(locks.members(n), 1)
        share = math.ceil(n / members)
        held = sorted(self._held)
        if len(held) > share:
            for k in sorted(held, reverse=True)[: len(held) - share]:
                self._drop(k)
                locks.unlock(k)
                log_event(
                    log,
                    logging.INFO,
                    "partition_released",
                    "partition handed over (rebalancing)",
                    group=self.group.name,
                    partition=k,
                    members=members,
                )
            return
        start = self.instance % n
        for i in range(n):
            if len(self._held) >= share:
                break
            k = (start + i) % n
            if k in self._held or not locks.try_lock(k):
                continue
            # Held before the consumer opens: a delivery that arrives while basic.consume is
            # being confirmed must be handled, not requeued behind the later ones.
            self._held.add(k)
            try:
                source.open(self.group.partition_queue(k), k)
            except BaseException:
                self._held.discard(k)
                with contextlib.suppress(Exception):
                    locks.unlock(k)
                raise
            log_event(
                log,
                logging.INFO,
                "partition_acquired",
                "partition acquired",
                group=self.group.name,
                partition=k,
                members=members,
            )

    def _drop(self, partition: int) -> None:
        self._held.discard(partition)
        if self._source is not None:
            self._source.close_queue(self.group.partition_queue(partition))

    def _reclaim(self, source: _RedisSource) -> None:
        locks = self._locks
        assert locks is not None
        for instance in source.instances():
            if instance == self.instance or not 0 <= instance < INSTANCE_SPAN:
                continue
            if not locks.try_lock(INSTANCE_BASE + instance):
                continue  # alive
            try:
                moved = source.reclaim_instance(instance)
            finally:
                locks.unlock(INSTANCE_BASE + instance)
            if moved:
                log_event(
                    log,
                    logging.WARNING,
                    "instance_reclaimed",
                    "a stopped consumer's in-flight messages went back to the queue",
                    group=self.group.name,
                    instance=instance,
                    messages=moved,
                )

    def _export_lag(self) -> None:
        if self.metrics is None:
            return
        try:
            value = lag(self.group, url=self.url, peek=not self.group.ordered)
        except Exception as error:
            log_event(
                log,
                logging.DEBUG,
                "lag_unavailable",
                "could not measure lag",
                group=self.group.name,
                error=_describe(error),
            )
            return
        self.metrics.set_lag(self.group.name, value)

    def _teardown(self) -> None:
        # Give messages back (close channels / restore in-flight lists) BEFORE releasing the
        # partitions, so the next holder cannot see a later message first.
        source, self._source = self._source, None
        if source is not None:
            with contextlib.suppress(Exception):
                source.shutdown()
        self._held.clear()
        locks, self._locks = self._locks, None
        if locks is not None:
            locks.close()


# --------------------------------------------------------------------------------------------
# Administration: topology, lag, parked aggregates, replay
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _broker_call(url: str, what: str) -> Iterator[None]:
    """Broker driver errors -> BrokerUnavailable, naming the broker (never its password)."""
    errors = _broker_errors(url)
    try:
        yield
    except OutboxError:
        raise
    except errors as error:
        raise BrokerUnavailable(
            f"broker {_safe(url)} unavailable while {what}: {_describe(error)}"
        ) from error


def _resolve(settings: Settings | None, url: str | None) -> tuple[Settings | None, str]:
    if url is not None:
        return settings, url
    settings = settings or Settings.from_env()
    return settings, settings.effective_publish_url


def declare_topology(
    group: ConsumerGroup | str,
    *,
    settings: Settings | None = None,
    url: str | None = None,
    exchange: str | None = None,
    partitions: int | None = None,
) -> None:
    """Create the group's queues and bindings (idempotent). Do it before the first events you
    want the group to see are published: a queue receives only what arrives after it is bound.
    """
    target = _admin_group(group, partitions)
    settings, url = _resolve(settings, url)
    exchange_name = exchange or (settings.exchange if settings else Settings().exchange)

    conn: Any = _connection(url)
    try:
        with _broker_call(url, "declaring the group's queues"):
            _declare(conn.channel(), _kombu_queues(target, exchange_name, _is_amqp(url)))
    finally:
        with contextlib.suppress(Exception):
            conn.release()


def delete_topology(
    group: ConsumerGroup | str,
    *,
    settings: Settings | None = None,
    url: str | None = None,
    exchange: str | None = None,
    partitions: int | None = None,
) -> None:
    """Delete the group's queues (with their bindings), in-flight lists and dead-letter queue.
    Their messages are lost: for tests and for retiring a group."""
    target = _admin_group(group, partitions)
    settings, url = _resolve(settings, url)
    exchange_name = exchange or (settings.exchange if settings else Settings().exchange)

    amqp = _is_amqp(url)
    conn: Any = _connection(url)
    try:
        for queue in _kombu_queues(target, exchange_name, amqp):
            channel = conn.channel()
            try:
                bound = queue(channel)
                if not amqp:
                    # kombu's Redis transport removes the bindings it knows of in this
                    # connection: declare them first, so the exchange stops routing here.
                    bound.declare()
                bound.delete()
            except Exception:
                pass
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
        if not amqp:
            import redis

            client: Any = redis.Redis.from_url(url)
            try:
                keys = [f"{q}.inflight" for q in target.queues]
                keys += [f"{target.dead_letter_queue}.replaying", f"{target.queue}.instances"]
                keys += [k for k in client.scan_iter(match=f"{target.queue}.inflight.*")]
                client.delete(*keys)
            finally:
                client.close()
    finally:
        with contextlib.suppress(Exception):
            conn.release()


class Lag(NamedTuple):
    """Ready messages in the group's queues, and the age of the oldest one (None: empty or not
    measurable)."""

    messages: int
    oldest_age_seconds: float | None


def _age_of(body: bytes, now: datetime) -> float | None:
    try:
        data = json.loads(body)
        occurred = datetime.fromisoformat(str(data["occurred_at"]))
    except (ValueError, TypeError, KeyError):
        return None
    if occurred.tzinfo is None:
        occurred = occurred.replace(tzinfo=UTC)
    return max(0.0, (now - occurred).total_seconds())


def lag(
    group: ConsumerGroup | str,
    *,
    settings: Settings | None = None,
    url: str | None = None,
    partitions: int | None = None,
    peek: bool = True,
) -> Lag:
    """How far behind the group is: ready messages in its queues (an ordered group's partition
    queues summed) and the age (now - ``occurred_at``) of the oldest ready one.

    Redis: LLEN and a look at the next message (LINDEX), nothing moves. RabbitMQ: a passive
    declare gives the count; the age needs a peek (basic.get then reject/requeue), done only
    where it cannot disturb order: unordered queues, or a partition queue nobody consumes.
    Otherwise the age is None. ``peek=False`` never peeks.
    """
    target = _admin_group(group, partitions)
    _, url = _resolve(settings, url)
    now = datetime.now(UTC)
    with _broker_call(url, "measuring lag"):
        if _is_amqp(url):
            return _amqp_lag(target, url, now, peek)
        return _redis_lag(target, url, now)


def _redis_lag(group: ConsumerGroup, url: str, now: datetime) -> Lag:
    import redis

    client: Any = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
    try:
        with client.pipeline(transaction=False) as pipe:
            for queue in group.queues:
                pipe.llen(queue)
                pipe.lindex(queue, -1)
            replies = pipe.execute()
    finally:
        client.close()
    total = 0
    oldest: float | None = None
    for length, head in zip(replies[::2], replies[1::2], strict=True):
        total += int(length)
        if head is not None:
            age = _age_of(_decode_redis_item(head)[0], now)
            if age is not None:
                oldest = age if oldest is None else max(oldest, age)
    return Lag(total, oldest)


def _amqp_lag(group: ConsumerGroup, url: str, now: datetime, peek: bool) -> Lag:
    from amqp.exceptions import NotFound

    conn: Any = _connection(url)
    total = 0
    oldest: float | None = None
    try:
        conn.ensure_connection(max_retries=0)
        for queue in group.queues:
            channel = conn.channel()
            try:
                _, count, consumers = channel.queue_declare(queue=queue, passive=True)
            except NotFound:
                continue
            total += int(count)
            if peek and count and (not group.ordered or consumers == 0):
                message = channel.basic_get(queue=queue, no_ack=False)
                if message is not None:
                    age = _age_of(_as_bytes(message.body), now)
                    channel.basic_reject(message.delivery_tag, requeue=True)
                    if age is not None:
                        oldest = age if oldest is None else max(oldest, age)
            with contextlib.suppress(Exception):
                channel.close()
    finally:
        with contextlib.suppress(Exception):
            conn.release()
    return Lag(total, oldest)


def dead_letter_count(
    group: ConsumerGroup | str, *, settings: Settings | None = None, url: str | None = None
) -> int:
    """Messages waiting in the group's dead-letter queue."""
    target = _admin_group(group, None)
    _, url = _resolve(settings, url)
    with _broker_call(url, "counting dead letters"):
        return _dead_letter_count(target, url)


def _dead_letter_count(target: ConsumerGroup, url: str) -> int:
    if _is_amqp(url):
        from amqp.exceptions import NotFound

        conn: Any = _connection(url)
        try:
            try:
                _, count, _ = conn.channel().queue_declare(
                    queue=target.dead_letter_queue, passive=True
                )
            except NotFound:
                return 0
            return int(count)
        finally:
            with contextlib.suppress(Exception):
                conn.release()
    import redis

    client: Any = redis.Redis.from_url(url)
    try:
        return int(client.llen(target.dead_letter_queue))
    finally:
        client.close()


@dataclass(frozen=True, slots=True)
class ParkedAggregate:
    aggregate_type: str
    aggregate_id: str
    parked_at: datetime
    event_id: uuid.UUID | None
    error: str | None
    last_sequence: int
    dead_sequence: int | None


@contextlib.contextmanager
def _engine_for(engine: Engine | None, settings: Settings | None) -> Iterator[Engine]:
    if engine is not None:
        yield engine
        return
    from outbox_tasks.db import make_engine

    made = make_engine(
        settings or Settings.from_env(), application_name="outbox_tasks.consumer", pool_size=1
    )
    try:
        yield made
    finally:
        made.dispose()


def _group_name(group: ConsumerGroup | str) -> str:
    return group.name if isinstance(group, ConsumerGroup) else group


def parked_aggregates(
    group: ConsumerGroup | str,
    *,
    engine: Engine | None = None,
    settings: Settings | None = None,
) -> list[ParkedAggregate]:
    """The aggregates an ordered group has parked, oldest first."""
    from outbox_tasks.db import translate_errors

    with _engine_for(engine, settings) as eng, translate_errors("parked"), eng.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT aggregate_type, aggregate_id, parked_at, parked_event_id, parked_error, "
                "last_sequence, dead_sequence FROM outbox_consumer_position "
                "WHERE consumer_group = :group AND parked_at IS NOT NULL ORDER BY parked_at"
            ),
            {"group": _group_name(group)},
        ).all()
    return [ParkedAggregate(*row) for row in rows]


def unpark(
    group: ConsumerGroup | str,
    aggregate_type: str,
    aggregate_id: str,
    *,
    engine: Engine | None = None,
    settings: Settings | None = None,
) -> bool:
    """Resume a parked aggregate now, SKIPPING what was dead-lettered for it.

    Its high-water mark moves past the dead-lettered events, so the next new event is handled
    and a later replay of the skipped ones is dropped as stale (order is never broken). To
    handle the dead-lettered events instead, fix the handler and :func:`replay_dead_letters`:
    the aggregate then resumes by itself. Returns False when the aggregate was not parked.
    """
    from outbox_tasks.db import translate_errors

    with _engine_for(engine, settings) as eng, translate_errors("unpark"), eng.begin() as conn:
        row = conn.execute(
            text(
                "UPDATE outbox_consumer_position SET parked_at = NULL, parked_event_id = NULL, "
                "parked_error = NULL, updated_at = now(), "
                "last_sequence = greatest(last_sequence, coalesce(dead_sequence, 0)) "
                "WHERE consumer_group = :group AND aggregate_type = :type "
                "AND aggregate_id = :id AND parked_at IS NOT NULL RETURNING last_sequence"
            ),
            {"group": _group_name(group), "type": aggregate_type, "id": str(aggregate_id)},
        ).first()
    if row is not None:
        log_event(
            log,
            logging.INFO,
            "aggregate_unparked",
            "aggregate unparked by an operator; its dead-lettered events are skipped",
            group=_group_name(group),
            aggregate_type=aggregate_type,
            aggregate_id=str(aggregate_id),
            resumes_after_sequence=int(row[0]),
        )
    return row is not None


@dataclass(frozen=True, slots=True)
class _Dead:
    """A dead-lettered message read back for a replay."""

    body: bytes
    headers: dict[str, Any]
    event: Event | None


def replay_dead_letters(
    group: ConsumerGroup | str,
    *,
    settings: Settings | None = None,
    url: str | None = None,
    partitions: int | None = None,
    limit: int = 10_000,
) -> int:
    """Move up to ``limit`` messages from the group's dead-letter queue back to its queue(s).

    They go back sorted by sequence, each to the queue that handles its aggregate (an ordered
    group's partition queue), marked ``outbox-consumer-replayed``. A parked aggregate accepts
    its replayed events in order and resumes by itself after the last one; one that fails
    again goes back to the dead-letter queue. Messages that are not outbox envelopes stay in
    the dead-letter queue. Returns how many were replayed. Run one replay at a time per group.
    """
    target = _admin_group(group, partitions)
    settings, url = _resolve(settings, url)
    exchange = settings.exchange if settings else Settings().exchange
    amqp = _is_amqp(url)
    queues = {q.name: q for q in _kombu_queues(target, exchange, amqp)}
    writer = _BrokerWriter(url, settings.broker_timeout_seconds if settings else 10.0)
    try:
        with _broker_call(url, "replaying dead letters"):
            if amqp:
                replayed = _replay_amqp(target, url, queues, writer, limit)
            else:
                replayed = _replay_redis(target, url, queues, writer, limit)
    finally:
        writer.close()
    log_event(
        log,
        logging.INFO,
        "dead_letters_replayed",
        "dead letters moved back to the group's queues",
        group=target.name,
        replayed=replayed,
    )
    return replayed


def _replay_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in headers.items() if k not in DEAD_LETTER_HEADERS}
    previous = out.get(H_CONSUMER_REPLAYED, 0)
    count = previous if isinstance(previous, int) and not isinstance(previous, bool) else 0
    out[H_CONSUMER_REPLAYED] = count + 1
    return out


def _parse_dead(body: bytes, headers: Mapping[str, Any]) -> Event | None:
    try:
        return parse_event(body, headers)
    except InvalidEvent:
        return None


def _republish(
    group: ConsumerGroup, items: list[_Dead], queues: Mapping[str, Any], writer: _BrokerWriter
) -> int:
    valid = sorted(
        ((d, d.event) for d in items if d.event is not None), key=lambda pair: pair[1].sequence
    )
    for dead, event in valid:
        queue = group.queue_for(event.aggregate_type, event.aggregate_id)
        writer.send(
            queue,
            dead.body,
            _replay_headers(dead.headers),
            str(event.id),
            declare=queues[queue],
        )
    return len(valid)


def _replay_amqp(
    group: ConsumerGroup, url: str, queues: Mapping[str, Any], writer: _BrokerWriter, limit: int
) -> int:
    from amqp.exceptions import NotFound

    conn: Any = _connection(url)
    try:
        channel = conn.channel()
        items: list[_Dead] = []
        raw: list[tuple[Any, bool]] = []
        try:
            channel.queue_declare(queue=group.dead_letter_queue, passive=True)
        except NotFound:
            return 0
        while len(items) < limit:
            message = channel.basic_get(queue=group.dead_letter_queue, no_ack=False)
            if message is None:
                break
            body = _as_bytes(message.body)
            headers = dict(message.headers or {})
            event = _parse_dead(body, headers)
            items.append(_Dead(body, headers, event))
            raw.append((message, event is not None))
        count = _republish(group, items, queues, writer)
        for message, valid in raw:
            if valid:
                channel.basic_ack(message.delivery_tag)
            else:
                channel.basic_reject(message.delivery_tag, requeue=True)
        return count
    finally:
        with contextlib.suppress(Exception):
            conn.release()


def _replay_redis(
    group: ConsumerGroup, url: str, queues: Mapping[str, Any], writer: _BrokerWriter, limit: int
) -> int:
    import redis

    client: Any = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)
    dead = group.dead_letter_queue
    replaying = f"{dead}.replaying"
    try:
        moved = 0
        while moved < limit:
            if client.lmove(dead, replaying, "RIGHT", "LEFT") is None:
                break
            moved += 1
        # Oldest first (a previous, interrupted replay's leftovers included).
        stored = list(reversed(client.lrange(replaying, 0, -1)))
        items: list[_Dead] = []
        invalid: list[bytes] = []
        for item in stored:
            body, headers, _, _ = _decode_redis_item(item)
            event = _parse_dead(body, headers)
            if event is None:
                invalid.append(item)
            items.append(_Dead(body, headers, event))
        count = _republish(group, items, queues, writer)
        with client.pipeline(transaction=True) as pipe:
            pipe.delete(replaying)
            for item in invalid:
                pipe.lpush(dead, item)
            pipe.execute()
        return count
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# Command line: ``outbox-tasks consume`` and ``outbox-tasks consumers ...``
# --------------------------------------------------------------------------------------------


def add_consume_parser(sub: Any) -> None:
    """Register ``consume`` (run a consumer process) and ``consumers`` (lag, parked, unpark,
    replay) on the ``outbox-tasks`` sub-parsers."""
    db_help = (
        f"database holding the handler's tables and the receipts (env {env_var('database_url')})"
    )
    broker_help = (
        f"broker events arrive on (env {env_var('publish_url')}, else {env_var('broker_url')})"
    )
    consume = sub.add_parser(
        "consume",
        help="run a consumer group process: idempotent (and optionally ordered) event handling",
        description="Consume outbox events with a handler `on_event(event, session)`. Each event "
        "is handled in one database transaction with its receipt, and acknowledged after the "
        "commit. SIGTERM/SIGINT finish the message in hand and exit.",
    )
    consume.add_argument("--group", required=True, help="consumer group name")
    consume.add_argument(
        "--bind",
        action="append",
        required=True,
        metavar="PATTERN",
        help="routing-key pattern, `<aggregate_type>.<event_type>` (e.g. 'Order.*'); repeatable",
    )
    consume.add_argument("--handler", required=True, help="the handler, 'package.module:function'")
    consume.add_argument(
        "--partitions",
        type=int,
        default=0,
        help="ordered per aggregate with N partition queues (0: unordered, the default); "
        "every process of the group must use the same N",
    )
    consume.add_argument(
        "--prefetch", type=int, default=50, help="unacknowledged messages per queue (RabbitMQ)"
    )
    consume.add_argument("--max-attempts", type=int, default=5, help="attempts before the DLQ")
    consume.add_argument(
        "--backoff-base", type=float, default=0.5, help="first retry delay, seconds"
    )
    consume.add_argument("--backoff-max", type=float, default=30.0, help="retry delay cap")
    consume.add_argument("--database-url", help=db_help)
    consume.add_argument("--broker-url", help=broker_help)
    consume.add_argument("--exchange", help=f"topic exchange (env {env_var('exchange')})")
    consume.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics (and lag gauges) on this port (0: off)",
    )
    consume.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    consume.set_defaults(func=run_consume)

    admin = sub.add_parser("consumers", help="consumer groups: lag, parked aggregates, replay")
    actions = admin.add_subparsers(dest="consumers_command", required=True)

    def common(parser: argparse.ArgumentParser, *, broker: bool, db: bool) -> None:
        parser.add_argument("--group", required=True, help="consumer group name")
        parser.add_argument(
            "--partitions", type=int, default=0, help="the group's partition count (0: unordered)"
        )
        if broker:
            parser.add_argument("--broker-url", help=broker_help)
            parser.add_argument("--exchange", help=f"topic exchange (env {env_var('exchange')})")
        if db:
            parser.add_argument("--database-url", help=db_help)
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    lag_cmd = actions.add_parser("lag", help="ready messages, oldest age, dead letters")
    common(lag_cmd, broker=True, db=False)
    lag_cmd.set_defaults(func=_cmd_lag)
    parked_cmd = actions.add_parser("parked", help="aggregates an ordered group has parked")
    common(parked_cmd, broker=False, db=True)
    parked_cmd.set_defaults(func=_cmd_parked)
    unpark_cmd = actions.add_parser(
        "unpark", help="resume a parked aggregate, skipping its dead-lettered events"
    )
    common(unpark_cmd, broker=False, db=True)
    unpark_cmd.add_argument("--aggregate-type", required=True)
    unpark_cmd.add_argument("--aggregate-id", required=True)
    unpark_cmd.set_defaults(func=_cmd_unpark)
    replay_cmd = actions.add_parser(
        "replay", help="move dead letters back to the group's queues, in sequence order"
    )
    common(replay_cmd, broker=True, db=False)
    replay_cmd.add_argument("--limit", type=int, default=10_000, help="at most this many")
    replay_cmd.set_defaults(func=_cmd_replay)


def _cli_settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "database_url", None):
        overrides["database_url"] = args.database_url
    if getattr(args, "broker_url", None):
        overrides["publish_url"] = args.broker_url
    if getattr(args, "exchange", None):
        overrides["exchange"] = args.exchange
    return Settings.from_env(**overrides)


def run_consume(args: argparse.Namespace) -> int:
    from outbox_tasks.logs import configure

    configure(args.log_level.upper())
    settings = _cli_settings(args)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `celery -A`: the handler is found from here
    group = ConsumerGroup(
        name=args.group,
        bindings=tuple(args.bind),
        handler=load_handler(args.handler),
        partitions=args.partitions,
        max_attempts=args.max_attempts,
        backoff_base_seconds=args.backoff_base,
        backoff_max_seconds=args.backoff_max,
        prefetch=args.prefetch,
    )
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    consumer = Consumer(group, settings, export_lag=bool(args.metrics_port))

    def on_signal(signum: int, frame: object) -> None:
        log_event(
            log,
            logging.INFO,
            "consumer_stopping",
            "signal received: finishing the message in hand",
            group=group.name,
            signal=signal.Signals(signum).name,
        )
        consumer.stop()
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    consumer.run()
    return 0


def _cmd_lag(args: argparse.Namespace) -> int:
    settings = _cli_settings(args)
    group = _admin_group(args.group, args.partitions)
    value = lag(group, settings=settings)
    dead = dead_letter_count(group, settings=settings)
    if args.json:
        print(
            json.dumps(
                {
                    "group": group.name,
                    "messages": value.messages,
                    "oldest_age_seconds": value.oldest_age_seconds,
                    "dead_letters": dead,
                }
            )
        )
    else:
        age = "-" if value.oldest_age_seconds is None else f"{value.oldest_age_seconds:.1f}s"
        print(f"{group.name}: {value.messages} ready, oldest {age}, {dead} dead letters")
    return 0


def _cmd_parked(args: argparse.Namespace) -> int:
    rows = parked_aggregates(args.group, settings=_cli_settings(args))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], default=str))
        return 0
    if not rows:
        print(f"{args.group}: no parked aggregates")
    for r in rows:
        print(
            f"{r.aggregate_type}/{r.aggregate_id} parked at {r.parked_at.isoformat()} "
            f"(event {r.event_id}, dead-lettered up to sequence {r.dead_sequence}): {r.error}"
        )
    return 0


def _cmd_unpark(args: argparse.Namespace) -> int:
    done = unpark(args.group, args.aggregate_type, args.aggregate_id, settings=_cli_settings(args))
    if args.json:
        print(json.dumps({"unparked": done}))
    else:
        print("unparked" if done else "not parked: nothing to do")
    return 0 if done else 1


def _cmd_replay(args: argparse.Namespace) -> int:
    count = replay_dead_letters(
        args.group, settings=_cli_settings(args), partitions=args.partitions, limit=args.limit
    )
    print(json.dumps({"replayed": count}) if args.json else f"replayed {count} dead letters")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m outbox_tasks.consumer consume ...`` (the same as ``outbox-tasks consume``)."""
    parser = argparse.ArgumentParser(prog="python -m outbox_tasks.consumer")
    add_consume_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigurationError as error:
        print(f"outbox-tasks: configuration error: {error}", file=sys.stderr)
        return 2
    except OutboxError as error:
        print(f"outbox-tasks: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from outbox_tasks.consumer import main as _main  # the importable module, not __main__

    raise SystemExit(_main())
