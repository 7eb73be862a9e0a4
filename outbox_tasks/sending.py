"""Sending one batch, and what happened to each message of it, in one classification.

Every message of a batch ends up in exactly one of these (DESIGN guarantees 4, 6 and 7; the
names are the ``error_type`` label of ``outbox_publish_errors_total`` and the reason a dead
letter starts with):

* published;
* ``invalid_message``: refused by our own checks before sending (``outbox_tasks.limits``), as a
  broker would refuse it whatever happens (routing key over 255 bytes, headers AMQP cannot
  encode, a body over ``OUTBOX_MAX_MESSAGE_BYTES``, a row plain SQL filled with something that
  is not a message). Dead-lettered at once: retrying cannot help;
* ``message_rejected``: the broker refused this message alone; retried with backoff, then
  dead-lettered (its aggregate parks);
* ``unknown_error``: an exception nobody recognised. Treated as ``message_rejected``, logged with
  its type and counted apart;
* ``broker_nack``: backpressure, a healthy broker did not take it now. Retried without spending
  the retry budget for ``OUTBOX_BACKPRESSURE_MAX_SECONDS``, then dead-lettered;
* skipped: an earlier message of its aggregate failed, so it waits (untouched) behind it.

A broker outage (``BrokerUnavailable``) is none of these: it propagates, the relay opens its
circuit and nothing of the batch is marked (the in-flight marker flags every row of it as a
redelivery next time).

When the publisher raises anything else for a batch, nobody knows which message caused it, nor
which went out before it: the batch is sent again one message at a time, each flagged
``outbox-redelivered`` (it may have reached a queue already), and the one that raises again is
the one refused. So no single row can stall a partition, and no row is re-sent in a loop: each
failed attempt re-sends a message at most once more.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from outbox_tasks.broker import (
    BROKER_NACK,
    INVALID_MESSAGE,
    MESSAGE_REJECTED,
    publish_fault,
)
from outbox_tasks.envelope import OutboundMessage
from outbox_tasks.errors import BrokerUnavailable, InvalidMessage, describe_error
from outbox_tasks.limits import (
    check_headers,
    check_message_size,
    check_routing_key,
    routing_key_problem,
)
from outbox_tasks.logs import event, get_logger
from outbox_tasks.protocols import Publisher
from outbox_tasks.retry import GiveUp, decide
from outbox_tasks.settings import Settings
from outbox_tasks.store.records import Failure, Row

log = get_logger("relay")

MAX_ERROR_LENGTH = 2000

Build = Callable[[Row, bool], OutboundMessage]
"""Builds a row's message; the flag says "this is a re-send" (``outbox-redelivered``)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why one message was not published: its error type and the error's text."""

    error_type: str
    text: str


@dataclass
class Sent:
    """What happened to each message of one batch (event ids as strings)."""

    published: list[str] = field(default_factory=list)
    refused: dict[str, Refusal] = field(default_factory=dict)
    maybe_sent: set[str] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)


def problem(row: Row, build: Build, max_message_bytes: int) -> tuple[OutboundMessage | None, str]:
    """The row's message, or why no broker would take it: (None, reason). The built message is
    routing key checked is the built message's, so a builder may shorten it (the dead-letter
    copy does)."""
    try:
        check_headers(row.headers, reserved_prefix=None)
        message = build(row, False)
        routing_problem = routing_key_problem(message.routing_key)
        if routing_problem is not None:
            check_routing_key(row.aggregate_type, row.event_type)  # names both fields
            raise InvalidMessage(routing_problem)
        check_message_size(len(message.body), max_message_bytes)
    except InvalidMessage as error:
        return None, str(error)
    except Exception as error:  # a row plain SQL filled with something that is no message
        return None, f"cannot build the message: {describe_error(error)}"
    return message, ""


def send_batch(
    publisher: Publisher, rows: Sequence[Row], build: Build, *, max_message_bytes: int
) -> Sent:
    """Check, send and classify one batch of rows (in ``seq`` order). Raises only
    ``BrokerUnavailable`` (an outage)."""
    sent = Sent()
    messages: list[OutboundMessage] = []
    dead: set[tuple[str, str]] = set()
    for row in rows:
        key = (row.aggregate_type, row.aggregate_id)
        if key in dead:
            sent.skipped.append(str(row.id))
            continue
        message, reason = problem(row, build, max_message_bytes)
        if message is None:
            sent.refused[str(row.id)] = Refusal(INVALID_MESSAGE, reason)
            dead.add(key)
        else:
            messages.append(message)
    if not messages:
        return sent
    try:
        outcome = publisher.publish_batch(messages)
    except BrokerUnavailable:
        raise
    except Exception as error:
        by_id = {str(row.id): row for row in rows}
        _isolate(publisher, [by_id[m.event_id] for m in messages], build, error, sent)
        return sent
    sent.published += outcome.published
    sent.skipped += outcome.skipped
    sent.maybe_sent |= set(outcome.maybe_sent)
    for event_id, text in outcome.failed.items():
        sent.refused[event_id] = Refusal(MESSAGE_REJECTED, text)
    for event_id, text in outcome.deferred.items():
        sent.refused[event_id] = Refusal(BROKER_NACK, text)
    return sent


def _isolate(
    publisher: Publisher, rows: Sequence[Row], build: Build, error: Exception, sent: Sent
) -> None:
    """The publisher raised for the batch: send it again one message at a time, each flagged as
    a re-send, to find the message(s) at fault."""
    event(
        log,
        logging.WARNING,
        "publish_isolating",
        "the publisher raised an unclassified error for a batch; sending it one by one",
        error_type=type(error).__name__,
        error=describe_error(error),
        rows=len(rows),
    )
    dead: set[tuple[str, str]] = set()
    for row in rows:
        event_id = str(row.id)
        key = (row.aggregate_type, row.aggregate_id)
        if key in dead:
            sent.skipped.append(event_id)
            # The failed batch may have carried it to a queue already.
            sent.maybe_sent.add(event_id)
            continue
        try:
            outcome = publisher.publish_batch([build(row, True)])
        except BrokerUnavailable:
            raise
        except Exception as again:
            sent.refused[event_id] = Refusal(publish_fault(again), describe_error(again))
        else:
            if event_id in outcome.published:
                sent.published.append(event_id)
                continue
            if event_id in outcome.deferred:
                sent.refused[event_id] = Refusal(BROKER_NACK, outcome.deferred[event_id])
            else:
                text = outcome.failed.get(event_id, "not published by the publisher")
                sent.refused[event_id] = Refusal(MESSAGE_REJECTED, text)
        sent.maybe_sent.add(event_id)
        dead.add(key)


def failures(
    rows: Sequence[Row], sent: Sent, settings: Settings, jitter: Callable[[], float]
) -> list[Failure]:
    """What to record for each refused row: park at once (``invalid_message``), back off
    without spending a retry (``broker_nack``), or spend one (everything else)."""
    result: list[Failure] = []
    if not sent.refused:
        return result
    for row in rows:
        refusal = sent.refused.get(str(row.id))
        if refusal is None:
            continue
        text = refusal.text
        if refusal.error_type != MESSAGE_REJECTED:
            text = f"{refusal.error_type}: {text}"
        text = text[:MAX_ERROR_LENGTH]
        if refusal.error_type == INVALID_MESSAGE:
            result.append(Failure(row.id, row.retry_count + 1, text, delay_seconds=None))
        elif refusal.error_type == BROKER_NACK:
            result.append(
                Failure(
                    row.id,
                    row.retry_count,
                    text,
                    delay_seconds=settings.backoff_base_seconds * (0.5 + jitter() / 2),
                    patience_seconds=settings.backpressure_max_seconds,
                )
            )
        else:
            decision = decide(
                row.retry_count,
                max_retries=settings.max_retries,
                base_seconds=settings.backoff_base_seconds,
                max_seconds=settings.backoff_max_seconds,
                jitter=jitter(),
            )
            delay = None if isinstance(decision, GiveUp) else decision.delay_seconds
            result.append(Failure(row.id, decision.retry_count, text, delay_seconds=delay))
    return result


def ids(event_ids: set[str] | list[str]) -> list[uuid.UUID]:
    """Event id strings as UUIDs, for the store."""
    return [uuid.UUID(i) for i in event_ids]
