"""What a publish task holds and what it did: a :class:`Holding` (a lease, its cursor, the rows
to flag as redelivered) and its :class:`PublishReport` (also the task's result). Used by
``relay`` and ``serving``; ``relay`` re-exports both."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from outbox_tasks.store.records import Lease


@dataclass
class PublishReport:
    """What one publish task did; also what Flower shows as the task result."""

    partition: int
    epoch: int
    batches: int = 0
    published: int = 0
    failed: int = 0
    more: bool = False
    lease_lost: bool = False
    circuit_open: bool = False
    errors: list[str] = field(default_factory=list)
    newest_row_at: datetime | None = None
    """When the newest row published was committed (the database's clock)."""

    def as_dict(self) -> dict[str, object]:
        return {
            "partition": self.partition,
            "epoch": self.epoch,
            "batches": self.batches,
            "published": self.published,
            "failed": self.failed,
            "more": self.more,
            "lease_lost": self.lease_lost,
            "circuit_open": self.circuit_open,
        }


@dataclass
class Holding:
    """A lease this process holds, what was done under it, and where its next scan starts."""

    lease: Lease | None
    report: PublishReport
    cursor: int | None = None
    redeliver: set[uuid.UUID] = field(default_factory=set)
    """Rows that may have reached the broker before: flagged ``outbox-redelivered`` when sent."""

    def __post_init__(self) -> None:
        if self.lease is not None:
            if self.cursor is None:
                self.cursor = self.lease.cursor_slot
            self.redeliver |= self.lease.redeliver_ids
