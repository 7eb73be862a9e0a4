# kombu is only partly annotated.
# mypy: disable-error-code="no-untyped-call"
"""Consumer groups against real PostgreSQL and Redis/RabbitMQ, consumers run in-process on a
thread: idempotency, retries, stale events, dead letters, parking, replay, lag.

Every test has its own database, exchange and group names, and deletes its queues afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from kombu.connection import Connection
from kombu.entity import Exchange
from kombu.messaging import Producer
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from outbox_tasks.broker import decode_redis_item
from outbox_tasks.consumer import (
    DEAD_LETTERED,
    DUPLICATE,
    HANDLED,
    INVALID,
    OTHER_PARTITION,
    PARKED,
    STALE,
    BrokerWriter,
    Consumer,
    ConsumerGroup,
    Event,
    EventHandler,
    Lag,
    declare_topology,
    kombu_queues,
    lag,
    parked_aggregates,
    replay_dead_letters,
    unpark,
)
from outbox_tasks.errors import ConfigurationError
from outbox_tasks.settings import Settings
from tests.integration.test_consumer_kit import (
    broker_settings,
    cleaned_up,
    create_effects,
    effect_count,
    effects,
    group_name,
    message,
    on_event,
    publish,
    receipts,
    running,
)
from tests.support.kit import wait_until
from tests.support.services import ROOT

pytestmark = pytest.mark.timeout(120)


@dataclass
class Env:
    settings: Settings
    engine: Engine
    kind: str

    def group(self, handler: EventHandler = on_event, **options: Any) -> ConsumerGroup:
        options.setdefault("backoff_base_seconds", 0.01)
        options.setdefault("backoff_max_seconds", 0.05)
        return ConsumerGroup(group_name(), ("Order.*",), handler, **options)

    def consumer(self, group: ConsumerGroup, **options: Any) -> Consumer:
        return Consumer(group, self.settings, engine=self.engine, **options)


@pytest.fixture(params=["redis", "amqp"])
def env(request: pytest.FixtureRequest, settings: Settings, engine: Engine) -> Iterator[Env]:
    create_effects(engine)
    yield Env(broker_settings(request, settings, request.param), engine, request.param)


@pytest.fixture
def amqp_env(request: pytest.FixtureRequest, settings: Settings, engine: Engine) -> Env:
    create_effects(engine)
    return Env(broker_settings(request, settings, "amqp"), engine, "amqp")


@pytest.fixture
def redis_env(request: pytest.FixtureRequest, settings: Settings, engine: Engine) -> Env:
    create_effects(engine)
    return Env(settings, engine, "redis")


def settled(consumer: Consumer) -> int:
    return sum(consumer.outcomes.values())


def wait_settled(consumer: Consumer, count: int, timeout: float = 30.0) -> None:
    wait_until(
        lambda: settled(consumer) >= count,
        timeout=timeout,
        what=f"{count} messages settled (so far {dict(consumer.outcomes)})",
    )


def dead_letters(env: Env, group: ConsumerGroup) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(body, headers) of each message in the group's dead-letter queue, oldest first; the
    queue is left as it was."""
    url = env.settings.effective_publish_url
    if env.kind == "redis":
        client = redis.Redis.from_url(url)
        try:
            items = list(reversed(client.lrange(group.dead_letter_queue, 0, -1)))
        finally:
            client.close()
        out = []
        for item in items:
            body, headers, _, _ = decode_redis_item(item)
            out.append((json.loads(body), headers))
        return out
    with Connection(url) as conn:
        channel = conn.channel()
        out = []
        while True:
            got = channel.basic_get(group.dead_letter_queue, no_ack=False)
            if got is None:
                break
            out.append((json.loads(got.body), dict(got.headers)))
        channel.close()  # requeues them all, in place
        return out


def metric(group: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "outbox_consumer_messages_total", {"group": group, "outcome": outcome}
    )
    return value or 0.0


def gauge(name: str, group: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"group": group})


# --- idempotency ------------------------------------------------------------------------------


def test_the_same_message_delivered_three_times_has_one_effect(env: Env) -> None:
    group = env.group()
    declare_topology(group, settings=env.settings)
    event_id = uuid.uuid4()
    with cleaned_up(env.settings, [(group.name, 0)]):
        publish(env.settings, [message("o-1", 1, event_id=event_id) for _ in range(3)])
        with running(env.consumer(group)) as consumer:
            wait_settled(consumer, 3)

        assert consumer.outcomes == {HANDLED: 1, DUPLICATE: 2}
        assert [row.event_id for row in effects(env.engine)] == [event_id]
        assert receipts(env.engine, group.name) == 1
        assert metric(group.name, HANDLED) == 1
        assert metric(group.name, DUPLICATE) == 2
        assert lag(group, settings=env.settings).messages == 0


