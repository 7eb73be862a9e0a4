"""The relay against real PostgreSQL and Redis, in-process (no Celery), so each scenario can be
staged exactly: open transactions, expired leases, failing messages, a cut broker."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from outbox_tasks.envelope import OutboundMessage, message_for_row
from outbox_tasks.errors import DatabaseUnavailable
from outbox_tasks.partitioning import partition_of_aggregate
from outbox_tasks.publisher import BatchResult, BrokerPublisher
from outbox_tasks.relay import Relay
from outbox_tasks.schema import OutboxMessage
from outbox_tasks.settings import Settings
from outbox_tasks.store import relay as store
from outbox_tasks.store.relay import PostgresRelayStore
from tests.support.kit import bulk_insert, collecting, insert_events, pending_count, wait_until
from tests.support.publishers import RefusingPublisher
from tests.support.relaying import drain, make_relay, wait_for


@pytest.fixture
def publisher(settings: Settings) -> Iterator[BrokerPublisher]:
    pub = BrokerPublisher(settings.effective_publish_url, settings.exchange, timeout_seconds=2)
    pub.declare()
    yield pub
    pub.close()


def test_each_aggregate_arrives_in_sequence_order_across_partitions_and_small_batches(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    settings = settings.with_changes(partitions=3, batch_size=7)
    bulk_insert(engine, 600, 25)
    with collecting(settings.broker_url, settings.exchange) as collector:
        assert drain(make_relay(settings, engine, publisher)) == 600
        wait_for(collector, 600)
        assert collector.order_violations() == []
        assert collector.duplicates() == 0
    assert pending_count(engine) == 0


def test_messages_carry_the_design_envelope_and_headers(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    with Session(engine, expire_on_commit=False) as session, session.begin():
        message = OutboxMessage(
            aggregate_type="Order",
            aggregate_id=7,
            event_type="OrderPaid",
            payload={"amount": "9.99"},
            headers={"traceparent": "00-abc-def-01"},
        )
        session.add(message)
    with collecting(settings.broker_url, settings.exchange, "Order.*") as collector:
        drain(make_relay(settings, engine, publisher))
        wait_for(collector, 1)
        got = collector.snapshot()[0]
    assert set(got.body) == {
        "id",
        "aggregate_type",
        "aggregate_id",
        "event_type",
        "occurred_at",
        "schema_version",
        "sequence",
        "aggregate_sequence",
        "previous_aggregate_sequence",
        "payload",
    }
    assert got.body["aggregate_sequence"] == 1
    assert got.body["previous_aggregate_sequence"] == 0
    assert got.headers["outbox-aggregate-sequence"] == 1
    assert got.headers["outbox-previous-aggregate-sequence"] == 0
    assert got.body["payload"] == {"amount": "9.99"}
    assert got.headers["traceparent"] == "00-abc-def-01"
    assert got.headers["outbox-event-id"] == str(message.id)
    assert got.headers["outbox-aggregate-id"] == "7"
    assert got.headers["outbox-redelivered"] is False
    assert got.headers["outbox-attempt"] == 1
    assert got.headers["outbox-epoch"] >= 1


def test_an_open_transaction_delays_only_its_own_aggregate_and_its_writers(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    relay = make_relay(settings, engine, publisher)
    with collecting(settings.broker_url, settings.exchange) as collector:
        with Session(engine, expire_on_commit=False) as a:
            a.begin()
            first = OutboxMessage(
                aggregate_type="Order",
                aggregate_id="X",
                event_type="OrderCreated",
                payload={"n": 1},
            )
            a.add(first)
            a.flush()  # the row exists, uncommitted; X's counter row is locked until A ends
            # Another aggregate is not held back by A (it used to wait for every older xid).
            [other] = insert_events(engine, [("Order", "Y")])
            assert drain(relay) == 1
            wait_for(collector, 1)
            assert collector.unique_ids() == {str(other)}
            # A second writer of X waits for A, so it can never be published before A's row.
            second: list[object] = []
            writer = threading.Thread(
                target=lambda: second.extend(
                    insert_events(engine, [("Order", "X")], event_type="OrderPaid")
                ),
                daemon=True,
            )
            writer.start()
            writer.join(0.5)
            assert writer.is_alive()
            assert drain(relay) == 0
            a.commit()
        writer.join(10)
        assert len(second) == 1
        assert drain(relay) == 2
        wait_for(collector, 3)
        x = [m for m in collector.snapshot() if m.aggregate == ("Order", "X")]
        assert [m.id for m in x] == [str(first.id), str(second[0])]
        assert [m.body["aggregate_sequence"] for m in x] == [1, 2]
        assert [m.body["previous_aggregate_sequence"] for m in x] == [0, 1]
        assert x[0].sequence < x[1].sequence


def test_a_rolled_back_row_is_never_published(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    with Session(engine) as session:
        session.begin()
        session.add(
            OutboxMessage(
                aggregate_type="Order", aggregate_id="R", event_type="OrderCreated", payload={}
            )
        )
        session.flush()
        session.rollback()
    [kept] = insert_events(engine, [("Order", "K")])
    with collecting(settings.broker_url, settings.exchange) as collector:
        assert drain(make_relay(settings, engine, publisher)) == 1
        wait_for(collector, 1)
        assert collector.unique_ids() == {str(kept)}


def test_a_second_claim_on_a_leased_partition_is_a_no_op(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    settings = settings.with_changes(partitions=1)
    insert_events(engine, [("Order", "1")])
    relay = make_relay(settings, engine, publisher)
    lease = relay.claim(0)
    assert lease is not None
    assert relay.claim(0) is None
    assert make_relay(settings, engine, publisher, owner="other").claim(0) is None
    report = relay.publish(0, lease.epoch)
    assert report.published == 1
    # The lease was released: the next claim is granted with a higher epoch.
    insert_events(engine, [("Order", "1")])
    again = relay.claim(0)
    assert again is not None and again.epoch == lease.epoch + 1


def test_a_publish_task_with_a_superseded_epoch_does_nothing(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    settings = settings.with_changes(partitions=1)
    insert_events(engine, [("Order", "1")])
    relay = make_relay(settings, engine, publisher)
    lease = relay.claim(0)
    assert lease is not None
    report = relay.publish(0, lease.epoch + 5)
    assert report.published == 0
    assert pending_count(engine) == 1


def expire_leases(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE outbox_partition SET leased_until = clock_timestamp() - interval '1 second'"
            )
        )


def test_a_worker_whose_lease_expired_mid_publish_cannot_mark_or_fail_any_row(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    """Worker A is stuck inside the broker call; its lease expires; B takes over and publishes;
    A wakes up and tries to mark its batch and record a failure: nothing changes."""
    settings = settings.with_changes(partitions=1, batch_size=100)
    ids = insert_events(engine, [("Order", str(i % 5)) for i in range(20)])
    entered, release = threading.Event(), threading.Event()

    @dataclass
    class StuckPublisher:
        def publish_batch(self, messages: Sequence[OutboundMessage]) -> BatchResult:
            entered.set()
            release.wait(20)
            result = publisher.publish_batch(messages[1:])
            return BatchResult(
                published=result.published,
                failed={messages[0].event_id: "late failure"},
                skipped=[],
            )

    a = make_relay(settings, engine, StuckPublisher(), owner="A")
    b = make_relay(settings, engine, publisher, owner="B")
    lease_a = a.claim(0)
    assert lease_a is not None
    reports = []
    thread = threading.Thread(target=lambda: reports.append(a.publish(0, lease_a.epoch)))
    thread.start()
    assert entered.wait(10)
    expire_leases(engine)
    lease_b = b.claim(0)
    assert lease_b is not None and lease_b.epoch == lease_a.epoch + 1
    assert b.publish(0, lease_b.epoch).published == 20
    with engine.connect() as conn:
        before = conn.execute(
            text(
                "SELECT id, published_at, retry_count, last_error, "
                "next_attempt_at FROM outbox ORDER BY seq"
            )
        ).all()
    release.set()
    thread.join(20)
    with engine.connect() as conn:
        after = conn.execute(
            text(
                "SELECT id, published_at, retry_count, last_error, "
                "next_attempt_at FROM outbox ORDER BY seq"
            )
        ).all()
    assert after == before
    assert reports[0].lease_lost and reports[0].published == 0
    assert all(r.retry_count == 0 for r in after)
    assert len(ids) == 20


def test_rows_sent_by_a_crashed_holder_are_resent_marked_redelivered(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    """A holder sends a batch and dies before marking it: the next holder re-sends exactly those
    rows with outbox-redelivered true; rows written later are not flagged."""
    settings = settings.with_changes(partitions=1, batch_size=10)
    first = insert_events(engine, [("Order", str(i)) for i in range(10)])
    relay = make_relay(settings, engine, publisher, owner="crashing")
    lease = relay.claim(0)
    assert lease is not None
    # What the publish loop does up to the broker call, then "crash" (no finish_batch).
    with engine.begin() as conn:
        rows = store.select_candidates(conn, lease.slot_lo, lease.slot_hi, 10)
        assert store.mark_inflight(
            conn, lease, ids=[r.id for r in rows], cursor_slot=0, lease_seconds=30
        )
    with collecting(settings.broker_url, settings.exchange) as collector:
        publisher.publish_batch(
            [
                message_for_row(r, partition=lease.partition, epoch=lease.epoch, redelivered=False)
                for r in rows
            ]
        )
        later = insert_events(engine, [("Order", "new")])
        expire_leases(engine)
        assert drain(make_relay(settings, engine, publisher, owner="next")) == 11
        wait_for(collector, 21)
        resent = [m for m in collector.snapshot()[10:]]
    flags = {m.id: m.headers["outbox-redelivered"] for m in resent}
    assert {str(i) for i in first} == {i for i, flag in flags.items() if flag}
    assert flags[str(later[0])] is False


def test_a_failing_message_backs_off_holds_its_aggregate_and_parks_after_max_retries(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    settings = settings.with_changes(
        partitions=1, max_retries=2, backoff_base_seconds=0.001, backoff_max_seconds=0.002
    )
    poison, behind = insert_events(engine, [("Order", "P"), ("Order", "P")])
    others = insert_events(engine, [("Order", "Q"), ("Order", "Q")])
    refusing = RefusingPublisher(publisher, refuse={str(poison)})
    relay = make_relay(settings, engine, refusing)
    with collecting(settings.broker_url, settings.exchange) as collector:
        for _ in range(10):
            drain(relay)
            with engine.connect() as conn:
                row = conn.execute(
                    text("SELECT retry_count, dead_lettered_at FROM outbox WHERE id = :id"),
                    {"id": poison},
                ).one()
            if row.dead_lettered_at is not None:
                break
            threading.Event().wait(0.01)  # let the millisecond backoff pass
        wait_for(collector, 2)
        assert collector.unique_ids() == {str(i) for i in others}
    assert refusing.attempts[str(poison)] == 3  # first try + max_retries
    with engine.connect() as conn:
        rows = {
            r.id: r
            for r in conn.execute(
                text(
                    "SELECT id, retry_count, last_error, next_attempt_at, published_at, "
                    "dead_lettered_at, first_failed_at FROM outbox"
                )
            )
        }
    assert rows[poison].retry_count == 3
    assert rows[poison].dead_lettered_at is not None
    assert rows[poison].first_failed_at is not None
    assert "PoisonError" in rows[poison].last_error
    assert rows[behind].published_at is None and rows[behind].retry_count == 0


def test_a_parked_aggregate_does_not_hold_back_ten_thousand_events_of_its_partition(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    settings = settings.with_changes(partitions=1, batch_size=1000, max_retries=0)
    [poison] = insert_events(engine, [("Order", "P")])
    insert_events(engine, [("Order", "P")] * 5)
    bulk_insert(engine, 10_000, 200)
    relay = make_relay(settings, engine, RefusingPublisher(publisher, refuse={str(poison)}))
    with collecting(settings.broker_url, settings.exchange) as collector:
        assert drain(relay, rounds=100) == 10_000
        wait_for(collector, 10_000)
        assert collector.order_violations() == []
        assert not any(m.aggregate == ("Order", "P") for m in collector.snapshot())
    assert pending_count(engine) == 6


def test_an_aggregate_in_backoff_with_100k_rows_behind_it_does_not_starve_its_partition(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    settings = settings.with_changes(partitions=1, batch_size=500)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "SELECT 'Order', 'hot', 'OrderCreated', '{}'::jsonb FROM generate_series(1, 100000)"
            )
        )
        conn.execute(
            text(
                "UPDATE outbox SET retry_count = 1, next_attempt_at = clock_timestamp() + "
                "interval '1 hour' WHERE seq = (SELECT min(seq) FROM outbox)"
            )
        )
        conn.execute(text("ANALYZE outbox"))
    bulk_insert(engine, 1000, 100, prefix="cold")
    with collecting(settings.broker_url, settings.exchange) as collector:
        assert drain(make_relay(settings, engine, publisher)) == 1000
        wait_for(collector, 1000)
        assert {m.aggregate[1][:4] for m in collector.snapshot()} == {"cold"}


def test_a_broker_outage_spends_no_retry_budget_and_publishing_resumes_after_it(
    settings: Settings, engine: Engine, tcp_proxy: object, redis_db: int
) -> None:
    proxy = tcp_proxy("127.0.0.1", 6379)  # type: ignore[operator]
    proxied = f"redis://127.0.0.1:{proxy.port}/{redis_db}"
    settings = settings.with_changes(partitions=1, publish_url=proxied)
    pub = BrokerPublisher(proxied, settings.exchange, timeout_seconds=1)
    clock = [0.0]
    relay = Relay(
        settings,
        PostgresRelayStore(engine),
        pub,
        owner="t",
        clock=lambda: clock[0],
        jitter=lambda: 0.0,
    )
    bulk_insert(engine, 50, 5)
    with collecting(settings.broker_url, settings.exchange) as collector:
        pub.declare()
        proxy.cut()
        lease = relay.claim(0)
        assert lease is not None
        report = relay.publish(0, lease.epoch)
        assert report.circuit_open and report.published == 0
        assert relay.circuit.is_open
        assert relay.claim(0) is None, "claims pause while the circuit is open"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT max(retry_count) FROM outbox")).scalar() == 0
        proxy.restore()
        clock[0] += settings.circuit_max_seconds + 1
        assert drain(relay) == 50
        assert not relay.circuit.is_open
        wait_for(collector, 50)
        assert collector.order_violations() == []
    pub.close()


def test_a_database_outage_raises_database_unavailable_and_loses_nothing(
    settings: Settings, engine: Engine, publisher: BrokerPublisher, tcp_proxy: object
) -> None:
    from outbox_tasks.db import make_engine

    proxy = tcp_proxy("127.0.0.1", 5432)  # type: ignore[operator]
    url = settings.database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    proxied_settings = settings.with_changes(database_url=url, partitions=1)
    proxied_engine = make_engine(proxied_settings)
    bulk_insert(engine, 30, 3)
    relay = make_relay(proxied_settings, proxied_engine, publisher)
    proxy.cut()
    with pytest.raises(DatabaseUnavailable):
        relay.claim(0)
    proxy.restore()
    with collecting(settings.broker_url, settings.exchange) as collector:
        assert drain(relay) == 30
        wait_for(collector, 30)
        assert collector.duplicates() == 0
    proxied_engine.dispose()


def test_a_range_leased_under_another_partition_count_is_not_granted_until_released(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    insert_events(engine, [("Order", str(i)) for i in range(200)])
    four = make_relay(settings.with_changes(partitions=4), engine, publisher, owner="four")
    eight = make_relay(settings.with_changes(partitions=8), engine, publisher, owner="eight")
    held = four.claim(0)  # slots 0-255
    assert held is not None
    assert eight.claim(0) is None  # slots 0-127 overlap
    assert eight.claim(1) is None  # slots 128-255 overlap
    assert eight.claim(2) is not None  # slots 256-383: free
    four.publish(0, held.epoch)  # releases when drained
    insert_events(engine, [("Order", str(i)) for i in range(200, 400)])
    assert eight.claim(0) is not None


def test_delete_mode_removes_rows_in_the_statement_that_would_mark_them(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    settings = settings.with_changes(cleanup_mode="delete")
    bulk_insert(engine, 40, 4)
    with collecting(settings.broker_url, settings.exchange) as collector:
        assert drain(make_relay(settings, engine, publisher)) == 40
        wait_for(collector, 40)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM outbox")).scalar() == 0


def test_rows_locked_by_a_stalled_transaction_do_not_starve_the_rest_of_the_partition(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    """A former holder frozen inside its select transaction keeps the head rows of one aggregate
    locked: the new holder skips that aggregate and publishes everything else."""
    settings = settings.with_changes(partitions=1, batch_size=100)
    bulk_insert(engine, 2000, 10)
    with engine.connect() as stalled, collecting(settings.broker_url, settings.exchange) as got:
        stalled.execute(
            text("SELECT id FROM outbox WHERE aggregate_id = 'A0' ORDER BY seq LIMIT 50 FOR UPDATE")
        )
        assert drain(make_relay(settings, engine, publisher)) == 1800
        wait_for(got, 1800)
        assert not any(m.aggregate == ("Order", "A0") for m in got.snapshot())
        stalled.rollback()
        assert drain(make_relay(settings, engine, publisher)) == 200
        wait_for(got, 2000)
        assert got.order_violations() == []


def test_a_grant_under_another_partition_count_waits_for_a_renewal_in_progress(
    settings: Settings, engine: Engine, publisher: BrokerPublisher
) -> None:
    """A holder renews its lease in a transaction that commits only after the old expiry; a
    grant for an overlapping range of another partition count must wait and then see the
    renewal, never grant a second live lease over the same aggregates."""
    [event_id] = insert_events(engine, [("Order", "x")])
    four = make_relay(
        settings.with_changes(partitions=4, lease_seconds=1, publish_task_seconds=0.5),
        engine,
        publisher,
        owner="holder",
    )
    eight = make_relay(settings.with_changes(partitions=8), engine, publisher, owner="newcomer")
    lease = four.claim(partition_of_aggregate("Order", "x", 4))
    assert lease is not None
    with engine.connect() as holder:
        holder.begin()
        assert store.mark_inflight(holder, lease, ids=[event_id], cursor_slot=0, lease_seconds=30)
        # Let the lease as committed expire while its renewal is still uncommitted.
        wait_until(lambda: expired(engine), timeout=10, what="the committed lease to expire")
        granted: list[object] = []
        claimer = threading.Thread(
            target=lambda: granted.append(eight.claim(partition_of_aggregate("Order", "x", 8)))
        )
        claimer.start()
        wait_until(lambda: waiting_on_a_lock(engine), timeout=10, what="the grant to wait")
        holder.commit()
    claimer.join(10)
    assert granted == [None]
    with engine.connect() as conn:
        live = conn.execute(
            text("SELECT partition_count FROM outbox_partition WHERE leased_until > now()")
        ).scalars()
        assert list(live) == [4]


def expired(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text("SELECT bool_and(leased_until < clock_timestamp()) FROM outbox_partition")
            ).scalar()
        )


def waiting_on_a_lock(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            ).scalar()
        )
