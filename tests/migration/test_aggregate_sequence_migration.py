"""Migration 0004 on a table that already has rows: existing rows are numbered per aggregate in
``seq`` order, the counters continue from there, and down/up/up gives the same numbers."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Engine

pytestmark = pytest.mark.timeout(120)

PLAIN_INSERT = text(
    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
    "VALUES (:type, :id, :event, '{}')"
)


def _insert(engine: Engine, *rows: tuple[str, str, str]) -> None:
    with engine.begin() as conn:
        for aggregate_type, aggregate_id, event_type in rows:
            conn.execute(
                PLAIN_INSERT, {"type": aggregate_type, "id": aggregate_id, "event": event_type}
            )


def _numbers(engine: Engine) -> list[tuple[str, str, str, int]]:
    with engine.connect() as conn:
        return [
            (r.aggregate_type, r.aggregate_id, r.event_type, r.aggregate_sequence)
            for r in conn.execute(
                text(
                    "SELECT aggregate_type, aggregate_id, event_type, aggregate_sequence "
                    "FROM outbox ORDER BY seq"
                )
            )
        ]


def _counters(engine: Engine) -> dict[tuple[str, str], int]:
    with engine.connect() as conn:
        return {
            (r.aggregate_type, r.aggregate_id): r.last_sequence
            for r in conn.execute(
                text("SELECT aggregate_type, aggregate_id, last_sequence FROM outbox_aggregate")
            )
        }


def _columns(engine: Engine, table: str) -> set[str]:
    with engine.connect() as conn:
        return set(
            conn.execute(
                text(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND table_name = :table"
                ),
                {"table": table},
            ).scalars()
        )


def test_existing_rows_are_numbered_per_aggregate_in_seq_order_and_counting_continues(
    alembic_config: Config, db_engine: Engine
) -> None:
    command.upgrade(alembic_config, "0003")
    _insert(
        db_engine,
        ("Order", "1", "Created"),
        ("Order", "2", "Created"),
        ("Invoice", "1", "Opened"),  # same id, other type: another aggregate
        ("Order", "1", "Paid"),
        ("Order", "1", "Shipped"),
    )
    with db_engine.begin() as conn:
        # Published rows are numbered too: they keep their place in the aggregate's history.
        conn.execute(text("UPDATE outbox SET published_at = now() WHERE event_type = 'Created'"))
        conn.execute(
            text(
                "INSERT INTO outbox_consumer_position (consumer_group, aggregate_type, "
                "aggregate_id, last_sequence) VALUES ('billing', 'Order', '1', 4)"
            )
        )

    command.upgrade(alembic_config, "0004")

    assert _numbers(db_engine) == [
        ("Order", "1", "Created", 1),
        ("Order", "2", "Created", 1),
        ("Invoice", "1", "Opened", 1),
        ("Order", "1", "Paid", 2),
        ("Order", "1", "Shipped", 3),
    ]
    assert _counters(db_engine) == {("Order", "1"): 3, ("Order", "2"): 1, ("Invoice", "1"): 1}
    with db_engine.connect() as conn:
        position = conn.execute(
            text(
                "SELECT last_sequence, last_aggregate_sequence, parked_reason "
                "FROM outbox_consumer_position"
            )
        ).one()
    # The group has not seen an aggregate_sequence yet: it accepts the next one it gets.
    assert tuple(position) == (4, None, None)

    _insert(db_engine, ("Order", "1", "Delivered"), ("Order", "3", "Created"))
    assert _numbers(db_engine)[-2:] == [
        ("Order", "1", "Delivered", 4),
        ("Order", "3", "Created", 1),
    ]


def test_down_and_up_again_gives_the_same_numbers_and_removes_everything_it_added(
    alembic_config: Config, db_engine: Engine
) -> None:
    command.upgrade(alembic_config, "0004")
    _insert(
        db_engine,
        ("Order", "1", "Created"),
        ("Order", "2", "Created"),
        ("Order", "1", "Paid"),
    )
    before = _numbers(db_engine)

    command.downgrade(alembic_config, "0003")
    assert "aggregate_sequence" not in _columns(db_engine, "outbox")
    assert _columns(db_engine, "outbox_aggregate") == set()
    assert _columns(db_engine, "outbox_aggregate_skip") == set()
    assert {"last_aggregate_sequence", "parked_reason"}.isdisjoint(
        _columns(db_engine, "outbox_consumer_position")
    )
    _insert(db_engine, ("Order", "2", "Paid"))  # written while downgraded

    command.upgrade(alembic_config, "0004")

    assert _numbers(db_engine) == [*before, ("Order", "2", "Paid", 2)]
    assert _counters(db_engine) == {("Order", "1"): 2, ("Order", "2"): 2}
    _insert(db_engine, ("Order", "2", "Shipped"))
    assert _numbers(db_engine)[-1] == ("Order", "2", "Shipped", 3)
