"""Ordered groups and ``aggregate_sequence`` (migration 0004): a real gap waits, then parks the
aggregate with reason ``gap``; a replay resumes it in order; a gap left on purpose (the message
says which number was published before it) and an aggregate a group has never seen do not park;
an event behind the high-water mark is set aside, never acknowledged unhandled."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks.consumer import (
    ConsumerGroup,
    Delivery,
    GroupProcessor,
    declare_topology,
    parked_aggregates,
    replay_dead_letters,
)
from outbox_tasks.consumer.processing import (
    DUPLICATE,
    GAP,
    H_CONSUMER_REASON,
    HANDLED,
    PARKED,
    STALE,
)
from outbox_tasks.envelope import OutboundMessage
from outbox_tasks.settings import Settings
from tests.integration.test_consumer_kit import (
    cleaned_up,
    create_effects,
    effects,
    group_name,
    message,
    on_event,
    publish,
    running,
)
from tests.support.kit import wait_until

pytestmark = pytest.mark.timeout(120)


def numbered(aggregate_id: str, number: int, previous: int | None = None) -> OutboundMessage:
    """Event ``number`` of an aggregate (its envelope ``sequence`` is ten times that)."""
    return message(
        aggregate_id,
        number * 10,
        aggregate_sequence=number,
        previous_aggregate_sequence=number - 1 if previous is None else previous,
    )


class Sink:
    """The dead-letter queue, in memory."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], Mapping[str, Any]]] = []

    def send(self, queue: str, body: bytes, headers: Mapping[str, Any], message_id: str) -> None:
        self.sent.append((json.loads(body), dict(headers)))

    def reasons(self) -> list[tuple[int, str]]:
        return [(b["aggregate_sequence"], h[H_CONSUMER_REASON]) for b, h in self.sent]


class Settled:
    """How a delivery was settled."""

    def __init__(self) -> None:
        self.acked = False
        self.requeued = False

    def ack(self) -> None:
        self.acked = True

    def requeue(self) -> None:
        self.requeued = True


def deliver(processor: GroupProcessor, outbound: OutboundMessage) -> tuple[str, Settled]:
    settled = Settled()
    delivery = Delivery(
        body=outbound.body,
        headers=outbound.headers,
        redelivered=False,
        ack=settled.ack,
        requeue=settled.requeue,
        message_id=outbound.event_id,
    )
    return processor.process(delivery), settled


@pytest.fixture
def effects_table(engine: Engine) -> Engine:
    create_effects(engine)
    return engine


def processor(engine: Engine, sink: Sink, *, gap_wait: float = 0.3) -> GroupProcessor:
    group = ConsumerGroup(
        group_name(), ("Order.*",), on_event, partitions=1, gap_wait_seconds=gap_wait
    )
    return GroupProcessor(group, engine, sink)


