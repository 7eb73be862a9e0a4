"""The relay use case: claim a partition, publish its due rows in order, mark them. No Celery here.

One publish cycle (DESIGN 4.1, with the shape changes explained in docs/relay.md):

1. ``claim(partition)``: if the partition has due rows and no live lease, grant one (epoch + 1).
2. ``publish(partition, epoch)``: adopt that lease (fenced by epoch), then loop until the
   partition is drained or the task's time budget is spent:
   a. lock a batch (slot-major, seq order; blocked aggregates skipped), drop rows that would
      overtake an earlier pending row of their aggregate, record the batch as in flight and
      renew the lease, commit;
   b. publish through the broker publisher (one pipeline / one confirm wave per aggregate rank);
   c. mark published and record failures in one fenced statement.
3. Release the lease; report whether the partition still has work (the caller chains a claim).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy.engine import Connection, Engine

from outbox_tasks.db import translate_errors
from outbox_tasks.envelope import OutboundMessage, message_for_row
from outbox_tasks.errors import BrokerUnavailable
from outbox_tasks.logs import event, get_logger
from outbox_tasks.partitioning import slot_range
from outbox_tasks.retry import GiveUp, decide, system_jitter
from outbox_tasks.settings import Settings
from outbox_tasks.store import relay as store

log = get_logger("relay")

MAX_ERROR_LENGTH = 2000
# Extra selections per batch when blocked aggregates crowd out the rest (see _select_batch).
MAX_RESELECTS = 4


class BatchOutcome(Protocol):
    """What a publisher reports for one batch (see ``publisher.BatchResult``)."""

    @property
    def published(self) -> list[str]: ...
    @property
    def failed(self) -> dict[str, str]: ...
    @property
    def skipped(self) -> list[str]: ...


class Publisher(Protocol):
    def publish_batch(self, messages: Sequence[OutboundMessage]) -> BatchOutcome: ...


class Observer(Protocol):
    """Hooks the relay calls; metrics implement it. Exceptions from it are swallowed."""

    def batch_published(
        self,
        partition: int,
        rows: Sequence[store.Row],
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
        rows: Sequence[store.Row],
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


class _SafeObserver:
    """Wraps an observer so that a broken hook or metric can never break the relay."""

    def __init__(self, inner: Observer) -> None:
        self._inner = inner

    def call(self, name: str, *args: object) -> None:
        try:
            getattr(self._inner, name)(*args)
        except Exception:
            log.debug("observer %s failed", name, exc_info=True)


@dataclass
class Circuit:
    """Broker outage circuit, one per process. Open: claims and publishes pause.

    Opening and closing are logged once each, never per message.
    """

    base_seconds: float = 1.0
    max_seconds: float = 30.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    open_until: float = 0.0
    on_change: Callable[[bool], None] | None = None

    @property
    def is_open(self) -> bool:
        return self.failures > 0 and self.clock() < self.open_until

    def record_failure(self, error: BaseException) -> None:
        self.failures += 1
        delay = min(self.max_seconds, self.base_seconds * 2 ** min(self.failures - 1, 20))
        self.open_until = self.clock() + delay
        if self.failures == 1:
            event(
                log,
                logging.WARNING,
                "circuit_open",
                "broker unavailable; pausing publishing",
                error=str(error),
                retry_in_seconds=delay,
            )
            if self.on_change:
                self.on_change(True)

    def record_success(self) -> None:
        if self.failures:
            event(
                log,
                logging.INFO,
                "circuit_closed",
                "broker is back; publishing resumed",
                failed_attempts=self.failures,
            )
            self.failures = 0
            self.open_until = 0.0
            if self.on_change:
                self.on_change(False)


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


class Relay:
    """Claims and publishes for one process. Thread-compatible, not thread-safe."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        publisher: Publisher,
        *,
        owner: str,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = system_jitter,
        circuit: Circuit | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.publisher = publisher
        self.owner = owner
        self._observer = _SafeObserver(observer or NullObserver())
        self.clock = clock
        self.jitter = jitter
        self.circuit = circuit or Circuit(
            max_seconds=settings.circuit_max_seconds,
            clock=clock,
        )
        if self.circuit.on_change is None:
            self.circuit.on_change = lambda is_open: self._observer.call("circuit_changed", is_open)

    # --- claim ------------------------------------------------------------------------------

    def claim(self, partition: int, partition_count: int | None = None) -> store.Lease | None:
        """Grant a lease on ``partition`` if it has due rows and nobody holds it. Idempotent:
        a duplicate claim while the lease is live changes nothing."""
        if self.circuit.is_open:
            return None
        n = partition_count or self.settings.partitions
        lo, hi = slot_range(partition, n)
        with translate_errors("claim"), self.engine.begin() as conn:
            if not store.has_due_rows(conn, lo, hi):
                return None
            store.lock_lease_table(conn)
            store.ensure_partition_row(conn, n, partition, lo, hi)
            store.lock_overlapping_leases(conn, n, lo, hi)
            lease = store.grant_lease(conn, n, partition, self.owner, self.settings.lease_seconds)
        if lease is not None:
            event(
                log,
                logging.DEBUG,
                "lease_granted",
                "partition leased",
                partition=partition,
                partitions=n,
                epoch=lease.epoch,
            )
        return lease

    # --- publish ----------------------------------------------------------------------------

    def publish(
        self, partition: int, epoch: int, partition_count: int | None = None
    ) -> PublishReport:
        """Drain one leased partition for up to ``publish_task_seconds``."""
        n = partition_count or self.settings.partitions
        report = PublishReport(partition=partition, epoch=epoch)
        with translate_errors("publish"), self.engine.begin() as conn:
            lease = store.take_over_lease(
                conn,
                partition_count=n,
                partition=partition,
                epoch=epoch,
                owner=self.owner,
                lease_seconds=self.settings.lease_seconds,
            )
            if lease is not None and self.circuit.is_open:
                # Hand the partition straight back: holding it would only delay another
                # process that may already see the broker again.
                store.release_lease(conn, lease)
                report.circuit_open = True
                report.more = True
                return report
        if lease is None:
            # Expired in the queue or already superseded: a newer claim owns the partition.
            event(
                log,
                logging.INFO,
                "lease_stale",
                "publish task found its lease gone",
                partition=partition,
                epoch=epoch,
            )
            return report
        deadline = self.clock() + self.settings.publish_task_seconds
        cursor = lease.cursor_slot
        try:
            while True:
                outcome = self._one_batch(lease, cursor, report)
                if outcome is None:
                    break
                cursor, full = outcome
                if not full:
                    break
                if self.clock() >= deadline:
                    report.more = True
                    break
        except BrokerUnavailable as error:
            self.circuit.record_failure(error)
            report.circuit_open = True
            report.more = True
        if not report.lease_lost:
            with translate_errors("release"), self.engine.begin() as conn:
                if not store.release_lease(conn, lease):
                    # Taken over while we were between batches (a stall past the lease).
                    self._lost(lease, report)
                    return report
                # A row committed after our last select had its wake-up claim refused while we
                # held the lease: say so, and the caller claims again at once. Only after a
                # productive run, so rows that cannot move yet never cause a claim loop.
                if (
                    report.batches
                    and not report.more
                    and not report.circuit_open
                    and store.has_due_rows(conn, lease.slot_lo, lease.slot_hi)
                ):
                    report.more = True
        return report

    def _one_batch(
        self, lease: store.Lease, cursor: int | None, report: PublishReport
    ) -> tuple[int, bool] | None:
        """One batch. Returns (next cursor, batch was full), or None when there is nothing to do
        or the lease was lost."""
        limit = self.settings.batch_size
        lo, hi = lease.slot_lo, lease.slot_hi
        start = cursor if cursor is not None and lo <= cursor < hi else lo
        with translate_errors("select batch"), self.engine.begin() as conn:
            rows, batch = self._select_batch(conn, start, lo, hi, limit)
            if not rows:
                return None
            full = len(rows) >= limit
            next_cursor = rows[-1].slot + 1 if full else lo
            if next_cursor >= hi:
                next_cursor = lo
            if not batch:
                # Every candidate waits behind an earlier row it cannot take yet.
                return None
            if not store.mark_inflight(
                conn,
                lease,
                ids=[r.id for r in batch],
                cursor_slot=next_cursor,
                lease_seconds=self.settings.lease_seconds,
            ):
                self._lost(lease, report)
                return None
        event(
            log,
            logging.DEBUG,
            "claim_batch",
            "batch selected",
            partition=lease.partition,
            epoch=lease.epoch,
            rows=len(batch),
        )
        started = self.clock()
        messages = [self._message(lease, row) for row in batch]
        result = self.publisher.publish_batch(messages)
        self.circuit.record_success()
        failures = self._failures(batch, result.failed)
        published = set(result.published)
        ok_rows = [row for row, m in zip(batch, messages, strict=True) if m.event_id in published]
        ok_ids = [row.id for row in ok_rows]
        with translate_errors("finish batch"), self.engine.begin() as conn:
            finish = store.finish_batch(
                conn,
                lease,
                ok_ids,
                failures,
                delete_published=self.settings.cleanup_mode == "delete",
            )
        if not finish.fenced_ok:
            self._lost(lease, report)
            return None
        report.batches += 1
        report.published += finish.marked
        report.failed += finish.failed
        latencies: list[float] = []
        if finish.finished_at is not None:
            at = finish.finished_at
            latencies = [(at - row.created_at).total_seconds() for row in ok_rows]
        self._observer.call(
            "batch_published",
            lease.partition,
            batch,
            published,
            self.clock() - started,
            latencies,
        )
        if failures:
            event(
                log,
                logging.WARNING,
                "publish_failed",
                "messages failed; they will be retried",
                partition=lease.partition,
                failed=len(failures),
                parked=sum(1 for f in failures if f.delay_seconds is None),
                first_error=failures[0].error[:200],
            )
        event(
            log,
            logging.DEBUG,
            "publish_ok",
            "batch published",
            partition=lease.partition,
            epoch=lease.epoch,
            published=finish.marked,
            skipped=len(result.skipped),
        )
        return next_cursor, full

    def _select_batch(
        self, conn: Connection, start: int, lo: int, hi: int, limit: int
    ) -> tuple[list[store.Row], list[store.Row]]:
        """Lock candidates and keep the unbroken per-aggregate prefixes (the batch).

        Rows dropped because an earlier row of their aggregate is out of reach (locked by another
        transaction: a stalled former holder, a replay) must not take the batch's room: select
        again without those aggregates, so a few blocked aggregates cannot starve the partition
        (DESIGN 4.3). Returns the first selection (it sets the cursor) and the batch.
        """
        skip: set[tuple[str, str]] = set()
        first: list[store.Row] | None = None
        selected: list[store.Row] = []
        batch: list[store.Row] = []
        for _ in range(MAX_RESELECTS):
            want = limit - len(batch)
            rows = store.select_candidates(conn, start, hi, want, skip=skip)
            if len(rows) < want and start > lo:
                rows += store.select_candidates(conn, lo, start, want - len(rows), skip=skip)
            if first is None:
                first = rows
            selected += rows
            batch = self._unbroken_prefixes(conn, selected)
            if len(rows) < want or len(batch) >= limit:
                break
            kept = {row.seq for row in batch}
            skip |= {
                (row.aggregate_type, row.aggregate_id) for row in selected if row.seq not in kept
            }
        return first or [], batch

    def _unbroken_prefixes(self, conn: Connection, rows: list[store.Row]) -> list[store.Row]:
        """Keep, per aggregate, only rows with no earlier pending row outside the batch."""
        max_seq: dict[tuple[str, str], int] = {}
        for row in rows:
            key = (row.aggregate_type, row.aggregate_id)
            if row.seq > max_seq.get(key, -1):
                max_seq[key] = row.seq
        pending = store.pending_seqs(conn, max_seq)
        in_batch = {row.seq for row in rows}
        first_gap: dict[tuple[str, str], int] = {}
        for key, seqs in pending.items():
            for seq in seqs:
                if seq not in in_batch:
                    first_gap[key] = seq
                    break
        kept = [
            row
            for row in rows
            if row.seq < first_gap.get((row.aggregate_type, row.aggregate_id), row.seq + 1)
        ]
        kept.sort(key=lambda r: r.seq)
        return kept

    def _message(self, lease: store.Lease, row: store.Row) -> OutboundMessage:
        return message_for_row(
            row,
            partition=lease.partition,
            epoch=lease.epoch,
            redelivered=row.id in lease.redeliver_ids,
        )

    def _failures(self, batch: Sequence[store.Row], failed: dict[str, str]) -> list[store.Failure]:
        result = []
        for row in batch:
            error = failed.get(str(row.id))
            if error is None:
                continue
            decision = decide(
                row.retry_count,
                max_retries=self.settings.max_retries,
                base_seconds=self.settings.backoff_base_seconds,
                max_seconds=self.settings.backoff_max_seconds,
                jitter=self.jitter(),
            )
            self._observer.call("message_failed", "message_rejected")
            result.append(
                store.Failure(
                    id=row.id,
                    retry_count=decision.retry_count,
                    error=error[:MAX_ERROR_LENGTH],
                    delay_seconds=None if isinstance(decision, GiveUp) else decision.delay_seconds,
                )
            )
        return result

    def _lost(self, lease: store.Lease, report: PublishReport) -> None:
        report.lease_lost = True
        self._observer.call("lease_lost", lease.partition)
        event(
            log,
            logging.WARNING,
            "lease_lost",
            "lease expired or taken over; this worker stops writing to the partition",
            partition=lease.partition,
            epoch=lease.epoch,
        )
