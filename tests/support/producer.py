"""A producer for relay scenarios, and the checks an independent consumer is held to.

- ``Producer`` writes small transactions on a background thread (a few aggregates per
  transaction, chosen at random), commits most of them and rolls some back after their rows
  were really inserted (flushed), and records every id of both kinds.
- ``insert_in_chunks`` writes a backlog fast, in short transactions: a long open transaction in
  the test database would hold back the relay's commit-order guard.
- ``judge`` compares what a ``kit.Collector`` received with what was committed: lost, phantom
  and unknown ids, order of first arrival per aggregate, duplicates and how they were marked.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from outbox_tasks.envelope import H_REDELIVERED
from outbox_tasks.schema import OutboxMessage
from tests.support.kit import Collector


@dataclass
class Producer:
    """Writes ``total`` committed events over ``aggregates`` aggregates, then stops by itself
    (``total=0``: until stopped). One thread, so per aggregate, seq order is commit order."""

    engine: Engine
    total: int = 0
    aggregates: int = 20
    per_transaction: int = 5
    interval: float = 0.0
    rollback_every: int = 0
    prefix: str = "P"
    aggregate_type: str = "Order"
    seed: int = 7
    committed: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    transactions: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Producer:
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        rng = random.Random(self.seed)
        counter = 0
        try:
            while not self._stop.is_set():
                if self.total and len(self.committed) >= self.total:
                    break
                self.transactions += 1
                roll_back = (
                    bool(self.rollback_every) and self.transactions % self.rollback_every == 0
                )
                size = self.per_transaction
                if self.total and not roll_back:
                    size = min(size, self.total - len(self.committed))
                messages = []
                for _ in range(size):
                    aggregate = f"{self.prefix}{rng.randrange(self.aggregates)}"
                    messages.append(
                        OutboxMessage(
                            aggregate_type=self.aggregate_type,
                            aggregate_id=aggregate,
                            event_type="OrderRolledBack" if roll_back else "OrderCreated",
                            payload={"n": counter},
                        )
                    )
                    counter += 1
                ids = [str(m.id) for m in messages]
                with Session(self.engine) as session:
                    session.add_all(messages)
                    session.flush()  # the rows are really in the table (seq taken, NOTIFY queued)
                    if roll_back:
                        session.rollback()
                    else:
                        session.commit()
                with self._lock:
                    (self.rolled_back if roll_back else self.committed).extend(ids)
                if self.interval:
                    self._stop.wait(self.interval)
        except BaseException as error:  # surfaced by stop() / wait_done()
            self.error = error
        finally:
            self.done.set()

    def committed_ids(self) -> set[str]:
        with self._lock:
            return set(self.committed)

    def rolled_back_ids(self) -> set[str]:
        with self._lock:
            return set(self.rolled_back)

    def count(self) -> int:
        with self._lock:
            return len(self.committed)

    def wait_done(self, timeout: float) -> None:
        if not self.done.wait(timeout):
            raise AssertionError(f"producer not done after {timeout} s ({self.count()} written)")
        self._raise()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise AssertionError(f"producer failed: {self.error!r}") from self.error


@contextmanager
def producing(engine: Engine, **options: Any) -> Iterator[Producer]:
    producer = Producer(engine, **options).start()
    try:
        yield producer
    finally:
        producer._stop.set()
        if producer._thread is not None:
            producer._thread.join(15)


def insert_in_chunks(
    engine: Engine,
    count: int,
    aggregates: int,
    *,
    chunk: int = 100,
    prefix: str = "A",
    event_type: str = "OrderCreated",
) -> None:
    """``count`` events round-robin over ``aggregates`` aggregates, ``chunk`` rows per (short)
    transaction, in order: event ``i`` goes to aggregate ``i % aggregates``."""
    for start in range(0, count, chunk):
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                    "SELECT 'Order', :prefix || (i % :aggs)::text, :event_type, "
                    "jsonb_build_object('n', i) FROM generate_series(:lo, :hi - 1) AS i "
                    "ORDER BY i"
                ),
                {
                    "aggs": aggregates,
                    "prefix": prefix,
                    "event_type": event_type,
                    "lo": start,
                    "hi": min(start + chunk, count),
                },
            )


def all_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {str(r[0]) for r in conn.execute(text("SELECT id FROM outbox"))}


@dataclass
class Verdict:
    received: int
    lost: set[str]
    phantoms: set[str]
    unknown: set[str]
    order_violations: list[str]
    aggregate_sequence_problems: list[str]
    duplicates: int
    duplicates_marked: int
    unmarked_duplicates: list[str]
    first_copies_marked: int

    def summary(self) -> str:
        return (
            f"received {self.received}, lost {len(self.lost)}, phantoms {len(self.phantoms)}, "
            f"unknown {len(self.unknown)}, order violations {len(self.order_violations)}, "
            f"aggregate_sequence problems {len(self.aggregate_sequence_problems)}, "
            f"duplicates {self.duplicates} ({self.duplicates_marked} marked "
            f"{H_REDELIVERED}: True), first copies marked redelivered {self.first_copies_marked}"
        )


def judge(
    collector: Collector, committed: set[str], rolled_back: set[str] | None = None
) -> Verdict:
    """What the consumer saw against what was committed (and rolled back)."""
    rolled_back = rolled_back or set()
    messages = collector.snapshot()
    seen: set[str] = set()
    duplicates = marked = first_marked = 0
    unmarked = []
    for m in messages:
        redelivered = m.headers.get(H_REDELIVERED) is True
        if m.id in seen:
            duplicates += 1
            if redelivered:
                marked += 1
            else:
                unmarked.append(f"{m.aggregate} seq {m.sequence} id {m.id}")
        else:
            seen.add(m.id)
            first_marked += redelivered
    return Verdict(
        received=len(messages),
        lost=committed - seen,
        phantoms=seen & rolled_back,
        unknown=seen - committed - rolled_back,
        order_violations=collector.order_violations(),
        aggregate_sequence_problems=collector.aggregate_sequence_problems(),
        duplicates=duplicates,
        duplicates_marked=marked,
        unmarked_duplicates=unmarked,
        first_copies_marked=first_marked,
    )
