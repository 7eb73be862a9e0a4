"""The two worlds the contract runs in: the in-memory fakes, and PostgreSQL with Redis.

A backend gives the contract what it needs and nothing more: a store and a publisher for a
relay, a way to add events, to read a row's state and what reached the broker, to let time pass,
to expire leases and to replay a parked aggregate. Failures are planned on a
``RecordingPublisher`` in both worlds (in front of the real broker publisher for PostgreSQL).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks import deadletter
from outbox_tasks.envelope import H_REDELIVERED
from outbox_tasks.protocols import RelayStore
from outbox_tasks.publisher import BrokerPublisher
from outbox_tasks.relay import Relay
from outbox_tasks.schema import OutboxMessage
from outbox_tasks.settings import Settings
from outbox_tasks.store.relay import PostgresRelayStore
from outbox_tasks.testing import InMemoryRelayStore, ManualClock, RecordingPublisher
from tests.support.kit import Collector, collecting, insert_events
from tests.support.relaying import wait_for


@dataclass(frozen=True)
class Sent:
    """One message as it reached the broker."""

    event_id: str
    aggregate: tuple[str, str]
    sequence: int
    redelivered: bool


@dataclass(frozen=True)
class RowState:
    published: bool
    retry_count: int
    waiting: bool  # has a next attempt time (backoff) and is not published
    parked: bool  # dead-lettered, not published: its aggregate waits


class Backend(Protocol):
    name: str
    settings: Settings
    store: RelayStore
    publisher: RecordingPublisher
    clock: ManualClock
    """The relay's clock (deadlines, circuit); in memory also the store's."""

    def relay(self, settings: Settings, owner: str = "t") -> Relay: ...
    def add(self, *aggregates: tuple[str, str]) -> list[uuid.UUID]: ...
    def sent(self, count: int) -> list[Sent]:
        """Every message that reached the broker so far, in arrival order: exactly ``count`` of
        them (fails if more or fewer arrived)."""
        ...

    def row(self, event_id: uuid.UUID) -> RowState: ...
    def gone(self, event_id: uuid.UUID) -> bool: ...
    def wait(self, seconds: float) -> None: ...
    def expire_leases(self) -> None: ...
    def replay(self, aggregate_type: str, aggregate_id: str) -> None: ...


def _relay(backend: Backend, settings: Settings, owner: str) -> Relay:
    return Relay(
        settings,
        backend.store,
        backend.publisher,
        owner=owner,
        clock=backend.clock,
        jitter=lambda: 0.0,
    )


def _exactly(count: int, sent: list[Sent]) -> list[Sent]:
    assert len(sent) == count, f"{len(sent)} messages reached the broker, expected {count}"
    return sent


def _event(aggregate: tuple[str, str]) -> OutboxMessage:
    return OutboxMessage(
        aggregate_type=aggregate[0],
        aggregate_id=aggregate[1],
        event_type="OrderCreated",
        payload={},
    )


class MemoryBackend:
    """``InMemoryRelayStore`` + ``RecordingPublisher`` on one ``ManualClock``. ``wrap`` puts a
    store in front of the fake (the contract's own tests use it to break the fake on purpose)."""

    name = "memory"

    def __init__(self, wrap: Callable[[InMemoryRelayStore], RelayStore] | None = None) -> None:
        self.settings = Settings.from_env({})
        self.clock = ManualClock()
        self.memory = InMemoryRelayStore(clock=self.clock)
        self.store: RelayStore = wrap(self.memory) if wrap else self.memory
        self.publisher = RecordingPublisher()

    def relay(self, settings: Settings, owner: str = "t") -> Relay:
        return _relay(self, settings, owner)

    def add(self, *aggregates: tuple[str, str]) -> list[uuid.UUID]:
        return self.memory.add(*(_event(a) for a in aggregates))

    def sent(self, count: int) -> list[Sent]:
        return _exactly(
            count,
            [
                Sent(m.event_id, m.aggregate_key, m.sequence, bool(m.headers[H_REDELIVERED]))
                for m in self.publisher.published
            ],
        )

    def row(self, event_id: uuid.UUID) -> RowState:
        row = self.memory.row(event_id)
        assert row is not None, f"no row {event_id}"
        return RowState(
            published=not row.pending,
            retry_count=row.retry_count,
            waiting=row.pending and row.next_attempt_at is not None,
            parked=row.parked,
        )

    def gone(self, event_id: uuid.UUID) -> bool:
        return self.memory.row(event_id) is None

    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def expire_leases(self) -> None:
        self.clock.advance(self.settings.lease_seconds + 1)

    def replay(self, aggregate_type: str, aggregate_id: str) -> None:
        assert self.memory.replay(aggregate_type, aggregate_id), "nothing was parked"


class PostgresBackend:
    """``PostgresRelayStore`` on a fresh database; the publisher sends to Redis through the real
    ``BrokerPublisher``, and an independent consumer reads what arrived."""

    name = "postgres"

    def __init__(self, settings: Settings, engine: Engine, collector: Collector) -> None:
        self.settings = settings
        self.engine = engine
        self.collector = collector
        self.clock = ManualClock()
        self.store: RelayStore = PostgresRelayStore(engine)
        self.broker = BrokerPublisher(
            settings.effective_publish_url, settings.exchange, timeout_seconds=2
        )
        self.broker.declare()
        self.publisher = RecordingPublisher(self.broker)

    @classmethod
    @contextmanager
    def running(cls, settings: Settings, engine: Engine) -> Iterator[PostgresBackend]:
        with collecting(settings.broker_url, settings.exchange) as collector:
            backend = cls(settings, engine, collector)
            try:
                yield backend
            finally:
                backend.broker.close()

    def relay(self, settings: Settings, owner: str = "t") -> Relay:
        return _relay(self, settings, owner)

    def add(self, *aggregates: tuple[str, str]) -> list[uuid.UUID]:
        return insert_events(self.engine, aggregates)

    def sent(self, count: int) -> list[Sent]:
        wait_for(self.collector, count)
        # Everything was published before this call; a message beyond ``count`` is already on its
        # way to the collector (it would not be on the fakes).
        return _exactly(
            count,
            [
                Sent(m.id, m.aggregate, m.sequence, bool(m.headers[H_REDELIVERED]))
                for m in self.collector.snapshot()
            ],
        )

    def row(self, event_id: uuid.UUID) -> RowState:
        with self.engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT published_at, retry_count, next_attempt_at, dead_lettered_at "
                    "FROM outbox WHERE id = :id"
                ),
                {"id": event_id},
            ).one()
        pending = row.published_at is None
        return RowState(
            published=not pending,
            retry_count=row.retry_count,
            waiting=pending and row.next_attempt_at is not None,
            parked=pending and row.dead_lettered_at is not None,
        )

    def gone(self, event_id: uuid.UUID) -> bool:
        with self.engine.connect() as conn:
            found = conn.execute(text("SELECT 1 FROM outbox WHERE id = :id"), {"id": event_id})
            return found.first() is None

    def wait(self, seconds: float) -> None:
        # Leases and backoffs run on PostgreSQL's clock: real time must pass.
        time.sleep(seconds)
        self.clock.advance(seconds)

    def expire_leases(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE outbox_partition "
                    "SET leased_until = clock_timestamp() - interval '1 second'"
                )
            )

    def replay(self, aggregate_type: str, aggregate_id: str) -> None:
        # As in production: the dead-letter task records the parked row, an operator replays it.
        deadletter.collect(self.engine, self.settings, RecordingPublisher())
        result = deadletter.replay(
            self.engine,
            deadletter.Filters(aggregate_type=aggregate_type, aggregate_id=aggregate_id),
            actor="contract",
            rate_per_second=None,
        )
        assert result.changed, "nothing was parked"
