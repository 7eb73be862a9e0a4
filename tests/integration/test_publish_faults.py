"""Issue 11, items 1 and 2, against real PostgreSQL and RabbitMQ: one row the broker cannot take
never stalls its partition, and a nack because another bound queue is full spends no retry and
flags every re-send as a redelivery."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks import deadletter, sending
from outbox_tasks.metrics import RelayMetrics
from outbox_tasks.publisher import BrokerPublisher
from outbox_tasks.relay import Relay
from outbox_tasks.settings import Settings
from outbox_tasks.store.relay import PostgresRelayStore
from outbox_tasks.testing import drain
from tests.support.kit import collecting, insert_events, wait_until
from tests.support.relaying import wait_for

pytestmark = pytest.mark.timeout(180)

LONG_TYPE = "A" * 200  # 200 + 1 + 100 bytes: over RabbitMQ's 255-byte routing key
LONG_EVENT = "E" * 100


@pytest.fixture
def amqp_settings(settings: Settings, amqp_url: str) -> Settings:
    return settings.with_changes(publish_url=amqp_url, partitions=1)


@pytest.fixture
def amqp_publisher(amqp_settings: Settings) -> Iterator[BrokerPublisher]:
    publisher = BrokerPublisher(amqp_settings.effective_publish_url, amqp_settings.exchange)
    yield publisher
    publisher.close()


def _insert_plain(engine: Engine, aggregate_type: str, aggregate_id: str, event_type: str) -> str:
    """A row written with plain SQL: nothing checks it on the way in."""
    with engine.begin() as conn:
        return str(
            conn.execute(
                text(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                    "VALUES (:t, :i, :e, '{}') RETURNING id"
                ),
                {"t": aggregate_type, "i": aggregate_id, "e": event_type},
            ).scalar_one()
        )


def _row(engine: Engine, event_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT published_at, retry_count, last_error, dead_lettered_at, "
                "next_attempt_at FROM outbox WHERE id = :id"
            ),
            {"id": event_id},
        ).one()


def _good_events(engine: Engine, count: int, prefix: str) -> list[str]:
    return [
        str(i)
        for i in insert_events(engine, [("Order", f"{prefix}{n % 50}") for n in range(count)])
    ]


def test_one_bad_routing_key_among_1000_events_stalls_nothing_and_is_dead_lettered(
    amqp_settings: Settings, engine: Engine, amqp_publisher: BrokerPublisher
) -> None:
    before = _good_events(engine, 500, "a")
    bad = _insert_plain(engine, LONG_TYPE, "x", LONG_EVENT)
    behind_bad = _insert_plain(engine, LONG_TYPE, "x", "Fine")
    after = _good_events(engine, 500, "b")
    good = before + after
    registry = CollectorRegistry()
    relay = Relay(
        amqp_settings,
        PostgresRelayStore(engine),
        amqp_publisher,
        owner="t",
        observer=RelayMetrics(registry),
    )

    with collecting(amqp_settings.effective_publish_url, amqp_settings.exchange) as collector:
        started = time.monotonic()
        assert drain(relay) == 1000
        wait_for(collector, 1000)
        elapsed = time.monotonic() - started
        time.sleep(0.5)  # anything extra would show up now
        received = collector.snapshot()

    assert elapsed < 10, f"1,000 events took {elapsed:.1f} s"
    assert sorted(m.id for m in received) == sorted(good)  # each exactly once
    assert not [m for m in received if m.headers["outbox-redelivered"]]
    assert collector.order_violations() == []
    row = _row(engine, bad)
    assert row.published_at is None and row.dead_lettered_at is not None
    assert row.last_error.startswith("invalid_message: routing key (aggregate_type.event_type)")
    assert _row(engine, behind_bad).published_at is None  # its aggregate parks behind it
    assert (
        registry.get_sample_value("outbox_publish_errors_total", {"error_type": "invalid_message"})
        == 1.0
    )

    # The dead-letter copy goes out with its routing key cut to fit, and the dead letter is
    # recorded for an operator to replay or discard.
    dead = BrokerPublisher(amqp_settings.effective_publish_url, amqp_settings.dead_letter_exchange)
    with collecting(amqp_settings.effective_publish_url, amqp_settings.dead_letter_exchange) as dlq:
        assert deadletter.collect(engine, amqp_settings, dead) == {"recorded": 1, "skipped": 0}
        wait_for(dlq, 1)
        [copy] = dlq.snapshot()
    dead.close()
    assert copy.id == bad
    assert copy.body["aggregate_type"] == LONG_TYPE
    assert copy.headers[deadletter.H_DEAD_REASON].startswith("invalid_message: routing key")
    with engine.connect() as conn:
        assert (
            conn.execute(
                text("SELECT status FROM outbox_dead_letter WHERE id = :id"), {"id": bad}
            ).scalar_one()
            == "parked"
        )


def test_an_error_no_check_foresaw_is_isolated_to_its_message_on_real_rabbitmq(
    amqp_settings: Settings,
    engine: Engine,
    amqp_publisher: BrokerPublisher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the pre-check, py-amqp raises ``struct.error`` mid-batch: the batch is sent
    again one by one (copies flagged), the bad row spends its retries and parks."""
    monkeypatch.setattr(sending, "routing_key_problem", lambda key: None)
    settings = amqp_settings.with_changes(
        max_retries=1, backoff_base_seconds=0.05, backoff_max_seconds=0.1
    )
    good = _good_events(engine, 100, "a")
    bad = _insert_plain(engine, LONG_TYPE, "x", LONG_EVENT)
    good += _good_events(engine, 100, "b")
    relay = Relay(settings, PostgresRelayStore(engine), amqp_publisher, owner="t")

    with collecting(settings.effective_publish_url, settings.exchange) as collector:
        wait_until(
            lambda: drain(relay) >= 0 and _row(engine, bad).dead_lettered_at is not None,
            timeout=30,
            what="the bad row parked",
        )
        wait_until(lambda: collector.unique_ids() >= set(good), timeout=15, what="every event")
        received = collector.snapshot()

    assert collector.unique_ids() == set(good)
    first_seen: set[str] = set()
    for message in received:
        if message.id in first_seen:
            assert message.headers["outbox-redelivered"] is True
        first_seen.add(message.id)
    row = _row(engine, bad)
    assert row.retry_count == 2
    # struct.error, recognised as py-amqp refusing to encode this message: message_rejected.
    assert row.last_error == "error: ubyte format requires 0 <= number <= 255"


