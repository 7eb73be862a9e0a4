"""The relay's store in memory: rows and leases with the PostgreSQL store's contract."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from outbox_tasks.schema import OutboxMessage, slot_of
from outbox_tasks.store.records import (
    QUEUED_PREFIX,
    Failure,
    FinishResult,
    Lease,
    Row,
)
from outbox_tasks.testing.batches import select_batch_of
from outbox_tasks.testing.records import LeaseRecord, OutboxRecord


class InMemoryRelayStore:
    """The relay's store in memory (``protocols.RelayStore``). Thread-safe: one transaction at
    a time.

    ``clock`` gives the time in seconds; leases expire and backoffs end by it (share it with the
    ``Relay``). Records are immutable snapshots: read them with :meth:`rows` and :meth:`row`.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.RLock()
        self._rows: dict[uuid.UUID, OutboxRecord] = {}
        self._leases: dict[tuple[int, int], LeaseRecord] = {}
        self._next_seq = 1
        # Per aggregate, the last aggregate_sequence handed out (PostgreSQL: outbox_aggregate).
        self._counters: dict[tuple[str, str], int] = {}

    # --- what a test sets up and reads ----------------------------------------------------------

    def add(self, *messages: OutboxMessage) -> list[uuid.UUID]:
        """Store messages as one committed transaction would, in order; returns their ids.
        Raises ValueError if an id is already stored."""
        with self._lock:
            ids = []
            created_at = self._timestamp()
            for message in messages:
                if message.id in self._rows:
                    raise ValueError(f"an outbox row with id {message.id} is already stored")
                key = (message.aggregate_type, message.aggregate_id)
                self._counters[key] = self._counters.get(key, 0) + 1
                self._rows[message.id] = OutboxRecord(
                    id=message.id,
                    aggregate_type=message.aggregate_type,
                    aggregate_id=message.aggregate_id,
                    event_type=message.event_type,
                    payload_json=json.dumps(message.payload, separators=(",", ":")),
                    headers=dict(message.headers or {}),
                    schema_version=message.schema_version,
                    seq=self._next_seq,
                    slot=slot_of(message.aggregate_type, message.aggregate_id),
                    created_at=created_at,
                    aggregate_sequence=self._counters[key],
                )
                self._next_seq += 1
                ids.append(message.id)
            return ids

    def add_row(
        self,
        *,
        aggregate_type: str,
        aggregate_id: str,
        event_type: str,
        payload: Any = None,
        headers: Any = None,
        event_id: uuid.UUID | None = None,
    ) -> uuid.UUID:
        """Store one row as a plain SQL ``INSERT`` would: nothing is validated (a routing key
        over 255 bytes, headers that are not a dict...). Returns its id."""
        with self._lock:
            row_id = event_id or uuid.uuid4()
            key = (aggregate_type, aggregate_id)
            self._counters[key] = self._counters.get(key, 0) + 1
            self._rows[row_id] = OutboxRecord(
                id=row_id,
                aggregate_type=aggregate_type,
                aggregate_id=aggregate_id,
                event_type=event_type,
                payload_json=json.dumps(payload, separators=(",", ":")),
                headers={} if headers is None else headers,
                schema_version=1,
                seq=self._next_seq,
                slot=slot_of(aggregate_type, aggregate_id),
                created_at=self._timestamp(),
                aggregate_sequence=self._counters[key],
            )
            self._next_seq += 1
            return row_id

    def rows(self) -> list[OutboxRecord]:
        """Every stored row (published ones too, unless published in delete mode), in seq order."""
        with self._lock:
            return sorted(self._rows.values(), key=lambda r: r.seq)

    def row(self, event_id: uuid.UUID) -> OutboxRecord | None:
        with self._lock:
            return self._rows.get(event_id)

    def lease(self, partition: int, partition_count: int) -> LeaseRecord | None:
        """The lease record of a partition, None if it was never claimed."""
        with self._lock:
            return self._leases.get((partition_count, partition))

    def replay(self, aggregate_type: str, aggregate_id: str) -> list[uuid.UUID]:
        """Put an aggregate's parked rows back in line (retries reset, same seq), as an operator's
        replay does; returns their ids in seq order (empty if none was parked)."""
        with self._lock:
            parked = sorted(
                (
                    r
                    for r in self._rows.values()
                    if r.parked
                    and r.aggregate_type == aggregate_type
                    and r.aggregate_id == aggregate_id
                ),
                key=lambda r: r.seq,
            )
            for r in parked:
                self._rows[r.id] = replace(
                    r,
                    retry_count=0,
                    last_error=None,
                    first_failed_at=None,
                    next_attempt_at=None,
                    dead_lettered_at=None,
                )
            return [r.id for r in parked]

    # --- the RelayStore interface ---------------------------------------------------------------

    @contextmanager
    def transaction(self, what: str = "relay") -> Iterator[InMemoryRelayTransaction]:
        """One transaction: its writes are undone if the block raises. ``what`` is unused."""
        with self._lock:
            tx = InMemoryRelayTransaction(self)
            try:
                yield tx
            except BaseException:
                tx.roll_back()
                raise
            finally:
                tx.closed = True

    @contextmanager
    def session(self) -> Iterator[None]:
        """Nothing to hold in memory: transactions are the same inside and outside."""
        yield

    def _timestamp(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)


