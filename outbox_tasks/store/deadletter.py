"""Dead-letter SQL, one named function per statement: recording exhausted messages, reading dead
letters, resolving them (replay, discard) and their audit trail.

Every function takes an open SQLAlchemy ``Connection``; the caller owns the transaction.
Dead-letter counts for reports are ``store.reports.outbox_totals`` (one query for status,
metrics and ``deadletter.counts``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from outbox_tasks.store.records import Row
from outbox_tasks.store.relay import PREVIOUS_AGGREGATE_SEQUENCE

# Dead-letter statuses an operator can still act on; replay and discard resolve them.
UNRESOLVED_STATUSES = ("parked", "skipped")


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    """One dead letter; ``payload``, ``headers`` and ``errors`` only when read in full."""

    id: uuid.UUID
    aggregate_type: str
    aggregate_id: str
    event_type: str
    seq: int
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    first_failed_at: datetime | None
    last_failed_at: datetime | None
    dead_lettered_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None
    resolution_reason: str | None
    payload: Any = None
    headers: dict[str, Any] | None = None
    errors: list[Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Filters:
    """Which dead letters an operation applies to. Empty filters match nothing unless
    ``everything`` is set, so a typo can never replay or discard the whole table."""

    ids: tuple[uuid.UUID, ...] = ()
    aggregate_type: str | None = None
    aggregate_id: str | None = None
    event_type: str | None = None
    since: datetime | None = None
    everything: bool = False

    @property
    def empty(self) -> bool:
        return not (
            self.ids or self.aggregate_type or self.aggregate_id or self.event_type or self.since
        )

    def where(self) -> tuple[str, dict[str, Any]]:
        """The SQL condition on ``outbox_dead_letter d`` and its bound parameters."""
        clauses: list[str] = ["TRUE"]
        params: dict[str, Any] = {}
        if self.ids:
            clauses.append("d.id = ANY(CAST(:ids AS uuid[]))")
            params["ids"] = list(self.ids)
        if self.aggregate_type:
            clauses.append("d.aggregate_type = :aggregate_type")
            params["aggregate_type"] = self.aggregate_type
        if self.aggregate_id:
            clauses.append("d.aggregate_id = :aggregate_id")
            params["aggregate_id"] = self.aggregate_id
        if self.event_type:
            clauses.append("d.event_type = :event_type")
            params["event_type"] = self.event_type
        if self.since:
            clauses.append("d.dead_lettered_at >= :since")
            params["since"] = self.since
        return " AND ".join(clauses), params


@dataclass(frozen=True, slots=True)
class ExhaustedRow(Row):
    """An outbox row that exhausted its retries and has no dead letter yet: the relay's row (so
    its dead-letter copy is built like any message) and its last error."""

    last_error: str | None


@dataclass(frozen=True, slots=True)
class MatchedDeadLetter:
    """What replay and discard need of a dead letter matched by filters."""

    id: uuid.UUID
    status: str
    aggregate_type: str
    aggregate_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the dead-letter audit trail."""

    id: int
    at: datetime
    actor: str
    action: str
    event_id: uuid.UUID | None
    aggregate_type: str | None
    aggregate_id: str | None
    reason: str | None
    details: dict[str, Any]


# --- recording --------------------------------------------------------------------------------

_SELECT_EXHAUSTED = text(
    f"""
    SELECT o.id, o.aggregate_type, o.aggregate_id, o.event_type, o.payload::text AS payload_json,
           o.headers, o.schema_version, o.seq, o.slot, o.created_at, o.retry_count,
           o.aggregate_sequence, {PREVIOUS_AGGREGATE_SEQUENCE} AS previous_aggregate_sequence,
           o.last_error
    FROM outbox o
    WHERE o.dead_lettered_at IS NOT NULL AND o.published_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM outbox_dead_letter d WHERE d.id = o.id)
    ORDER BY o.seq
    LIMIT :limit
    FOR UPDATE OF o SKIP LOCKED
    """
)


