"""The rows and leases of the in-memory store (``testing.InMemoryRelayStore``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from outbox_tasks.store.records import Lease, Row


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One outbox row of the in-memory store. Times are ``clock`` readings (seconds) or None."""

    id: uuid.UUID
    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload_json: str
    headers: dict[str, Any]
    schema_version: int
    seq: int
    slot: int
    created_at: datetime
    aggregate_sequence: int
    retry_count: int = 0
    last_error: str | None = None
    first_failed_at: float | None = None
    next_attempt_at: float | None = None
    dead_lettered_at: float | None = None
    published_at: float | None = None

    @property
    def pending(self) -> bool:
        return self.published_at is None

    @property
    def parked(self) -> bool:
        """Dead-lettered and unpublished: its aggregate's later rows wait behind it."""
        return self.pending and self.dead_lettered_at is not None

    def due(self, now: float) -> bool:
        return (
            self.pending
            and self.dead_lettered_at is None
            and (self.next_attempt_at is None or self.next_attempt_at <= now)
        )

    def blocks(self, now: float) -> bool:
        """In backoff or parked: later rows of its aggregate must wait."""
        return self.pending and (
            self.dead_lettered_at is not None
            or (self.next_attempt_at is not None and self.next_attempt_at > now)
        )

    def as_row(self) -> Row:
        return Row(
            id=self.id,
            aggregate_type=self.aggregate_type,
            aggregate_id=self.aggregate_id,
            event_type=self.event_type,
            payload_json=self.payload_json,
            headers=self.headers,
            schema_version=self.schema_version,
            seq=self.seq,
            slot=self.slot,
            created_at=self.created_at,
            retry_count=self.retry_count,
            aggregate_sequence=self.aggregate_sequence,
            # Nothing removes a pending row here (no discard), so no number is ever skipped.
            previous_aggregate_sequence=self.aggregate_sequence - 1,
        )


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """One partition's lease (of one partition count). ``leased_until`` is a clock reading."""

    partition_count: int
    partition: int
    slot_lo: int
    slot_hi: int
    epoch: int = 0
    owner: str | None = None
    leased_until: float | None = None
    granted_at: float | None = None
    inflight_ids: frozenset[uuid.UUID] = frozenset()
    redeliver_ids: frozenset[uuid.UUID] = frozenset()
    cursor_slot: int | None = None
    published_count: int = 0

    def live(self, now: float) -> bool:
        return self.leased_until is not None and self.leased_until > now

    def overlaps(self, other: LeaseRecord) -> bool:
        return self.slot_lo < other.slot_hi and self.slot_hi > other.slot_lo

    def as_lease(self) -> Lease:
        return Lease(
            partition_count=self.partition_count,
            partition=self.partition,
            slot_lo=self.slot_lo,
            slot_hi=self.slot_hi,
            epoch=self.epoch,
            owner=self.owner or "",
            redeliver_ids=self.redeliver_ids,
            cursor_slot=self.cursor_slot,
        )
