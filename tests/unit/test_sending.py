"""One classification of every publish-path error (issue 11, items 1 and 2), on the in-memory
store and the recording publisher: no single row stalls its partition, backpressure spends no
retry, and every re-send of a message that may have reached a queue is flagged."""

from __future__ import annotations

import struct
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from outbox_tasks import OutboxMessage
from outbox_tasks.broker import (
    BROKER_NACK,
    INVALID_MESSAGE,
    MESSAGE_REJECTED,
    UNKNOWN_ERROR,
    publish_fault,
    publish_outage,
)
from outbox_tasks.envelope import H_REDELIVERED
from outbox_tasks.errors import BrokerUnavailable, InvalidMessage
from outbox_tasks.protocols import NullObserver
from outbox_tasks.relay import Relay
from outbox_tasks.settings import Settings
from outbox_tasks.testing import InMemoryRelayStore, ManualClock, RecordingPublisher, drain


class CountingObserver(NullObserver):
    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()

    def message_failed(self, error_type: str) -> None:
        self.errors[error_type] += 1


class World:
    """A relay on the fakes, with one partition and a clock the test moves."""

    def __init__(self, **settings: Any) -> None:
        self.clock = ManualClock()
        self.store = InMemoryRelayStore(clock=self.clock)
        self.publisher = RecordingPublisher()
        self.observer = CountingObserver()
        self.settings = Settings.from_env({}, partitions=1, batch_size=100, **settings)
        self.relay = Relay(
            self.settings,
            self.store,
            self.publisher,
            owner="test",
            observer=self.observer,
            clock=self.clock,
            jitter=lambda: 0.0,
        )

    def add(self, aggregate_id: str, count: int, aggregate_type: str = "Order") -> list[str]:
        messages = [
            OutboxMessage(
                aggregate_type=aggregate_type,
                aggregate_id=aggregate_id,
                event_type=f"E{n}",
                payload={"n": n},
            )
            for n in range(count)
        ]
        return [str(i) for i in self.store.add(*messages)]

    def run(self, seconds: float = 600.0, step: float = 1.0) -> None:
        """Drain, letting time pass so backoffs end, for ``seconds`` of fake time."""
        waited = 0.0
        while waited <= seconds:
            drain(self.relay)
            self.clock.advance(step)
            waited += step

    def row(self, event_id: str) -> Any:
        return self.store.row(uuid.UUID(event_id))

    def published_once_in_order(self, ids: Sequence[str]) -> bool:
        firsts: list[str] = []
        for event_id in self.publisher.published_ids():
            if event_id in ids and event_id not in firsts:
                firsts.append(event_id)
        return firsts == list(ids)


def test_a_row_with_a_routing_key_over_255_bytes_is_dead_lettered_at_once_and_the_rest_flows() -> (
    None
):
    world = World()
    before = world.add("1", 3)
    bad = str(world.store.add_row(aggregate_type="\u00e9" * 128, aggregate_id="1", event_type="X"))
    same_aggregate_after = [
        str(world.store.add_row(aggregate_type="\u00e9" * 128, aggregate_id="1", event_type="Y"))
        for _ in range(2)
    ]
    others = world.add("2", 50)

    world.run(seconds=5)

    assert world.published_once_in_order(before + others)
    assert world.publisher.published_ids().count(others[0]) == 1
    row = world.row(bad)
    assert row.parked
    assert row.last_error.startswith("invalid_message: routing key")
    assert all(world.row(i).pending for i in same_aggregate_after)  # parked behind it
    assert world.observer.errors == {INVALID_MESSAGE: 1}
    assert world.publisher.attempts.get(bad) is None  # never offered to the broker


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param(["not", "a", "dict"], "headers must be a dict", id="a-list"),
        pytest.param({"n": 2**70}, "64-bit", id="a-huge-int"),
        pytest.param({"h": "x" * 70_000}, "the limit is 65536", id="too-big"),
    ],
)
def test_headers_plain_sql_left_unsendable_dead_letter_their_row_at_once(
    headers: object, reason: str
) -> None:
    world = World()
    bad = str(
        world.store.add_row(
            aggregate_type="Order", aggregate_id="9", event_type="X", headers=headers
        )
    )
    good = world.add("10", 3)

    world.run(seconds=3)

    assert world.row(bad).parked
    assert reason in world.row(bad).last_error
    assert world.published_once_in_order(good)


def test_a_message_over_the_broker_size_limit_is_dead_lettered_before_sending() -> None:
    world = World(max_message_bytes=2048)
    bad = str(
        world.store.add_row(
            aggregate_type="Order", aggregate_id="9", event_type="X", payload="y" * 4096
        )
    )
    good = world.add("10", 3)

    world.run(seconds=3)

    assert "message body is" in world.row(bad).last_error
    assert world.published_once_in_order(good)


