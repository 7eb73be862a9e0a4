"""What the serving path saves per batch, held on real PostgreSQL: a batch's finish does not wait
for the disk (its in-flight record covers a server crash), and a store session runs many
transactions on one connection."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks.relay import claim_partition
from outbox_tasks.settings import Settings
from outbox_tasks.store.relay import PostgresRelayStore
from tests.support.kit import insert_events


def test_a_batch_finish_commits_without_waiting_for_the_disk_and_nothing_else_does(
    engine: Engine, settings: Settings
) -> None:
    insert_events(engine, [("Order", "1")])
    store = PostgresRelayStore(engine)
    lease = claim_partition(store, settings.with_changes(partitions=1), owner="t", partition=0)
    assert lease is not None

    with store.transaction() as tx:
        rows = tx.select_candidates(lease.slot_lo, lease.slot_hi, 10)
        assert tx.mark_inflight(lease, ids=[r.id for r in rows], cursor_slot=0, lease_seconds=30)
        setting = tx.conn.execute(text("SHOW synchronous_commit")).scalar()
        assert setting == "on", "the in-flight record must be durable before publishing"
    with store.transaction() as tx:
        finish = tx.finish_batch(lease, [r.id for r in rows], [], delete_published=False)
        assert finish.marked == 1
        assert tx.conn.execute(text("SHOW synchronous_commit")).scalar() == "off"
    with store.transaction() as tx:
        assert tx.conn.execute(text("SHOW synchronous_commit")).scalar() == "on"


def test_a_store_session_runs_its_transactions_on_one_connection(engine: Engine) -> None:
    store = PostgresRelayStore(engine)
    pids = set()

    with store.session():
        for _ in range(5):
            with store.transaction() as tx:
                pids.add(tx.conn.execute(text("SELECT pg_backend_pid()")).scalar())

    assert len(pids) == 1