def select_exhausted(conn: Connection, limit: int) -> list[ExhaustedRow]:
    """Lock up to ``limit`` dead-lettered outbox rows not recorded yet, by ``seq`` (rows another
    transaction holds are skipped, not waited for)."""
    return [ExhaustedRow(**r._asdict()) for r in conn.execute(_SELECT_EXHAUSTED, {"limit": limit})]


_RECORD = text(
    """
    INSERT INTO outbox_dead_letter (id, aggregate_type, aggregate_id, event_type, payload, headers,
        schema_version, seq, created_at, attempts, last_error, errors, first_failed_at,
        last_failed_at, dead_lettered_at, status)
    SELECT o.id, o.aggregate_type, o.aggregate_id, o.event_type, o.payload, o.headers,
           o.schema_version, o.seq, o.created_at, o.retry_count, o.last_error,
           jsonb_build_array(jsonb_build_object('at', o.dead_lettered_at, 'error', o.last_error,
                                                'attempts', o.retry_count)),
           o.first_failed_at, o.dead_lettered_at, clock_timestamp(), :status
    FROM outbox o WHERE o.id = :id
    ON CONFLICT (id) DO NOTHING
    """
)


def record_dead_letter(conn: Connection, event_id: uuid.UUID, status: str) -> None:
    """Copy the outbox row into ``outbox_dead_letter`` with ``status`` (``parked`` or
    ``skipped``) and its failure history; a row already recorded is left as it is."""
    conn.execute(_RECORD, {"id": event_id, "status": status})


_DROP_SKIPPED = text(
    "DELETE FROM outbox WHERE id = ANY(CAST(:ids AS uuid[])) AND dead_lettered_at IS NOT NULL "
    "AND published_at IS NULL"
)


def drop_skipped(conn: Connection, ids: Sequence[uuid.UUID]) -> None:
    """Remove these dead-lettered outbox rows (``skip`` policy: the aggregate flows on). Rows
    that are not dead-lettered, or were published, stay. No ids: no statement."""
    if ids:
        conn.execute(_DROP_SKIPPED, {"ids": list(ids)})


# --- reading ----------------------------------------------------------------------------------

_COLUMNS = (
    "d.id, d.aggregate_type, d.aggregate_id, d.event_type, d.seq, d.status, d.attempts, "
    "d.last_error, d.created_at, d.first_failed_at, d.last_failed_at, d.dead_lettered_at, "
    "d.resolved_at, d.resolved_by, d.resolution_reason"
)


def select_dead_letters(
    conn: Connection, filters: Filters, *, status: str | None, limit: int, offset: int
) -> list[DeadLetterView]:
    """Dead letters matching ``filters`` (and ``status`` unless None), by ``seq``, one page;
    without payload, headers and errors."""
    where, params = filters.where()
    if status:
        where += " AND d.status = :status"
        params["status"] = status
    params.update(limit=limit, offset=offset)
    rows = conn.execute(
        text(
            f"SELECT {_COLUMNS} FROM outbox_dead_letter d WHERE {where} "
            "ORDER BY d.seq LIMIT :limit OFFSET :offset"
        ),
        params,
    )
    return [DeadLetterView(**r._asdict()) for r in rows]


_SELECT_ONE = text(
    f"SELECT {_COLUMNS}, d.payload, d.headers, d.errors FROM outbox_dead_letter d WHERE d.id = :id"
)


def select_dead_letter(conn: Connection, event_id: uuid.UUID) -> DeadLetterView | None:
    """One dead letter in full (payload, headers, error history), or None."""
    row = conn.execute(_SELECT_ONE, {"id": event_id}).one_or_none()
    return None if row is None else DeadLetterView(**row._asdict())


def select_matching(conn: Connection, filters: Filters) -> list[MatchedDeadLetter]:
    """Every dead letter matching ``filters``, whatever its status, by ``seq`` (replay order)."""
    where, params = filters.where()
    rows = conn.execute(
        text(
            "SELECT d.id, d.status, d.aggregate_type, d.aggregate_id, d.seq "
            f"FROM outbox_dead_letter d WHERE {where} ORDER BY d.seq"
        ),
        params,
    )
    return [MatchedDeadLetter(**r._asdict()) for r in rows]