@pytest.mark.parametrize(
    "exception",
    [
        pytest.param(struct.error("ubyte format requires 0 <= number <= 255"), id="struct"),
        pytest.param(KeyError("x"), id="key-error"),
        pytest.param(RuntimeError("boom"), id="runtime-error"),
        pytest.param(ZeroDivisionError(), id="zero-division"),
    ],
)
def test_an_exception_the_relay_does_not_recognise_parks_only_its_message(
    exception: Exception,
) -> None:
    world = World(max_retries=2)
    ids = world.add("1", 5) + world.add("2", 5)
    poison = ids[2]
    world.publisher.raise_on(poison, exception=exception, times=None)

    world.run(seconds=60)

    healthy = [i for i in ids if i not in ids[2:5]]
    assert world.published_once_in_order(healthy)
    assert world.row(poison).parked
    assert world.row(poison).retry_count == 3
    assert type(exception).__name__ in world.row(poison).last_error
    expected = MESSAGE_REJECTED if isinstance(exception, struct.error) else UNKNOWN_ERROR
    assert world.observer.errors == {expected: 3}
    assert world.row(poison).last_error.startswith(
        "" if expected == MESSAGE_REJECTED else "unknown_error: "
    )
    # Bounded duplicates: a message is re-sent at most once per failed attempt of the batch.
    assert max(Counter(world.publisher.published_ids()).values()) <= 1 + 3


def test_every_copy_sent_after_a_batch_raised_is_flagged_as_redelivered() -> None:
    world = World()
    ids = world.add("1", 3)
    world.publisher.raise_on(ids[2], exception=ValueError("once"), times=1)

    world.run(seconds=5)

    copies = [m for m in world.publisher.published if m.event_id in ids]
    counts = Counter(m.event_id for m in copies)
    assert counts == {ids[0]: 2, ids[1]: 2, ids[2]: 1}  # 1 and 2 went out before it raised
    for event_id in ids:
        first, *later = [m for m in copies if m.event_id == event_id]
        assert first.headers[H_REDELIVERED] is False or event_id == ids[2]
        assert all(m.headers[H_REDELIVERED] is True for m in later)
    assert world.row(ids[2]).published_at is not None


def test_a_nack_spends_no_retry_and_the_resend_is_flagged_as_redelivered() -> None:
    world = World(max_retries=1)
    [nacked] = world.add("1", 1)
    world.publisher.nack(nacked, times=4)

    world.run(seconds=120)

    sends = [m for m in world.publisher.published if m.event_id == nacked]
    assert len(sends) == 1
    assert sends[0].headers[H_REDELIVERED] is True  # the nacked tries left copies elsewhere
    assert world.row(nacked).retry_count == 0
    assert world.publisher.attempts[nacked] == 5
    assert world.observer.errors == {BROKER_NACK: 4}


def test_a_message_nacked_for_longer_than_the_backpressure_bound_is_dead_lettered() -> None:
    world = World(backpressure_max_seconds=60)
    [nacked] = world.add("1", 1)
    others = world.add("2", 3)
    world.publisher.nack(nacked, times=None)

    world.run(seconds=200)

    row = world.row(nacked)
    assert row.parked
    assert row.retry_count == 0
    assert row.last_error.startswith("broker_nack: ")
    # Re-sends thin out while it keeps failing: far fewer than one per second.
    assert world.publisher.attempts[nacked] <= 12
    assert world.published_once_in_order(others)


def test_an_outage_spends_no_retry_and_sends_nothing() -> None:
    world = World()
    ids = world.add("1", 3)
    world.publisher.unavailable = True

    world.run(seconds=10)
    world.publisher.unavailable = False
    world.run(seconds=10)

    assert world.published_once_in_order(ids)
    assert all(world.row(i).retry_count == 0 for i in ids)


def test_the_classification_of_driver_errors() -> None:
    import redis.exceptions
    from amqp.exceptions import FrameSyntaxError, NotFound, PreconditionFailed

    outage = (OSError, redis.exceptions.ConnectionError)
    assert publish_outage(ConnectionResetError(), outage)
    assert publish_outage(NotFound("no exchange", reply_code=404), (*outage, NotFound))
    assert not publish_outage(PreconditionFailed("too big", reply_code=406), (PreconditionFailed,))
    assert publish_outage(redis.exceptions.ResponseError("OOM command not allowed"), outage)
    assert publish_outage(redis.exceptions.ResponseError("READONLY You can't write"), outage)
    assert not publish_outage(redis.exceptions.ResponseError("WRONGTYPE Operation"), outage)
    assert not publish_outage(ValueError("x"), outage)

    assert publish_fault(BrokerUnavailable("down")) == "broker_unavailable"
    assert publish_fault(InvalidMessage("bad")) == INVALID_MESSAGE
    assert publish_fault(struct.error("ubyte")) == MESSAGE_REJECTED
    assert publish_fault(FrameSyntaxError("table")) == MESSAGE_REJECTED
    assert publish_fault(PreconditionFailed("too big", reply_code=406)) == MESSAGE_REJECTED
    assert publish_fault(redis.exceptions.ResponseError("WRONGTYPE")) == MESSAGE_REJECTED
    assert publish_fault(KeyError("x")) == UNKNOWN_ERROR