class InMemoryRelayTransaction:
    """The relay's statements on an :class:`InMemoryRelayStore`, with the meaning of the SQL
    ones in ``store.relay``. Lease writes are fenced: a stale epoch or an expired lease changes
    nothing and reports it (None, False, ``fenced_ok=False``)."""

    def __init__(self, store: InMemoryRelayStore) -> None:
        self._store = store
        self._rows = store._rows
        self._leases = store._leases
        self._clock = store.clock
        self._undo_rows: dict[uuid.UUID, OutboxRecord | None] = {}
        self._undo_leases: dict[tuple[int, int], LeaseRecord | None] = {}
        self.closed = False

    @property
    def _now(self) -> float:
        return self._clock()

    # --- leases ---------------------------------------------------------------------------------

    def lock_lease_table(self) -> None:
        """Nothing to do: transactions already run one at a time."""

    def lock_overlapping_leases(self, partition_count: int, slot_lo: int, slot_hi: int) -> None:
        """Nothing to do: transactions already run one at a time."""

    def ensure_partition_row(
        self, partition_count: int, partition: int, slot_lo: int, slot_hi: int
    ) -> None:
        key = (partition_count, partition)
        if key not in self._leases:
            self._put_lease(LeaseRecord(partition_count, partition, slot_lo, slot_hi))

    def grant_lease(
        self,
        partition_count: int,
        partition: int,
        owner: str,
        lease_seconds: float,
        *,
        take_queued_after: float | None = None,
    ) -> Lease | None:
        now = self._now
        record = self._leases.get((partition_count, partition))
        if record is None:
            return None
        queued_long = (
            take_queued_after is not None
            and (record.owner or "").startswith(QUEUED_PREFIX)
            and record.granted_at is not None
            and record.granted_at <= now - take_queued_after
        )
        if record.live(now) and not queued_long:
            return None
        overlapping = [o for o in self._leases.values() if o.overlaps(record)]
        if any(o.partition_count != partition_count and o.live(now) for o in overlapping):
            return None  # repartitioning: never two live leases over one slot
        maybe_sent = {i for o in overlapping for i in o.inflight_ids | o.redeliver_ids}
        granted = replace(
            record,
            epoch=record.epoch + 1,
            owner=owner,
            leased_until=now + lease_seconds,
            granted_at=now,
            redeliver_ids=frozenset(i for i in maybe_sent if self._is_pending(i)),
            inflight_ids=frozenset(),
        )
        self._put_lease(granted)
        return granted.as_lease()

    def take_over_lease(
        self, *, partition_count: int, partition: int, epoch: int, owner: str, lease_seconds: float
    ) -> Lease | None:
        record = self._held(partition_count, partition, epoch)
        if record is None:
            return None
        if not (record.owner or "").startswith(QUEUED_PREFIX) and record.owner != owner:
            return None  # another task took it over already
        renewed = replace(record, owner=owner, leased_until=self._now + lease_seconds)
        self._put_lease(renewed)
        return renewed.as_lease()

    def queue_lease(self, lease: Lease, owner: str, lease_seconds: float) -> Lease | None:
        record = self._held(lease.partition_count, lease.partition, lease.epoch)
        if record is None:
            return None
        now = self._now
        kept = replace(
            record,
            epoch=record.epoch + 1,
            owner=owner,
            granted_at=now,
            leased_until=now + lease_seconds,
        )
        self._put_lease(kept)
        return kept.as_lease()

    def held_partitions(self, partition_count: int) -> set[int]:
        now = self._now
        return {
            r.partition
            for r in self._leases.values()
            if r.partition_count == partition_count
            and r.live(now)
            and not (r.owner or "").startswith(QUEUED_PREFIX)
        }

    def release_lease(self, lease: Lease) -> bool:
        record = self._held(lease.partition_count, lease.partition, lease.epoch)
        if record is None:
            return False
        self._put_lease(replace(record, owner=None, leased_until=self._now))
        return True

    def mark_inflight(
        self, lease: Lease, *, ids: Sequence[uuid.UUID], cursor_slot: int, lease_seconds: float
    ) -> bool:
        record = self._held(lease.partition_count, lease.partition, lease.epoch)
        if record is None:
            return False
        self._put_lease(
            replace(
                record,
                inflight_ids=frozenset(ids),
                cursor_slot=cursor_slot,
                leased_until=self._now + lease_seconds,
            )
        )
        return True

    # --- selecting a batch ----------------------------------------------------------------------

    def has_due_rows(self, slot_lo: int, slot_hi: int) -> bool:
        return any(slot_lo <= r.slot < slot_hi and r.due(self._now) for r in self._rows.values())

    def select_candidates(
        self, slot_lo: int, slot_hi: int, limit: int, *, skip: Collection[tuple[str, str]] = ()
    ) -> list[Row]:
        if limit <= 0 or slot_lo >= slot_hi:
            return []
        in_range = [r for r in self._rows.values() if slot_lo <= r.slot < slot_hi]
        first_blocked: dict[tuple[str, str], int] = {}
        for r in in_range:
            if r.blocks(self._now):
                key = (r.aggregate_type, r.aggregate_id)
                first_blocked[key] = min(r.seq, first_blocked.get(key, r.seq))
        skipped = set(skip)
        candidates = [
            r
            for r in in_range
            if r.due(self._now)
            and (r.aggregate_type, r.aggregate_id) not in skipped
            and first_blocked.get((r.aggregate_type, r.aggregate_id), r.seq) >= r.seq
        ]
        candidates.sort(key=lambda r: (r.slot, r.seq))
        return [r.as_row() for r in candidates[:limit]]

    def pending_seqs(
        self, max_seq_by_aggregate: dict[tuple[str, str], int]
    ) -> dict[tuple[str, str], list[int]]:
        found: dict[tuple[str, str], list[int]] = {}
        for r in self._rows.values():
            key = (r.aggregate_type, r.aggregate_id)
            if r.pending and r.seq <= max_seq_by_aggregate.get(key, -1):
                found.setdefault(key, []).append(r.seq)
        return {key: sorted(seqs) for key, seqs in found.items()}

    # Made of this transaction's select_candidates, pending_seqs and mark_inflight.
    select_batch = select_batch_of

    # --- finishing a batch ----------------------------------------------------------------------

    def finish_batch(
        self,
        lease: Lease,
        published_ids: Sequence[uuid.UUID],
        failures: Sequence[Failure],
        *,
        delete_published: bool,
        maybe_sent: Sequence[uuid.UUID] = (),
    ) -> FinishResult:
        now = self._now
        record = self._held(lease.partition_count, lease.partition, lease.epoch)
        if record is None:
            return FinishResult(fenced_ok=False, marked=0, failed=0, finished_at=None)
        self._put_lease(
            replace(
                record,
                inflight_ids=frozenset(),
                redeliver_ids=record.redeliver_ids | frozenset(maybe_sent),
                published_count=record.published_count + len(published_ids),
            )
        )
        marked = 0
        for event_id in published_ids:
            row = self._rows.get(event_id)
            if row is None or not row.pending:
                continue
            self._put_row(event_id, None if delete_published else replace(row, published_at=now))
            marked += 1
        failed = parked = 0
        for failure in failures:
            row = self._rows.get(failure.id)
            if row is None or not row.pending:
                continue
            failing = 0.0 if row.first_failed_at is None else now - row.first_failed_at
            patience = failure.patience_seconds
            park = failure.delay_seconds is None or (
                patience is not None and row.first_failed_at is not None and failing >= patience
            )
            delay = max(failure.delay_seconds or 0.0, failing / 2 if patience is not None else 0.0)
            self._put_row(
                failure.id,
                replace(
                    row,
                    retry_count=failure.retry_count,
                    last_error=failure.error,
                    first_failed_at=now if row.first_failed_at is None else row.first_failed_at,
                    next_attempt_at=None if park else now + delay,
                    dead_lettered_at=now if park else None,
                ),
            )
            failed += 1
            parked += park
        return FinishResult(
            fenced_ok=True,
            marked=marked,
            failed=failed,
            finished_at=datetime.fromtimestamp(now, UTC),
            parked=parked,
        )

    # --- bookkeeping ----------------------------------------------------------------------------

    def roll_back(self) -> None:
        """Undo this transaction's writes (the store calls it when the block raises)."""
        for event_id, old_row in self._undo_rows.items():
            if old_row is None:
                self._rows.pop(event_id, None)
            else:
                self._rows[event_id] = old_row
        for key, old_lease in self._undo_leases.items():
            if old_lease is None:
                self._leases.pop(key, None)
            else:
                self._leases[key] = old_lease

    def _held(self, partition_count: int, partition: int, epoch: int) -> LeaseRecord | None:
        """The fence: the lease record if ``epoch`` is its epoch and it is live, else None."""
        record = self._leases.get((partition_count, partition))
        if record is None or record.epoch != epoch or not record.live(self._now):
            return None
        return record

    def _is_pending(self, event_id: uuid.UUID) -> bool:
        row = self._rows.get(event_id)
        return row is not None and row.pending

    def _put_row(self, event_id: uuid.UUID, row: OutboxRecord | None) -> None:
        self._check_open()
        self._undo_rows.setdefault(event_id, self._rows.get(event_id))
        if row is None:
            del self._rows[event_id]
        else:
            self._rows[event_id] = row

    def _put_lease(self, lease: LeaseRecord) -> None:
        self._check_open()
        key = (lease.partition_count, lease.partition)
        self._undo_leases.setdefault(key, self._leases.get(key))
        self._leases[key] = lease

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this in-memory transaction is over; open a new one")
