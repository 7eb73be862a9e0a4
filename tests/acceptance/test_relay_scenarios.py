"""Relay scenarios through real Celery workers and beat: duplicated claims and two beats,
repartitioning on a live system, RabbitMQ with publisher confirms, and the wake-up path.

Every test reads what was published with an independent consumer (``kit.collecting``, bound
before anything is written) and keeps its own transactions short: an open transaction in the
test database would hold back the relay's commit-order guard.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue
from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks.settings import Settings
from tests.support.cluster import Cluster, Proc, cluster
from tests.support.kit import collecting, insert_events, pending_count, wait_until
from tests.support.producer import all_ids, insert_in_chunks, judge, producing
from tests.support.services import unique

pytestmark = pytest.mark.slow


def claims_app(settings: Settings) -> Celery:
    """A Celery client configured exactly like the workers (queues, routes, serializer)."""
    from outbox_tasks.celery import celery_config

    app = Celery("outbox_tasks.test_claims", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def claim_tasks_run(procs: list[Proc]) -> int:
    return sum(len(re.findall(r"Task outbox\.claim\[\S+\] succeeded", p.log())) for p in procs)


def task_errors(procs: list[Proc]) -> list[str]:
    """Log lines of tasks that raised (Celery logs them as ERROR)."""
    return [
        line
        for p in procs
        for line in p.log().splitlines()
        if "ERROR/" in line or "raised unexpected" in line
    ]


# --------------------------------------------------------------------------------------------
# 1. Two beats and duplicated claim tasks
# --------------------------------------------------------------------------------------------


def test_two_beats_and_duplicated_claim_tasks_publish_every_event_once_in_order(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    settings = settings.with_changes(partitions=8, batch_size=50, poll_interval_seconds=0.5)
    extra = claims_app(settings)
    stop = threading.Event()
    sent = Counter[str]()

    def duplicate_claims() -> None:
        # Every partition claimed twice by hand every 100 ms, plus a whole-range claim: on top
        # of the two beats, the wake-up listeners and drain chaining.
        while not stop.is_set():
            for partition in [*range(settings.partitions), *range(settings.partitions), None]:
                args = [] if partition is None else [partition]
                extra.send_task("outbox.claim", args=args, expires=2.0)
                sent["claim"] += 1
            stop.wait(0.1)

    with (
        collecting(settings.broker_url, settings.exchange) as consumer,
        cluster(settings, tmp_path) as c,
    ):
        workers = [c.worker(f"w{i}", concurrency=2) for i in range(2)]
        beats = [c.beat("beat1"), c.beat("beat2")]
        for proc in [*workers, *beats]:
            c.wait_ready(proc)
        duplicator = threading.Thread(target=duplicate_claims, daemon=True)
        duplicator.start()
        try:
            wait_until(lambda: sent["claim"] > 100, timeout=10, what="duplicate claims flowing")
            # 3000 events over 60 aggregates, 100 per short transaction, while claims rain.
            insert_in_chunks(engine, 3000, 60, chunk=100, prefix="D")
            wait_until(lambda: pending_count(engine) == 0, timeout=40, what="all rows marked")
        finally:
            stop.set()
            duplicator.join(5)
        wait_until(lambda: consumer.count() >= 3000, timeout=30, what="3000 events")
        claims_run = claim_tasks_run(workers)
        beat_sends = [b.log().count("Sending due task outbox.claim") for b in beats]
        with engine.connect() as conn:
            grants = int(
                conn.execute(
                    text("SELECT coalesce(sum(epoch), 0) FROM outbox_partition")
                ).scalar_one()
            )
        verdict = judge(consumer, all_ids(engine))
        print(
            f"\nclaims sent by hand {sent['claim']}, claim tasks run {claims_run}, "
            f"beat sends {beat_sends}, leases granted {grants}; {verdict.summary()}"
        )
        assert not verdict.lost
        assert not verdict.unknown
        assert verdict.received == 3000
        assert verdict.duplicates == 0, "no crash happened: a duplicate is a bug"
        assert verdict.order_violations == []
        assert all(n > 0 for n in beat_sends), "both beats were ticking"
        assert claims_run > sent["claim"] // 3, "the duplicated claims really ran"


# --------------------------------------------------------------------------------------------
# 2. Repartitioning on a live system: 4 -> 8 -> 4
# --------------------------------------------------------------------------------------------


@dataclass
class LeaseSampler:
    """Reads the live leases in a loop: two live leases of different partition counts over
    overlapping slot ranges must never be seen (DESIGN 4.2)."""

    engine: Engine
    phase: str = "start"
    samples: int = 0
    overlaps: list[str] = field(default_factory=list)
    live: Counter[tuple[str, int]] = field(default_factory=Counter)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        # clock_timestamp(), not now(): now() is the transaction's start, which a loaded machine
        # can put well before the statement's snapshot, so a lease released before the snapshot
        # would still look live "at" that time. A lease's end read after the snapshot is exact.
        query = text(
            "SELECT partition_count, partition, slot_lo, slot_hi, epoch, owner, leased_until, "
            "clock_timestamp() AS at FROM outbox_partition WHERE leased_until > clock_timestamp()"
        )
        try:
            with self.engine.connect() as conn:
                while not self._stop.is_set():
                    rows = conn.execute(query).all()
                    conn.commit()  # one short read-only transaction per sample
                    self.samples += 1
                    for a in rows:
                        self.live[(self.phase, a.partition_count)] += 1
                        for b in rows:
                            if (
                                a.partition_count < b.partition_count
                                and a.slot_lo < b.slot_hi
                                and b.slot_lo < a.slot_hi
                            ):
                                self.overlaps.append(
                                    f"at {a.at}: {a.partition_count}/{a.partition} epoch "
                                    f"{a.epoch} ({a.owner}) until {a.leased_until} and "
                                    f"{b.partition_count}/{b.partition} epoch {b.epoch} "
                                    f"({b.owner}) until {b.leased_until}"
                                )
                    self._stop.wait(0.01)
        except BaseException as error:
            self.error = error

    def seen(self, phase: str, partition_count: int) -> int:
        return self.live[(phase, partition_count)]


@contextmanager
def sampling(engine: Engine) -> Iterator[LeaseSampler]:
    sampler = LeaseSampler(engine)
    thread = threading.Thread(target=sampler.run, name="lease-sampler", daemon=True)
    thread.start()
    try:
        yield sampler
    finally:
        sampler._stop.set()
        thread.join(5)
    if sampler.error is not None:
        raise AssertionError(f"lease sampler failed: {sampler.error!r}")


def stop_together(procs: list[Proc], timeout: float = 20.0) -> list[str]:
    """Warm shutdown (SIGTERM) of several processes at once; each finishes its task in hand.
    Returns the names of those that did not exit by themselves within ``timeout`` and were
    killed (Celery's prefork pool can wait up to 30 s at exit for its parent to read the last
    task result, long after the task itself finished)."""
    threads = [threading.Thread(target=p.stop, args=(timeout,)) for p in procs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 15)
    return [p.name for p in procs if p.popen.returncode not in (0, None)]


def start_ready(c: Cluster, names: list[str], settings: Settings) -> list[Proc]:
    """Workers and a beat (the name starting with 'beat') started at once, waited for."""
    procs = [
        c.beat(name, settings=settings)
        if name.startswith("beat")
        else c.worker(name, settings=settings)
        for name in names
    ]
    for proc in procs:
        c.wait_ready(proc)
    return procs


def test_repartitioning_from_4_to_8_and_back_never_lets_two_workers_publish_one_aggregate(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    four = settings.with_changes(
        partitions=4, batch_size=20, poll_interval_seconds=0.5, publish_task_seconds=1.0
    )
    eight = four.with_changes(partitions=8)
    with (
        collecting(four.broker_url, four.exchange) as consumer,
        cluster(four, tmp_path) as c,
        sampling(engine) as sampler,
        producing(engine, aggregates=40, per_transaction=3, interval=0.02, prefix="R") as producer,
    ):
        began = time.monotonic()
        timeline: list[str] = []

        def mark(what: str) -> None:
            timeline.append(
                f"{time.monotonic() - began:5.1f} s  {what} (written {producer.count()}, "
                f"received {consumer.count()})"
            )

        def progress(phase: str, count: int, at_least: int) -> None:
            sampler.phase = phase
            mark(f"phase {phase}")
            start = consumer.count()
            wait_until(
                lambda: sampler.seen(phase, count) > 0 and consumer.count() >= start + at_least,
                timeout=20,
                what=f"phase {phase}: live leases of {count} and {at_least} more events",
            )
            mark(f"phase {phase}: {count}-leases live, {at_least} more events")

        killed: list[str] = []
        sampler.phase = "4"
        *fours, beat = start_ready(c, ["w4a", "w4b", "beat4"], four)
        progress("4", 4, 150)

        # Roll out 8: new workers and beat first, then the old ones leave (warm shutdown).
        *eights, new_beat = start_ready(c, ["w8a", "w8b", "beat8"], eight)
        progress("4+8", 8, 50)
        killed += stop_together([beat, *fours], timeout=10)
        beat = new_beat
        mark("4-workers and 4-beat stopped")
        progress("8", 8, 150)

        # And back to 4.
        *fours, new_beat = start_ready(c, ["w4c", "w4d", "beat4b"], four)
        progress("8+4", 4, 50)
        killed += stop_together([beat, *eights], timeout=10)
        mark("8-workers and 8-beat stopped")
        progress("4 again", 4, 150)

        producer.stop()
        committed = producer.committed_ids()
        wait_until(
            lambda: committed <= consumer.unique_ids(), timeout=20, what="every committed event"
        )
        verdict = judge(consumer, committed)
        errors = task_errors(c.procs)
        print(
            f"\n{len(committed)} events in {producer.transactions} transactions; "
            f"{sampler.samples} lease samples, live leases seen per (phase, count): "
            f"{dict(sampler.live)}; {verdict.summary()}; task errors: {len(errors)}; "
            f"killed after a slow warm shutdown: {killed}"
        )
        print("\n".join(timeline))
        for line in errors[:10]:
            print("  ", line)
        assert sampler.overlaps == [], sampler.overlaps[:10]
        assert not verdict.lost
        assert not verdict.unknown
        assert verdict.order_violations == []
        assert verdict.unmarked_duplicates == []
        if not [name for name in killed if name.startswith("w")]:
            # Warm shutdowns only: no lease was lost, so nothing was sent twice.
            assert verdict.duplicates == 0
        stop_together([p for p in c.procs if p.alive()])


# --------------------------------------------------------------------------------------------
# 3. RabbitMQ: order with publisher confirms; a nack is a failure of that message
# --------------------------------------------------------------------------------------------


@contextmanager
def amqp_exchange_cleanup(url: str, name: str) -> Iterator[None]:
    try:
        yield
    finally:
        try:
            with Connection(url) as conn:
                Exchange(name, type="topic")(conn.default_channel).delete()
        except Exception:
            pass


def test_events_arrive_in_sequence_order_through_three_workers_publishing_to_rabbitmq(
    settings: Settings, engine: Engine, amqp_url: str, tmp_path: Path
) -> None:
    settings = settings.with_changes(
        partitions=6, batch_size=50, poll_interval_seconds=0.5, publish_url=amqp_url
    )
    with (
        amqp_exchange_cleanup(amqp_url, settings.exchange),
        collecting(amqp_url, settings.exchange) as consumer,
        cluster(settings, tmp_path) as c,
    ):
        workers = [c.worker(f"w{i}") for i in range(3)]
        beat = c.beat()
        for proc in [*workers, beat]:
            c.wait_ready(proc)
        insert_in_chunks(engine, 2000, 50, chunk=200)
        wait_until(lambda: consumer.count() >= 2000, timeout=45, what="2000 events at RabbitMQ")
        wait_until(lambda: pending_count(engine) == 0, timeout=10, what="all rows marked")
        verdict = judge(consumer, all_ids(engine))
        print(f"\n{verdict.summary()}")
        assert verdict.order_violations == []
        assert not verdict.lost
        assert not verdict.unknown
        assert verdict.duplicates == 0
        assert all("outbox.publish" in w.log() for w in workers), c.logs()


def retries_of(engine: Engine, event_id: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT retry_count, last_error, published_at, dead_lettered_at FROM outbox "
                "WHERE id = :id"
            ),
            {"id": event_id},
        ).one()
    return dict(row._mapping)


def test_a_rabbitmq_nack_holds_its_aggregate_without_spending_a_retry_and_the_others_flow(
    settings: Settings, engine: Engine, amqp_url: str, tmp_path: Path
) -> None:
    settings = settings.with_changes(
        partitions=2,
        poll_interval_seconds=0.5,
        publish_url=amqp_url,
        backoff_base_seconds=0.2,
        backoff_max_seconds=0.5,
        max_retries=1000,
    )
    exchange = Exchange(settings.exchange, type="topic", durable=True)
    # A full queue that rejects publishes makes RabbitMQ nack what is routed to it.
    rejecting = Queue(
        unique("test.rejecting"),
        exchange,
        routing_key="Order.OrderRejected",
        queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    with (
        amqp_exchange_cleanup(amqp_url, settings.exchange),
        Connection(amqp_url) as admin,
        collecting(amqp_url, settings.exchange) as consumer,
        cluster(settings, tmp_path) as c,
    ):
        rejecting(admin.default_channel).declare()
        try:
            worker = c.worker("w", concurrency=2)
            beat = c.beat()
            c.wait_ready(worker)
            c.wait_ready(beat)
            [created] = insert_events(engine, [("Order", "R")], event_type="OrderCreated")
            [rejected] = insert_events(engine, [("Order", "R")], event_type="OrderRejected")
            [shipped] = insert_events(engine, [("Order", "R")], event_type="OrderShipped")
            others = insert_in_chunks_ids(engine, 300, 10)

            ids = consumer.unique_ids
            wait_until(
                lambda: {str(i) for i in [created, *others]} <= ids(),
                timeout=20,
                what="the first event of R and every other aggregate",
            )
            wait_until(
                lambda: "nack" in (retries_of(engine, rejected)["last_error"] or ""),
                timeout=20,
                what="the nacked message held back",
            )
            row = retries_of(engine, rejected)
            # Backpressure (issue 11): the broker is healthy but will not take it now.
            assert row["retry_count"] == 0, "a nack spends no retry"
            assert row["published_at"] is None and row["dead_lettered_at"] is None
            assert str(shipped) not in ids(), "the event after a nacked one was not sent"
            assert retries_of(engine, shipped)["retry_count"] == 0, "a waiting row is not charged"
        finally:
            rejecting(admin.default_channel).delete()

        # The queue is gone: the next retry is confirmed and R flows on, in order.
        wait_until(lambda: str(shipped) in consumer.unique_ids(), timeout=10, what="R released")
        assert consumer.order_violations() == []
        first = [m.id for m in consumer.snapshot() if m.aggregate == ("Order", "R")]
        assert list(dict.fromkeys(first)) == [str(created), str(rejected), str(shipped)]


def insert_in_chunks_ids(engine: Engine, count: int, aggregates: int) -> list[str]:
    before = all_ids(engine)
    insert_in_chunks(engine, count, aggregates, chunk=100, prefix="B")
    return sorted(all_ids(engine) - before)


# --------------------------------------------------------------------------------------------
# 4. The wake-up path
# --------------------------------------------------------------------------------------------

CLAIM_DONE = re.compile(r"Task outbox\.claim\[\S+\] succeeded")


def wait_for_tick(worker: Proc, timeout: float = 15.0) -> None:
    """Until the worker has run a new claim task (beat's tick): the next is a whole poll
    interval away, and the pool process is warm (engine and broker connection built)."""
    before = len(CLAIM_DONE.findall(worker.log()))
    wait_until(
        lambda: len(CLAIM_DONE.findall(worker.log())) > before,
        timeout=timeout,
        interval=0.01,
        what="a beat tick",
    )


def latency_of_one_event(settings: Settings, engine: Engine, tmp_path: Path) -> tuple[float, float]:
    """Start a worker and beat, let the system go idle, write one event right after a tick.
    Returns (seconds from commit to arrival, seconds from the tick to arrival)."""
    with (
        collecting(settings.broker_url, settings.exchange) as consumer,
        cluster(settings, tmp_path) as c,
    ):
        worker = c.worker("w")
        beat = c.beat()
        c.wait_ready(worker)
        c.wait_ready(beat)
        if settings.wakeup_enabled:
            wait_until(lambda: "wakeup_listening" in worker.log(), timeout=10, what="listener")
        wait_for_tick(worker)  # one tick done: idle, and the next tick is ~5 s away
        before = time.time()
        [event_id] = insert_events(engine, [("Order", "W1")])
        committed = time.time()
        wait_until(lambda: consumer.count() >= 1, timeout=settings.poll_interval_seconds + 3)
        [received] = consumer.snapshot()
        assert received.id == str(event_id)
        print(
            f"\nwake-up {'on' if settings.wakeup_enabled else 'off'}: insert+commit took "
            f"{committed - before:.3f} s, commit -> arrival {received.at - committed:.3f} s "
            f"(start of the transaction -> arrival {received.at - before:.3f} s)"
        )
        return received.at - committed, received.at - before


def test_one_event_written_to_an_idle_system_arrives_in_well_under_a_second(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    settings = settings.with_changes(partitions=4, poll_interval_seconds=5)
    latency, _ = latency_of_one_event(settings, engine, tmp_path)
    assert latency < 1.0


def test_without_the_wake_up_listener_an_event_waits_for_the_next_poll_tick(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    settings = settings.with_changes(partitions=4, poll_interval_seconds=5, wakeup_enabled=False)
    latency, since_tick = latency_of_one_event(settings, engine, tmp_path)
    # Written just after a tick: nothing claims it until the next one, a poll interval later.
    assert latency > 1.0
    assert since_tick < 6.5
