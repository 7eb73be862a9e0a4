"""Read-only SQL for reports (``outbox-tasks status``, metrics, cleanup's table report and the
dead-letter counts), one named function per statement.

Every function takes an open SQLAlchemy ``Connection`` and changes nothing. Ages are measured on
PostgreSQL's clock (``clock_timestamp()``), the one clock every host shares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection


@dataclass(frozen=True, slots=True)
class OutboxTotals:
    """Unpublished rows of the outbox, counted in one scan."""

    pending: int  # not dead-lettered: the relay will publish them
    oldest_pending_age_seconds: float | None  # None: nothing pending
    parked_messages: int  # dead-lettered, not yet replayed or discarded
    parked_aggregates: int  # distinct (aggregate_type, aggregate_id) of the parked messages
    retrying_messages: int  # pending with a retry scheduled (next_attempt_at set)


_OUTBOX_TOTALS = text(
    """
    SELECT count(*) FILTER (WHERE dead_lettered_at IS NULL) AS pending,
           EXTRACT(EPOCH FROM clock_timestamp() - min(created_at)
                   FILTER (WHERE dead_lettered_at IS NULL)) AS oldest,
           count(*) FILTER (WHERE dead_lettered_at IS NOT NULL) AS parked,
           count(DISTINCT (aggregate_type, aggregate_id))
               FILTER (WHERE dead_lettered_at IS NOT NULL) AS parked_aggregates,
           count(*) FILTER (WHERE dead_lettered_at IS NULL
                            AND next_attempt_at IS NOT NULL) AS retrying
    FROM outbox WHERE published_at IS NULL
    """
)


def outbox_totals(conn: Connection) -> OutboxTotals:
    """Pending, parked and retrying rows, and the age of the oldest pending one (seconds)."""
    row = conn.execute(_OUTBOX_TOTALS).one()
    return OutboxTotals(
        pending=int(row.pending),
        oldest_pending_age_seconds=float(row.oldest) if row.oldest is not None else None,
        parked_messages=int(row.parked),
        parked_aggregates=int(row.parked_aggregates),
        retrying_messages=int(row.retrying),
    )


_PUBLISHED_LAST_MINUTE = text(
    "SELECT count(*) FROM outbox WHERE published_at > clock_timestamp() - interval '1 minute'"
)


def count_published_last_minute(conn: Connection) -> int:
    """Rows published in the last 60 seconds that are still in the table (retain and archive
    modes; delete mode removes rows as it publishes them)."""
    return int(conn.execute(_PUBLISHED_LAST_MINUTE).scalar_one())


@dataclass(frozen=True, slots=True)
class PartitionBacklog:
    """Pending, not dead-lettered rows of one partition."""

    rows: int
    due: int  # of those, publishable now (no retry delay pending)


_BACKLOG_BY_PARTITION = text(
    "SELECT (slot::int * :n / 1024) AS partition, count(*) AS n, "
    "count(*) FILTER (WHERE next_attempt_at IS NULL "
    "OR next_attempt_at <= clock_timestamp()) AS due FROM outbox "
    "WHERE published_at IS NULL AND dead_lettered_at IS NULL GROUP BY 1"
)


def backlog_by_partition(conn: Connection, partition_count: int) -> dict[int, PartitionBacklog]:
    """Backlog per partition (0 .. ``partition_count`` - 1); partitions without any are absent."""
    return {
        int(r.partition): PartitionBacklog(rows=int(r.n), due=int(r.due))
        for r in conn.execute(_BACKLOG_BY_PARTITION, {"n": partition_count})
    }


@dataclass(frozen=True, slots=True)
class LeaseState:
    """One lease row of the current partition count."""

    partition: int
    owner: str | None
    epoch: int
    leased_until: datetime | None
    live: bool  # leased_until is still ahead of the database clock
    last_published_at: datetime | None


_LEASES = text(
    "SELECT partition, owner, epoch, leased_until, "
    "leased_until > clock_timestamp() AS live, last_published_at "
    "FROM outbox_partition WHERE partition_count = :n ORDER BY partition"
)


def lease_states(conn: Connection, partition_count: int) -> list[LeaseState]:
    """The lease rows of ``partition_count`` partitions, by partition (partitions never leased
    have no row)."""
    return [
        LeaseState(
            partition=r.partition,
            owner=r.owner,
            epoch=r.epoch,
            leased_until=r.leased_until,
            live=bool(r.live),
            last_published_at=r.last_published_at,
        )
        for r in conn.execute(_LEASES, {"n": partition_count})
    ]


_SINCE_LAST_PUBLISH = text(
    "SELECT EXTRACT(EPOCH FROM clock_timestamp() - max(last_published_at)) FROM outbox_partition"
)


def seconds_since_last_publish(conn: Connection) -> float | None:
    """Seconds since any partition (of any partition count) last published a batch; None when
    none ever did."""
    value = conn.execute(_SINCE_LAST_PUBLISH).scalar_one()
    return None if value is None else float(value)


# Rows the relay could publish right now: due, not dead-lettered, and not held back by an
# earlier row of their aggregate that waits for a retry or is parked. Each one has waited since
# it was written or its retry came due, whichever is later.
_OLDEST_MOVABLE_WAIT = text(
    """
    SELECT EXTRACT(EPOCH FROM clock_timestamp()
                   - min(greatest(o.created_at, coalesce(o.next_attempt_at, o.created_at))))
    FROM outbox o
    WHERE o.published_at IS NULL AND o.dead_lettered_at IS NULL
      AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= clock_timestamp())
      AND NOT EXISTS (
          SELECT 1 FROM outbox b
          WHERE b.aggregate_type = o.aggregate_type AND b.aggregate_id = o.aggregate_id
            AND b.seq < o.seq AND b.published_at IS NULL
            AND (b.dead_lettered_at IS NOT NULL OR b.next_attempt_at > clock_timestamp()))
    """
)


def oldest_movable_wait_seconds(conn: Connection) -> float | None:
    """How long the longest-waiting row the relay could publish now has waited (seconds, since
    it was written or its retry came due); None when there is no such row. Scans the pending
    rows: call it when the relay looks quiet, not on every tick."""
    value = conn.execute(_OLDEST_MOVABLE_WAIT).scalar_one()
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class TableHealth:
    """Statistics of the outbox table (``pg_stat_user_tables``: a few hundred ms behind,
    approximate counts)."""

    n_live_tup: int
    n_dead_tup: int
    last_vacuum: datetime | None
    last_autovacuum: datetime | None
    last_analyze: datetime | None
    last_autoanalyze: datetime | None
    total_bytes: int  # table, indexes and TOAST

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_TABLE_HEALTH = text(
    """
    SELECT n_live_tup, n_dead_tup, last_vacuum, last_autovacuum, last_analyze,
           last_autoanalyze, pg_total_relation_size(relid) AS total_bytes
    FROM pg_stat_user_tables
    WHERE relid = to_regclass('outbox')
    """
)


def table_health(conn: Connection) -> TableHealth | None:
    """Live and dead tuples, size and the last (auto)vacuum and analyze of the outbox table;
    None when the statistics have no row for it."""
    row = conn.execute(_TABLE_HEALTH).one_or_none()
    if row is None:
        return None
    return TableHealth(
        n_live_tup=int(row.n_live_tup),
        n_dead_tup=int(row.n_dead_tup),
        last_vacuum=row.last_vacuum,
        last_autovacuum=row.last_autovacuum,
        last_analyze=row.last_analyze,
        last_autoanalyze=row.last_autoanalyze,
        total_bytes=int(row.total_bytes),
    )


_DATABASE_IDENTITY = text(
    "SELECT (SELECT system_identifier FROM pg_control_system())::text || '/' || current_database()"
)


def database_identity(conn: Connection) -> str:
    """This database as no other is: ``<cluster system identifier>/<database name>`` (a
    physical replica promoted keeps it; a restore into another cluster does not)."""
    return str(conn.execute(_DATABASE_IDENTITY).scalar_one())
