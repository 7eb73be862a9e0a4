"""Cleanup SQL, one named function per statement shape: bounded deletes of aged rows (published
outbox rows, consumer receipts, resolved dead letters), the archive read, the per-database lock.

Every function takes an open SQLAlchemy ``Connection``; the caller owns the transaction (one
short transaction per batch: cleanup never holds a long one). Which rows expire is data: an
``AgedRows`` names a table, the timestamp its rows age by and the condition that makes a row
removable at all; ``count_aged`` and ``delete_aged`` work on any of them.
"""

from __future__ import annotations

import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import TextClause

# Serializes cleanup runs per database ("cleanup" in ASCII); distinct from the lease lock key.
CLEANUP_LOCK_KEY = 0x636C65616E7570
# Dead-letter statuses that mean "resolved": only these are ever purged.
RESOLVED_DEAD_LETTER_STATUSES = ("replayed", "discarded")

_PAST = "'-infinity'::timestamptz"


@dataclass(frozen=True, slots=True)
class AgedRows:
    """Rows of one table that cleanup removes once their timestamp is older than a cutoff."""

    table: str
    stamp: str  # the timestamp column rows age by, walked oldest first
    count_sql: TextClause  # params: cutoff
    delete_sql: TextClause  # params: cutoff, after, limit; RETURNING stamp


def _aged_rows(table: str, stamp: str, removable: str | None = None) -> AgedRows:
    """The count and the bounded delete of one table (``removable``: an extra SQL condition,
    also what lets the planner use a partial index on ``stamp``)."""
    aged = f"{stamp} < :cutoff" if removable is None else f"{removable} AND {stamp} < :cutoff"
    # PostgreSQL has no DELETE ... LIMIT: lock a bounded, index-ordered sub-select (skipping rows
    # someone else holds) and delete exactly those row versions by ctid: a TID scan, about twice
    # as fast as looking 5000 random uuids up in the primary key (bench/cleanup.py), and it
    # sidesteps composite keys. FOR UPDATE re-checks the sub-select's conditions on the row it
    # locks and the lock is held until the delete, so the outer statement repeats none of them.
    # Should a row have been updated concurrently, its new version is simply not deleted this
    # time: never a wrong row. The lower bound (:after, the newest stamp of the previous batch)
    # keeps each batch from re-walking the index entries of rows the earlier batches deleted but
    # vacuum has not removed yet.
    delete = f"""
        DELETE FROM {table}
        WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {table}
            WHERE {aged}
              AND {stamp} >= COALESCE(CAST(:after AS timestamptz), {_PAST})
            ORDER BY {stamp}
            LIMIT :limit
            FOR UPDATE SKIP LOCKED
        ))
        RETURNING {stamp} AS stamp
        """
    return AgedRows(
        table=table,
        stamp=stamp,
        count_sql=text(f"SELECT count(*) FROM {table} WHERE {aged}"),
        delete_sql=text(delete),
    )


PUBLISHED = _aged_rows("outbox", "published_at", "published_at IS NOT NULL")
RECEIPTS = _aged_rows("outbox_consumer_receipt", "processed_at")
# Parked and skipped dead letters are never touched; the audit trail (outbox_dead_letter_audit)
# stays.
RESOLVED_DEAD_LETTERS = _aged_rows(
    "outbox_dead_letter",
    "resolved_at",
    "status IN (" + ", ".join(f"'{s}'" for s in RESOLVED_DEAD_LETTER_STATUSES) + ")",
)


class DeletedBatch(NamedTuple):
    """What one bounded delete removed."""

    rows: int
    newest: datetime | None  # the newest stamp among them (None: nothing deleted)


def count_aged(conn: Connection, aged: AgedRows, *, cutoff: datetime) -> int:
    """How many rows of ``aged`` are older than ``cutoff`` (a dry run)."""
    return int(conn.execute(aged.count_sql, {"cutoff": cutoff}).scalar_one())


