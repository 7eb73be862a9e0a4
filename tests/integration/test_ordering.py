"""Issue 10's scenarios end to end, with real PostgreSQL and Redis and the relay in-process:

1. two unsynchronized writers of one aggregate (the second took its transaction id first): what
   is published agrees with ``sequence`` and the ordered consumer handles both events;
2. a transaction left open 20 s delays only its own aggregate: 20 events of other aggregates go
   out with their usual latency meanwhile;
3. a database dumped and restored into another cluster (whose transaction ids are far behind)
   publishes its backlog in order, with no manual step: ordering reads no transaction id.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from outbox_tasks.consumer import ConsumerGroup, Delivery, Event, GroupProcessor
from outbox_tasks.consumer.processing import HANDLED
from outbox_tasks.db import make_engine
from outbox_tasks.publisher import BrokerPublisher
from outbox_tasks.settings import Settings
from tests.support import pgcluster
from tests.support.kit import Collector, Received, collecting, insert_events, wait_until
from tests.support.relaying import drain, make_relay, wait_for

pytestmark = pytest.mark.timeout(180)

INSERT = (
    "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
    "VALUES (%s, 'Order', %s, %s, '{}')"
)


@pytest.fixture
def publisher(settings: Settings) -> Iterator[BrokerPublisher]:
    pub = BrokerPublisher(settings.effective_publish_url, settings.exchange, timeout_seconds=2)
    pub.declare()
    yield pub
    pub.close()


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def of_aggregate(collector: Collector, aggregate_id: str) -> list[Received]:
    return [m for m in collector.snapshot() if m.aggregate == ("Order", aggregate_id)]


class NullSink:
    def send(self, queue: str, body: bytes, headers: object, message_id: str) -> None:
        raise AssertionError(f"nothing should be dead-lettered, got {body!r}")


def test_two_unsynchronized_writers_publish_in_sequence_order_and_the_consumer_handles_both(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    url = libpq(settings.database_url)
    relay = make_relay(settings, engine, publisher)
    first, second = uuid.uuid4(), uuid.uuid4()
    with collecting(settings.broker_url, settings.exchange) as collector:
        with psycopg.connect(url, application_name="t2") as t2, psycopg.connect(url) as t1:
            t2.execute("SELECT pg_current_xact_id()")  # T2 has a transaction id first
            t1.execute(INSERT, (first, "1", "First"))
            done = threading.Event()

            def t2_writes() -> None:
                t2.execute(INSERT, (second, "1", "Second"))
                t2.commit()
                done.set()

            writer = threading.Thread(target=t2_writes, daemon=True)
            writer.start()
            time.sleep(0.5)
            assert not done.is_set()  # T2 waits for T1: it can never commit first
            assert drain(relay) == 0
            t1.commit()
            writer.join(10)
        assert done.is_set()
        assert drain(relay) == 2
        wait_for(collector, 2)
        got = of_aggregate(collector, "1")

    assert [m.id for m in got] == [str(first), str(second)]
    assert got[0].sequence < got[1].sequence
    assert [m.body["aggregate_sequence"] for m in got] == [1, 2]

    # The ordered consumer group handles both, in that order (the group acknowledged
    # First as stale and never ran its handler).
    handled: list[str] = []

    def handler(event: Event, session: Session) -> None:
        handled.append(event.event_type)

    group = ConsumerGroup("ordering", ("Order.*",), handler, partitions=1)
    processor = GroupProcessor(group, engine, NullSink())
    outcomes = [
        processor.process(
            Delivery(
                body=json.dumps(m.body).encode(),
                headers=m.headers,
                redelivered=False,
                ack=lambda: None,
                requeue=lambda: None,
            )
        )
        for m in got
    ]
    assert outcomes == [HANDLED, HANDLED]
    assert handled == ["First", "Second"]


def test_a_transaction_left_open_delays_only_its_own_aggregate(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    url = libpq(settings.database_url)
    relay = make_relay(settings, engine, publisher)
    stop = threading.Event()
    relay_errors: list[BaseException] = []

    def relay_loop() -> None:
        try:
            while not stop.is_set():
                drain(relay)
                stop.wait(0.1)
        except BaseException as error:
            relay_errors.append(error)

    committed_at: dict[str, float] = {}
    held = uuid.uuid4()
    with collecting(settings.broker_url, settings.exchange) as collector:
        loop = threading.Thread(target=relay_loop, daemon=True)
        loop.start()
        try:
            with psycopg.connect(url) as idle:
                # A batch job: it wrote an event of aggregate "held" and sits in its
                # transaction for 20 s (it holds a transaction id all along).
                idle.execute(INSERT, (held, "held", "Started"))
                for i in range(20):
                    [event_id] = insert_events(engine, [("Order", f"other-{i}")])
                    committed_at[str(event_id)] = time.time()
                    time.sleep(1.0)
                assert str(held) not in collector.unique_ids()
                idle.commit()
            wait_until(
                lambda: str(held) in collector.unique_ids(), timeout=15, what="the held event"
            )
        finally:
            stop.set()
            loop.join(30)
        arrivals = {m.id: m.at for m in collector.snapshot()}

    assert not relay_errors, relay_errors
    latencies = sorted(arrivals[i] - at for i, at in committed_at.items())
    # Usual latency is the relay loop's pace (0.1 s) plus a drain; generous for a busy machine,
    # and far below the 20 s the old transaction-id horizon made them wait.
    assert latencies[-1] < 5.0, latencies
    assert sorted(latencies)[len(latencies) // 2] < 2.0, latencies


def test_a_database_restored_into_another_cluster_publishes_its_backlog_in_order(
    settings: Settings,
    engine: Engine,
    publisher: BrokerPublisher,
    second_cluster: str,
    tmp_path: Path,
) -> None:
    backlog = insert_events(engine, [("Order", "R"), ("Order", "S"), ("Order", "R")])
    backlog += insert_events(engine, [("Order", "R")])
    restored_url = pgcluster.dump_and_restore(
        libpq(settings.database_url), second_cluster, tmp_path
    )
    with psycopg.connect(restored_url) as conn:
        row = conn.execute(
            "SELECT min(txid)::text, pg_current_xact_id()::text FROM outbox"
        ).fetchone()
    assert row is not None
    # Every restored row's transaction id is "in the future" in the new cluster: the old
    # horizon test (txid < xmin) would have held all of them back for ever.
    assert int(str(row[0])) > int(str(row[1]))

    restored = settings.with_changes(
        database_url=restored_url.replace("postgresql://", "postgresql+psycopg://")
    )
    restored_engine = make_engine(restored, application_name="outbox_tasks.tests")
    try:
        relay = make_relay(restored, restored_engine, publisher)
        with collecting(settings.broker_url, settings.exchange) as collector:
            assert drain(relay) == 4
            [newer] = insert_events(restored_engine, [("Order", "R")])
            assert drain(relay) == 1
            wait_for(collector, 5)
            r = of_aggregate(collector, "R")
    finally:
        restored_engine.dispose()

    assert [m.id for m in r] == [str(backlog[0]), str(backlog[2]), str(backlog[3]), str(newer)]
    assert [m.body["aggregate_sequence"] for m in r] == [1, 2, 3, 4]
    assert [m.body["previous_aggregate_sequence"] for m in r] == [0, 1, 2, 3]
    assert [m.sequence for m in r] == sorted(m.sequence for m in r)