def test_a_handler_that_fails_then_succeeds_has_one_effect(env: Env) -> None:
    group = env.group(max_attempts=5)
    declare_topology(group, settings=env.settings)
    with cleaned_up(env.settings, [(group.name, 0)]):
        publish(env.settings, [message("o-1", 1, payload={"fail_attempts": 2})])
        with running(env.consumer(group)) as consumer:
            wait_settled(consumer, 1)

        assert consumer.outcomes == {HANDLED: 1}
        rows = effects(env.engine)
        assert len(rows) == 1  # the two failed attempts rolled their effects back
        assert rows[0].attempt == 3
        assert receipts(env.engine, group.name) == 1


def test_the_handler_sees_the_typed_envelope_and_its_headers(env: Env) -> None:
    seen: list[Event] = []

    def handler(event: Event, session: Session) -> None:
        seen.append(event)

    group = env.group(handler)
    declare_topology(group, settings=env.settings)
    sent = message("o-7", 42, payload={"amount": "9.99"}, redelivered=True)
    with cleaned_up(env.settings, [(group.name, 0)]):
        publish(env.settings, [sent])
        with running(env.consumer(group)) as consumer:
            wait_settled(consumer, 1)

    [event] = seen
    assert str(event.id) == sent.event_id
    assert (event.aggregate_type, event.aggregate_id, event.event_type) == (
        "Order",
        "o-7",
        "OrderPlaced",
    )
    assert event.sequence == 42 and event.schema_version == 1
    assert event.payload == {"amount": "9.99"}
    assert event.headers["traceparent"] == "00-test-01"
    assert event.redelivered is True  # outbox-redelivered travels to the handler
    assert event.attempt == 1
    assert event.occurred_at.tzinfo is not None


# --- order ------------------------------------------------------------------------------------


def test_an_event_behind_the_high_water_mark_is_never_applied_but_set_aside(env: Env) -> None:
    group = env.group(partitions=1)
    declare_topology(group, settings=env.settings)
    first = message("o-1", 10)
    with cleaned_up(env.settings, [(group.name, 1)]):
        publish(env.settings, [first, message("o-1", 20)])
        with running(env.consumer(group)) as consumer:
            wait_settled(consumer, 2)
            # Receipts are purged after a while (retention): a late redelivery of the first
            # event, and an older event never seen before, must still not be applied.
            with env.engine.begin() as conn:
                conn.execute(text("DELETE FROM outbox_consumer_receipt"))
            publish(
                env.settings,
                [
                    message("o-1", 10, event_id=uuid.UUID(first.event_id), redelivered=True),
                    message("o-1", 15),
                ],
            )
            wait_settled(consumer, 4)

        assert consumer.outcomes == {HANDLED: 2, STALE: 2}
        assert [row.sequence for row in effects(env.engine)] == [10, 20]
        # Not dropped: the group never handled them (no receipt), so an operator gets them.
        dead = dead_letters(env, group)
        assert [(b["sequence"], h["outbox-consumer-reason"]) for b, h in dead] == [
            (10, STALE),
            (15, STALE),
        ]


def test_each_event_of_an_ordered_group_reaches_exactly_one_partition_queue(env: Env) -> None:
    group = env.group(partitions=4)
    declare_topology(group, settings=env.settings)
    events = [message(f"o-{n}", n + 1) for n in range(40)]
    with cleaned_up(env.settings, [(group.name, 4)]):
        publish(env.settings, events)
        # Broker messages per event: 1 (the four queues together hold 40 messages).
        assert lag(group, settings=env.settings, peek=False).messages == len(events)
        with running(env.consumer(group)) as consumer:
            wait_settled(consumer, len(events))
            assert consumer.held_partitions == frozenset(range(4))

        # No event was found in another partition's queue.
        assert consumer.outcomes == {HANDLED: 40}
        assert consumer.held_partitions == frozenset()  # released on stop
        assert sorted(row.aggregate_id for row in effects(env.engine)) == sorted(
            f"o-{n}" for n in range(40)
        )


