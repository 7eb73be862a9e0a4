"""An ordered consumer group end to end: outbox rows -> the relay -> the broker -> several
consumer processes (``python -m outbox_tasks.consumer consume --partitions N``), one of them
killed mid-stream. Every event takes effect exactly once, in sequence order per aggregate."""

from __future__ import annotations

import signal
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks.consumer import declare_topology
from outbox_tasks.publisher import BrokerPublisher
from outbox_tasks.relay import Relay
from outbox_tasks.settings import Settings
from outbox_tasks.store.relay import PostgresRelayStore
from tests.integration.test_consumer_kit import (
    ConsumerProcess,
    broker_settings,
    cleaned_up,
    create_effects,
    effect_count,
    effects,
    group_name,
    processes,
)
from tests.support.kit import pending_count, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EVENTS = 1200
AGGREGATES = 30


@contextmanager
def relay_running(settings: Settings, engine: Engine) -> Iterator[None]:
    """The relay, in-process on a thread, publishing whatever is pending until stopped."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        publisher = BrokerPublisher(settings.effective_publish_url, settings.exchange)
        relay = Relay(
            settings, PostgresRelayStore(engine), publisher, owner="acceptance", jitter=lambda: 0.0
        )
        try:
            while not stop.is_set():
                for partition in range(settings.partitions):
                    lease = relay.claim(partition)
                    if lease is not None:
                        relay.publish(partition, lease.epoch)
                stop.wait(0.05)
        except BaseException as error:
            errors.append(error)
        finally:
            publisher.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
    if errors:
        raise errors[0]


def insert(engine: Engine, start: int, count: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "SELECT 'Order', 'A' || (i % :aggs)::text, 'OrderPlaced', "
                "jsonb_build_object('n', i, 'sleep', 0.002) "
                "FROM generate_series(:start, :start + :count - 1) AS i"
            ),
            {"aggs": AGGREGATES, "start": start, "count": count},
        )


def outbox_sequences(engine: Engine) -> dict[str, list[int]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT aggregate_id, seq FROM outbox ORDER BY seq")).all()
    out: dict[str, list[int]] = defaultdict(list)
    for aggregate_id, seq in rows:
        out[aggregate_id].append(int(seq))
    return out


@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_an_ordered_group_keeps_per_aggregate_order_with_several_processes_and_a_kill(
    kind: str,
    request: pytest.FixtureRequest,
    settings: Settings,
    engine: Engine,
    tmp_path: Path,
) -> None:
    settings = broker_settings(request, settings, kind).with_changes(partitions=4)
    create_effects(engine)
    name = group_name()
    partitions = 3
    declare_topology(name, settings=settings, partitions=partitions)

    def spawn() -> ConsumerProcess:
        return ConsumerProcess(
            settings,
            name,
            partitions=partitions,
            log_dir=tmp_path,
            extra=["--prefetch", "20", "--log-level", "INFO"],
        )

    with (
        cleaned_up(settings, [(name, partitions)]),
        relay_running(settings, engine),
        processes(spawn(), spawn(), spawn()) as procs,
    ):
        for proc in procs:
            proc.wait_for("consumer_ready")
        insert(engine, 0, EVENTS // 2)
        wait_until(lambda: effect_count(engine) >= EVENTS // 6, timeout=60, what="some effects")
        victim = procs[0]
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        procs.append(spawn())
        insert(engine, EVENTS // 2, EVENTS // 2)
        wait_until(
            lambda: effect_count(engine) >= EVENTS,
            timeout=120,
            what=f"{EVENTS} effects",
        )
        wait_until(lambda: pending_count(engine) == 0, timeout=10, what="outbox drained")
        survivors = procs[1:]
        handled_by = {p.pid for p in survivors if p.actions("partition_acquired")}

    rows = effects(engine)
    assert len(rows) == EVENTS  # exactly once: no event lost, none applied twice
    assert len({row.event_id for row in rows}) == EVENTS
    applied: dict[str, list[int]] = defaultdict(list)
    for row in rows:  # in commit order of the effects (bigserial, one holder per aggregate)
        applied[row.aggregate_id].append(row.sequence)
    assert applied == outbox_sequences(engine)
    # The work was spread: more than one process held partitions and handled events.
    assert len({row.pid for row in rows}) >= 2
    assert len(handled_by) >= 2