# --- resolving --------------------------------------------------------------------------------

_RESOLVE = text(
    "UPDATE outbox_dead_letter SET status = :status, resolved_at = clock_timestamp(), "
    "resolved_by = :actor, resolution_reason = :reason "
    "WHERE id = :id AND status IN ('parked', 'skipped') RETURNING id"
)


def resolve_dead_letter(
    conn: Connection, event_id: uuid.UUID, *, status: str, actor: str, reason: str | None
) -> bool:
    """Mark an unresolved dead letter ``status`` (``replayed`` or ``discarded``) by ``actor``.
    False when it was resolved already (by someone else, concurrently): nothing changed."""
    params = {"status": status, "actor": actor, "reason": reason, "id": event_id}
    return conn.execute(_RESOLVE, params).one_or_none() is not None


# Put the original row back in line: same id and seq, so it goes before the aggregate's later
# rows. A skip-policy row was removed from the outbox: re-insert it from the dead-letter copy.
_REQUEUE = text(
    "UPDATE outbox SET dead_lettered_at = NULL, retry_count = 0, next_attempt_at = NULL, "
    "last_error = NULL, first_failed_at = NULL WHERE id = :id AND published_at IS NULL"
)


def requeue_outbox_row(conn: Connection, event_id: uuid.UUID) -> bool:
    """Reset the unpublished outbox row's retries and dead-letter mark. False: no such row."""
    return bool(conn.execute(_REQUEUE, {"id": event_id}).rowcount)


_REINSERT = text(
    "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers, "
    "schema_version, created_at) SELECT id, aggregate_type, aggregate_id, event_type, payload, "
    "headers, schema_version, created_at FROM outbox_dead_letter WHERE id = :id "
    "ON CONFLICT (id) DO NOTHING"
)


def reinsert_outbox_row(conn: Connection, event_id: uuid.UUID) -> None:
    """Insert the outbox row again from its dead-letter copy (same id; the table assigns a new
    ``seq``). A row still there is left as it is."""
    conn.execute(_REINSERT, {"id": event_id})


_REMOVE = text("DELETE FROM outbox WHERE id = :id AND published_at IS NULL")


def remove_outbox_row(conn: Connection, event_id: uuid.UUID) -> None:
    """Delete the unpublished outbox row (its dead-letter copy stays)."""
    conn.execute(_REMOVE, {"id": event_id})


# --- audit ------------------------------------------------------------------------------------

_AUDIT = text(
    "INSERT INTO outbox_dead_letter_audit (actor, action, event_id, aggregate_type, "
    "aggregate_id, reason, details) VALUES (:actor, :action, :event_id, :aggregate_type, "
    ":aggregate_id, :reason, CAST(:details AS jsonb))"
)


def insert_audit(
    conn: Connection,
    *,
    actor: str,
    action: str,
    event_id: uuid.UUID,
    aggregate_type: str,
    aggregate_id: str,
    reason: str | None,
    details: dict[str, Any],
) -> None:
    """Append one line to the audit trail (``details`` stored as jsonb)."""
    conn.execute(
        _AUDIT,
        {
            "actor": actor,
            "action": action,
            "event_id": event_id,
            "aggregate_type": aggregate_type,
            "aggregate_id": aggregate_id,
            "reason": reason,
            "details": json.dumps(details),
        },
    )


def select_audit(conn: Connection, *, limit: int, event_id: uuid.UUID | None) -> list[AuditEntry]:
    """The newest ``limit`` audit lines, newest first; only those of ``event_id`` if given."""
    where = "WHERE event_id = :event_id" if event_id else ""
    rows = conn.execute(
        text(
            "SELECT id, at, actor, action, event_id, aggregate_type, aggregate_id, "
            f"reason, details FROM outbox_dead_letter_audit {where} "
            "ORDER BY id DESC LIMIT :limit"
        ),
        {"limit": limit, "event_id": event_id},
    )
    return [AuditEntry(**r._asdict()) for r in rows]
