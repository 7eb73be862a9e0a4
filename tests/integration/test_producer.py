"""The producer API against real PostgreSQL: defaults for plain SQL, one transaction with the
business rows (Session and AsyncSession), and refused messages that leave nothing behind."""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Integer, Text, Uuid, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox_tasks import InvalidMessage, OutboxMessage, PayloadTooLarge
from outbox_tasks.db import make_async_engine, make_engine
from outbox_tasks.schema import PAYLOAD_MAX_BYTES, PAYLOAD_WARN_BYTES, slot_of
from outbox_tasks.settings import Settings

pytestmark = pytest.mark.timeout(60)

OVERSIZED_BYTES = PAYLOAD_MAX_BYTES + len('{"blob":""}')  # {"blob": "x" * PAYLOAD_MAX_BYTES}


class ShopBase(DeclarativeBase):
    """The application's own models: nothing shared with outbox_tasks but the connection."""


class Order(ShopBase):
    __tablename__ = "shop_order"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    customer: Mapped[str] = mapped_column(Text)
    total_cents: Mapped[int] = mapped_column(Integer)

    def to_event_payload(self) -> dict[str, Any]:
        return {"order_id": self.id, "customer": self.customer, "total_cents": self.total_cents}


class Shipment(ShopBase):
    __tablename__ = "shop_shipment"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    order_id: Mapped[int] = mapped_column(Integer)


@pytest.fixture
def db_settings(database_url: str) -> Settings:
    return Settings.from_env({}, database_url=database_url)


@pytest.fixture
def shop_engine(db_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(db_settings, application_name="outbox_tasks.tests.producer")
    ShopBase.metadata.create_all(engine)
    yield engine
    engine.dispose()


def _count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def _outbox(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT id, aggregate_type, aggregate_id, event_type, payload, headers, "
                    "schema_version, retry_count, published_at, seq, slot, txid::text AS txid "
                    "FROM outbox ORDER BY seq"
                )
            )
        )


def _order(order_id: int = 42) -> Order:
    return Order(id=order_id, customer="ada", total_cents=1250)


# --- plain SQL, as any language would write it ------------------------------------------------


def test_a_plain_sql_insert_of_the_seed_columns_gets_every_default(shop_engine: Engine) -> None:
    event_id = uuid.uuid4()
    with shop_engine.begin() as conn:
        txid = int(conn.execute(text("SELECT pg_current_xact_id()::text")).scalar_one())
        conn.execute(
            text(
                "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
                "VALUES (:id, 'Order', '42', 'OrderCreated', '{\"total_cents\": 1250}')"
            ),
            {"id": event_id},
        )
        row = conn.execute(
            text(
                "SELECT seq, txid::text AS txid, slot, headers, schema_version, retry_count, "
                "published_at, next_attempt_at, last_error, first_failed_at, dead_lettered_at, "
                "created_at, now() AS now, payload FROM outbox WHERE id = :id"
            ),
            {"id": event_id},
        ).one()

    assert row.seq >= 1
    assert int(row.txid) == txid
    assert row.slot == slot_of("Order", "42") == 853
    assert row.headers == {}
    assert row.schema_version == 1
    assert row.retry_count == 0
    assert row.published_at is None
    assert row.next_attempt_at is None
    assert row.last_error is None
    assert row.first_failed_at is None
    assert row.dead_lettered_at is None
    assert row.created_at == row.now
    assert row.payload == {"total_cents": 1250}


def test_plain_sql_can_leave_the_id_to_the_database_and_seqs_follow_insert_order(
    shop_engine: Engine,
) -> None:
    with shop_engine.begin() as conn:
        for n in range(3):
            conn.execute(
                text(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                    "VALUES ('Order', :agg, 'OrderCreated', '{}')"
                ),
                {"agg": str(n)},
            )

    rows = _outbox(shop_engine)
    assert [r.aggregate_id for r in rows] == ["0", "1", "2"]
    assert all(isinstance(r.id, uuid.UUID) for r in rows)
    assert len({r.id for r in rows}) == 3
    assert rows[0].seq < rows[1].seq < rows[2].seq


