"""Finishing a batch: ONE fenced statement marks the published rows (or deletes them) and
records the failures, so a worker whose lease was lost can write nothing (see ``store.relay``);
its commit need not wait for the disk (see ``finish_batch``).

A failure either backs off (``next_attempt_at``) or parks its row (``dead_lettered_at``, which
holds the aggregate's later rows back). Backpressure failures carry a patience: the row parks
once its first failure is older than that, and until then waits at least half the time it has
been failing. Failed rows that may have reached a queue all the same are added to the lease's
``redeliver_ids``, so every later send of them is flagged ``outbox-redelivered``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from outbox_tasks.store.records import Failure, FinishResult, Lease

_FENCE_CTE = """
    lease AS (
        UPDATE outbox_partition
        SET inflight_ids = NULL,
            -- Failed rows that may have reached a queue (a nack): every later send is flagged.
            redeliver_ids = CASE WHEN cardinality(CAST(:maybe_sent AS uuid[])) = 0
                                 THEN redeliver_ids
                                 ELSE ARRAY(SELECT DISTINCT unnest(COALESCE(redeliver_ids,
                                      '{}'::uuid[]) || CAST(:maybe_sent AS uuid[]))) END,
            published_count = published_count + :n_ok,
            last_published_at = CASE WHEN :n_ok > 0 THEN clock_timestamp()
                                     ELSE last_published_at END
        WHERE partition_count = :n AND partition = :p AND epoch = :epoch
          AND leased_until > clock_timestamp()
        RETURNING clock_timestamp() AS at
    )"""

_FAILED_CTE = """
    fails AS (
        -- g: seconds since the row first failed; park: give up now (no delay, or a
        -- backpressure failure older than its patience).
        SELECT f.*, EXTRACT(EPOCH FROM clock_timestamp() - COALESCE(o.first_failed_at,
                    clock_timestamp())) AS g,
               f.delay IS NULL OR o.first_failed_at <= clock_timestamp()
                   - make_interval(secs => f.patience) AS park
        FROM unnest(CAST(:f_ids AS uuid[]), CAST(:f_counts AS integer[]),
                    CAST(:f_errors AS text[]), CAST(:f_delays AS float8[]),
                    CAST(:f_patience AS float8[]))
             AS f(id, retry_count, error, delay, patience)
        JOIN outbox o ON o.id = f.id
    ),
    failed AS (
        UPDATE outbox o
        SET retry_count = f.retry_count,
            last_error = f.error,
            first_failed_at = COALESCE(o.first_failed_at, clock_timestamp()),
            -- Parked rows have no next attempt: dead_lettered_at holds their aggregate.
            next_attempt_at = CASE WHEN f.park IS TRUE THEN NULL
                              ELSE clock_timestamp() + make_interval(secs => GREATEST(f.delay,
                                   CASE WHEN f.patience IS NULL THEN 0 ELSE f.g / 2 END)) END,
            dead_lettered_at = CASE WHEN f.park IS TRUE THEN clock_timestamp() END
        FROM fails f
        WHERE o.id = f.id AND o.published_at IS NULL AND EXISTS (SELECT 1 FROM lease)
        RETURNING o.id, o.dead_lettered_at IS NOT NULL AS parked
    )"""


def _finish(done: str) -> Any:
    """The per-batch finishing statement: fence, ``done`` (mark or delete), failures."""
    return text(
        "WITH"
        + _FENCE_CTE
        + f""",
    done AS (
        {done}
        WHERE id = ANY(CAST(:ok_ids AS uuid[])) AND published_at IS NULL
          AND EXISTS (SELECT 1 FROM lease)
        RETURNING id
    ),"""
        + _FAILED_CTE
        + """
    SELECT (SELECT at FROM lease) AS at, (SELECT count(*) FROM done) AS done,
           (SELECT count(*) FROM failed) AS failed,
           (SELECT count(*) FROM failed WHERE parked) AS parked,
           -- This transaction's commit need not wait for the disk (see finish_batch).
           set_config('synchronous_commit', 'off', true) AS relaxed
    """
    )


_FINISH_MARK = _finish("UPDATE outbox SET published_at = (SELECT at FROM lease)")
# OUTBOX_CLEANUP_MODE=delete: the published rows go in the same statement that would mark them.
_FINISH_DELETE = _finish("DELETE FROM outbox")


def finish_batch(
    conn: Connection,
    lease: Lease,
    published_ids: Sequence[uuid.UUID],
    failures: Sequence[Failure],
    *,
    delete_published: bool,
    maybe_sent: Sequence[uuid.UUID] = (),
) -> FinishResult:
    """Mark published (or delete) and record failures in ONE fenced statement per batch.
    ``maybe_sent``: failed rows that may have reached a queue; later sends are redeliveries.

    The statement also turns ``synchronous_commit`` off for its transaction: the commit need not
    wait for the disk. If the server crashes before it gets there, the batch's in-flight record
    (committed durably before publishing, every row of the batch) is still there and the next
    holder re-sends the batch marked redelivered, failures included; the next durable commit
    on the connection makes it durable anyway (the log is written in order)."""
    row = conn.execute(
        _FINISH_DELETE if delete_published else _FINISH_MARK,
        {
            "n": lease.partition_count,
            "p": lease.partition,
            "epoch": lease.epoch,
            "n_ok": len(published_ids),
            "ok_ids": list(published_ids),
            "f_ids": [f.id for f in failures],
            "f_counts": [f.retry_count for f in failures],
            "f_errors": [f.error for f in failures],
            "f_delays": [f.delay_seconds for f in failures],
            "f_patience": [f.patience_seconds for f in failures],
            "maybe_sent": list(maybe_sent),
        },
    ).one()
    return FinishResult(
        fenced_ok=row.at is not None,
        marked=row.done,
        failed=row.failed,
        finished_at=row.at,
        parked=row.parked,
    )
