"""Administration of a group: lag, dead letters waiting, parked aggregates, unpark."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

from sqlalchemy.engine import Engine

from outbox_tasks.broker import (
    as_bytes,
    broker_call,
    decode_redis_item,
    is_amqp,
    redis_client,
    released,
)
from outbox_tasks.consumer import store
from outbox_tasks.consumer.brokers import resolve
from outbox_tasks.consumer.events import aware_time
from outbox_tasks.consumer.group import ConsumerGroup, admin_group
from outbox_tasks.consumer.metrics import Lag
from outbox_tasks.logs import event as log_event
from outbox_tasks.logs import get_logger
from outbox_tasks.settings import Settings

log = get_logger("consumer")


def _age_of(body: bytes, now: datetime) -> float | None:
    try:
        data = json.loads(body)
        occurred = aware_time(data["occurred_at"])
    except (ValueError, TypeError, KeyError):
        return None
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
    target = admin_group(group, partitions)
    _, url = resolve(settings, url)
    now = datetime.now(UTC)
    with broker_call(url, "measuring lag"):
        if is_amqp(url):
            return _amqp_lag(target, url, now, peek)
        return _redis_lag(target, url, now)


def _redis_lag(group: ConsumerGroup, url: str, now: datetime) -> Lag:
    with (
        redis_client(url, socket_timeout=10, socket_connect_timeout=10) as client,
        client.pipeline(transaction=False) as pipe,
    ):
        for queue in group.queues:
            pipe.llen(queue)
            pipe.lindex(queue, -1)
        replies = pipe.execute()
    total = 0
    oldest: float | None = None
    for length, head in zip(replies[::2], replies[1::2], strict=True):
        total += int(length)
        if head is not None:
            age = _age_of(decode_redis_item(head)[0], now)
            if age is not None:
                oldest = age if oldest is None else max(oldest, age)
    return Lag(total, oldest)


def _amqp_lag(group: ConsumerGroup, url: str, now: datetime, peek: bool) -> Lag:
    from amqp.exceptions import NotFound

    total = 0
    oldest: float | None = None
    with released(url) as conn:
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
                    age = _age_of(as_bytes(message.body), now)
                    channel.basic_reject(message.delivery_tag, requeue=True)
                    if age is not None:
                        oldest = age if oldest is None else max(oldest, age)
            with contextlib.suppress(Exception):
                channel.close()
    return Lag(total, oldest)


def dead_letter_count(
    group: ConsumerGroup | str, *, settings: Settings | None = None, url: str | None = None
) -> int:
    """Messages waiting in the group's dead-letter queue."""
    target = admin_group(group, None)
    _, url = resolve(settings, url)
    with broker_call(url, "counting dead letters"):
        return _dead_letter_count(target, url)


def _dead_letter_count(target: ConsumerGroup, url: str) -> int:
    if is_amqp(url):
        from amqp.exceptions import NotFound

        with released(url) as conn:
            try:
                _, count, _ = conn.channel().queue_declare(
                    queue=target.dead_letter_queue, passive=True
                )
            except NotFound:
                return 0
            return int(count)
    with redis_client(url) as client:
        return int(client.llen(target.dead_letter_queue))


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
) -> list[store.ParkedAggregate]:
    """The aggregates an ordered group has parked, oldest first."""
    from outbox_tasks.db import translate_errors

    with _engine_for(engine, settings) as eng, translate_errors("parked"), eng.connect() as conn:
        return store.select_parked(conn, _group_name(group))


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
        resumes_after = store.unpark_aggregate(
            conn, _group_name(group), aggregate_type, str(aggregate_id)
        )
    if resumes_after is not None:
        log_event(
            log,
            logging.INFO,
            "aggregate_unparked",
            "aggregate unparked by an operator; its dead-lettered events are skipped",
            group=_group_name(group),
            aggregate_type=aggregate_type,
            aggregate_id=str(aggregate_id),
            resumes_after_sequence=resumes_after,
        )
    return resumes_after is not None
