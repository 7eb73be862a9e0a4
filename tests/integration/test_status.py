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
