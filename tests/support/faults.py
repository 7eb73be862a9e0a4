"""Helpers for fault-injection acceptance tests: a write audit installed in the test database,
worker log parsing, a background producer and URL rewriting for TCP proxies.

The audit is test-only DDL: two AFTER row triggers record, with PostgreSQL's clock and the
writer's ``application_name``, every change of an outbox row and every change of a lease's
epoch or owner. Give each worker its own ``OUTBOX_APPLICATION_NAME`` and the audit says which
worker changed which row, when, and who held the partition's lease at that moment.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from kombu.connection import Connection
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.support import services
from tests.support.cluster import Proc
from tests.support.kit import Collector, Received, insert_events

AUDIT_DDL = (
    """
    CREATE TABLE fault_row_audit (
        id bigserial PRIMARY KEY,
        app text NOT NULL,
        op text NOT NULL,
        event_id uuid NOT NULL,
        seq bigint NOT NULL,
        old_published_at timestamptz,
        new_published_at timestamptz,
        old_retry_count integer,
        new_retry_count integer,
        new_dead_lettered_at timestamptz,
        lease_epoch bigint,
        lease_owner text,
        at timestamptz NOT NULL
    )
    """,
    """
    CREATE FUNCTION fault_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        r outbox;
        new_published timestamptz;
        new_retries integer;
        new_dead timestamptz;
        lease_epoch bigint;
        lease_owner text;
    BEGIN
        IF TG_OP = 'DELETE' THEN
            r := OLD;
        ELSE
            r := NEW;
            new_published := NEW.published_at;
            new_retries := NEW.retry_count;
            new_dead := NEW.dead_lettered_at;
        END IF;
        -- The lease covering the row as this statement sees it (a fenced write updated it in
        -- the same statement, so it is the writer's own lease when the fence let it through).
        SELECT p.epoch, p.owner INTO lease_epoch, lease_owner
        FROM outbox_partition p
        WHERE p.slot_lo <= r.slot AND r.slot < p.slot_hi
        ORDER BY p.leased_until > clock_timestamp() DESC NULLS LAST, p.epoch DESC
        LIMIT 1;
        INSERT INTO fault_row_audit (app, op, event_id, seq, old_published_at,
            new_published_at, old_retry_count, new_retry_count, new_dead_lettered_at,
            lease_epoch, lease_owner, at)
        VALUES (current_setting('application_name'), TG_OP, r.id, r.seq, OLD.published_at,
            new_published, OLD.retry_count, new_retries, new_dead, lease_epoch, lease_owner,
            clock_timestamp());
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER fault_audit_row AFTER UPDATE OR DELETE ON outbox
    FOR EACH ROW EXECUTE FUNCTION fault_audit_row()
    """,
    """
    CREATE TABLE fault_lease_audit (
        id bigserial PRIMARY KEY,
        app text NOT NULL,
        partition_count integer NOT NULL,
        partition integer NOT NULL,
        old_epoch bigint,
        epoch bigint NOT NULL,
        old_owner text,
        owner text,
        granted_at timestamptz,
        leased_until timestamptz,
        at timestamptz NOT NULL
    )
    """,
    """
    CREATE FUNCTION fault_audit_lease() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO fault_lease_audit (app, partition_count, partition, old_epoch, epoch,
            old_owner, owner, granted_at, leased_until, at)
        VALUES (current_setting('application_name'), NEW.partition_count, NEW.partition,
            OLD.epoch, NEW.epoch, OLD.owner, NEW.owner, NEW.granted_at, NEW.leased_until,
            clock_timestamp());
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER fault_audit_lease AFTER UPDATE ON outbox_partition
    FOR EACH ROW
    WHEN (OLD.epoch IS DISTINCT FROM NEW.epoch OR OLD.owner IS DISTINCT FROM NEW.owner)
    EXECUTE FUNCTION fault_audit_lease()
    """,
)


def install_audit(engine: Engine) -> None:
    """Install the write audit (before any worker starts)."""
    with engine.begin() as conn:
        for statement in AUDIT_DDL:
            conn.execute(text(statement))


def _rows(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def row_audit(engine: Engine) -> list[dict[str, Any]]:
    return _rows(engine, "SELECT * FROM fault_row_audit ORDER BY id")


def lease_history(engine: Engine) -> list[dict[str, Any]]:
    return _rows(engine, "SELECT * FROM fault_lease_audit ORDER BY id")


def audit_count(engine: Engine, app: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM fault_row_audit WHERE app = :app"), {"app": app}
            ).scalar_one()
        )


def lease_row(engine: Engine, partition_count: int = 1, partition: int = 0) -> dict[str, Any]:
    """The lease row, with ``live`` computed on PostgreSQL's clock."""
    rows = _rows(
        engine,
        "SELECT *, leased_until > clock_timestamp() AS live, clock_timestamp() AS now "
        "FROM outbox_partition WHERE partition_count = :n AND partition = :p",
        n=partition_count,
        p=partition,
    )
    return rows[0] if rows else {}


def double_marks(engine: Engine) -> list[dict[str, Any]]:
    """Writes that changed an already published row, and rows marked published twice."""
    return _rows(
        engine,
        """
        SELECT event_id, count(*) FILTER (WHERE old_published_at IS NULL
                                           AND new_published_at IS NOT NULL) AS marks,
               count(*) FILTER (WHERE old_published_at IS NOT NULL AND op = 'UPDATE') AS rewrites
        FROM fault_row_audit GROUP BY event_id
        HAVING count(*) FILTER (WHERE old_published_at IS NULL
                                 AND new_published_at IS NOT NULL) > 1
            OR count(*) FILTER (WHERE old_published_at IS NOT NULL AND op = 'UPDATE') > 0
        """,
    )


def retry_increments(engine: Engine) -> list[dict[str, Any]]:
    return _rows(
        engine,
        "SELECT * FROM fault_row_audit WHERE new_retry_count > old_retry_count ORDER BY id",
    )


def outbox_totals(engine: Engine) -> dict[str, int]:
    rows = _rows(
        engine,
        """
        SELECT count(*) AS total,
               count(*) FILTER (WHERE published_at IS NULL) AS pending,
               count(*) FILTER (WHERE retry_count > 0) AS retried,
               count(*) FILTER (WHERE dead_lettered_at IS NOT NULL) AS dead_lettered
        FROM outbox
        """,
    )
    return {k: int(v) for k, v in rows[0].items()}


def backends(engine: Engine) -> list[dict[str, Any]]:
    """Every other session on the test database: who, state, and the locks it holds."""
    return _rows(
        engine,
        """
        SELECT a.pid, a.application_name AS app, a.state,
               array_remove(array_agg(DISTINCT
                   CASE WHEN l.locktype = 'advisory' THEN 'advisory'
                        WHEN l.relation IS NOT NULL
                        THEN l.relation::regclass::text || ':' || l.mode END), NULL) AS locks
        FROM pg_stat_activity a
        LEFT JOIN pg_locks l ON l.pid = a.pid AND l.granted
        WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
          AND a.backend_type = 'client backend'
        GROUP BY a.pid, a.application_name, a.state
        """,
    )


# --- worker logs -------------------------------------------------------------------------------


def actions(proc: Proc) -> list[dict[str, Any]]:
    """The structured (JSON) log lines of a process that carry an ``action``."""
    found = []
    for raw in proc.log().splitlines():
        line = raw.strip()
        if not line.startswith("{") or '"action"' not in line:
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "action" in data:
            found.append(data)
    return found


def count_action(procs: list[Proc], action: str) -> int:
    return sum(1 for p in procs for a in actions(p) if a["action"] == action)


def owner_pid(owner: str | None) -> int | None:
    """``host:pid`` (a pool process) -> pid; the wake-up claimer ``host:pid:wakeup`` -> None."""
    if not owner:
        return None
    parts = owner.rsplit(":", 2)
    if len(parts) == 3 and parts[2] == "wakeup":
        return None
    try:
        return int(owner.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


# --- producer and URLs -------------------------------------------------------------------------


@dataclass
class Producer:
    """Writes small transactions on a background thread until stopped."""

    engine: Engine
    aggregates: int = 20
    per_transaction: int = 3
    interval: float = 0.05
    prefix: str = "P"
    ids: list[uuid.UUID] = field(default_factory=list)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _next: int = 0

    def start(self) -> Producer:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                events = []
                for _ in range(self.per_transaction):
                    events.append(("Order", f"{self.prefix}{self._next % self.aggregates}"))
                    self._next += 1
                self.ids.extend(insert_events(self.engine, events))
                self._stop.wait(self.interval)
        except BaseException as error:  # surfaced by stop()
            self.error = error

    def count(self) -> int:
        return len(self.ids)

    def stop(self) -> list[uuid.UUID]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.error is not None:
            raise AssertionError(f"producer failed: {self.error!r}")
        return list(self.ids)


@contextmanager
def producing(engine: Engine, **options: Any) -> Iterator[Producer]:
    producer = Producer(engine, **options).start()
    try:
        yield producer
    finally:
        producer._stop.set()
        if producer._thread is not None:
            producer._thread.join(10)


def via(url: str, host: str, port: int) -> str:
    """``url`` with its host and port replaced (point a client at a TCP proxy)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@contextmanager
def another_redis_url() -> Iterator[str]:
    """A second Redis database of this test run (e.g. a separate Celery broker for one worker)."""
    with services.redis_database() as number:
        yield f"redis://{services.REDIS_HOST}:{services.REDIS_PORT}/{number}"


def since(start: float) -> float:
    return round(time.monotonic() - start, 2)


def as_text(value: datetime | None) -> str:
    return value.isoformat() if value is not None else "-"


# --- a consumer that keeps up on a loaded machine ---------------------------------------------


@dataclass
class BulkCollector(Collector):
    """``kit.Collector`` (same checks: order of first arrival, duplicates, headers), reading its
    queue in bulk. The queue is declared and bound through kombu like any consumer's; messages
    are then taken from the queue's Redis list a thousand per round trip (RPOP with a count,
    oldest first, as kombu's BRPOP) instead of one, so that on a busy machine the consumer is
    not what a test waits for. Redis only."""

    batch: int = 1000

    def _run(self) -> None:
        try:
            connection: Any = Connection  # kombu is untyped
            queue: Any = self._queue()
            with connection(self.url) as conn:
                queue(conn.default_channel).declare()
            client = redis.Redis.from_url(self.url)
            try:
                self._ready.set()
                while not self._stop.is_set():
                    raw = client.rpop(self.queue_name, self.batch)
                    if not raw:
                        self._stop.wait(0.02)
                        continue
                    now = time.time()
                    received = [_decode(item, now) for item in cast(list[bytes], raw)]
                    with self.lock:
                        self.messages.extend(received)
            finally:
                client.close()
        except BaseException as error:  # surfaced to the test by bulk_collecting()
            self.error = error
            self._ready.set()


def _decode(raw: bytes, at: float) -> Received:
    """One message as kombu's Redis transport stores it (JSON envelope, body base64)."""
    envelope = json.loads(raw)
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    data = json.loads(body)
    return Received(
        id=data["id"],
        aggregate=(data["aggregate_type"], data["aggregate_id"]),
        sequence=int(data["sequence"]),
        headers=dict(envelope.get("headers") or {}),
        body=data,
        at=at,
    )


@contextmanager
def bulk_collecting(url: str, exchange: str, pattern: str = "#") -> Iterator[BulkCollector]:
    collector = BulkCollector(url, exchange, pattern)
    collector.start()
    try:
        yield collector
    finally:
        collector.stop()
    if collector.error is not None:
        raise AssertionError(f"collector failed: {collector.error!r}")
