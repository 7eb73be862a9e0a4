"""Replay: dead letters back to the group's queues, in sequence order, marked as replayed."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outbox_tasks.broker import (
    as_bytes,
    broker_call,
    decode_redis_item,
    is_amqp,
    redis_client,
    released,
)
from outbox_tasks.consumer.brokers import BrokerWriter, exchange_name, kombu_queues, resolve
from outbox_tasks.consumer.events import Event, parse_event
from outbox_tasks.consumer.group import ConsumerGroup, admin_group
from outbox_tasks.consumer.processing import DEAD_LETTER_HEADERS, H_CONSUMER_REPLAYED
from outbox_tasks.errors import InvalidEvent
from outbox_tasks.logs import event as log_event
from outbox_tasks.logs import get_logger
from outbox_tasks.settings import Settings

log = get_logger("consumer")


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
    target = admin_group(group, partitions)
    settings, url = resolve(settings, url)
    amqp = is_amqp(url)
    queues = {q.name: q for q in kombu_queues(target, exchange_name(settings), amqp)}
    writer = BrokerWriter(url, settings.broker_timeout_seconds if settings else 10.0)
    try:
        with broker_call(url, "replaying dead letters"):
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
    group: ConsumerGroup, items: list[_Dead], queues: Mapping[str, Any], writer: BrokerWriter
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
    group: ConsumerGroup, url: str, queues: Mapping[str, Any], writer: BrokerWriter, limit: int
) -> int:
    from amqp.exceptions import NotFound

    with released(url) as conn:
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
            body = as_bytes(message.body)
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


def _replay_redis(
    group: ConsumerGroup, url: str, queues: Mapping[str, Any], writer: BrokerWriter, limit: int
) -> int:
    dead = group.dead_letter_queue
    replaying = f"{dead}.replaying"
    with redis_client(url, socket_timeout=30, socket_connect_timeout=10) as client:
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
            body, headers, _, _ = decode_redis_item(item)
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
