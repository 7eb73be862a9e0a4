"""``select_batch`` for in-memory transactions, made of their own statements."""

from __future__ import annotations

from collections.abc import Collection

from outbox_tasks.protocols import RelayTransaction
from outbox_tasks.store.records import Lease, SelectedBatch


def select_batch_of(
    tx: RelayTransaction,
    lease: Lease,
    start: int,
    limit: int,
    *,
    lease_seconds: float,
    skip: Collection[tuple[str, str]] = (),
) -> SelectedBatch:
    """``select_batch`` made of ``tx``'s ``select_candidates``, ``pending_seqs`` and
    ``mark_inflight`` (of the unbroken prefixes), with the meaning of the one PostgreSQL
    statement. A fake transaction that redefines those three gets a ``select_batch`` to match."""
    rows = tx.select_candidates(start, lease.slot_hi, limit, skip=skip)
    if not rows:
        return SelectedBatch(rows=[], gaps={}, marked=False)
    max_seq: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row.aggregate_type, row.aggregate_id)
        max_seq[key] = max(max_seq.get(key, row.seq), row.seq)
    selected = {row.seq for row in rows}
    gaps = {
        key: min(missing)
        for key, seqs in tx.pending_seqs(max_seq).items()
        if (missing := [q for q in seqs if q not in selected])
    }
    kept = [r for r in rows if r.seq < gaps.get((r.aggregate_type, r.aggregate_id), r.seq + 1)]
    last = rows[-1].slot + 1
    cursor = lease.slot_lo if len(rows) < limit or last >= lease.slot_hi else last
    marked = bool(kept) and tx.mark_inflight(
        lease, ids=[r.id for r in kept], cursor_slot=cursor, lease_seconds=lease_seconds
    )
    return SelectedBatch(rows=rows, gaps=gaps, marked=marked)
