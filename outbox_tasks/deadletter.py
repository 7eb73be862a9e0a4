"""Dead letters: messages that exhausted their retries, their parked aggregates, and what an
operator does about them (list, show, replay in order, discard with a reason, audit history).

How a message gets here: the relay, in the same fenced statement that records its last failure,
sets ``outbox.dead_lettered_at``. From then on the relay never selects it, and its aggregate's
later rows wait behind it (parked). The ``outbox.dead_letter`` task then:

- copies it into ``outbox_dead_letter`` with its history (attempts, last error, first and last
  failure time),
- publishes a copy to the dead-letter exchange (``OUTBOX_DEAD_LETTER_EXCHANGE``, same routing key),
- for event types whose policy is ``skip`` (``OUTBOX_EVENT_TYPE_POLICIES``), removes the outbox row
  so the aggregate flows on; the default policy ``park`` keeps it parked until an operator acts.

Replay puts the original outbox row back in line (same id, same ``seq``, retries reset), so it is
published before the aggregate's later rows. Discard removes it from the outbox (the dead-letter
copy stays) and unparks the aggregate. Both are idempotent and audited.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from outbox_tasks.envelope import OutboundMessage, message_for_row
from outbox_tasks.errors import InvalidMessage, NotFound
from outbox_tasks.logs import event, get_logger
from outbox_tasks.partitioning import partition_of
from outbox_tasks.relay import Publisher
from outbox_tasks.settings import Settings

log = get_logger("deadletter")

H_DEAD_REASON = "outbox-dead-letter-reason"
H_DEAD_RETRIES = "outbox-dead-letter-retries"


@dataclass(frozen=True, slots=True)
class DeadLetterView:
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


@dataclass
class Resolution:
    """What replay or discard did (or would do, with ``dry_run``)."""

    action: str
    dry_run: bool
    matched: list[uuid.UUID]
    changed: list[uuid.UUID]
    already_resolved: list[uuid.UUID]

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "dry_run": self.dry_run,
            "matched": [str(i) for i in self.matched],
            "changed": [str(i) for i in self.changed],
            "already_resolved": [str(i) for i in self.already_resolved],
        }


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = os.environ.get("USER", "unknown")
    return f"{user}@{os.uname().nodename}"


# --- statements -------------------------------------------------------------------------------

_EXHAUSTED = text(
    """
    SELECT o.id, o.aggregate_type, o.aggregate_id, o.event_type, o.payload::text AS payload_json,
           o.headers, o.schema_version, o.seq, o.slot, o.created_at, o.retry_count, o.last_error,
           o.first_failed_at, o.dead_lettered_at
    FROM outbox o
    WHERE o.dead_lettered_at IS NOT NULL AND o.published_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM outbox_dead_letter d WHERE d.id = o.id)
    ORDER BY o.seq
    LIMIT :limit
    FOR UPDATE OF o SKIP LOCKED
    """
)

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

_DROP_SKIPPED = text(
    "DELETE FROM outbox WHERE id = ANY(CAST(:ids AS uuid[])) AND dead_lettered_at IS NOT NULL "
    "AND published_at IS NULL"
)


def _select_exhausted(conn: Connection, limit: int) -> list[Any]:
    return list(conn.execute(_EXHAUSTED, {"limit": limit}))


def _record(conn: Connection, event_id: uuid.UUID, status: str) -> None:
    conn.execute(_RECORD, {"id": event_id, "status": status})


def _drop_skipped(conn: Connection, ids: list[uuid.UUID]) -> None:
    if ids:
        conn.execute(_DROP_SKIPPED, {"ids": ids})


def _dead_copy(row: Any, settings: Settings) -> OutboundMessage:
    message = message_for_row(
        row, partition=partition_of(row.slot, settings.partitions), epoch=0, redelivered=False
    )
    message.headers[H_DEAD_REASON] = (row.last_error or "")[:1000]
    message.headers[H_DEAD_RETRIES] = row.retry_count
    return message


def collect(
    engine: Engine, settings: Settings, publisher: Publisher, *, limit: int = 500
) -> dict[str, int]:
    """The ``outbox.dead_letter`` task: record newly exhausted messages, publish their copies to
    the dead-letter exchange, and drop the outbox rows of ``skip``-policy event types.

    The copy is published before the dead letter is recorded: a crash in between re-publishes the
    copy on the next run (at least once), never loses it.
    """
    with engine.begin() as conn:
        rows = _select_exhausted(conn, limit)
        if not rows:
            return {"recorded": 0, "skipped": 0}
        result = publisher.publish_batch([_dead_copy(r, settings) for r in rows])
        sent = set(result.published)
        skipped_ids = []
        for row in rows:
            if str(row.id) not in sent:
                continue  # the copy could not be published: try again next run
            policy = settings.event_type_policies.get(row.event_type, "park")
            _record(conn, row.id, "skipped" if policy == "skip" else "parked")
            if policy == "skip":
                skipped_ids.append(row.id)
        _drop_skipped(conn, skipped_ids)
    recorded = len(sent)
    if recorded:
        event(
            log,
            logging.WARNING,
            "dead_lettered",
            "messages dead-lettered; their aggregates are parked until replay or discard",
            count=recorded,
            skipped=len(skipped_ids),
            aggregates=len({(r.aggregate_type, r.aggregate_id) for r in rows}),
        )
    return {"recorded": recorded, "skipped": len(skipped_ids)}


_COLUMNS = (
    "d.id, d.aggregate_type, d.aggregate_id, d.event_type, d.seq, d.status, d.attempts, "
    "d.last_error, d.created_at, d.first_failed_at, d.last_failed_at, d.dead_lettered_at, "
    "d.resolved_at, d.resolved_by, d.resolution_reason"
)


def _view(row: Any, full: bool = False) -> DeadLetterView:
    return DeadLetterView(
        id=row.id,
        aggregate_type=row.aggregate_type,
        aggregate_id=row.aggregate_id,
        event_type=row.event_type,
        seq=row.seq,
        status=row.status,
        attempts=row.attempts,
        last_error=row.last_error,
        created_at=row.created_at,
        first_failed_at=row.first_failed_at,
        last_failed_at=row.last_failed_at,
        dead_lettered_at=row.dead_lettered_at,
        resolved_at=row.resolved_at,
        resolved_by=row.resolved_by,
        resolution_reason=row.resolution_reason,
        payload=row.payload if full else None,
        headers=row.headers if full else None,
        errors=row.errors if full else None,
    )


def list_dead_letters(
    engine: Engine,
    filters: Filters,
    *,
    status: str | None = "parked",
    limit: int = 50,
    offset: int = 0,
) -> list[DeadLetterView]:
    """Dead letters matching the filters, oldest first (the order replay uses)."""
    where, params = filters.where()
    if status:
        where += " AND d.status = :status"
        params["status"] = status
    params.update(limit=limit, offset=offset)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                f"SELECT {_COLUMNS} FROM outbox_dead_letter d WHERE {where} "
                "ORDER BY d.seq LIMIT :limit OFFSET :offset"
            ),
            params,
        )
        return [_view(r) for r in rows]


def show(engine: Engine, event_id: uuid.UUID) -> DeadLetterView:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                f"SELECT {_COLUMNS}, d.payload, d.headers, d.errors "
                "FROM outbox_dead_letter d WHERE d.id = :id"
            ),
            {"id": event_id},
        ).one_or_none()
    if row is None:
        raise NotFound(f"no dead letter with id {event_id} (see `outbox-tasks dlq list`)")
    return _view(row, full=True)


_AUDIT = text(
    "INSERT INTO outbox_dead_letter_audit (actor, action, event_id, aggregate_type, "
    "aggregate_id, reason, details) VALUES (:actor, :action, :event_id, :aggregate_type, "
    ":aggregate_id, :reason, CAST(:details AS jsonb))"
)

_RESOLVE = text(
    "UPDATE outbox_dead_letter SET status = :status, resolved_at = clock_timestamp(), "
    "resolved_by = :actor, resolution_reason = :reason "
    "WHERE id = :id AND status IN ('parked', 'skipped') RETURNING id"
)

# Put the original row back in line: same id and seq, so it goes before the aggregate's later
# rows. A skip-policy row was removed from the outbox: re-insert it from the dead-letter copy.
_REQUEUE = text(
    "UPDATE outbox SET dead_lettered_at = NULL, retry_count = 0, next_attempt_at = NULL, "
    "last_error = NULL, first_failed_at = NULL WHERE id = :id AND published_at IS NULL"
)
_REINSERT = text(
    "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers, "
    "schema_version, created_at) SELECT id, aggregate_type, aggregate_id, event_type, payload, "
    "headers, schema_version, created_at FROM outbox_dead_letter WHERE id = :id "
    "ON CONFLICT (id) DO NOTHING"
)
_REMOVE = text("DELETE FROM outbox WHERE id = :id AND published_at IS NULL")


def _resolve(
    engine: Engine,
    filters: Filters,
    *,
    action: str,
    actor: str,
    reason: str | None,
    dry_run: bool,
    per_row: Callable[[Connection, Any], None],
    rate_per_second: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Resolution:
    if filters.empty and not filters.everything:
        raise InvalidMessage(
            f"{action} needs an id, an aggregate or other filters, or --all: refusing to act on "
            "every dead letter by accident"
        )
    where, params = filters.where()
    with engine.connect() as conn:
        rows = list(
            conn.execute(
                text(
                    f"SELECT d.id, d.status, d.aggregate_type, d.aggregate_id, d.seq "
                    f"FROM outbox_dead_letter d WHERE {where} ORDER BY d.seq"
                ),
                params,
            )
        )
    if filters.ids and len(rows) < len(set(filters.ids)):
        missing = set(filters.ids) - {r.id for r in rows}
        raise NotFound("no dead letter with id " + ", ".join(sorted(str(m) for m in missing)))
    result = Resolution(
        action=action,
        dry_run=dry_run,
        matched=[r.id for r in rows],
        changed=[],
        already_resolved=[r.id for r in rows if r.status not in ("parked", "skipped")],
    )
    if dry_run:
        result.changed = [r.id for r in rows if r.status in ("parked", "skipped")]
        return result
    status = "replayed" if action == "replay" else "discarded"
    for row in rows:
        if row.status not in ("parked", "skipped"):
            continue
        with engine.begin() as conn:
            resolved = conn.execute(
                _RESOLVE, {"status": status, "actor": actor, "reason": reason, "id": row.id}
            ).one_or_none()
            if resolved is None:
                continue  # resolved concurrently by someone else: idempotent
            per_row(conn, row)
            conn.execute(
                _AUDIT,
                {
                    "actor": actor,
                    "action": action,
                    "event_id": row.id,
                    "aggregate_type": row.aggregate_type,
                    "aggregate_id": row.aggregate_id,
                    "reason": reason,
                    "details": json.dumps({"seq": row.seq}),
                },
            )
        result.changed.append(row.id)
        if rate_per_second:
            sleep(1.0 / rate_per_second)
    event(
        log,
        logging.INFO,
        f"dead_letter_{action}",
        f"dead letters {status}",
        count=len(result.changed),
        actor=actor,
    )
    return result


def replay(
    engine: Engine,
    filters: Filters,
    *,
    actor: str,
    reason: str | None = None,
    dry_run: bool = False,
    rate_per_second: float | None = 50.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Resolution:
    """Put dead letters back in line, oldest first, at most ``rate_per_second``."""

    def requeue(conn: Connection, row: Any) -> None:
        if conn.execute(_REQUEUE, {"id": row.id}).rowcount == 0:
            conn.execute(_REINSERT, {"id": row.id})

    return _resolve(
        engine,
        filters,
        action="replay",
        actor=actor,
        reason=reason,
        dry_run=dry_run,
        per_row=requeue,
        rate_per_second=rate_per_second,
        sleep=sleep,
    )


def discard(
    engine: Engine, filters: Filters, *, actor: str, reason: str, dry_run: bool = False
) -> Resolution:
    """Drop dead letters for good (the dead-letter copy stays) and unpark their aggregates."""
    if not reason or not reason.strip():
        raise InvalidMessage("discard needs a reason (--reason): it is kept in the audit trail")

    def remove(conn: Connection, row: Any) -> None:
        conn.execute(_REMOVE, {"id": row.id})

    return _resolve(
        engine,
        filters,
        action="discard",
        actor=actor,
        reason=reason,
        dry_run=dry_run,
        per_row=remove,
    )


def history(
    engine: Engine, *, limit: int = 50, event_id: uuid.UUID | None = None
) -> list[dict[str, Any]]:
    where = "WHERE event_id = :event_id" if event_id else ""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, at, actor, action, event_id, aggregate_type, aggregate_id, "
                f"reason, details FROM outbox_dead_letter_audit {where} "
                "ORDER BY id DESC LIMIT :limit"
            ),
            {"limit": limit, "event_id": event_id},
        )
        return [dict(r._mapping) for r in rows]


def counts(engine: Engine) -> dict[str, int]:
    """Unresolved dead letters and parked aggregates (for status and metrics)."""
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT count(*) AS parked, count(DISTINCT (aggregate_type, aggregate_id)) AS aggs "
                "FROM outbox WHERE dead_lettered_at IS NOT NULL AND published_at IS NULL"
            )
        ).one()
    return {"dead_letters": int(row.parked), "parked_aggregates": int(row.aggs)}


def parse_ids(values: Sequence[str]) -> tuple[uuid.UUID, ...]:
    try:
        return tuple(uuid.UUID(v) for v in values)
    except ValueError:
        raise InvalidMessage(
            f"not an event id: {', '.join(values)} (ids look like 1b4e28ba-2fa1-11d2-883f-...)"
        ) from None
