"""Small helpers shared by relay tests: write events, read them back from the broker, wait."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kombu import Connection, Exchange, Queue
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from outbox_tasks.schema import OutboxMessage


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.05, what: str = ""
) -> None:
    """Poll a condition (a database count, a consumer's tally) until it holds or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def insert_events(
    engine: Engine,
    events: Iterable[tuple[str, str]],
    *,
    event_type: str = "OrderCreated",
    payload: Callable[[int], Any] = lambda i: {"n": i},
) -> list[uuid.UUID]:
    """Insert (aggregate_type, aggregate_id) events in one transaction, in order."""
    ids = []
    with Session(engine) as session, session.begin():
        for i, (aggregate_type, aggregate_id) in enumerate(events):
            message = OutboxMessage(
                aggregate_type=aggregate_type,
                aggregate_id=aggregate_id,
                event_type=event_type,
                payload=payload(i),
            )
            session.add(message)
            ids.append(message.id)
    return ids


def bulk_insert(engine: Engine, count: int, aggregates: int, *, prefix: str = "A") -> None:
    """Fast server-side insert of ``count`` events round-robin over ``aggregates`` aggregates."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "SELECT 'Order', :prefix || (i % :aggs)::text, 'OrderCreated', "
                "jsonb_build_object('n', i) FROM generate_series(0, :count - 1) AS i"
            ),
            {"count": count, "aggs": aggregates, "prefix": prefix},
        )


def pending_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            ).scalar_one()
        )


@dataclass
class Received:
    id: str
    aggregate: tuple[str, str]
    sequence: int
    headers: dict[str, Any]
    body: dict[str, Any]
    at: float


@dataclass
class Collector:
    """An independent consumer: a queue bound to the exchange, read on a background thread."""

    url: str
    exchange: str
    pattern: str = "#"
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    queue_name: str = field(default_factory=lambda: f"test.collector.{uuid.uuid4().hex[:8]}")
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    error: BaseException | None = None

    def start(self) -> Collector:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError(f"collector did not start: {self.error}")
        return self

    def _queue(self) -> Queue:
        exchange = Exchange(self.exchange, type="topic", durable=True)
        return Queue(self.queue_name, exchange, routing_key=self.pattern, durable=True)

    def _run(self) -> None:
        try:
            with Connection(self.url) as conn:
                queue = self._queue()

                def on_message(body: Any, message: Any) -> None:
                    data = json.loads(message.body)
                    with self.lock:
                        self.messages.append(
                            Received(
                                id=data["id"],
                                aggregate=(data["aggregate_type"], data["aggregate_id"]),
                                sequence=int(data["sequence"]),
                                headers=dict(message.headers),
                                body=data,
                                at=time.time(),
                            )
                        )
                    message.ack()

                with conn.Consumer([queue], callbacks=[on_message], accept=["json"]):
                    self._ready.set()
                    while not self._stop.is_set():
                        try:
                            conn.drain_events(timeout=0.2)
                        except TimeoutError:
                            continue
        except BaseException as error:
            self.error = error
            self._ready.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        try:
            with Connection(self.url) as conn:
                self._queue()(conn.default_channel).delete()
        except Exception:
            pass

    def count(self) -> int:
        with self.lock:
            return len(self.messages)

    def unique_ids(self) -> set[str]:
        with self.lock:
            return {m.id for m in self.messages}

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.messages)

    def order_violations(self) -> list[str]:
        """Per aggregate, first arrivals must come in sequence order."""
        seen: set[str] = set()
        last: dict[tuple[str, str], int] = {}
        problems = []
        for m in self.snapshot():
            if m.id in seen:
                continue
            seen.add(m.id)
            previous = last.get(m.aggregate, -1)
            if m.sequence < previous:
                problems.append(f"{m.aggregate}: {m.sequence} arrived after {previous}")
            last[m.aggregate] = max(previous, m.sequence)
        return problems

    def aggregate_sequence_problems(self) -> list[str]:
        """Per aggregate, first arrivals must number 1, 2, 3 ... (``aggregate_sequence``): no
        gap, no repeat, each saying the one before it was published before it."""
        seen: set[str] = set()
        last: dict[tuple[str, str], int] = {}
        problems = []
        for m in self.snapshot():
            if m.id in seen:
                continue
            seen.add(m.id)
            number = m.body.get("aggregate_sequence")
            previous = m.body.get("previous_aggregate_sequence")
            expected = last.get(m.aggregate, 0) + 1
            if number != expected or previous != expected - 1:
                problems.append(
                    f"{m.aggregate}: aggregate_sequence {number} (previous {previous}) arrived "
                    f"where {expected} was due"
                )
            last[m.aggregate] = number if isinstance(number, int) else expected
        return problems

    def duplicates(self) -> int:
        snapshot = self.snapshot()
        return len(snapshot) - len({m.id for m in snapshot})


@contextmanager
def collecting(url: str, exchange: str, pattern: str = "#") -> Iterator[Collector]:
    collector = Collector(url, exchange, pattern).start()
    try:
        yield collector
    finally:
        collector.stop()
    if collector.error is not None:
        raise AssertionError(f"collector failed: {collector.error!r}")
