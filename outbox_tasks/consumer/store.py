"""Every SQL statement of the consumer, one function per statement.

Two kinds of connection are used:

* SQLAlchemy sessions and connections, for receipts, per-aggregate positions (order, parking)
  and the fence, all inside the handling transaction of :mod:`.processing` or the operator
  calls of :mod:`.admin`;
* one raw psycopg autocommit connection per consumer process, for the session-level advisory
  locks of :mod:`.locks` (they must live exactly as long as that connection), its heartbeat and
  the eviction of silent members. These functions raise ``psycopg.Error``;
  :class:`~outbox_tasks.consumer.locks.Locks` translates it.

Tables: ``outbox_consumer_receipt`` (group, event id) and ``outbox_consumer_position`` (group,
aggregate type, aggregate id -> high-water mark and parking state); see DESIGN 6. An ordered
group's partition count is recorded in ``outbox_consumer_position`` too, in a row whose
aggregate type and id are empty (no event has those: the envelope requires both).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from outbox_tasks.consumer.events import Event

# -- receipts and positions (inside the handling transaction) -----------------------------------

_INSERT_RECEIPT = text(
    "INSERT INTO outbox_consumer_receipt (consumer_group, event_id) VALUES (:group, :event_id) "
    "ON CONFLICT DO NOTHING RETURNING 1"
)
_SELECT_POSITION = text(
    "SELECT last_sequence, parked_at IS NOT NULL AS parked, parked_event_id, dead_sequence, "
    "last_aggregate_sequence, parked_reason FROM outbox_consumer_position "
    "WHERE consumer_group = :group AND aggregate_type = :type AND aggregate_id = :id "
    "FOR UPDATE"
)
_CREATE_POSITION = text(
    "INSERT INTO outbox_consumer_position (consumer_group, aggregate_type, aggregate_id, "
    "last_sequence) VALUES (:group, :type, :id, 0) ON CONFLICT DO NOTHING"
)
_ADVANCE_POSITION = text(
    "UPDATE outbox_consumer_position SET last_sequence = :sequence, updated_at = now(), "
    "last_aggregate_sequence = CASE WHEN CAST(:aggregate_sequence AS bigint) IS NULL "
    "THEN last_aggregate_sequence ELSE greatest(coalesce(last_aggregate_sequence, 0), "
    "CAST(:aggregate_sequence AS bigint)) END, "
    "parked_event_id = CASE WHEN :resolve THEN NULL ELSE parked_event_id END, "
    "parked_error = CASE WHEN :resolve THEN NULL ELSE parked_error END, "
    "parked_reason = CASE WHEN :unpark THEN NULL ELSE parked_reason END, "
    "parked_at = CASE WHEN :unpark THEN NULL ELSE parked_at END "
    "WHERE consumer_group = :group AND aggregate_type = :type AND aggregate_id = :id"
)
_PARK = text(
    "INSERT INTO outbox_consumer_position AS p (consumer_group, aggregate_type, aggregate_id, "
    "last_sequence, parked_at, parked_event_id, parked_error, dead_sequence, parked_reason) "
    "VALUES (:group, :type, :id, 0, now(), :event_id, :error, :sequence, :reason) "
    "ON CONFLICT (consumer_group, aggregate_type, aggregate_id) DO UPDATE SET "
    "parked_at = coalesce(p.parked_at, now()), "
    "parked_event_id = CASE WHEN :cause THEN :event_id ELSE p.parked_event_id END, "
    "parked_error = CASE WHEN :cause THEN :error ELSE p.parked_error END, "
    "parked_reason = CASE WHEN :cause THEN :reason ELSE coalesce(p.parked_reason, :reason) END, "
    "dead_sequence = greatest(coalesce(p.dead_sequence, 0), :sequence), updated_at = now()"
)
_PING = text("SELECT 1")


class Position(NamedTuple):
    """An aggregate's state in one group: the high-water marks and the parking state.

    ``last_aggregate_sequence`` is None until the group handles an event that carries one (or
    after an operator's unpark): the next event is then accepted whatever its number."""

    last_sequence: int
    parked: bool
    parked_event_id: uuid.UUID | None
    dead_sequence: int | None
    last_aggregate_sequence: int | None = None
    parked_reason: str | None = None


def _position_key(group: str, event: Event) -> dict[str, Any]:
    return {"group": group, "type": event.aggregate_type, "id": event.aggregate_id}


def insert_receipt(session: Session, group: str, event_id: uuid.UUID) -> bool:
    """Insert the group's receipt for the event; False when it was there (a duplicate)."""
    inserted = session.execute(_INSERT_RECEIPT, {"group": group, "event_id": event_id}).first()
    return inserted is not None


def select_position_for_update(session: Session, group: str, event: Event) -> Position | None:
    """The position of the event's aggregate, its row locked until commit (None: no row)."""
    row = session.execute(_SELECT_POSITION, _position_key(group, event)).first()
    if row is None:
        return None
    return Position(
        int(row[0]),
        bool(row[1]),
        row[2],
        None if row[3] is None else int(row[3]),
        None if row[4] is None else int(row[4]),
        row[5],
    )


def create_position(session: Session, group: str, event: Event) -> None:
    """Create the aggregate's position at sequence 0 (nothing when a row exists)."""
    session.execute(_CREATE_POSITION, _position_key(group, event))


def lock_position(session: Session, group: str, event: Event) -> Position:
    """The aggregate's position, its row locked until commit (created at sequence 0 if new)."""
    position = select_position_for_update(session, group, event)
    if position is None:
        create_position(session, group, event)
        position = select_position_for_update(session, group, event)
        assert position is not None  # created above, or by a concurrent transaction
    return position


def advance_position(
    session: Session, group: str, event: Event, *, resolve: bool, unpark: bool
) -> None:
    """Move the high-water mark to the event; ``resolve`` clears the parking cause, ``unpark``
    resumes the aggregate."""
    params = {
        **_position_key(group, event),
        "sequence": event.sequence,
        "aggregate_sequence": event.aggregate_sequence,
    }
    session.execute(_ADVANCE_POSITION, {**params, "resolve": resolve, "unpark": unpark})


def park_aggregate(
    session: Session,
    group: str,
    event: Event,
    *,
    cause: bool,
    error: str | None,
    reason: str = "dead_lettered",
) -> None:
    """Park the aggregate (or keep it parked) up to the event's sequence; ``cause``: this
    event is why (its id, error and ``reason``, ``dead_lettered`` or ``gap``, are recorded)."""
    params = {**_position_key(group, event), "event_id": event.id, "sequence": event.sequence}
    session.execute(_PARK, {**params, "error": error, "cause": cause, "reason": reason})


def ping(conn: Connection) -> None:
    """A trivial round trip: raises (a driver error) when the database cannot answer."""
    conn.execute(_PING)


# -- operator calls ----------------------------------------------------------------------------

_SELECT_PARKED = text(
    "SELECT aggregate_type, aggregate_id, parked_at, parked_event_id, parked_error, "
    "last_sequence, dead_sequence, parked_reason FROM outbox_consumer_position "
    "WHERE consumer_group = :group AND parked_at IS NOT NULL ORDER BY parked_at"
)
_UNPARK = text(
    "UPDATE outbox_consumer_position SET parked_at = NULL, parked_event_id = NULL, "
    "parked_error = NULL, parked_reason = NULL, last_aggregate_sequence = NULL, "
    "updated_at = now(), "
    "last_sequence = greatest(last_sequence, coalesce(dead_sequence, 0)) "
    "WHERE consumer_group = :group AND aggregate_type = :type "
    "AND aggregate_id = :id AND parked_at IS NOT NULL RETURNING last_sequence"
)


@dataclass(frozen=True, slots=True)
class ParkedAggregate:
    """An aggregate an ordered group has parked: why (event id, error, ``reason``:
    ``dead_lettered`` or ``gap``) and up to where."""

    aggregate_type: str
    aggregate_id: str
    parked_at: datetime
    event_id: uuid.UUID | None
    error: str | None
    last_sequence: int
    dead_sequence: int | None
    reason: str | None = None


def select_parked(conn: Connection, group: str) -> list[ParkedAggregate]:
    """The group's parked aggregates, oldest parking first."""
    rows = conn.execute(_SELECT_PARKED, {"group": group}).all()
    return [ParkedAggregate(*row) for row in rows]


def unpark_aggregate(
    conn: Connection, group: str, aggregate_type: str, aggregate_id: str
) -> int | None:
    """Resume a parked aggregate past its dead-lettered events; returns its new high-water mark,
    None when it was not parked. Skipping leaves a hole in the aggregate's numbers, so its next
    event is accepted whatever its ``aggregate_sequence`` (as a new group would)."""
    params = {"group": group, "type": aggregate_type, "id": aggregate_id}
    row = conn.execute(_UNPARK, params).first()
    return None if row is None else int(row[0])


# -- advisory locks (a raw psycopg autocommit connection, except the fence) ----------------------
# A group's locks are (group key, n), taken with the two-int4 form: in pg_locks classid is the
# key, objid is n and objsubid is 2.

# The fence first takes the partition's fence lock (key, fence) in shared mode for the rest of
# the transaction (CASE evaluates in order), then checks that our lock session still holds the
# partition: whoever takes the partition over terminates the sessions holding its fence lock,
# so a transaction that passed this check either commits before the takeover or not at all.
_FENCE = text(
    "SELECT CASE WHEN pg_try_advisory_xact_lock_shared(CAST(:key AS int4), CAST(:fence AS int4)) "
    "THEN EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = :pid "
    "AND classid::bigint = :key AND objid::bigint = :n AND objsubid = 2 "
    "AND mode = 'ExclusiveLock' AND granted) ELSE false END"
)
_BACKEND_PID = "SELECT pg_backend_pid()"
_LOCKED_OFFSETS = (
    "SELECT array_agg(DISTINCT objid::bigint - %s) FROM pg_locks "
    "WHERE locktype = 'advisory' AND classid::bigint = %s AND objsubid = 2 "
    "AND objid::bigint BETWEEN %s AND %s"
)
_LOCK_SHARED = "SELECT pg_advisory_lock_shared(%s::int4, %s::int4)"
_HOLDERS = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 2"
)
_TRY_LOCK = "SELECT pg_try_advisory_lock(%s::int4, %s::int4)"
_UNLOCK = "SELECT pg_advisory_unlock(%s::int4, %s::int4)"
_HEARTBEAT = "SELECT 1"
# Sessions holding one of the group's locks (except fence locks, held by handling transactions)
# that are not running a statement and have not finished one for ``stale`` seconds: their
# process stopped talking to PostgreSQL (killed without a FIN, cut off, frozen). Terminated,
# waiting up to ``wait`` ms for each to end, which frees its locks. A session of another role
# shows no state to us (NULL): never evicted.
_EVICT_STALE = (
    "SELECT s.pid FROM (SELECT DISTINCT l.pid FROM pg_locks l "
    "JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
    "AND l.classid::bigint = %s AND NOT l.objid::bigint BETWEEN %s AND %s "
    "AND l.pid <> pg_backend_pid() AND a.state <> 'active' "
    "AND a.state_change < clock_timestamp() - %s * interval '1 second') AS s "
    "WHERE pg_terminate_backend(s.pid, %s)"
)
_TERMINATE_HOLDERS = (
    "SELECT count(*) FROM (SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' "
    "AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 2 "
    "AND pid <> pg_backend_pid()) AS h WHERE pg_terminate_backend(h.pid, %s)"
)
_SELECT_LAYOUT = (
    "SELECT last_sequence FROM outbox_consumer_position "
    "WHERE consumer_group = %s AND aggregate_type = '' AND aggregate_id = ''"
)
_RECORD_LAYOUT = (
    "INSERT INTO outbox_consumer_position (consumer_group, aggregate_type, aggregate_id, "
    "last_sequence) VALUES (%s, '', '', %s) ON CONFLICT (consumer_group, aggregate_type, "
    "aggregate_id) DO UPDATE SET last_sequence = excluded.last_sequence, updated_at = now()"
)


