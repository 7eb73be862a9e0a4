"""Issue 11, item 5, against real PostgreSQL: what PostgreSQL would refuse at commit (NUL, lone
surrogates in any text field or header) is refused when the message is built, so the caller's
business change is never rolled back by a driver DataError; what is accepted commits and reads
back unchanged, right up to the limits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session

from outbox_tasks import InvalidMessage, OutboxMessage
from outbox_tasks.db import make_engine
from outbox_tasks.limits import INT64_MAX, INT64_MIN
from outbox_tasks.settings import Settings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = make_engine(
        Settings.from_env({}, database_url=database_url), application_name="tests.limits"
    )
    yield engine
    engine.dispose()


def _fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "aggregate_type": "Order",
        "aggregate_id": "42",
        "event_type": "OrderCreated",
        "payload": {"total": 1},
    }
    fields.update(changes)
    return fields


BAD = [
    pytest.param({"aggregate_type": "Or\x00der"}, "aggregate_type", id="nul-aggregate-type"),
    pytest.param({"aggregate_id": "4\x002"}, "aggregate_id", id="nul-aggregate-id"),
    pytest.param({"event_type": "Created\x00"}, "event_type", id="nul-event-type"),
    pytest.param({"aggregate_type": "Order\ud800"}, "aggregate_type", id="surrogate-type"),
    pytest.param({"aggregate_id": "\udfff"}, "aggregate_id", id="surrogate-aggregate-id"),
    pytest.param({"event_type": "\ud83d"}, "event_type", id="surrogate-event-type"),
    pytest.param({"headers": {"tenant": "a\x00"}}, "header 'tenant' value", id="nul-header"),
    pytest.param({"headers": {"t\x00": "a"}}, "header 't\\x00' name", id="nul-header-name"),
    pytest.param({"headers": {"t": "\ud800"}}, "header 't' value", id="surrogate-header"),
    pytest.param({"headers": {"\udc00": 1}}, "header '\\udc00' name", id="surrogate-name"),
]


@pytest.mark.parametrize(("changes", "named"), BAD)
def test_postgresql_would_refuse_it_at_commit_without_the_check(
    db: Engine, changes: dict[str, Any], named: str
) -> None:
    # What the check protects from: the same values written with plain SQL fail in the driver.
    fields = _fields(**changes)
    with pytest.raises((DataError, UnicodeEncodeError, ValueError)), db.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) "
                "VALUES (:t, :i, :e, '{}', CAST(:h AS jsonb))"
            ),
            {
                "t": fields["aggregate_type"],
                "i": fields["aggregate_id"],
                "e": fields["event_type"],
                "h": json.dumps(fields.get("headers", {})),
            },
        )


@pytest.mark.parametrize(("changes", "named"), BAD)
def test_the_message_is_refused_when_built_and_the_business_change_can_still_commit(
    db: Engine, changes: dict[str, Any], named: str
) -> None:
    with Session(db) as session, session.begin():
        session.execute(text("CREATE TABLE shop (id int PRIMARY KEY)"))
        session.execute(text("INSERT INTO shop VALUES (1)"))
        with pytest.raises(InvalidMessage) as caught:
            session.add(OutboxMessage(**_fields(**changes)))

    assert str(caught.value).startswith(named)
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM shop")).scalar_one() == 1
        assert conn.execute(text("SELECT count(*) FROM outbox")).scalar_one() == 0


def test_everything_accepted_right_up_to_the_limits_commits_and_reads_back_unchanged(
    db: Engine,
) -> None:
    headers = {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "k" * 255: "\u00e9\u20ac\U0001f600",
        "nested": {"n" * 255: [INT64_MIN, INT64_MAX, 1.5, None, True, "\u0001"]},
        "CC": ["Audit.OrderCreated"],
    }
    message = OutboxMessage(
        aggregate_type="\u00e9" * 126,  # 252 bytes; with ".EE": the 255-byte routing key
        aggregate_id="\U0001f600" * 255,
        event_type="EE",
        payload={"ok": True},
        headers=headers,
    )
    with Session(db) as session, session.begin():
        session.add(message)

    with db.connect() as conn:
        row = conn.execute(
            text("SELECT aggregate_type, aggregate_id, event_type, headers FROM outbox")
        ).one()
    assert row.aggregate_type == "\u00e9" * 126
    assert row.aggregate_id == "\U0001f600" * 255
    assert len(f"{row.aggregate_type}.{row.event_type}".encode()) == 255
    assert row.headers == headers
