"""`outbox-tasks status` and `events` against a real database."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks.cli import main
from outbox_tasks.settings import Settings
from outbox_tasks.status import add_circuits, collect_status, db_snapshot, render_status
from tests.support.kit import insert_events


def test_status_reports_backlog_per_partition_and_is_healthy_without_problems(
    settings: Settings, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    insert_events(engine, [("Order", str(i)) for i in range(10)])
    status = collect_status(engine, settings)
    assert status.pending == 10
    assert sum(p.backlog for p in status.partition_rows) == 10
    assert status.partitions_unowned == sum(1 for p in status.partition_rows if p.backlog)
    assert status.healthy
    assert main(["status", "--json", "--database-url", settings.database_url]) == 0
    assert json.loads(capsys.readouterr().out)["pending"] == 10


def test_status_exits_non_zero_when_an_aggregate_is_parked(
    settings: Settings, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    [parked] = insert_events(engine, [("Order", "P")])
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE outbox SET dead_lettered_at = now(), retry_count = 6 WHERE id = :id"),
            {"id": parked},
        )
    assert main(["status", "--database-url", settings.database_url]) == 1
    out = capsys.readouterr().out
    assert "attention: 1 dead-lettered message(s) park 1 aggregate(s)" in out
    snapshot = db_snapshot(collect_status(engine, settings))
    assert snapshot["outbox_dead_letter_messages"] == 1
    assert snapshot["outbox_parked_aggregates"] == 1


def test_events_lists_event_types_with_volumes(
    settings: Settings, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    insert_events(engine, [("Order", "1"), ("Order", "2")], event_type="OrderPaid")
    assert main(["events", "--json", "--database-url", settings.database_url]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["aggregate_type"], row["event_type"], row["total"]) == ("Order", "OrderPaid", 2)


def test_an_open_broker_circuit_on_any_worker_needs_attention(
    settings: Settings, engine: Engine
) -> None:
    status = collect_status(engine, settings)
    add_circuits(status, {"w1@host": True, "w2@host": False})
    assert not status.healthy
    assert "broker circuit open on 1 worker(s): w1@host" in status.problems
    assert "open on 1 of 2 worker(s)" in render_status(status)


def backdate(engine: Engine, seconds: float, sql_filter: str = "TRUE") -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE outbox SET created_at = clock_timestamp() - make_interval(secs => :s) "
                f"WHERE {sql_filter}"
            ),
            {"s": seconds},
        )


def published_ago(engine: Engine, seconds: float) -> None:
    """A lease row that last published ``seconds`` ago (what the relay's finish writes)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_partition (partition_count, partition, slot_lo, slot_hi, "
                "last_published_at) VALUES (1, 0, 0, 1024, "
                "clock_timestamp() - make_interval(secs => :s))"
            ),
            {"s": seconds},
        )


def test_rows_waiting_with_nothing_published_make_a_stalled_relay_that_needs_attention(
    settings: Settings, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    insert_events(engine, [("Order", str(i)) for i in range(3)])
    backdate(engine, 600)
    published_ago(engine, 200)

    status = collect_status(engine, settings)

    assert 199 < status.stalled_seconds < 260
    assert db_snapshot(status)["outbox_relay_stalled_seconds"] == status.stalled_seconds
    assert any(p.startswith("relay stalled") for p in status.problems)
    assert main(["status", "--database-url", settings.database_url]) == 1
    out = capsys.readouterr().out
    assert "relay progress        no publish for" in out
    assert "runbook: OutboxRelayStalled" in out


def test_a_relay_that_just_published_or_has_waited_less_than_the_bound_is_not_stalled(
    settings: Settings, engine: Engine
) -> None:
    insert_events(engine, [("Order", "1")])
    backdate(engine, 600)
    published_ago(engine, 1)
    assert collect_status(engine, settings).stalled_seconds == 0.0

    with engine.begin() as conn:
        conn.execute(text("DELETE FROM outbox_partition"))
    backdate(engine, 60)  # never published, but the row has waited less than OUTBOX_STALL_SECONDS
    status = collect_status(engine, settings)
    assert 59 < status.stalled_seconds < settings.stall_seconds
    assert status.healthy


def test_rows_held_back_by_a_parked_or_retrying_aggregate_do_not_make_a_stall(
    settings: Settings, engine: Engine
) -> None:
    parked, _behind_parked = insert_events(engine, [("Order", "P"), ("Order", "P")])
    retrying, _behind_retry = insert_events(engine, [("Order", "R"), ("Order", "R")])
    backdate(engine, 600)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE outbox SET dead_lettered_at = now(), retry_count = 6 WHERE id = :id"),
            {"id": parked},
        )
        conn.execute(
            text(
                "UPDATE outbox SET retry_count = 2, "
                "next_attempt_at = clock_timestamp() + interval '5 minutes' WHERE id = :id"
            ),
            {"id": retrying},
        )
    published_ago(engine, 600)

    status = collect_status(engine, settings)

    assert status.stalled_seconds == 0.0
    assert not any(p.startswith("relay stalled") for p in status.problems)
