"""Handling one message, whatever the transport: receipts (idempotency), per-aggregate positions
(order), retries with backoff, dead letters and parking. The outcomes a message can have."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from outbox_tasks.consumer import store
from outbox_tasks.consumer.events import Event, parse_event, truthy
from outbox_tasks.consumer.group import ConsumerGroup
from outbox_tasks.consumer.metrics import ConsumerMetrics
from outbox_tasks.errors import ERROR_TEXT_MAX, InvalidEvent, PartitionLost, describe_error
from outbox_tasks.logs import event as log_event
from outbox_tasks.logs import get_logger
from outbox_tasks.retry import backoff_delay

log = get_logger("consumer")

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
# ordered: at or below the aggregate's high-water mark and never handled by the group: sent to
# the dead-letter queue (a replayed one is dropped: the operator skipped it with unpark)
STALE: Final = "stale"
OTHER_PARTITION: Final = "other_partition"  # ordered: another partition's event: forwarded, acked
DEAD_LETTERED: Final = "dead_lettered"  # retries exhausted: sent to the dead-letter queue
PARKED: Final = "parked"  # ordered: its aggregate is parked: sent to the dead-letter queue
# ordered: follows a missing event of its aggregate; after gap_wait_seconds it is sent to the
# dead-letter queue and parks the aggregate (reason "gap")
GAP: Final = "gap"
INVALID: Final = "invalid"  # not an outbox envelope: sent to the dead-letter queue
REQUEUED: Final = "requeued"  # given back to the broker unhandled (shutdown, partition lost)
OUTCOMES: Final = (
    HANDLED,
    DUPLICATE,
    STALE,
    OTHER_PARTITION,
    DEAD_LETTERED,
    PARKED,
    GAP,
    INVALID,
    REQUEUED,
)
# How often an event waiting behind a gap looks again for the missing one.
GAP_POLL_SECONDS: Final = 0.5


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
"""Inside the handling transaction: does this process still hold the partition? (It also
makes the transaction one that a new holder of the partition ends before it starts.)"""

Forward = Callable[[Delivery, Event, int], None]
"""Publish a delivery to the queue of the partition its event belongs to (confirmed); raise
BrokerUnavailable when that fails."""


@dataclass(frozen=True, slots=True)
class _Verdict:
    outcome: str
    error: str | None = None


class GroupProcessor:
    """Handles deliveries of one group: the same rules in the process form and in Celery.

    ``sleep(seconds)`` waits between attempts and returns False when the process is stopping
    (the message is then given back to the broker instead of retried). ``forward`` sends an
    ordered group's event found in another partition's queue to its own (a change of partition
    count left it there); without it such an event is acknowledged without effect.
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
        forward: Forward | None = None,
    ) -> None:
        self.group = group
        self.engine = engine
        self.sink = sink
        self.metrics = metrics
        if metrics is not None:
            metrics.seed(group.name, OUTCOMES)
        self._sleep = sleep or _plain_sleep
        self._jitter = jitter
        self._on_outcome = on_outcome
        self._forward = forward

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
            return self.record_outcome(INVALID, None, error=str(error))
        if partition is not None and self.group.ordered:
            mine = self.group.partition_of(event.aggregate_type, event.aggregate_id)
            if mine != partition:
                if self._forward is not None:
                    self._forward(delivery, event, mine)
                delivery.ack()
                return self.record_outcome(OTHER_PARTITION, event)
        replayed = truthy(delivery.headers.get(H_CONSUMER_REPLAYED))
        failures = 0
        outages = 0
        gap_since: float | None = None
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
                        error=describe_error(error),
                        retry_in_seconds=round(delay, 3),
                    )
                    if not self._sleep(delay):
                        delivery.requeue()
                        return self.record_outcome(REQUEUED, event)
                    continue
                failures += 1
                text_error = describe_error(error)
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
                    return self.record_outcome(REQUEUED, event)
                continue
            if verdict.outcome == GAP:
                now = time.monotonic()
                if gap_since is None:
                    gap_since = now
                    self._log_gap(event, verdict.error, waiting=True)
                remaining = gap_since + self.group.gap_wait_seconds - now
                if remaining > 0:
                    # Another process may still hand in the missing event (a partition changing
                    # hands); the message stays unacknowledged meanwhile.
                    if not self._sleep(min(GAP_POLL_SECONDS, remaining)):
                        delivery.requeue()
                        return self.record_outcome(REQUEUED, event)
                    continue
                missing = verdict.error or GAP
                self._send_dead_letter(delivery, event, GAP, missing, 0)
                self._park(event, cause=True, error=missing, fence=fence, reason=GAP)
                delivery.ack()
                self._log_gap(event, missing, waiting=False)
                return self.record_outcome(GAP, event, error=missing)
            if verdict.outcome == PARKED:
                self._send_dead_letter(delivery, event, PARKED, "aggregate is parked", 0)
                self._park(event, cause=False, error=None, fence=fence)
                delivery.ack()
                return self.record_outcome(PARKED, event)
            if verdict.outcome == STALE and not replayed:
                # Never handled by this group, yet behind what it handled: not dropped, set
                # aside for an operator (the aggregate keeps flowing).
                self._send_dead_letter(delivery, event, STALE, verdict.error or STALE, 0)
            delivery.ack()
            return self.record_outcome(verdict.outcome, event, error=verdict.error)

    # -- one attempt: one transaction ---------------------------------------------------------

    def _attempt(self, event: Event, replayed: bool, fence: Fence | None) -> _Verdict:
        group = self.group
        resumes = False
        with Session(self.engine) as session, session.begin():
            if not store.insert_receipt(session, group.name, event.id):
                return _Verdict(DUPLICATE)
            position: store.Position | None = None
            if group.ordered:
                position = store.lock_position(session, group.name, event)
                if fence is not None and not fence(session):
                    raise PartitionLost(f"group {group.name}: partition lost")
                behind = _behind(event, position)
                if behind is not None:
                    session.rollback()
                    return _Verdict(STALE, behind)
                gap = _gap(event, position)
                if position.parked and not (
                    replayed
                    and (
                        position.parked_event_id is None
                        or position.parked_event_id == event.id
                        or gap is None
                    )
                ):
                    session.rollback()
                    return _Verdict(PARKED)
                if gap is not None and not position.parked:
                    session.rollback()
                    return _Verdict(GAP, gap)
            group.handler(event, session)
            if position is not None:
                resumes = position.parked and (
                    position.dead_sequence is None or event.sequence >= position.dead_sequence
                )
                store.advance_position(
                    session, group.name, event, resolve=position.parked, unpark=resumes
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

    # -- failures -------------------------------------------------------------------------------

    def _give_up(
        self, delivery: Delivery, event: Event, error: str, attempts: int, fence: Fence | None
    ) -> str:
        self._send_dead_letter(delivery, event, DEAD_LETTERED, error, attempts)
        if self.group.ordered:
            self._park(event, cause=True, error=error, fence=fence)
        delivery.ack()
        return self.record_outcome(DEAD_LETTERED, event, error=error, attempts=attempts)

    def _park(
        self,
        event: Event,
        *,
        cause: bool,
        error: str | None,
        fence: Fence | None,
        reason: str = DEAD_LETTERED,
    ) -> None:
        with Session(self.engine) as session, session.begin():
            if fence is not None and not fence(session):
                raise PartitionLost(f"group {self.group.name}: partition lost")
            store.park_aggregate(
                session, self.group.name, event, cause=cause, error=error, reason=reason
            )

    def _log_gap(self, event: Event, error: str | None, *, waiting: bool) -> None:
        log_event(
            log,
            logging.WARNING if waiting else logging.ERROR,
            "event_gap_wait" if waiting else "event_gap",
            "an earlier event of the aggregate is missing; waiting for it"
            if waiting
            else "an earlier event of the aggregate never came; aggregate parked",
            group=self.group.name,
            event_id=str(event.id),
            aggregate_type=event.aggregate_type,
            aggregate_id=event.aggregate_id,
            aggregate_sequence=event.aggregate_sequence,
            error=error,
            wait_seconds=self.group.gap_wait_seconds,
        )

    def _send_dead_letter(
        self, delivery: Delivery, event: Event | None, reason: str, error: str, attempts: int
    ) -> None:
        headers = {k: v for k, v in delivery.headers.items() if k not in DEAD_LETTER_HEADERS}
        headers.update(
            {
                H_CONSUMER_GROUP: self.group.name,
                H_CONSUMER_REASON: reason,
                H_CONSUMER_ERROR: error[:ERROR_TEXT_MAX],
                H_CONSUMER_ATTEMPTS: attempts,
                H_CONSUMER_DEAD_AT: datetime.now(UTC).isoformat(),
            }
        )
        message_id = str(event.id) if event is not None else (delivery.message_id or "")
        self.sink.send(self.group.dead_letter_queue, delivery.body, headers, message_id)

    def _database_reachable(self) -> bool:
        try:
            with self.engine.connect() as conn:
                store.ping(conn)
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

    def record_outcome(
        self, outcome: str, event: Event | None, *, error: str | None = None, attempts: int = 0
    ) -> str:
        """Count, report (``on_outcome``) and log one message's outcome; returns ``outcome``.
        For callers that settle a delivery themselves too (a requeue after PartitionLost)."""
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
        elif outcome == STALE:
            log_event(
                log,
                logging.WARNING,
                "event_stale",
                "event behind the aggregate's high-water mark, never handled: "
                "sent to the dead-letter queue (a replay of a skipped event: dropped)",
                error=error,
                **fields,
            )
        elif outcome in (PARKED, REQUEUED):
            log_event(log, logging.INFO, f"event_{outcome}", f"event {outcome}", **fields)
        else:
            log_event(log, logging.DEBUG, f"event_{outcome}", f"event {outcome}", **fields)
        return outcome


def _behind(event: Event, position: store.Position) -> str | None:
    """Why the event is at or below the aggregate's high-water mark (None: it is not)."""
    if event.sequence <= position.last_sequence:
        return f"sequence {event.sequence} is not above {position.last_sequence}, already handled"
    number, last = event.aggregate_sequence, position.last_aggregate_sequence
    if number is not None and last is not None and number <= last:
        return f"aggregate_sequence {number} is not above {last}, already handled"
    return None


def _gap(event: Event, position: store.Position) -> str | None:
    """What is missing before the event (None: nothing). A group that has not handled a numbered
    event of the aggregate yet accepts any (a group created later, an unpark)."""
    number, last = event.aggregate_sequence, position.last_aggregate_sequence
    if number is None or last is None:
        return None
    previous = event.previous_aggregate_sequence
    if previous is None:
        previous = number - 1
    if previous <= last:
        return None
    return (
        f"aggregate_sequence {number} follows {previous}, but the group last handled {last}: "
        f"{last + 1}..{previous} never arrived"
    )


def _plain_sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return True