def test_a_nack_from_a_full_queue_spends_no_retry_and_every_resend_is_flagged(
    amqp_settings: Settings, engine: Engine, amqp_publisher: BrokerPublisher
) -> None:
    settings = amqp_settings.with_changes(
        max_retries=1, backoff_base_seconds=0.2, backpressure_max_seconds=60
    )
    suffix = uuid.uuid4().hex[:8]
    exchange = Exchange(settings.exchange, type="topic", durable=True)
    full = Queue(
        f"test.full.{suffix}",
        exchange,
        routing_key="Order.#",
        queue_arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    with Connection(settings.effective_publish_url) as conn:
        channel = conn.default_channel
        exchange(channel).declare()
        full(channel).declare()
        # Fill it: from now on RabbitMQ nacks what routes to it (the healthy queues take it).
        conn.Producer(channel).publish({"filler": True}, exchange=exchange, routing_key="Order.x")
        [event_id] = [str(i) for i in insert_events(engine, [("Order", "1")])]
        registry = CollectorRegistry()
        relay = Relay(
            settings,
            PostgresRelayStore(engine),
            amqp_publisher,
            owner="t",
            observer=RelayMetrics(registry),
        )
        with collecting(settings.effective_publish_url, settings.exchange) as healthy:
            wait_until(
                lambda: drain(relay) >= 0 and healthy.count() >= 3,
                timeout=30,
                what="three nacked attempts",
            )
            row = _row(engine, event_id)
            assert row.published_at is None and row.dead_lettered_at is None
            assert row.retry_count == 0  # max_retries=1 would have parked it otherwise
            full(channel).purge()  # the consumer caught up
            wait_until(
                lambda: drain(relay) >= 0 and _row(engine, event_id).published_at is not None,
                timeout=30,
                what="published once the queue has room",
            )
            time.sleep(0.3)
            copies = [m for m in healthy.snapshot() if m.id == event_id]
        full(channel).delete()

    assert len(copies) >= 4
    assert copies[0].headers["outbox-redelivered"] is False
    assert all(m.headers["outbox-redelivered"] is True for m in copies[1:])
    assert _row(engine, event_id).retry_count == 0
    assert (
        registry.get_sample_value("outbox_publish_errors_total", {"error_type": "broker_nack"}) or 0
    ) >= 3
    assert (
        registry.get_sample_value("outbox_publish_errors_total", {"error_type": "message_rejected"})
        == 0.0
    )


def test_a_message_nacked_past_the_backpressure_bound_is_dead_lettered_as_broker_nack(
    amqp_settings: Settings, engine: Engine, amqp_publisher: BrokerPublisher
) -> None:
    settings = amqp_settings.with_changes(backoff_base_seconds=0.1, backpressure_max_seconds=2)
    suffix = uuid.uuid4().hex[:8]
    exchange = Exchange(settings.exchange, type="topic", durable=True)
    full = Queue(
        f"test.full.{suffix}",
        exchange,
        routing_key="Order.#",
        queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    with Connection(settings.effective_publish_url) as conn:
        exchange(conn.default_channel).declare()
        full(conn.default_channel).declare()
        [event_id] = [str(i) for i in insert_events(engine, [("Order", "1")])]
        [other] = [str(i) for i in insert_events(engine, [("Invoice", "1")])]
        relay = Relay(settings, PostgresRelayStore(engine), amqp_publisher, owner="t")
        wait_until(
            lambda: drain(relay) >= 0 and _row(engine, event_id).dead_lettered_at is not None,
            timeout=30,
            what="dead-lettered after the backpressure bound",
        )
        full(conn.default_channel).delete()

    row = _row(engine, event_id)
    assert row.retry_count == 0
    assert row.last_error.startswith("broker_nack: not taken by the broker (basic.nack)")
    assert _row(engine, other).published_at is not None