def test_the_slot_postgresql_computes_is_the_slot_python_computes(shop_engine: Engine) -> None:
    aggregates = [("Order", str(n)) for n in range(300)]
    aggregates += [
        ("Order", str(uuid.UUID(int=7))),
        ("Café", "crème brûlée"),
        ("Order", "\u2603 snowman"),
        ("Order", "with space"),
        ("Ab", "c"),
        ("A", "bc"),
    ]
    with shop_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "VALUES (:t, :i, 'Probed', '{}')"
            ),
            [{"t": t, "i": i} for t, i in aggregates],
        )
        stored = {
            (r.aggregate_type, r.aggregate_id): r.slot
            for r in conn.execute(text("SELECT aggregate_type, aggregate_id, slot FROM outbox"))
        }

    assert stored == {aggregate: slot_of(*aggregate) for aggregate in aggregates}


def test_the_slot_cannot_be_written_by_a_producer(shop_engine: Engine) -> None:
    with pytest.raises(DBAPIError, match="generated column"), shop_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, slot) "
                "VALUES ('Order', '1', 'OrderCreated', '{}', 5)"
            )
        )

    assert _count(shop_engine, "outbox") == 0


@pytest.mark.parametrize("column", ["aggregate_type", "aggregate_id", "event_type"])
def test_the_database_refuses_an_empty_name_from_plain_sql(
    shop_engine: Engine, column: str
) -> None:
    values = {"aggregate_type": "Order", "aggregate_id": "1", "event_type": "OrderCreated"}
    values[column] = ""

    with (
        pytest.raises(IntegrityError, match=f"ck_outbox_{column}_not_empty"),
        shop_engine.begin() as conn,
    ):
        conn.execute(
            text(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "VALUES (:aggregate_type, :aggregate_id, :event_type, '{}')"
            ),
            values,
        )

    assert _count(shop_engine, "outbox") == 0


# --- the producer API with a sync Session -----------------------------------------------------


def test_the_seed_snippet_commits_the_order_and_its_event_together(shop_engine: Engine) -> None:
    order = _order(42)

    with Session(shop_engine) as session, session.begin():
        session.add(order)
        session.add(
            OutboxMessage(
                aggregate_type="Order",
                aggregate_id=order.id,
                event_type="OrderCreated",
                payload=order.to_event_payload(),
            )
        )

    assert _count(shop_engine, "shop_order") == 1
    [row] = _outbox(shop_engine)
    assert row.aggregate_type == "Order"
    assert row.aggregate_id == "42"
    assert row.event_type == "OrderCreated"
    assert row.payload == {"order_id": 42, "customer": "ada", "total_cents": 1250}
    assert row.slot == slot_of("Order", "42")
    assert row.headers == {}
    assert row.schema_version == 1
    assert row.retry_count == 0
    assert row.published_at is None


def test_the_event_and_the_order_share_one_transaction_id(shop_engine: Engine) -> None:
    with Session(shop_engine) as session, session.begin():
        session.add(_order(7))
        session.add(
            OutboxMessage(
                aggregate_type="Order", aggregate_id=7, event_type="OrderCreated", payload={}
            )
        )
        session.flush()
        txid = int(session.execute(text("SELECT pg_current_xact_id()::text")).scalar_one())

    [row] = _outbox(shop_engine)
    assert int(row.txid) == txid


def test_the_event_is_invisible_to_others_until_the_transaction_commits(
    shop_engine: Engine,
) -> None:
    with Session(shop_engine) as session, session.begin():
        session.add(_order(1))
        session.add(
            OutboxMessage(
                aggregate_type="Order", aggregate_id=1, event_type="OrderCreated", payload={}
            )
        )
        session.flush()
        assert _count(shop_engine, "outbox") == 0  # another connection: not yet committed

    assert _count(shop_engine, "outbox") == 1


def test_a_uuid_aggregate_id_is_stored_as_its_text(shop_engine: Engine) -> None:
    shipment_id = uuid.uuid4()
    shipment = Shipment(id=shipment_id, order_id=42)

    with Session(shop_engine) as session, session.begin():
        session.add(shipment)
        session.add(
            OutboxMessage(
                aggregate_type="Shipment",
                aggregate_id=shipment.id,
                event_type="ShipmentDispatched",
                payload={"order_id": 42},
            )
        )

    [row] = _outbox(shop_engine)
    assert row.aggregate_id == str(shipment_id)
    assert uuid.UUID(row.aggregate_id) == shipment_id
    assert row.slot == slot_of("Shipment", str(shipment_id))


