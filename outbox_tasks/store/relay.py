"""The relay's batch SQL, one named function per statement, and ``PostgresRelayStore`` over
them and the lease statements (``store.leases``).

Every function takes an open SQLAlchemy ``Connection`` (the caller owns the transaction) and
returns plain values. ``PostgresRelayStore(engine)`` is what the relay talks to: its
``transaction()`` opens one and offers these statements as methods (``protocols.RelayStore``).

Lease time is PostgreSQL's clock (``clock_timestamp()``): one clock for every host, so a worker
with a skewed clock can never extend or steal a lease.

Fencing (DESIGN 2.5): every write a lease holder makes goes through a data-modifying CTE that
updates the holder's own lease row ``WHERE epoch = :epoch AND leased_until > clock_timestamp()``.
That row lock serializes it with a concurrent grant: either the write commits first and the new
holder sees its effect, or the grant wins and the write matches no lease and changes nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from outbox_tasks.db import translate_errors
from outbox_tasks.store.finish import finish_batch
from outbox_tasks.store.leases import (
    ensure_partition_row,
    grant_lease,
    held_partitions,
    lock_lease_table,
    lock_overlapping_leases,
    queue_lease,
    release_lease,
    take_over_lease,
)
from outbox_tasks.store.records import Lease, Row, SelectedBatch

_ROW_WIDTH = len(fields(Row))
_HEADERS = [f.name for f in fields(Row)].index("headers")

P = ParamSpec("P")
R = TypeVar("R")


def mark_inflight(
    conn: Connection,
    lease: Lease,
    *,
    ids: Sequence[uuid.UUID],
    cursor_slot: int,
    lease_seconds: float,
) -> bool:
    """Before a batch goes to the broker: renew the lease, record what is in flight and where the
    next scan starts. Committed before publishing, so a crash leaves the marker behind."""
    result = conn.execute(
        text(
            "UPDATE outbox_partition SET inflight_ids = CAST(:ids AS uuid[]), "
            "cursor_slot = :cursor, "
            "leased_until = clock_timestamp() + make_interval(secs => :lease_seconds) "
            "WHERE partition_count = :n AND partition = :p AND epoch = :epoch "
            "AND leased_until > clock_timestamp()"
        ),
        {
            "n": lease.partition_count,
            "p": lease.partition,
            "epoch": lease.epoch,
            "ids": list(ids),
            "cursor": cursor_slot,
            "lease_seconds": lease_seconds,
        },
    )
    return bool(result.rowcount)


# --- selecting a batch ------------------------------------------------------------------------


def has_due_rows(conn: Connection, slot_lo: int, slot_hi: int) -> bool:
    """Cheap probe before granting a lease: any pending, due row in the slot range?"""
    return bool(
        conn.execute(
            text(
                "SELECT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL "
                "AND slot >= :lo AND slot < :hi AND dead_lettered_at IS NULL "
                "AND (next_attempt_at IS NULL OR next_attempt_at <= clock_timestamp()))"
            ),
            {"lo": slot_lo, "hi": slot_hi},
        ).scalar()
    )


# The aggregate_sequence published before the row ``o``: one less, unless the numbers just
# below it were dropped on purpose (outbox_aggregate_skip); then one less than the lowest of
# that unbroken run (in the run the k-th skip below ``o`` is exactly o.aggregate_sequence - k).
# The usual case costs one probe of an (empty) primary key.
PREVIOUS_AGGREGATE_SEQUENCE = """
    CASE WHEN NOT EXISTS (
        SELECT 1 FROM outbox_aggregate_skip s
        WHERE s.aggregate_type = o.aggregate_type AND s.aggregate_id = o.aggregate_id
          AND s.aggregate_sequence = o.aggregate_sequence - 1
    ) THEN o.aggregate_sequence - 1
    ELSE (
        SELECT min(k.aggregate_sequence) - 1
        FROM (
            SELECT s.aggregate_sequence,
                   row_number() OVER (ORDER BY s.aggregate_sequence DESC) AS below
            FROM outbox_aggregate_skip s
            WHERE s.aggregate_type = o.aggregate_type AND s.aggregate_id = o.aggregate_id
              AND s.aggregate_sequence < o.aggregate_sequence
        ) AS k
        WHERE k.aggregate_sequence = o.aggregate_sequence - k.below
    ) END"""

_CANDIDATES_SQL = f"""
    WITH blocked AS MATERIALIZED (
        -- Aggregates with a row in backoff or parked: their later rows must wait.
        SELECT aggregate_type, aggregate_id, min(seq) AS seq
        FROM outbox
        WHERE published_at IS NULL
          AND (next_attempt_at IS NOT NULL OR dead_lettered_at IS NOT NULL)
          AND slot >= :lo AND slot < :hi
          AND (next_attempt_at > clock_timestamp() OR dead_lettered_at IS NOT NULL)
        GROUP BY aggregate_type, aggregate_id
    )
    SELECT o.id, o.aggregate_type, o.aggregate_id, o.event_type, o.payload::text AS payload_json,
           o.headers::text AS headers, o.schema_version, o.seq, o.slot, o.created_at, o.retry_count,
           o.aggregate_sequence, {PREVIOUS_AGGREGATE_SEQUENCE} AS previous_aggregate_sequence
    FROM outbox o
    WHERE o.published_at IS NULL
      AND o.slot >= :lo AND o.slot < :hi
      AND o.dead_lettered_at IS NULL
      AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= clock_timestamp())
      -- No commit-order guard: a committed row of an aggregate implies that every earlier row of
      -- it is committed (the counter trigger makes writers of one aggregate commit in turn).
      -- Aggregates the caller already found blocked behind a row it cannot take.
      AND NOT EXISTS (
          SELECT 1 FROM unnest(CAST(:skip_types AS text[]), CAST(:skip_ids AS text[]))
               AS s(aggregate_type, aggregate_id)
          WHERE s.aggregate_type = o.aggregate_type AND s.aggregate_id = o.aggregate_id
      )
      AND NOT EXISTS (
          SELECT 1 FROM blocked b
          WHERE b.aggregate_type = o.aggregate_type AND b.aggregate_id = o.aggregate_id
            AND b.seq < o.seq
      )
    -- Slot-major, then seq: one aggregate lives in one slot, so its rows come out contiguous and
    -- in seq order (which is aggregate_sequence order), and the scan walks the partial index
    -- with no sort.
    ORDER BY o.slot, o.seq
    LIMIT :limit
    FOR UPDATE OF o SKIP LOCKED
    """
_SELECT_CANDIDATES = text(_CANDIDATES_SQL)


def select_candidates(
    conn: Connection,
    slot_lo: int,
    slot_hi: int,
    limit: int,
    *,
    skip: Collection[tuple[str, str]] = (),
) -> list[Row]:
    """Lock up to ``limit`` due rows of a slot range (DESIGN 4.3), slot-major then seq, leaving
    out the aggregates in ``skip``."""
    if limit <= 0 or slot_lo >= slot_hi:
        return []
    result = conn.execute(
        _SELECT_CANDIDATES,
        {
            "lo": slot_lo,
            "hi": slot_hi,
            "limit": limit,
            "skip_types": [k[0] for k in skip],
            "skip_ids": [k[1] for k in skip],
        },
    )
    return [_row(r) for r in result]


def _row(r: Any) -> Row:
    """A Row from a selected row: its first columns are Row's fields, in order; the headers
    come as JSON text, parsed here only when there are any (most rows have none)."""
    values = list(r[:_ROW_WIDTH])
    headers = values[_HEADERS]
    values[_HEADERS] = {} if headers == "{}" else json.loads(headers)
    return Row(*values)


_PENDING_SEQS = text(
    """
    SELECT b.aggregate_type, b.aggregate_id, array_agg(e.seq ORDER BY e.seq) AS seqs
    FROM unnest(CAST(:types AS text[]), CAST(:ids AS text[]), CAST(:max_seqs AS bigint[]))
         AS b(aggregate_type, aggregate_id, max_seq)
    JOIN outbox e
      ON e.aggregate_type = b.aggregate_type AND e.aggregate_id = b.aggregate_id
     AND e.published_at IS NULL AND e.seq <= b.max_seq
    GROUP BY b.aggregate_type, b.aggregate_id
    """
)


def pending_seqs(
    conn: Connection, max_seq_by_aggregate: dict[tuple[str, str], int]
) -> dict[tuple[str, str], list[int]]:
    """Per aggregate, every pending seq up to the given one (all partitions, any state).

    The relay keeps only the rows of an aggregate that form an unbroken prefix of this list, so an
    earlier row it could not take (locked by a stale holder or a replay, in backoff) holds the
    later ones back.
    """
    if not max_seq_by_aggregate:
        return {}
    keys = list(max_seq_by_aggregate)
    result = conn.execute(
        _PENDING_SEQS,
        {
            "types": [k[0] for k in keys],
            "ids": [k[1] for k in keys],
            "max_seqs": [max_seq_by_aggregate[k] for k in keys],
        },
    )
    return {(r.aggregate_type, r.aggregate_id): list(r.seqs) for r in result}


_SELECT_BATCH = text(
    f"""
    WITH cand AS MATERIALIZED ({_CANDIDATES_SQL}),
    tail AS (SELECT aggregate_type, aggregate_id, max(seq) AS max_seq, array_agg(seq) AS seqs
             FROM cand GROUP BY 1, 2),
    gap AS (  -- per aggregate (an index probe each): its first pending row not among cand
        SELECT t.aggregate_type, t.aggregate_id, g.seq FROM tail t CROSS JOIN LATERAL (
            SELECT min(e.seq) AS seq FROM outbox e
            WHERE e.aggregate_type = t.aggregate_type AND e.aggregate_id = t.aggregate_id
              AND e.published_at IS NULL AND e.seq <= t.max_seq AND e.seq <> ALL (t.seqs)) g
        WHERE g.seq IS NOT NULL),
    kept AS (SELECT c.id FROM cand c LEFT JOIN gap g USING (aggregate_type, aggregate_id)
             WHERE g.seq IS NULL OR c.seq < g.seq),
    mark AS (  -- mark_inflight, fenced alike
        UPDATE outbox_partition
        SET inflight_ids = ARRAY(SELECT id FROM kept),
            cursor_slot = CASE WHEN (SELECT count(*) FROM cand) < :limit
                OR (SELECT max(slot) FROM cand) + 1 >= :hi THEN :part_lo
                ELSE (SELECT max(slot) FROM cand) + 1 END,
            leased_until = clock_timestamp() + make_interval(secs => :lease_seconds)
        WHERE partition_count = :n AND partition = :p AND epoch = :epoch
          AND leased_until > clock_timestamp() AND EXISTS (SELECT 1 FROM kept)
        RETURNING 1
    )
    SELECT c.*, g.seq AS gap, (SELECT count(*) FROM mark) AS marked
    FROM cand c LEFT JOIN gap g USING (aggregate_type, aggregate_id)
    ORDER BY c.slot, c.seq
    """
)


def select_batch(
    conn: Connection,
    lease: Lease,
    start: int,
    limit: int,
    *,
    lease_seconds: float,
    skip: Collection[tuple[str, str]] = (),
) -> SelectedBatch:
    """``select_candidates`` from ``start``, ``pending_seqs`` and ``mark_inflight`` of the
    unbroken prefixes in ONE statement; ``marked`` False: lease lost, or no row kept."""
    if limit <= 0 or start >= lease.slot_hi:
        return SelectedBatch(rows=[], gaps={}, marked=False)
    result = conn.execute(
        _SELECT_BATCH,
        {
            "lo": start,
            "hi": lease.slot_hi,
            "part_lo": lease.slot_lo,
            "limit": limit,
            "skip_types": [k[0] for k in skip],
            "skip_ids": [k[1] for k in skip],
            "n": lease.partition_count,
            "p": lease.partition,
            "epoch": lease.epoch,
            "lease_seconds": lease_seconds,
        },
    ).all()
    gaps = {(r.aggregate_type, r.aggregate_id): r.gap for r in result if r.gap is not None}
    return SelectedBatch(
        rows=[_row(r) for r in result], gaps=gaps, marked=bool(result and result[0].marked)
    )


# --- the store the relay talks to -------------------------------------------------------------


class PostgresRelayStore:
    """The relay's store on PostgreSQL. Each ``transaction()`` is one database transaction on
    ``engine``; driver errors in it are raised as ``DatabaseUnavailable`` or ``OutboxError``
    (``db.translate_errors``, with ``what`` naming the step)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pinned: Connection | None = None

    @contextmanager
    def transaction(self, what: str = "relay") -> Iterator[PostgresRelayTransaction]:
        pinned = self._pinned
        if pinned is not None:
            with translate_errors(what), pinned.begin():
                yield PostgresRelayTransaction(pinned)
            return
        with translate_errors(what), self.engine.begin() as conn:
            yield PostgresRelayTransaction(conn)

    @contextmanager
    def session(self) -> Iterator[None]:
        """The block's transactions on one connection, checked out (and pinged) once."""
        if self._pinned is not None:
            yield
            return
        with translate_errors("connect"), self.engine.connect() as conn:
            self._pinned = conn
            try:
                yield
            finally:
                self._pinned = None


def _bound(
    statement: Callable[Concatenate[Connection, P], R],
) -> Callable[Concatenate[PostgresRelayTransaction, P], R]:
    """A statement function as a method of the transaction: same parameters, minus ``conn``."""

    def method(self: PostgresRelayTransaction, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return statement(self.conn, *args, **kwargs)

    method.__name__ = statement.__name__
    method.__doc__ = statement.__doc__
    return method


class PostgresRelayTransaction:
    """The statements above, bound to one open transaction (committed when it closes)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    has_due_rows = _bound(has_due_rows)
    lock_lease_table = _bound(lock_lease_table)
    ensure_partition_row = _bound(ensure_partition_row)
    lock_overlapping_leases = _bound(lock_overlapping_leases)
    grant_lease = _bound(grant_lease)
    take_over_lease = _bound(take_over_lease)
    release_lease = _bound(release_lease)
    queue_lease = _bound(queue_lease)
    held_partitions = _bound(held_partitions)
    mark_inflight = _bound(mark_inflight)
    select_candidates = _bound(select_candidates)
    pending_seqs = _bound(pending_seqs)
    select_batch = _bound(select_batch)
    finish_batch = _bound(finish_batch)
