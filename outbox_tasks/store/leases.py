"""The lease statements: grant, take over, renew for a queued task, release (DESIGN 4.2, 5).

Each takes an open SQLAlchemy ``Connection`` (the caller owns the transaction). Lease time is
PostgreSQL's clock (``clock_timestamp()``), one clock for every host. Every write by a holder is
fenced by ``epoch = :epoch AND leased_until > clock_timestamp()``: a stale or expired holder
changes nothing and is told so.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from outbox_tasks.store.records import QUEUED_PREFIX, Lease

# Serializes lease grants across partition counts (repartitioning, DESIGN 4.2). Held for one
# short transaction per grant; the value is arbitrary but fixed ("outbox" in ASCII).
LEASE_LOCK_KEY = 0x6F7574626F78


def lease_from_row(row: Any, partition_count: int, partition: int, owner: str) -> Lease:
    """A Lease from a RETURNING row of the lease table."""
    return Lease(
        partition_count=partition_count,
        partition=partition,
        slot_lo=row.slot_lo,
        slot_hi=row.slot_hi,
        epoch=row.epoch,
        owner=owner,
        redeliver_ids=frozenset(row.redeliver_ids or ()),
        cursor_slot=row.cursor_slot,
    )


def lock_lease_table(conn: Connection) -> None:
    """Serialize grants (transaction-scoped advisory lock)."""
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LEASE_LOCK_KEY})


def ensure_partition_row(
    conn: Connection, partition_count: int, partition: int, slot_lo: int, slot_hi: int
) -> None:
    conn.execute(
        text(
            "INSERT INTO outbox_partition (partition_count, partition, slot_lo, slot_hi) "
            "VALUES (:n, :p, :lo, :hi) ON CONFLICT DO NOTHING"
        ),
        {"n": partition_count, "p": partition, "lo": slot_lo, "hi": slot_hi},
    )


def lock_overlapping_leases(
    conn: Connection, partition_count: int, slot_lo: int, slot_hi: int
) -> None:
    """Before a grant: share-lock the lease rows of OTHER partition counts over the range.

    A holder renews its lease (``mark_inflight``, ``take_over_lease``) in an UPDATE whose
    transaction commits a moment later. The grant's NOT EXISTS reads committed rows only, so
    without this lock it can take a lease that is being renewed for an expired one and grant an
    overlapping range: two live leases, two publishers of the same aggregates, and the newcomer
    does not even see the holder's in-flight marker. FOR SHARE waits for that transaction; the
    grant, a new statement (READ COMMITTED), then sees the renewal. Same-count grants need no
    such lock: they update the very row the holder renews.
    """
    conn.execute(
        text(
            "SELECT 1 FROM outbox_partition WHERE partition_count <> :n "
            "AND slot_lo < :hi AND slot_hi > :lo FOR SHARE"
        ),
        {"n": partition_count, "lo": slot_lo, "hi": slot_hi},
    )


_GRANT = text(
    """
    UPDATE outbox_partition AS l
    SET epoch = l.epoch + 1,
        owner = :owner,
        granted_at = clock_timestamp(),
        leased_until = clock_timestamp() + make_interval(secs => :lease_seconds),
        -- Rows a previous holder may have sent without marking: the in-flight batch left by
        -- every holder of an overlapping range, of any partition count (a crash leaves it
        -- behind), and those still pending from earlier grants. Published ones drop out.
        redeliver_ids = ARRAY(
            SELECT DISTINCT x.id
            FROM outbox_partition o
            CROSS JOIN LATERAL unnest(
                COALESCE(o.inflight_ids, '{}'::uuid[]) || COALESCE(o.redeliver_ids, '{}'::uuid[])
            ) AS u(id)
            JOIN outbox x ON x.id = u.id AND x.published_at IS NULL
            WHERE o.slot_lo < l.slot_hi AND o.slot_hi > l.slot_lo
        ),
        inflight_ids = NULL
    WHERE l.partition_count = :n AND l.partition = :p
      AND (l.leased_until IS NULL OR l.leased_until <= clock_timestamp()
           -- Held for a publish task still queued (never taken over) for :queued_after s.
           OR (CAST(:queued_after AS float8) IS NOT NULL
               AND starts_with(l.owner, :queued_prefix)
               AND l.granted_at
                   <= clock_timestamp() - make_interval(secs => CAST(:queued_after AS float8))))
      -- Repartitioning: never grant a range that overlaps a live lease of another count.
      AND NOT EXISTS (
          SELECT 1 FROM outbox_partition o
          WHERE o.partition_count <> l.partition_count
            AND o.leased_until > clock_timestamp()
            AND o.slot_lo < l.slot_hi AND o.slot_hi > l.slot_lo
      )
    RETURNING l.slot_lo, l.slot_hi, l.epoch, l.redeliver_ids, l.cursor_slot
    """
)


def grant_lease(
    conn: Connection,
    partition_count: int,
    partition: int,
    owner: str,
    lease_seconds: float,
    *,
    take_queued_after: float | None = None,
) -> Lease | None:
    """Lease a partition if it is free; None when another holder's lease is live. With
    ``take_queued_after``, a lease held that long for a publish task still in the queue (owner
    ``QUEUED_PREFIX...``, never taken over) counts as free: that task will find it gone."""
    row = conn.execute(
        _GRANT,
        {
            "n": partition_count,
            "p": partition,
            "owner": owner,
            "lease_seconds": lease_seconds,
            "queued_after": take_queued_after,
            "queued_prefix": QUEUED_PREFIX,
        },
    ).one_or_none()
    return None if row is None else lease_from_row(row, partition_count, partition, owner)


_TAKE_OVER = text(
    """
    UPDATE outbox_partition
    SET owner = :owner, leased_until = clock_timestamp() + make_interval(secs => :lease_seconds)
    WHERE partition_count = :n AND partition = :p AND epoch = :epoch
      AND leased_until > clock_timestamp()
      -- Granted for a queued task, or already this owner's: a second copy of a publish task
      -- (a redelivery, a re-sent message) cannot adopt a lease its first copy took over.
      AND (starts_with(owner, :queued_prefix) OR owner = :owner)
    RETURNING slot_lo, slot_hi, epoch, redeliver_ids, cursor_slot
    """
)


def take_over_lease(
    conn: Connection,
    *,
    partition_count: int,
    partition: int,
    epoch: int,
    owner: str,
    lease_seconds: float,
) -> Lease | None:
    """The publish task adopts the lease its claim granted (fenced by epoch; queued for it, or
    its own) and renews it."""
    row = conn.execute(
        _TAKE_OVER,
        {
            "n": partition_count,
            "p": partition,
            "epoch": epoch,
            "owner": owner,
            "lease_seconds": lease_seconds,
            "queued_prefix": QUEUED_PREFIX,
        },
    ).one_or_none()
    return None if row is None else lease_from_row(row, partition_count, partition, owner)


def release_lease(conn: Connection, lease: Lease) -> bool:
    """Hand the partition back at once. A leftover in-flight marker is kept on purpose."""
    result = conn.execute(
        text(
            "UPDATE outbox_partition SET owner = NULL, leased_until = clock_timestamp() "
            "WHERE partition_count = :n AND partition = :p AND epoch = :epoch "
            "AND leased_until > clock_timestamp()"
        ),
        {"n": lease.partition_count, "p": lease.partition, "epoch": lease.epoch},
    )
    return bool(result.rowcount)


def queue_lease(conn: Connection, lease: Lease, owner: str, lease_seconds: float) -> Lease | None:
    """Keep the partition leased for a publish task about to be queued (a serving task's
    continuation, ``outbox_tasks.serving``): a new epoch (so any older task or copy is stale),
    renewed for ``lease_seconds`` seconds, owner ``owner`` (``QUEUED_PREFIX``...), granted now,
    so a serving task with room may take it at once and a claim once the task is late
    (``grant_lease``'s ``take_queued_after``). None when the lease is stale or expired (nothing
    changed)."""
    row = conn.execute(
        text(
            "UPDATE outbox_partition SET epoch = epoch + 1, owner = :owner, "
            "granted_at = clock_timestamp(), "
            "leased_until = clock_timestamp() + make_interval(secs => :lease_seconds) "
            "WHERE partition_count = :n AND partition = :p AND epoch = :epoch "
            "AND leased_until > clock_timestamp() "
            "RETURNING slot_lo, slot_hi, epoch, redeliver_ids, cursor_slot"
        ),
        {
            "n": lease.partition_count,
            "p": lease.partition,
            "epoch": lease.epoch,
            "owner": owner,
            "lease_seconds": lease_seconds,
        },
    ).one_or_none()
    return (
        None if row is None else lease_from_row(row, lease.partition_count, lease.partition, owner)
    )


def held_partitions(conn: Connection, partition_count: int) -> set[int]:
    """The partitions of ``partition_count`` whose lease is live and taken over (not queued for
    a task): a claim for them would be refused, so a claim of many partitions skips them with
    this one statement instead of a transaction each."""
    rows = conn.execute(
        text(
            "SELECT partition FROM outbox_partition WHERE partition_count = :n "
            "AND leased_until > clock_timestamp() "
            "AND NOT starts_with(coalesce(owner, ''), :queued_prefix)"
        ),
        {"n": partition_count, "queued_prefix": QUEUED_PREFIX},
    )
    return {row.partition for row in rows}