def test_the_model_reads_back_the_database_defaults(shop_engine: Engine) -> None:
    event_id = uuid.uuid4()
    message = OutboxMessage(
        id=event_id,
        aggregate_type="Order",
        aggregate_id=42,
        event_type="OrderCreated",
        payload={"total_cents": 1250},
        headers={"traceparent": "00-abc-def-01"},
        schema_version=2,
    )
    with Session(shop_engine) as session, session.begin():
        session.add(message)

    with Session(shop_engine) as session:
        stored = session.execute(select(OutboxMessage)).scalar_one()
        assert stored.id == event_id
        assert stored.headers == {"traceparent": "00-abc-def-01"}
        assert stored.schema_version == 2
        assert stored.seq >= 1
        assert stored.slot == slot_of("Order", "42")
        assert stored.created_at is not None
        assert stored.retry_count == 0
        assert stored.published_at is None


def test_the_model_loads_the_transaction_id_as_an_int(shop_engine: Engine) -> None:
    with Session(shop_engine) as session, session.begin():
        session.add(
            OutboxMessage(
                aggregate_type="Order", aggregate_id=1, event_type="OrderCreated", payload={}
            )
        )
        session.flush()
        txid = int(session.execute(text("SELECT pg_current_xact_id()::text")).scalar_one())

    with Session(shop_engine) as session:
        stored = session.execute(select(OutboxMessage.txid)).scalar_one()

    assert stored == txid
    assert isinstance(stored, int)


def test_a_rolled_back_transaction_stores_neither_row(shop_engine: Engine) -> None:
    with (
        pytest.raises(RuntimeError, match="payment declined"),
        Session(shop_engine) as session,
        session.begin(),
    ):
        session.add(_order(42))
        session.add(
            OutboxMessage(
                aggregate_type="Order", aggregate_id=42, event_type="OrderCreated", payload={}
            )
        )
        session.flush()  # both rows reached PostgreSQL before the failure
        raise RuntimeError("payment declined")

    assert _count(shop_engine, "shop_order") == 0
    assert _count(shop_engine, "outbox") == 0


def test_a_failing_business_write_takes_its_event_with_it(shop_engine: Engine) -> None:
    with Session(shop_engine) as session, session.begin():
        session.add(_order(42))

    with pytest.raises(IntegrityError), Session(shop_engine) as session, session.begin():
        session.add(
            OutboxMessage(
                aggregate_type="Order", aggregate_id=42, event_type="OrderCreated", payload={}
            )
        )
        session.add(_order(42))  # duplicate primary key: the commit fails

    assert _count(shop_engine, "shop_order") == 1
    assert _count(shop_engine, "outbox") == 0


# --- the producer API with an AsyncSession ----------------------------------------------------


async def _async_commit(settings: Settings, order_id: int) -> None:
    engine = make_async_engine(settings, application_name="outbox_tasks.tests.producer")
    try:
        async with AsyncSession(engine) as session, session.begin():
            order = _order(order_id)
            session.add(order)
            session.add(
                OutboxMessage(
                    aggregate_type="Order",
                    aggregate_id=order.id,
                    event_type="OrderCreated",
                    payload=order.to_event_payload(),
                )
            )
    finally:
        await engine.dispose()


async def _async_rollback(settings: Settings, order_id: int) -> int:
    """Write both rows, flush, fail; return how many outbox rows the session saw before that."""
    engine = make_async_engine(settings, application_name="outbox_tasks.tests.producer")
    seen = -1
    try:
        async with AsyncSession(engine) as session, session.begin():
            session.add(_order(order_id))
            session.add(
                OutboxMessage(
                    aggregate_type="Order",
                    aggregate_id=order_id,
                    event_type="OrderCreated",
                    payload={},
                )
            )
            await session.flush()
            seen = (
                await session.execute(select(func.count()).select_from(OutboxMessage))
            ).scalar_one()
            raise RuntimeError("payment declined")
    except RuntimeError:
        return seen
    finally:
        await engine.dispose()
    raise AssertionError("the transaction was expected to fail")