def delete_aged(
    conn: Connection, aged: AgedRows, *, cutoff: datetime, after: datetime | None, limit: int
) -> DeletedBatch:
    """Delete up to ``limit`` rows of ``aged`` older than ``cutoff``, oldest first, from
    ``after`` on (the ``newest`` of the previous batch; None: from the start)."""
    stamps = [
        r.stamp
        for r in conn.execute(aged.delete_sql, {"cutoff": cutoff, "after": after, "limit": limit})
    ]
    return DeletedBatch(rows=len(stamps), newest=max(stamps, default=None))


class OutboxRecord(NamedTuple):
    """Every column of one outbox row, in table order; jsonb columns (payload, headers) as
    PostgreSQL's own text (exact numbers), txid as text."""

    id: uuid.UUID
    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: str
    created_at: datetime
    published_at: datetime
    retry_count: int
    last_error: str | None
    seq: int
    txid: str
    slot: int
    next_attempt_at: datetime | None
    headers: str
    schema_version: int
    first_failed_at: datetime | None
    dead_lettered_at: datetime | None
    aggregate_sequence: int | None


# Archive reads take no locks (published rows are never changed by the relay) and page by
# (published_at, id) so a row that could not be deleted is never read twice in one run.
_SELECT_ARCHIVE = text(
    f"""
    SELECT id, aggregate_type, aggregate_id, event_type, payload::text AS payload, created_at,
           published_at, retry_count, last_error, seq, txid::text AS txid, slot, next_attempt_at,
           headers::text AS headers, schema_version, first_failed_at, dead_lettered_at,
           aggregate_sequence
    FROM outbox
    WHERE published_at IS NOT NULL
      AND published_at >= COALESCE(CAST(:after_at AS timestamptz), {_PAST})
      AND published_at < :cutoff
      AND (CAST(:after_at AS timestamptz) IS NULL
           OR (published_at, id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS uuid)))
    ORDER BY published_at, id
    LIMIT :limit
    """
)


class Position(NamedTuple):
    """Where the previous batch of a paged read ended: its last row's stamp and id. Without an
    id, the next page starts strictly after the stamp."""

    stamp: datetime
    id: uuid.UUID | None = None


def select_published(
    conn: Connection, *, cutoff: datetime, after: Position | None, limit: int
) -> Generator[OutboxRecord, None, None]:
    """Up to ``limit`` rows published before ``cutoff``, after the (published_at, id) position,
    in that order; streamed (500 rows at a time), so a caller that stops early never holds a
    batch of large payloads whole. Close the generator when stopping early."""
    params = {
        "cutoff": cutoff,
        "after_at": after.stamp if after else None,
        "after_id": after.id if after else None,
        "limit": limit,
    }
    result = conn.execute(_SELECT_ARCHIVE, params, execution_options={"yield_per": 500})
    try:
        for r in result:
            yield OutboxRecord(*r)
    finally:
        result.close()


_DELETE_ARCHIVED = text(
    """
    DELETE FROM outbox
    WHERE id = ANY(ARRAY(
        SELECT id FROM outbox
        WHERE id = ANY(CAST(:ids AS uuid[])) AND published_at IS NOT NULL
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING id
    """
)


def delete_archived(conn: Connection, ids: Sequence[uuid.UUID]) -> int:
    """Delete exactly these rows, and only those still published (never a pending row).
    Returns how many were deleted."""
    return len(conn.execute(_DELETE_ARCHIVED, {"ids": list(ids)}).all())


_TRY_LOCK = text("SELECT pg_try_advisory_lock(:key)")


def try_lock_cleanup(conn: Connection) -> bool:
    """Take the per-database cleanup lock (session level: it outlives the transaction).
    False: another session holds it."""
    return bool(conn.execute(_TRY_LOCK, {"key": CLEANUP_LOCK_KEY}).scalar_one())


_UNLOCK = text("SELECT pg_advisory_unlock(:key)")


def unlock_cleanup(conn: Connection) -> None:
    """Release the cleanup lock."""
    conn.execute(_UNLOCK, {"key": CLEANUP_LOCK_KEY})