def applied(engine: Engine, aggregate_id: str) -> list[int]:
    return [r.sequence // 10 for r in effects(engine) if r.aggregate_id == aggregate_id]


def test_an_event_after_a_missing_one_waits_then_parks_its_aggregate_with_reason_gap(
    effects_table: Engine,
) -> None:
    sink = Sink()
    p = processor(effects_table, sink, gap_wait=0.6)
    assert deliver(p, numbered("A", 1))[0] == HANDLED

    started = time.monotonic()
    outcome, settled = deliver(p, numbered("A", 3))  # 2 never came
    waited = time.monotonic() - started

    assert outcome == GAP
    assert waited >= 0.6
    assert settled.acked and not settled.requeued  # acknowledged only once set aside
    assert sink.reasons() == [(3, GAP)]
    [parked] = parked_aggregates(p.group, engine=effects_table)
    assert (parked.aggregate_id, parked.reason) == ("A", GAP)
    assert "2..2 never arrived" in (parked.error or "")
    # The aggregate's later events follow it to the dead-letter queue; others flow.
    assert deliver(p, numbered("A", 4))[0] == PARKED
    assert deliver(p, numbered("B", 1))[0] == HANDLED
    assert applied(effects_table, "A") == [1]


def test_the_missing_event_handled_during_the_wait_lets_the_later_one_through(
    effects_table: Engine,
) -> None:
    p = processor(effects_table, Sink(), gap_wait=20)
    assert deliver(p, numbered("A", 1))[0] == HANDLED
    result: list[str] = []
    waiting = threading.Thread(target=lambda: result.append(deliver(p, numbered("A", 3))[0]))
    waiting.start()
    time.sleep(0.3)
    assert waiting.is_alive()
    # Another process of the group hands in event 2 (e.g. a partition changing hands).
    assert deliver(p, numbered("A", 2))[0] == HANDLED
    waiting.join(10)

    assert result == [HANDLED]
    assert applied(effects_table, "A") == [1, 2, 3]


def test_a_gap_left_on_purpose_does_not_wait(effects_table: Engine) -> None:
    """Events 2 and 3 were discarded at the relay: event 4 says 1 was published before it."""
    p = processor(effects_table, Sink(), gap_wait=30)
    assert deliver(p, numbered("A", 1))[0] == HANDLED
    started = time.monotonic()
    assert deliver(p, numbered("A", 4, previous=1))[0] == HANDLED
    assert time.monotonic() - started < 5
    assert applied(effects_table, "A") == [1, 4]


def test_a_group_accepts_the_first_event_it_ever_sees_of_an_aggregate(
    effects_table: Engine,
) -> None:
    """A group created after the aggregate's first events (or an aggregate whose earlier events
    went elsewhere) starts where it joins."""
    p = processor(effects_table, Sink(), gap_wait=30)
    assert deliver(p, numbered("A", 7))[0] == HANDLED
    assert deliver(p, numbered("A", 8))[0] == HANDLED
    assert applied(effects_table, "A") == [7, 8]


def test_an_unseen_event_behind_the_high_water_mark_is_set_aside_never_dropped(
    effects_table: Engine,
) -> None:
    """The issue's lost event: Second reached the group before First. First is not
    acknowledged unhandled: it goes to the dead-letter queue with reason stale."""
    sink = Sink()
    p = processor(effects_table, sink)
    assert deliver(p, numbered("A", 2))[0] == HANDLED  # the first the group sees: accepted
    outcome, settled = deliver(p, numbered("A", 1))

    assert outcome == STALE
    assert settled.acked
    assert sink.reasons() == [(1, STALE)]
    assert applied(effects_table, "A") == [2]


def test_a_duplicate_is_still_skipped(effects_table: Engine) -> None:
    p = processor(effects_table, Sink())
    first = numbered("A", 1)
    assert deliver(p, first)[0] == HANDLED
    assert deliver(p, first)[0] == DUPLICATE
    assert applied(effects_table, "A") == [1]


def test_events_without_numbers_keep_the_sequence_rules(effects_table: Engine) -> None:
    """Messages from a relay older than migration 0004 carry no aggregate_sequence."""
    p = processor(effects_table, Sink())
    assert deliver(p, message("A", 10))[0] == HANDLED
    assert deliver(p, message("A", 30))[0] == HANDLED  # no numbers: no gap to see
    assert deliver(p, message("A", 20))[0] == STALE
    assert applied(effects_table, "A") == [1, 3]


# --- a real consumer process on Redis: gap, park, replay --------------------------------------


@pytest.fixture
def consumer_settings(settings: Settings, engine: Engine) -> Iterator[Settings]:
    create_effects(engine)
    yield settings


def test_a_gap_parks_the_aggregate_and_a_replay_resumes_it_in_order(
    consumer_settings: Settings, engine: Engine
) -> None:
    from outbox_tasks.consumer import Consumer

    group = ConsumerGroup(
        group_name(),
        ("Order.*",),
        on_event,
        partitions=1,
        gap_wait_seconds=1.0,
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.05,
    )
    declare_topology(group, settings=consumer_settings)
    consumer = Consumer(group, consumer_settings, engine=engine)

    def settled() -> int:
        return sum(consumer.outcomes.values())

    with cleaned_up(consumer_settings, [(group.name, 1)]), running(consumer):
        late = numbered("A", 2)
        publish(consumer_settings, [numbered("A", 1), numbered("A", 3), numbered("B", 1)])
        wait_until(lambda: settled() >= 3, timeout=30, what="three settled")
        assert consumer.outcomes == {HANDLED: 2, GAP: 1}
        [parked] = parked_aggregates(group, engine=engine)
        assert parked.reason == GAP
        # The missing event turns up after all, then a later one: both follow A to the
        # dead-letter queue while A is parked.
        publish(consumer_settings, [late, numbered("A", 4)])
        wait_until(lambda: settled() >= 5, timeout=30, what="five settled")
        assert consumer.outcomes[PARKED] == 2

        assert replay_dead_letters(group, settings=consumer_settings) == 3
        wait_until(lambda: settled() >= 8, timeout=30, what="the replay settled")

    assert applied(engine, "A") == [1, 2, 3, 4]
    assert parked_aggregates(group, engine=engine) == []
    with engine.connect() as conn:
        last = conn.execute(
            text(
                "SELECT last_aggregate_sequence FROM outbox_consumer_position "
                "WHERE consumer_group = :g AND aggregate_id = 'A'"
            ),
            {"g": group.name},
        ).scalar_one()
    assert last == 4