def _one(conn: Any, sql: str, *params: int) -> Any:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


def holds_lock(session: Session, *, pid: int, key: int, n: int, fence: int) -> bool:
    """Inside a transaction: take lock (key, fence) shared until the transaction ends, then:
    does backend ``pid`` hold the exclusive lock (key, n)?"""
    params = {"pid": pid, "key": key, "n": n, "fence": fence}
    return bool(session.execute(_FENCE, params).scalar())


def backend_pid(conn: Any) -> int:
    """The server process id of a psycopg connection (it owns that connection's locks)."""
    return int(_one(conn, _BACKEND_PID))


def locked_offsets(conn: Any, key: int, low: int, high: int) -> list[int]:
    """For the locks (key, n) with ``low <= n <= high``, anyone's, granted or waiting: the
    distinct ``n - low``."""
    return list(_one(conn, _LOCKED_OFFSETS, low, key, low, high) or ())


def lock_shared(conn: Any, key: int, n: int) -> None:
    """Take lock (key, n) in shared mode, waiting for it."""
    _one(conn, _LOCK_SHARED, key, n)


def count_holders(conn: Any, key: int, n: int) -> int:
    """How many sessions hold lock (key, n) (shared holders each count)."""
    return int(_one(conn, _HOLDERS, key, n))