def test_an_event_found_in_another_partitions_queue_is_forwarded_to_its_own(env: Env) -> None:
    group = env.group(partitions=2)
    declare_topology(group, settings=env.settings)
    stray = next(
        m
        for n in range(100)
        if group.partition_of("Order", (m := message(f"o-{n}", 1)).aggregate_id) == 1
    )
    writer = BrokerWriter(env.settings.effective_publish_url, 10.0)
    queues = {q.name: q for q in kombu_queues(group, env.settings.exchange, env.kind == "amqp")}
    with cleaned_up(env.settings, [(group.name, 2)]):
        # Left in partition 0's queue by a change of partition count.
        writer.send(
            group.partition_queue(0),
            stray.body,
            stray.headers,
            stray.event_id,
            declare=queues[group.partition_queue(0)],
        )
        writer.close()
        with running(env.consumer(group)) as consumer:
            wait_settled(consumer, 2)

        assert consumer.outcomes == {OTHER_PARTITION: 1, HANDLED: 1}
        assert [str(row.event_id) for row in effects(env.engine)] == [stray.event_id]


def test_a_group_started_with_another_partition_count_rebinds_its_queues_when_they_are_empty(
    env: Env,
) -> None:
    two = env.group(partitions=2)
    three = replace(two, partitions=3)
    with cleaned_up(env.settings, [(two.name, 2), (two.name, 3)]):
        with running(env.consumer(two)):
            pass
        publish(env.settings, [message("o-1", 1)])
        # A message routed for two partitions waits: three would read it from the wrong queue.
        with pytest.raises(ConfigurationError, match="partitions=2"):
            env.consumer(three).run()
        with running(env.consumer(two)) as consumer:
            wait_settled(consumer, 1)
        with running(env.consumer(three)) as consumer:
            events = [message(f"o-{n}", 2) for n in range(30)]
            publish(env.settings, events)
            wait_settled(consumer, len(events))
            assert consumer.outcomes == {HANDLED: len(events)}  # one queue each, the right one
        assert lag(three, settings=env.settings, peek=False).messages == 0


def test_a_partition_queue_left_in_flight_on_redis_is_restored_first_by_the_next_holder(
    redis_env: Env,
) -> None:
    env = redis_env
    group = env.group(partitions=1)
    declare_topology(group, settings=env.settings)
    with cleaned_up(env.settings, [(group.name, 1)]):
        publish(env.settings, [message("o-1", 1), message("o-1", 2)])
        client = redis.Redis.from_url(env.settings.effective_publish_url)
        queue = group.partition_queue(0)
        # A holder took the first event and died before acknowledging it.
        assert client.lmove(queue, f"{queue}.inflight", "RIGHT", "LEFT") is not None
        publish(env.settings, [message("o-1", 3)])
        with running(env.consumer(group)) as consumer:
            wait_settled(consumer, 3)
        client.close()

        assert consumer.outcomes == {HANDLED: 3}
        assert [row.sequence for row in effects(env.engine)] == [1, 2, 3]


def test_an_unordered_redis_consumer_gives_back_the_messages_of_a_dead_one(
    redis_env: Env,
) -> None:
    env = redis_env
    group = env.group()
    declare_topology(group, settings=env.settings)
    with cleaned_up(env.settings, [(group.name, 0)]):
        publish(env.settings, [message("o-1", 1)])
        client = redis.Redis.from_url(env.settings.effective_publish_url)
        # Another process (instance 12345, whose liveness lock nobody holds) took the message
        # and was killed before acknowledging it.
        assert client.lmove(group.queue, f"{group.queue}.inflight.12345", "RIGHT", "LEFT")
        client.sadd(f"{group.queue}.instances", "12345")
        with running(env.consumer(group, reclaim_interval_seconds=0.2)) as consumer:
            wait_settled(consumer, 1)
        assert client.llen(f"{group.queue}.inflight.12345") == 0
        assert client.smembers(f"{group.queue}.instances") == set()
        client.close()

        assert consumer.outcomes == {HANDLED: 1}
        assert effect_count(env.engine) == 1


# --- failures, dead letters, parking ----------------------------------------------------------


def test_failures_go_to_the_dead_letter_queue_after_the_limit(env: Env) -> None:
    group = env.group(max_attempts=3)
    declare_topology(group, settings=env.settings)
    poison = message("o-1", 1, payload={"poison": True})
    with cleaned_up(env.settings, [(group.name, 0)]):
        publish(env.settings, [poison, message("o-1", 2), message("o-2", 3)])
        with running(env.consumer(group)) as consumer:
            wait_settled(consumer, 3)

        assert consumer.outcomes == {DEAD_LETTERED: 1, HANDLED: 2}
        # Unordered: the aggregate is not parked, its next event was handled.
        assert sorted(row.sequence for row in effects(env.engine)) == [2, 3]
        assert parked_aggregates(group, engine=env.engine) == []
        [(body, headers)] = dead_letters(env, group)
        assert body["id"] == poison.event_id
        assert headers["outbox-consumer-reason"] == DEAD_LETTERED
        assert headers["outbox-consumer-attempts"] == 3
        assert "Boom: poison event o-1/1" in headers["outbox-consumer-error"]
        assert headers["outbox-consumer-group"] == group.name
        assert headers["outbox-event-id"] == poison.event_id  # the original headers stay
        assert lag(group, settings=env.settings).messages == 0


