"""The relay store's value types: what its statements take and return (no SQL here).

Shared by ``store.relay`` (PostgreSQL), ``testing.InMemoryRelayStore``, the relay, metrics and
the dead-letter store.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

QUEUED_PREFIX = "queued:"
"""Owner prefix of a lease granted for a publish task that has yet to start (a take-over
replaces the owner); see ``store.leases.grant_lease``."""


@dataclass(frozen=True, slots=True)
class Lease:
    partition_count: int
    partition: int
    slot_lo: int
    slot_hi: int
    epoch: int
    owner: str
    redeliver_ids: frozenset[uuid.UUID]
    cursor_slot: int | None


@dataclass(frozen=True, slots=True)
class Row:
    """One pending outbox row, as the relay needs it."""

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
    retry_count: int
    # 1, 2, 3 ... per aggregate (the outbox_assign_sequence trigger), and the number published
    # before it: aggregate_sequence - 1 unless the numbers between were dropped on purpose
    # (outbox_aggregate_skip: a discarded or skipped dead letter).
    aggregate_sequence: int
    previous_aggregate_sequence: int


@dataclass(frozen=True, slots=True)
class Failure:
    """A failure to record. ``delay_seconds`` None means: give up (park).

    ``patience_seconds`` (backpressure): the store parks the row instead when its first failure
    is older than that, and waits at least half the time it has been failing (so re-sends thin
    out while a queue stays full).
    """

    id: uuid.UUID
    retry_count: int
    error: str
    delay_seconds: float | None
    patience_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class FinishResult:
    fenced_ok: bool
    marked: int
    failed: int
    finished_at: datetime | None
    parked: int = 0
    """Of ``failed``, the rows parked (dead-lettered) by this statement."""


@dataclass(frozen=True, slots=True)
class SelectedBatch:
    """What ``select_batch`` found: the locked rows, per aggregate the first pending seq that
    holds its later rows back, and whether the kept rows were recorded in flight."""

    rows: list[Row]
    gaps: dict[tuple[str, str], int]
    marked: bool
