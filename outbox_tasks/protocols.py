"""What the relay is given, as structural protocols: a ``RelayStore`` (rows and leases), a
``Publisher`` (the broker) and an ``Observer`` (metrics and hooks).

Production implementations: ``store.relay.PostgresRelayStore``, ``publisher.BrokerPublisher``,
``metrics.RelayMetrics``. In-memory ones for unit tests: ``outbox_tasks.testing``. Kept apart
from ``relay`` so that the dead-letter path and the fakes can name them without the algorithm.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from outbox_tasks.envelope import OutboundMessage
from outbox_tasks.store.records import Failure, FinishResult, Lease, Row, SelectedBatch


class BatchOutcome(Protocol):
    """What a publisher reports for one batch (see ``publisher.BatchResult``)."""

    @property
    def published(self) -> list[str]: ...
    @property
    def failed(self) -> dict[str, str]: ...
    @property
    def skipped(self) -> list[str]: ...
    @property
    def deferred(self) -> dict[str, str]: ...
    @property
    def maybe_sent(self) -> list[str]: ...


class Publisher(Protocol):
    """Publishes a batch in order; raises ``BrokerUnavailable`` for an outage. Anything else it
    raises is treated as refused for one (unknown) message of the batch: the relay sends the
    batch again one message at a time to find which."""

    def publish_batch(self, messages: Sequence[OutboundMessage]) -> BatchOutcome: ...


class RelayTransaction(Protocol):
    """One store transaction: the relay's statements (see ``store.relay`` for each one's
    meaning). Every write a lease holder makes is fenced: it changes nothing, and says so, when
    the lease's epoch is stale or the lease has expired."""

    def has_due_rows(self, slot_lo: int, slot_hi: int) -> bool: ...
    def lock_lease_table(self) -> None: ...
    def ensure_partition_row(
        self, partition_count: int, partition: int, slot_lo: int, slot_hi: int
    ) -> None: ...
    def lock_overlapping_leases(self, partition_count: int, slot_lo: int, slot_hi: int) -> None: ...
    def grant_lease(
        self,
        partition_count: int,
        partition: int,
        owner: str,
        lease_seconds: float,
        *,
        take_queued_after: float | None = None,
    ) -> Lease | None: ...
    def take_over_lease(
        self, *, partition_count: int, partition: int, epoch: int, owner: str, lease_seconds: float
    ) -> Lease | None: ...
    def release_lease(self, lease: Lease) -> bool: ...
    def queue_lease(self, lease: Lease, owner: str, lease_seconds: float) -> Lease | None: ...
    def held_partitions(self, partition_count: int) -> set[int]: ...
    def mark_inflight(
        self,
        lease: Lease,
        *,
        ids: Sequence[uuid.UUID],
        cursor_slot: int,
        lease_seconds: float,
    ) -> bool: ...
    def select_candidates(
        self, slot_lo: int, slot_hi: int, limit: int, *, skip: Collection[tuple[str, str]] = ()
    ) -> list[Row]: ...
    def pending_seqs(
        self, max_seq_by_aggregate: dict[tuple[str, str], int]
    ) -> dict[tuple[str, str], list[int]]: ...
    def select_batch(
        self,
        lease: Lease,
        start: int,
        limit: int,
        *,
        lease_seconds: float,
        skip: Collection[tuple[str, str]] = (),
    ) -> SelectedBatch: ...
    def finish_batch(
        self,
        lease: Lease,
        published_ids: Sequence[uuid.UUID],
        failures: Sequence[Failure],
        *,
        delete_published: bool,
        maybe_sent: Sequence[uuid.UUID] = (),
    ) -> FinishResult: ...


class RelayStore(Protocol):
    """Where the relay keeps rows and leases: ``store.relay.PostgresRelayStore`` in production,
    ``testing.InMemoryRelayStore`` in unit tests.

    ``transaction(what)`` commits when the block exits normally and rolls back when it raises;
    ``what`` names the step in errors (``DatabaseUnavailable`` from the PostgreSQL store).
    """

    def transaction(self, what: str = ...) -> AbstractContextManager[RelayTransaction]: ...
    def session(self) -> AbstractContextManager[None]:
        """The transactions of the block run on one connection (a serving task's many small
        ones); nothing changes for what they do."""
        ...


class Observer(Protocol):
    """Hooks the relay calls; metrics implement it. Exceptions from it are swallowed."""

    def batch_published(
        self,
        partition: int,
        rows: Sequence[Row],
        published: set[str],
        seconds: float,
        latencies: Sequence[float],
    ) -> None: ...
    def message_failed(self, error_type: str) -> None: ...
    def lease_lost(self, partition: int) -> None: ...
    def circuit_changed(self, is_open: bool) -> None: ...


class NullObserver:
    def batch_published(
        self,
        partition: int,
        rows: Sequence[Row],
        published: set[str],
        seconds: float,
        latencies: Sequence[float],
    ) -> None:
        pass

    def message_failed(self, error_type: str) -> None:
        pass

    def lease_lost(self, partition: int) -> None:
        pass

    def circuit_changed(self, is_open: bool) -> None:
        pass