def try_lock(conn: Any, key: int, n: int) -> bool:
    """Take lock (key, n) exclusively if it is free; False when someone holds it."""
    return bool(_one(conn, _TRY_LOCK, key, n))


def unlock(conn: Any, key: int, n: int) -> None:
    """Release one hold of lock (key, n) by this connection."""
    _one(conn, _UNLOCK, key, n)


def heartbeat(conn: Any) -> None:
    """A round trip that shows this session alive (``pg_stat_activity.state_change``)."""
    _one(conn, _HEARTBEAT)


def evict_stale(
    conn: Any, key: int, *, spare_low: int, spare_high: int, stale_seconds: float, wait_ms: int
) -> list[int]:
    """Terminate the other sessions holding a lock (key, n), ``n`` outside
    ``[spare_low, spare_high]``, that have been idle for ``stale_seconds``; their pids."""
    params = (key, spare_low, spare_high, stale_seconds, wait_ms)
    return [int(row[0]) for row in conn.execute(_EVICT_STALE, params).fetchall()]


def terminate_holders(conn: Any, key: int, n: int, *, wait_ms: int) -> int:
    """Terminate every other session holding lock (key, n) in any mode; how many."""
    return int(_one(conn, _TERMINATE_HOLDERS, key, n, wait_ms))


def select_layout(conn: Any, group: str) -> int | None:
    """The partition count the group's queues were last bound for (None: never recorded)."""
    row = conn.execute(_SELECT_LAYOUT, (group,)).fetchone()
    return None if row is None else int(row[0])


def record_layout(conn: Any, group: str, partitions: int) -> None:
    """Record the partition count the group's queues are bound for."""
    conn.execute(_RECORD_LAYOUT, (group, partitions))