def test_a_message_that_is_not_an_outbox_envelope_goes_to_the_dead_letter_queue(
    env: Env,
) -> None:
    group = env.group()
    declare_topology(group, settings=env.settings)
    with cleaned_up(env.settings, [(group.name, 0)]):
        with Connection(env.settings.effective_publish_url) as conn:
            exchange = Exchange(env.settings.exchange, type="topic", durable=True)
            Producer(conn.default_channel).publish(
                {"hello": "world"}, exchange=exchange, routing_key="Order.Weird", declare=[exchange]
            )
        publish(env.settings, [message("o-1", 1)])
        with running(env.consumer(group)) as consumer:
            wait_settled(consumer, 2)

        assert consumer.outcomes == {INVALID: 1, HANDLED: 1}
        [(body, headers)] = dead_letters(env, group)
        assert body == {"hello": "world"}
        assert headers["outbox-consumer-reason"] == INVALID
        assert "envelope lacks" in headers["outbox-consumer-error"]


@dataclass
class Switch:
    """A handler that fails on poison events while broken (the bug), and not once fixed."""

    broken: bool = True

    def __call__(self, event: Event, session: Session) -> None:
        payload = dict(event.payload)
        if not self.broken:
            payload.pop("poison", None)
        on_event(replace(event, payload=payload), session)


def park_scenario(env: Env, handler: EventHandler) -> tuple[ConsumerGroup, list[Any]]:
    """Ordered group; A2 is poison: A1 handled, A2 dead-lettered, A3 parked, B flows."""
    group = env.group(handler, partitions=2, max_attempts=2)
    declare_topology(group, settings=env.settings)
    events = [
        message("A", 1),
        message("A", 2, payload={"poison": True}),
        message("B", 3),
        message("A", 4),
        message("B", 5),
    ]
    return group, events


def test_an_ordered_group_dead_letters_after_the_limit_and_parks_the_aggregate(env: Env) -> None:
    group, events = park_scenario(env, on_event)
    with cleaned_up(env.settings, [(group.name, 2)]):
        publish(env.settings, events)
        with running(env.consumer(group)) as consumer:
            wait_settled(consumer, 5)
            assert consumer.outcomes == {HANDLED: 3, DEAD_LETTERED: 1, PARKED: 1}
            assert sorted((r.aggregate_id, r.sequence) for r in effects(env.engine)) == [
                ("A", 1),
                ("B", 3),
                ("B", 5),
            ]

            dead = dead_letters(env, group)
            assert [(b["aggregate_id"], b["sequence"]) for b, _ in dead] == [("A", 2), ("A", 4)]
            assert [h["outbox-consumer-reason"] for _, h in dead] == [DEAD_LETTERED, PARKED]
            [parked] = parked_aggregates(group, engine=env.engine)
            assert (parked.aggregate_type, parked.aggregate_id) == ("Order", "A")
            assert str(parked.event_id) == events[1].event_id
            assert "Boom" in (parked.error or "")
            assert (parked.last_sequence, parked.dead_sequence) == (1, 4)

            # The operator gives up on A's dead letters: A resumes with its next event.
            assert unpark(group, "Order", "A", engine=env.engine) is True
            assert unpark(group, "Order", "A", engine=env.engine) is False
            publish(env.settings, [message("A", 6)])
            wait_settled(consumer, 6)
            # A replay of the skipped events is now stale: order is never broken.
            assert replay_dead_letters(group, settings=env.settings) == 2
            wait_settled(consumer, 8)

        assert parked_aggregates(group, engine=env.engine) == []
        assert [r.sequence for r in effects(env.engine) if r.aggregate_id == "A"] == [1, 6]
        assert consumer.outcomes[STALE] == 2
        assert dead_letters(env, group) == []


