"""outbox_tasks.testing: the documented example runs, and the fakes' own knobs do what they say.
(Their relay behaviour is held to the PostgreSQL store's by tests/contract.)"""

from __future__ import annotations

import re
import textwrap
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

import outbox_tasks.testing
from outbox_tasks.envelope import OutboundMessage, build_message
from outbox_tasks.errors import BrokerUnavailable
from outbox_tasks.publisher import BatchResult
from outbox_tasks.relay import Relay
from outbox_tasks.schema import OutboxMessage
from outbox_tasks.settings import Settings
from outbox_tasks.testing import (
    InMemoryRelayStore,
    ManualClock,
    RecordingPublisher,
    drain,
)


def order(aggregate_id: str = "1", event_type: str = "OrderCreated") -> OutboxMessage:
    return OutboxMessage(
        aggregate_type="Order", aggregate_id=aggregate_id, event_type=event_type, payload={}
    )


def message(aggregate_id: str) -> OutboundMessage:
    return build_message(
        event_id=uuid.uuid4(),
        aggregate_type="Order",
        aggregate_id=aggregate_id,
        event_type="OrderCreated",
        occurred_at=datetime.now(UTC),
        schema_version=1,
        sequence=1,
        payload_json="{}",
        user_headers=None,
        partition=0,
        epoch=1,
        attempt=1,
        redelivered=False,
    )


def test_the_usage_example_in_the_module_docstring_runs_and_passes() -> None:
    docstring = outbox_tasks.testing.__doc__ or ""
    example = re.search(r"::\n\n((?:    .*\n|\n)+)", docstring)
    assert example is not None
    namespace: dict[str, Any] = {}
    exec(textwrap.dedent(example.group(1)), namespace)

    namespace["test_an_order_publishes_created_then_paid"]()


def test_a_manual_clock_moves_only_forward_and_only_when_told() -> None:
    clock = ManualClock(start=10.0)
    clock.advance(2.5)
    assert clock() == 12.5
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)


def test_a_planned_failure_is_reported_that_many_times_and_skips_the_aggregates_rest() -> None:
    publisher = RecordingPublisher()
    first, behind, other = message("A"), message("A"), message("B")
    publisher.fail(first.event_id, times=2, error="too big")

    results = [publisher.publish_batch([first, behind, other]) for _ in range(3)]

    assert results[0] == BatchResult(
        published=[other.event_id], failed={first.event_id: "too big"}, skipped=[behind.event_id]
    )
    assert results[1].failed == {first.event_id: "too big"}
    assert results[2].failed == {} and results[2].published == [
        first.event_id,
        behind.event_id,
        other.event_id,
    ]
    assert publisher.attempts[first.event_id] == 3 and publisher.attempts[behind.event_id] == 1
    assert publisher.published_ids() == [other.event_id] * 2 + [
        first.event_id,
        behind.event_id,
        other.event_id,
    ]


def test_failing_zero_times_cancels_a_plan_and_none_fails_for_ever() -> None:
    publisher = RecordingPublisher()
    m = message("A")
    publisher.fail(m.event_id, times=None)
    assert all(publisher.publish_batch([m]).failed for _ in range(5))
    publisher.fail(m.event_id, times=0)
    assert publisher.publish_batch([m]).published == [m.event_id]


def test_an_unavailable_publisher_raises_broker_unavailable_and_records_nothing() -> None:
    publisher = RecordingPublisher()
    publisher.unavailable = True
    with pytest.raises(BrokerUnavailable):
        publisher.publish_batch([message("A")])
    assert publisher.published == [] and publisher.attempts == {}


def test_a_wrapping_publisher_sends_what_it_does_not_fail_through_the_inner_one() -> None:
    inner = RecordingPublisher()
    outer = RecordingPublisher(inner)
    refused, sent = message("A"), message("B")
    outer.fail(refused.event_id)

    result = outer.publish_batch([refused, sent])

    assert inner.published_ids() == [sent.event_id] == outer.published_ids()
    assert result.failed == {refused.event_id: "RecordingPublisher: refused"}


def test_a_transaction_that_raises_leaves_the_store_as_it_was() -> None:
    clock = ManualClock()
    store = InMemoryRelayStore(clock=clock)
    [event_id] = store.add(order())
    before = store.rows()

    with pytest.raises(RuntimeError, match="boom"), store.transaction() as tx:
        tx.ensure_partition_row(1, 0, 0, 1024)
        lease = tx.grant_lease(1, 0, "t", 30)
        assert lease is not None
        tx.finish_batch(lease, [event_id], [], delete_published=True)
        assert store.row(event_id) is None
        raise RuntimeError("boom")

    assert store.rows() == before
    assert store.lease(0, 1) is None


def test_a_finished_transaction_cannot_write_any_more() -> None:
    store = InMemoryRelayStore(clock=ManualClock())
    with store.transaction() as tx:
        pass
    with pytest.raises(RuntimeError, match="over"):
        tx.ensure_partition_row(1, 0, 0, 1024)


def test_adding_an_id_twice_is_refused() -> None:
    store = InMemoryRelayStore(clock=ManualClock())
    event = order()
    store.add(event)
    with pytest.raises(ValueError, match="already stored"):
        store.add(event)


def test_rows_keep_their_write_order_and_the_producers_fields() -> None:
    clock = ManualClock()
    store = InMemoryRelayStore(clock=clock)
    created = OutboxMessage(
        aggregate_type="Order",
        aggregate_id=7,
        event_type="OrderCreated",
        payload={"total": "9.99"},
        headers={"traceparent": "00-abc-01"},
    )
    store.add(created, order("7", "OrderPaid"))

    rows = store.rows()

    assert [r.event_type for r in rows] == ["OrderCreated", "OrderPaid"]
    assert [r.seq for r in rows] == [1, 2] and rows[0].slot == rows[1].slot
    assert rows[0].payload_json == '{"total":"9.99"}'
    assert rows[0].headers == {"traceparent": "00-abc-01"}
    assert rows[0].created_at.timestamp() == clock()


def test_a_relay_on_the_fakes_backs_off_parks_and_replays_on_the_manual_clock() -> None:
    clock = ManualClock()
    store = InMemoryRelayStore(clock=clock)
    publisher = RecordingPublisher()
    settings = Settings.from_env({}).with_changes(max_retries=1, backoff_base_seconds=10.0)
    relay = Relay(settings, store, publisher, owner="t", clock=clock, jitter=lambda: 0.0)
    poison, behind = store.add(order("P"), order("P"))
    publisher.fail(poison, times=None)

    assert drain(relay) == 0
    waiting = store.row(poison)
    assert waiting is not None and waiting.next_attempt_at == clock() + 5.0
    assert drain(relay) == 0, "still in backoff"
    clock.advance(5.0)
    assert drain(relay) == 0
    parked = store.row(poison)
    assert parked is not None and parked.parked and parked.retry_count == 2

    publisher.fail(poison, times=0)
    assert store.replay("Order", "P") == [poison]
    assert store.replay("Order", "P") == []
    assert drain(relay) == 2
    assert publisher.published_ids()[-2:] == [str(poison), str(behind)]