def test_an_async_session_commits_the_order_and_its_event_together(
    shop_engine: Engine, db_settings: Settings
) -> None:
    asyncio.run(_async_commit(db_settings, 42))

    assert _count(shop_engine, "shop_order") == 1
    [row] = _outbox(shop_engine)
    assert row.aggregate_id == "42"
    assert row.payload == {"order_id": 42, "customer": "ada", "total_cents": 1250}
    assert row.slot == slot_of("Order", "42")


def test_an_async_rollback_stores_neither_row(shop_engine: Engine, db_settings: Settings) -> None:
    seen_inside = asyncio.run(_async_rollback(db_settings, 42))

    assert seen_inside == 1
    assert _count(shop_engine, "shop_order") == 0
    assert _count(shop_engine, "outbox") == 0


# --- refused messages leave nothing behind ----------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "error", "phrases"),
    [
        pytest.param(
            {"total": Decimal("12.50")},
            InvalidMessage,
            ["Decimal", "JSON-serializable"],
            id="decimal",
        ),
        pytest.param(
            {"tags": {"new", "paid"}}, InvalidMessage, ["set", "JSON-serializable"], id="set"
        ),
        pytest.param({"ratio": math.nan}, InvalidMessage, ["NaN", "JSON-serializable"], id="nan"),
        pytest.param(
            {"blob": "x" * PAYLOAD_MAX_BYTES},
            PayloadTooLarge,
            [f"payload is {OVERSIZED_BYTES} bytes", f"the limit is {PAYLOAD_MAX_BYTES} bytes"],
            id="over-1MB",
        ),
    ],
)
def test_a_refused_payload_stores_neither_the_event_nor_the_business_row(
    shop_engine: Engine, payload: object, error: type[InvalidMessage], phrases: list[str]
) -> None:
    with pytest.raises(error) as caught, Session(shop_engine) as session, session.begin():
        session.add(_order(42))
        session.flush()  # the business row is in PostgreSQL when the message is refused
        session.add(
            OutboxMessage(
                aggregate_type="Order",
                aggregate_id=42,
                event_type="OrderCreated",
                payload=payload,
            )
        )

    for phrase in phrases:
        assert phrase in str(caught.value)
    assert _count(shop_engine, "shop_order") == 0
    assert _count(shop_engine, "outbox") == 0


@pytest.mark.parametrize(
    "names",
    [
        pytest.param({"aggregate_type": ""}, id="empty-aggregate-type"),
        pytest.param({"aggregate_id": ""}, id="empty-aggregate-id"),
        pytest.param({"event_type": "  "}, id="blank-event-type"),
    ],
)
def test_an_event_with_an_empty_name_is_refused_and_nothing_is_stored(
    shop_engine: Engine, names: dict[str, str]
) -> None:
    arguments: dict[str, Any] = {
        "aggregate_type": "Order",
        "aggregate_id": 42,
        "event_type": "OrderCreated",
        "payload": {},
        **names,
    }

    with (
        pytest.raises(InvalidMessage, match="must not be empty"),
        Session(shop_engine) as session,
        session.begin(),
    ):
        session.add(_order(42))
        session.flush()
        session.add(OutboxMessage(**arguments))

    assert _count(shop_engine, "shop_order") == 0
    assert _count(shop_engine, "outbox") == 0


def test_a_100_kb_payload_logs_a_warning_and_is_stored(
    shop_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    payload = {"notes": "n" * 100_000}
    assert len('{"notes":""}') + 100_000 > PAYLOAD_WARN_BYTES

    with (
        caplog.at_level(logging.WARNING, logger="outbox_tasks.producer"),
        Session(shop_engine) as session,
        session.begin(),
    ):
        session.add(_order(42))
        session.add(
            OutboxMessage(
                aggregate_type="Order",
                aggregate_id=42,
                event_type="OrderNoted",
                payload=payload,
            )
        )

    warnings = [
        r
        for r in caplog.records
        if r.name == "outbox_tasks.producer" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert warnings[0].size_bytes == 100_000 + len('{"notes":""}')  # type: ignore[attr-defined]
    [row] = _outbox(shop_engine)
    assert row.payload == payload
    assert _count(shop_engine, "shop_order") == 1