def test_a_replay_after_the_fix_handles_the_parked_events_in_order_and_resumes_the_aggregate(
    env: Env,
) -> None:
    switch = Switch()
    group, events = park_scenario(env, switch)
    with cleaned_up(env.settings, [(group.name, 2)]):
        publish(env.settings, events)
        with running(env.consumer(group)) as consumer:
            wait_settled(consumer, 5)
            assert len(parked_aggregates(group, engine=env.engine)) == 1
            publish(env.settings, [message("A", 6)])  # still parked: follows to the DLQ
            wait_settled(consumer, 6)
            assert consumer.outcomes[PARKED] == 2

            switch.broken = False  # the fix is deployed
            assert replay_dead_letters(group, settings=env.settings) == 3
            wait_settled(consumer, 9)
            assert parked_aggregates(group, engine=env.engine) == []
            publish(env.settings, [message("A", 7)])
            wait_settled(consumer, 10)

        assert [r.sequence for r in effects(env.engine) if r.aggregate_id == "A"] == [
            1,
            2,
            4,
            6,
            7,
        ]
        assert dead_letters(env, group) == []


# --- lag --------------------------------------------------------------------------------------


def test_lag_reports_queue_depth_and_the_age_of_the_oldest_message(env: Env) -> None:
    group = env.group()
    ordered = env.group(partitions=2)
    declare_topology(group, settings=env.settings)
    declare_topology(ordered, settings=env.settings)
    old = datetime.now(UTC) - timedelta(seconds=60)
    with cleaned_up(env.settings, [(group.name, 0), (ordered.name, 2)]):
        assert lag(group, settings=env.settings) == Lag(0, None)
        publish(
            env.settings,
            [message("o-1", 1, occurred_at=old)] + [message("o-1", n) for n in range(2, 6)],
        )

        depth, age = lag(group, settings=env.settings)
        assert depth == 5
        assert age is not None and 59 <= age < 120
        ordered_depth, ordered_age = lag(ordered, settings=env.settings)
        assert ordered_depth == 5  # each event waits in one partition queue
        assert ordered_age is not None and ordered_age >= 59
        assert lag(group, settings=env.settings, peek=False).messages == 5
        # The peek left the messages where they were.
        consumer = env.consumer(group, export_lag=True, lag_interval_seconds=0.1)
        with running(consumer):
            wait_settled(consumer, 5)
            wait_until(
                lambda: lag(group, settings=env.settings) == Lag(0, None),
                timeout=10,
                what="lag back to zero",
            )
            # The consumer process exports the same numbers as gauges.
            wait_until(
                lambda: (
                    gauge("outbox_consumer_lag_messages", group.name) == 0.0
                    and gauge("outbox_consumer_oldest_message_age_seconds", group.name) == 0.0
                ),
                timeout=10,
                what="lag gauges exported",
            )
        assert [r.sequence for r in effects(env.engine)] == [1, 2, 3, 4, 5]


# --- configuration ----------------------------------------------------------------------------


def test_a_group_refuses_bad_names_bindings_and_numbers() -> None:
    with pytest.raises(ConfigurationError, match="name"):
        ConsumerGroup("billing.v2", ("Order.*",), on_event)
    with pytest.raises(ConfigurationError, match="binding"):
        ConsumerGroup("billing", (), on_event)
    with pytest.raises(ConfigurationError, match="partitions"):
        ConsumerGroup("billing", ("Order.*",), on_event, partitions=-1)
    with pytest.raises(ConfigurationError, match="backoff"):
        ConsumerGroup("billing", ("#",), on_event, backoff_base_seconds=5, backoff_max_seconds=1)
    group = ConsumerGroup.from_config(
        {
            "name": "billing",
            "bind": "Order.*",
            "handler": "tests.integration.test_consumer_kit:on_event",
            "partitions": 4,
        }
    )
    assert group.queues == tuple(f"outbox.consumer.billing.p{k}" for k in range(4))
    assert group.dead_letter_queue == "outbox.consumer.billing.dead"
    assert group.handler is on_event or group.handler.__name__ == "on_event"


def test_processes_of_one_group_must_agree_on_the_partition_count(amqp_env: Env) -> None:
    env = amqp_env
    group = env.group(partitions=2)
    declare_topology(group, settings=env.settings)
    other = ConsumerGroup(group.name, group.bindings, on_event, partitions=3)
    with (
        cleaned_up(env.settings, [(group.name, 2), (group.name, 3)]),
        running(env.consumer(group)),
        pytest.raises(ConfigurationError, match="partitions=2"),
    ):
        env.consumer(other).run()


def test_importing_the_consumer_api_does_not_import_celery_kombu_or_redis() -> None:
    probe = (
        "import sys, outbox_tasks.consumer as c; c.ConsumerGroup('g', ('#',), lambda e, s: None);"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'celery', 'kombu', 'redis', 'amqp', 'prometheus_client'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
