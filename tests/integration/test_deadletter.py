"""Dead letters end to end on real PostgreSQL and Redis: a poison message parks its aggregate,
the dead-letter task records and copies it, replay and discard unpark, all audited."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks import deadletter
from outbox_tasks.cli import main
from outbox_tasks.deadletter import Filters
from outbox_tasks.errors import InvalidMessage, NotFound
from outbox_tasks.publisher import BrokerPublisher
from outbox_tasks.settings import Settings
from tests.support.kit import bulk_insert, collecting, insert_events, pending_count
from tests.support.publishers import RefusingPublisher
from tests.support.relaying import drain, make_relay, wait_for


@pytest.fixture
def publisher(settings: Settings) -> Iterator[BrokerPublisher]:
    pub = BrokerPublisher(settings.effective_publish_url, settings.exchange, timeout_seconds=2)
    yield pub
    pub.close()


@pytest.fixture
def dead_publisher(settings: Settings) -> Iterator[BrokerPublisher]:
    pub = BrokerPublisher(
        settings.effective_publish_url, settings.dead_letter_exchange, timeout_seconds=2
    )
    yield pub
    pub.close()


def park(settings: Settings, engine: Engine, publisher: BrokerPublisher, poison: uuid.UUID) -> None:
    """Fail ``poison`` until it is parked (max_retries=0: the first failure parks)."""
    relay = make_relay(
        settings.with_changes(max_retries=0), engine, RefusingPublisher(publisher, {str(poison)})
    )
    drain(relay)
    with engine.connect() as conn:
        parked = conn.execute(
            text("SELECT dead_lettered_at FROM outbox WHERE id = :id"), {"id": poison}
        ).scalar()
    assert parked is not None


def test_a_poison_message_is_recorded_copied_to_the_dead_exchange_and_parks_its_aggregate(
    settings: Settings,
    engine: Engine,
    publisher: BrokerPublisher,
    dead_publisher: BrokerPublisher,
) -> None:
    settings = settings.with_changes(partitions=1, batch_size=1000)
    poison, *behind = insert_events(engine, [("Order", "P")] * 4)
    bulk_insert(engine, 10_000, 100)
    with (
        collecting(settings.broker_url, settings.exchange) as events,
        collecting(settings.broker_url, settings.dead_letter_exchange) as dead,
    ):
        park(settings, engine, publisher, poison)
        wait_for(events, 10_000)
        assert deadletter.collect(engine, settings, dead_publisher) == {
            "recorded": 1,
            "skipped": 0,
        }
        wait_for(dead, 1)
        copy = dead.snapshot()[0]
        assert copy.id == str(poison)
        assert "PoisonError" in copy.headers["outbox-dead-letter-reason"]
        assert not any(m.aggregate == ("Order", "P") for m in events.snapshot())
    # Idempotent: a second run records nothing new.
    assert deadletter.collect(engine, settings, dead_publisher)["recorded"] == 0
    [view] = deadletter.list_dead_letters(engine, Filters(aggregate_type="Order"))
    assert view.id == poison and view.status == "parked" and view.attempts == 1
    full = deadletter.show(engine, poison)
    assert full.payload == {"n": 0}
    assert full.errors and "PoisonError" in full.errors[0]["error"]
    assert pending_count(engine) == 4
    assert deadletter.counts(engine) == {"dead_letters": 1, "parked_aggregates": 1}
    assert len(behind) == 3


def test_replay_publishes_the_dead_letter_and_the_parked_ones_in_order(
    settings: Settings,
    engine: Engine,
    publisher: BrokerPublisher,
    dead_publisher: BrokerPublisher,
) -> None:
    settings = settings.with_changes(partitions=1)
    ids = insert_events(engine, [("Order", "P")] * 4)
    park(settings, engine, publisher, ids[0])
    deadletter.collect(engine, settings, dead_publisher)
    with collecting(settings.broker_url, settings.exchange) as events:
        result = deadletter.replay(
            engine,
            Filters(aggregate_type="Order", aggregate_id="P"),
            actor="ops",
            sleep=lambda s: None,
        )
        assert result.changed == [ids[0]]
        assert drain(make_relay(settings, engine, publisher)) == 4
        wait_for(events, 4)
        assert [m.id for m in events.snapshot()] == [str(i) for i in ids]
    again = deadletter.replay(engine, Filters(ids=(ids[0],)), actor="ops")
    assert again.changed == [] and again.already_resolved == [ids[0]]
    [entry] = deadletter.history(engine)
    assert entry["action"] == "replay" and entry["actor"] == "ops"
    assert deadletter.show(engine, ids[0]).status == "replayed"


def test_discard_needs_a_reason_unparks_the_aggregate_and_is_audited(
    settings: Settings,
    engine: Engine,
    publisher: BrokerPublisher,
    dead_publisher: BrokerPublisher,
) -> None:
    settings = settings.with_changes(partitions=1)
    poison, *behind = insert_events(engine, [("Order", "P")] * 3)
    park(settings, engine, publisher, poison)
    deadletter.collect(engine, settings, dead_publisher)
    with pytest.raises(InvalidMessage, match="reason"):
        deadletter.discard(engine, Filters(ids=(poison,)), actor="ops", reason=" ")
    dry = deadletter.discard(
        engine, Filters(ids=(poison,)), actor="ops", reason="bad data", dry_run=True
    )
    assert dry.changed == [poison] and deadletter.show(engine, poison).status == "parked"
    with collecting(settings.broker_url, settings.exchange) as events:
        deadletter.discard(engine, Filters(ids=(poison,)), actor="ops", reason="bad data")
        assert drain(make_relay(settings, engine, publisher)) == 2
        wait_for(events, 2)
        got = events.snapshot()
        assert [m.id for m in got] == [str(i) for i in behind]
        # The discarded event's number is a gap left on purpose: the next message says that
        # nothing was published before it, so a consumer does not wait for number 1.
        assert [m.body["aggregate_sequence"] for m in got] == [2, 3]
        assert [m.body["previous_aggregate_sequence"] for m in got] == [0, 2]
        assert got[0].headers["outbox-previous-aggregate-sequence"] == 0
    view = deadletter.show(engine, poison)
    assert (view.status, view.resolved_by, view.resolution_reason) == (
        "discarded",
        "ops",
        "bad data",
    )
    [entry] = deadletter.history(engine)
    assert entry["reason"] == "bad data"


def test_a_skip_policy_event_type_does_not_hold_its_aggregate(
    settings: Settings,
    engine: Engine,
    publisher: BrokerPublisher,
    dead_publisher: BrokerPublisher,
) -> None:
    settings = settings.with_changes(partitions=1, event_type_policies={"OrderViewed": "skip"})
    [viewed] = insert_events(engine, [("Order", "S")], event_type="OrderViewed")
    [later] = insert_events(engine, [("Order", "S")])
    park(settings, engine, publisher, viewed)
    assert deadletter.collect(engine, settings, dead_publisher) == {"recorded": 1, "skipped": 1}
    with collecting(settings.broker_url, settings.exchange) as events:
        assert drain(make_relay(settings, engine, publisher)) == 1
        wait_for(events, 1)
        assert events.unique_ids() == {str(later)}
        [message] = events.snapshot()
        assert (
            message.body["aggregate_sequence"],
            message.body["previous_aggregate_sequence"],
        ) == (
            2,
            0,
        )
    assert deadletter.show(engine, viewed).status == "skipped"


def test_an_operation_without_filters_or_all_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="--all"):
        deadletter.replay(None, Filters(), actor="ops")  # type: ignore[arg-type]


def test_an_unknown_id_is_a_clear_not_found(engine: Engine) -> None:
    missing = uuid.uuid4()
    with pytest.raises(NotFound, match=str(missing)):
        deadletter.show(engine, missing)
    with pytest.raises(NotFound, match=str(missing)):
        deadletter.replay(engine, Filters(ids=(missing,)), actor="ops")


def test_the_dlq_commands_list_show_replay_and_refuse_unconfirmed_discards(
    settings: Settings,
    engine: Engine,
    publisher: BrokerPublisher,
    dead_publisher: BrokerPublisher,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings.with_changes(partitions=1)
    [poison] = insert_events(engine, [("Order", "C")])
    park(settings, engine, publisher, poison)
    deadletter.collect(engine, settings, dead_publisher)
    db = ["--database-url", settings.database_url]
    assert main(["dlq", "list", "--json", *db]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == str(poison)
    assert main(["dlq", "show", str(poison), *db]) == 0
    assert json.loads(capsys.readouterr().out)["payload"] == {"n": 0}
    assert main(["dlq", "replay", "--all", "--dry-run", *db]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] == [str(poison)]
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["dlq", "discard", str(poison), "--reason", "x", *db]) == 1
    assert "--yes" in capsys.readouterr().err
    assert deadletter.show(engine, poison).status == "parked"
    assert main(["dlq", "discard", str(poison), "--reason", "x", "--yes", *db]) == 0
    assert main(["dlq", "history", *db]) == 0
    assert '"discard"' in capsys.readouterr().out
    assert main(["dlq", "show", "not-a-uuid", *db]) == 1
    assert "not an event id" in capsys.readouterr().err
