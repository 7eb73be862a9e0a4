"""The relay's hot queries use the partial indexes on a realistically shaped outbox: a million
published rows (retain mode keeps them for a week) and ten thousand pending ones."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from outbox_tasks.db import make_engine
from outbox_tasks.partitioning import slot_range
from outbox_tasks.settings import Settings
from outbox_tasks.store import relay as store
from tests.support import services

pytestmark = pytest.mark.timeout(120)

PUBLISHED_ROWS = 1_000_000
PENDING_ROWS = 10_000
PENDING_AGGREGATES = 1_000


@pytest.fixture(scope="module")
def loaded_engine(template_db: str) -> Iterator[Engine]:
    """A fresh outbox bulk-loaded in two statements, then analyzed; shared by this module's
    tests, which only read it (the load is most of the module's run time)."""
    with services.fresh_database(template_db) as database_url:
        settings = Settings.from_env({}, database_url=database_url, statement_timeout_seconds=120.0)
        engine = make_engine(settings, application_name="outbox_tasks.tests.claim_index")
        try:
            _load(engine)
            yield engine
        finally:
            engine.dispose()


LOAD_CHUNK = 100_000


def _load(engine: Engine) -> None:
    # In chunks, one transaction each: a long-running writer would hold back the commit-order
    # guard of every relay running on this PostgreSQL meanwhile (other test runs included).
    for start in range(1, PUBLISHED_ROWS + 1, LOAD_CHUNK):
        with engine.begin() as conn:
            # Ids and aggregate ids in ascending order keep the B-tree inserts at the right
            # edge, which makes the load about twice as fast as random ids; slots are still
            # spread by the hash.
            conn.execute(
                text(
                    "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, "
                    "created_at, published_at) "
                    "SELECT lpad(to_hex(g), 32, '0')::uuid, 'Order', "
                    "lpad((g / 10)::text, 7, '0'), 'OrderCreated', '{\"n\": 1}'::jsonb, "
                    "now() - interval '1 day', now() "
                    "FROM generate_series(:lo, :hi) AS g"
                ),
                {"lo": start, "hi": min(start + LOAD_CHUNK - 1, PUBLISHED_ROWS)},
            )
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "SELECT 'Order', 'p' || (g % :aggregates), 'OrderCreated', '{\"n\": 2}'::jsonb "
                "FROM generate_series(1, :n) AS g"
            ),
            {"n": PENDING_ROWS, "aggregates": PENDING_AGGREGATES},
        )
    with engine.begin() as conn:
        conn.execute(text("ANALYZE outbox"))


def _plan(conn: Connection, statement: Any, params: dict[str, Any]) -> dict[str, Any]:
    plan = conn.execute(text("EXPLAIN (FORMAT JSON) " + str(statement)), params).scalar_one()
    root: dict[str, Any] = plan[0]["Plan"]
    return root


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


def _outbox_scans(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(node type, index name) of every node that reads the outbox table."""
    return [
        (node["Node Type"], node.get("Index Name"))
        for node in _nodes(plan)
        if node.get("Relation Name") == "outbox"
    ]


def test_the_bulk_load_has_the_intended_shape(loaded_engine: Engine) -> None:
    with loaded_engine.connect() as conn:
        published, pending, lo_slot, hi_slot = conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE published_at IS NOT NULL), "
                "count(*) FILTER (WHERE published_at IS NULL), min(slot), max(slot) FROM outbox"
            )
        ).one()
        pending_in_partition = conn.execute(
            text("SELECT count(*) FROM outbox WHERE published_at IS NULL AND slot < 128")
        ).scalar_one()

    assert (published, pending) == (PUBLISHED_ROWS, PENDING_ROWS)
    assert (lo_slot, hi_slot) == (0, 1023)
    assert 0 < pending_in_partition < PENDING_ROWS


def test_the_claim_query_walks_the_pending_index_not_the_table(loaded_engine: Engine) -> None:
    lo, hi = slot_range(0, 8)
    with loaded_engine.connect() as conn:
        plan = _plan(
            conn,
            store._SELECT_CANDIDATES,
            {
                "lo": lo,
                "hi": hi,
                "limit": 500,
                "skip_types": ["Order", "Order"],
                "skip_ids": ["p1", "p7"],
            },
        )

    scans = _outbox_scans(plan)
    assert ("Index Scan", "ix_outbox_pending") in scans or (
        "Index Only Scan",
        "ix_outbox_pending",
    ) in scans, scans
    assert not any(node_type == "Seq Scan" for node_type, _ in scans), scans
    assert not any(n["Node Type"] == "Sort" and _reads_outbox_pending(n) for n in _nodes(plan))


def _reads_outbox_pending(node: dict[str, Any]) -> bool:
    """A Sort above the pending scan would mean the index order is not used (no early stop)."""
    return any(child.get("Index Name") == "ix_outbox_pending" for child in _nodes(node))


def test_the_claim_query_uses_the_pending_index_for_every_partition_of_eight(
    loaded_engine: Engine,
) -> None:
    with loaded_engine.connect() as conn:
        for partition in range(8):
            lo, hi = slot_range(partition, 8)
            scans = _outbox_scans(
                _plan(
                    conn,
                    store._SELECT_CANDIDATES,
                    {
                        "lo": lo,
                        "hi": hi,
                        "limit": 500,
                        "skip_types": ["Order", "Order"],
                        "skip_ids": ["p1", "p7"],
                    },
                )
            )
            assert any(index == "ix_outbox_pending" for _, index in scans), (partition, scans)
            assert all(node_type != "Seq Scan" for node_type, _ in scans), (partition, scans)


def test_the_claim_query_returns_rows_in_slot_then_seq_order(loaded_engine: Engine) -> None:
    lo, hi = slot_range(0, 8)
    with loaded_engine.connect() as conn:
        rows = conn.execute(
            store._SELECT_CANDIDATES,
            {
                "lo": lo,
                "hi": hi,
                "limit": 500,
                "skip_types": ["Order", "Order"],
                "skip_ids": ["p1", "p7"],
            },
        ).all()
        conn.rollback()

    keys = [(r.slot, r.seq) for r in rows]
    assert len(rows) == 500
    assert keys == sorted(keys)
    assert all(lo <= slot < hi for slot, _ in keys)


def test_the_head_of_line_check_uses_the_aggregate_pending_index(loaded_engine: Engine) -> None:
    params = {
        "types": ["Order", "Order", "Order", "Order"],
        "ids": ["p1", "p2", "p3", "0000042"],  # three pending aggregates and a published one
        "max_seqs": [10**12] * 4,
    }
    with loaded_engine.connect() as conn:
        plan = _plan(conn, store._PENDING_SEQS, params)
        result = store.pending_seqs(
            conn, {(t, i): m for t, i, m in zip(*params.values(), strict=True)}
        )

    scans = _outbox_scans(plan)
    assert any(index == "ix_outbox_aggregate_pending" for _, index in scans), scans
    assert not any(node_type == "Seq Scan" for node_type, _ in scans), scans
    assert set(result) == {("Order", "p1"), ("Order", "p2"), ("Order", "p3")}
    assert all(len(seqs) == PENDING_ROWS // PENDING_AGGREGATES for seqs in result.values())
