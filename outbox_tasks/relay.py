"""The relay use case: claim a partition, publish its due rows in order, mark them. No Celery here.

One publish cycle (DESIGN 4.1, with the shape changes explained in docs/relay.md):

1. ``claim(partition)``: if the partition has due rows and no live lease, grant one (epoch + 1).
2. ``publish(partition, epoch)``: adopt that lease (fenced by epoch), then loop until the
   partition is drained or the task's time budget is spent:
   a. lock a batch (slot-major, seq order; blocked aggregates skipped), drop rows that would
      overtake an earlier pending row of their aggregate, record the batch as in flight and
      renew the lease, commit;
   b. check and publish through the broker publisher (one pipeline / one confirm wave per
      aggregate rank), each message's fate classified by ``sending``;
   c. mark published and record failures in one fenced statement.
3. Release the lease; report whether the partition still has work (the caller chains a claim).

The relay holds no SQL: it is given a ``RelayStore`` (PostgreSQL in production,
``outbox_tasks.testing.InMemoryRelayStore`` in unit tests), a ``Publisher``, and the ``clock`` and
``jitter`` it uses.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from outbox_tasks.circuit import Circuit
from outbox_tasks.envelope import OutboundMessage, message_for_row
from outbox_tasks.errors import BrokerUnavailable
from outbox_tasks.holding import Holding, PublishReport
from outbox_tasks.logs import event, get_logger
from outbox_tasks.partitioning import slot_range
from outbox_tasks.protocols import NullObserver, Observer, Publisher, RelayStore, RelayTransaction
from outbox_tasks.retry import system_jitter
from outbox_tasks.sending import failures as record_failures
from outbox_tasks.sending import send_batch
from outbox_tasks.settings import Settings
from outbox_tasks.store.records import QUEUED_PREFIX, Lease, Row

__all__ = ["Holding", "PublishReport", "Relay", "claim_partition", "hand_back"]

log = get_logger("relay")

# Extra selections per batch when blocked aggregates crowd out the rest (see _select_batch).
MAX_RESELECTS = 4


class _SafeObserver:
    """Wraps an observer so that a broken hook or metric can never break the relay."""

    def __init__(self, inner: Observer) -> None:
        self._inner = inner

    def call(self, name: str, *args: object) -> None:
        try:
            getattr(self._inner, name)(*args)
        except Exception:
            log.debug("observer %s failed", name, exc_info=True)


def claim_partition(
    store: RelayStore,
    settings: Settings,
    *,
    owner: str,
    partition: int,
    partition_count: int | None = None,
    queued: bool = False,
    take_queued_after: float | None = None,
) -> Lease | None:
    """Grant ``owner`` a lease on ``partition`` (of ``partition_count``, default
    ``settings.partitions``) if it has due rows and nobody holds it; None otherwise. Idempotent:
    a duplicate claim while the lease is live changes nothing. Needs no publisher, so the wake-up
    listener claims with it too. Raises what the store raises (``DatabaseUnavailable``).

    ``queued``: the lease is for a publish task about to be queued (its owner gets
    ``QUEUED_PREFIX`` until the task takes it over). ``take_queued_after``: also take such a
    lease whose task has not started within that many seconds (a serving process, which would
    otherwise wait for a task stuck behind busy pool processes)."""
    n = partition_count or settings.partitions
    lo, hi = slot_range(partition, n)
    with store.transaction("claim") as tx:
        if not tx.has_due_rows(lo, hi):
            return None
        tx.lock_lease_table()
        tx.ensure_partition_row(n, partition, lo, hi)
        tx.lock_overlapping_leases(n, lo, hi)
        lease = tx.grant_lease(
            n,
            partition,
            QUEUED_PREFIX + owner if queued else owner,
            settings.lease_seconds,
            take_queued_after=take_queued_after,
        )
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


def hand_back(store: RelayStore, lease: Lease) -> bool:
    """Release a lease nobody will use at once (fenced by its epoch): its publish task could
    not be enqueued, so the partition is free for the next claim instead of waiting
    ``lease_seconds`` for it to expire. False when it was no longer this lease. Raises what the
    store raises (``DatabaseUnavailable``: then the lease expires as usual)."""
    with store.transaction("hand back") as tx:
        released = tx.release_lease(lease)
    event(
        log,
        logging.INFO,
        "lease_handed_back",
        "lease handed back unused",
        partition=lease.partition,
        epoch=lease.epoch,
        released=released,
    )
    return released


def _kept(rows: list[Row], gaps: dict[tuple[str, str], int]) -> list[Row]:
    """The rows of each aggregate before its first gap, in seq order."""
    kept = [
        row
        for row in rows
        if row.seq < gaps.get((row.aggregate_type, row.aggregate_id), row.seq + 1)
    ]
    kept.sort(key=lambda r: r.seq)
    return kept


class Relay:
    """Claims and publishes for one process. Thread-compatible, not thread-safe."""

    def __init__(
        self,
        settings: Settings,
        store: RelayStore,
        publisher: Publisher,
        *,
        owner: str,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = system_jitter,
        circuit: Circuit | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self.publisher = publisher
        self.owner = owner
        self._observer = _SafeObserver(observer or NullObserver())
        self.clock = clock
        self.jitter = jitter
        self.circuit = circuit or Circuit(clock=clock, max_seconds=settings.circuit_max_seconds)
        if self.circuit.on_change is None:
            self.circuit.on_change = lambda is_open: self._observer.call("circuit_changed", is_open)

    @property
    def store(self) -> RelayStore:
        return self._store

    # --- claim ------------------------------------------------------------------------------

    def claim(
        self,
        partition: int,
        partition_count: int | None = None,
        *,
        queued: bool = False,
        take_queued_after: float | None = None,
    ) -> Lease | None:
        """Grant a lease on ``partition`` if it has due rows and nobody holds it (see
        :func:`claim_partition`); None while the broker circuit is open."""
        if self.circuit.is_open:
            return None
        return claim_partition(
            self._store,
            self.settings,
            owner=self.owner,
            partition=partition,
            partition_count=partition_count,
            queued=queued,
            take_queued_after=take_queued_after,
        )

    def held_partitions(self, partition_count: int | None = None) -> set[int]:
        """Partitions whose lease is live and taken over: a claim of them would be refused."""
        with self._store.transaction("held partitions") as tx:
            return tx.held_partitions(partition_count or self.settings.partitions)

    def hand_back(self, lease: Lease) -> bool:
        """Release an unused lease at once (see :func:`hand_back`)."""
        return hand_back(self._store, lease)

    # --- publish ----------------------------------------------------------------------------

    def publish(
        self, partition: int, epoch: int, partition_count: int | None = None
    ) -> PublishReport:
        """Drain one leased partition for up to ``publish_task_seconds``, then release it."""
        with self._store.session():
            holding = self.adopt(partition, epoch, partition_count)
            if holding.lease is not None:
                self.drain(holding, until=self.clock() + self.settings.publish_task_seconds)
                self.release(holding)
        return holding.report

    def adopt(self, partition: int, epoch: int, partition_count: int | None = None) -> Holding:
        """Take over the lease a claim granted (fenced by ``epoch``) and renew it. The holding's
        lease is None when it is gone (expired in the queue, superseded) or was handed straight
        back because the broker circuit is open (``report.circuit_open``)."""
        n = partition_count or self.settings.partitions
        report = PublishReport(partition=partition, epoch=epoch)
        with self._store.transaction("publish") as tx:
            lease = tx.take_over_lease(
                partition_count=n,
                partition=partition,
                epoch=epoch,
                owner=self.owner,
                lease_seconds=self.settings.lease_seconds,
            )
            if lease is not None and self.circuit.is_open:
                # Hand the partition straight back: holding it would only delay another
                # process that may already see the broker again.
                tx.release_lease(lease)
                report.circuit_open = True
                report.more = True
                return Holding(None, report)
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
        return Holding(lease, report)

    def hold(self, lease: Lease) -> Holding:
        """A lease this relay was just granted (:meth:`claim`), ready to :meth:`drain`."""
        return Holding(lease, PublishReport(partition=lease.partition, epoch=lease.epoch))

    def drain(self, holding: Holding, *, until: float) -> int:
        """Publish the held partition's due rows, batch after batch, until a batch is not full
        or the clock passes ``until`` (then ``report.more``). Returns the rows published. After
        a lost lease (``report.lease_lost``) or a broker outage (``report.circuit_open``, the
        circuit recorded) the holding must not drain again."""
        lease, report = holding.lease, holding.report
        if lease is None or report.lease_lost or report.circuit_open:
            return 0
        before = report.published
        try:
            while True:
                outcome = self._one_batch(lease, holding.cursor, report, holding.redeliver)
                if outcome is None:
                    break
                holding.cursor, full = outcome
                if not full:
                    break
                if self.clock() >= until:
                    report.more = True
                    break
        except BrokerUnavailable as error:
            self.circuit.record_failure(error)
            report.circuit_open = True
            report.more = True
        return report.published - before

    def release(self, holding: Holding) -> PublishReport:
        """Hand the held partition back (unless the lease was lost); ``report.more`` says
        whether it still has work the caller should claim at once."""
        lease, report = holding.lease, holding.report
        if lease is None or report.lease_lost:
            return report
        holding.lease = None
        with self._store.transaction("release") as tx:
            if not tx.release_lease(lease):
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
                and tx.has_due_rows(lease.slot_lo, lease.slot_hi)
            ):
                report.more = True
        return report

    def pass_on(self, holding: Holding) -> Lease | None:
        """Keep the held partition leased for a publish task the caller queues next (a serving
        task's continuation: the partition is never free in between, and no claim is needed).
        The lease gets a new epoch (the continuation's; any older copy of a task is stale) and
        is marked queued, so a serving task with room may take it at once and a claim once the
        task is late. None when the lease was lost meanwhile."""
        lease, report = holding.lease, holding.report
        if lease is None or report.lease_lost:
            return None
        holding.lease = None
        with self._store.transaction("pass on") as tx:
            kept = tx.queue_lease(lease, QUEUED_PREFIX + self.owner, self.settings.lease_seconds)
        if kept is None:
            self._lost(lease, report)
        return kept

    def _one_batch(
        self,
        lease: Lease,
        cursor: int | None,
        report: PublishReport,
        redeliver: set[uuid.UUID],
    ) -> tuple[int, bool] | None:
        """One batch. Returns (next cursor, batch was full), or None when there is nothing to do
        or the lease was lost."""
        limit = self.settings.batch_size
        lo, hi = lease.slot_lo, lease.slot_hi
        start = cursor if cursor is not None and lo <= cursor < hi else lo
        with self._store.transaction("select batch") as tx:
            rows, batch, marked = self._select_batch(tx, lease, start, limit)
            if not rows:
                return None
            full = len(rows) >= limit
            next_cursor = rows[-1].slot + 1 if full else lo
            if next_cursor >= hi:
                next_cursor = lo
            if not batch:
                # Every candidate waits behind an earlier row it cannot take yet.
                return None
            if marked is None:
                marked = tx.mark_inflight(
                    lease,
                    ids=[r.id for r in batch],
                    cursor_slot=next_cursor,
                    lease_seconds=self.settings.lease_seconds,
                )
            if not marked:
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

        def build(row: Row, resend: bool) -> OutboundMessage:
            return message_for_row(
                row,
                partition=lease.partition,
                epoch=lease.epoch,
                redelivered=resend or row.id in redeliver,
            )

        sent = send_batch(
            self.publisher, batch, build, max_message_bytes=self.settings.max_message_bytes
        )
        self.circuit.record_success()
        failures = record_failures(batch, sent, self.settings, self.jitter)
        for failure in failures:
            self._observer.call("message_failed", sent.refused[str(failure.id)].error_type)
        published = set(sent.published)
        keys = [str(row.id) for row in batch]  # once per row: uuid's str is not cheap
        ok_rows = [row for row, key in zip(batch, keys, strict=True) if key in published]
        ok_ids = [row.id for row in ok_rows]
        maybe_sent = [
            row.id for row, key in zip(batch, keys, strict=True) if key in sent.maybe_sent
        ]
        with self._store.transaction("finish batch") as tx:
            finish = tx.finish_batch(
                lease,
                ok_ids,
                failures,
                delete_published=self.settings.cleanup_mode == "delete",
                maybe_sent=maybe_sent,
            )
        if not finish.fenced_ok:
            self._lost(lease, report)
            return None
        redeliver.update(maybe_sent)
        report.batches += 1
        report.published += finish.marked
        report.failed += finish.failed
        if ok_rows:
            newest = max(row.created_at for row in ok_rows)
            if report.newest_row_at is None or newest > report.newest_row_at:
                report.newest_row_at = newest
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
                "messages failed; they are retried or, when parked, dead-lettered",
                partition=lease.partition,
                failed=len(failures),
                parked=finish.parked,
                error_types=sorted({sent.refused[str(f.id)].error_type for f in failures}),
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
            skipped=len(sent.skipped),
        )
        return next_cursor, full

    def _select_batch(
        self, tx: RelayTransaction, lease: Lease, start: int, limit: int
    ) -> tuple[list[Row], list[Row], bool | None]:
        """Lock candidates and keep the unbroken per-aggregate prefixes (the batch).

        Usually one statement (``select_batch``) that also records the batch in flight. Rows
        dropped because an earlier row of their aggregate is out of reach (locked by another
        transaction: a stalled former holder, a replay) must not take the batch's room: select
        again without those aggregates, so a few blocked aggregates cannot starve the partition
        (DESIGN 4.3); so does a scan that wraps around to the partition's start. Returns the
        first selection (it sets the cursor), the batch, and whether it is recorded in flight
        (None: not yet, the caller records it).
        """
        lo, hi = lease.slot_lo, lease.slot_hi
        got = tx.select_batch(lease, start, limit, lease_seconds=self.settings.lease_seconds)
        rows = got.rows
        marked: bool | None = got.marked
        if len(rows) < limit and start > lo:  # wrap around to the partition's start
            rows = rows + tx.select_candidates(lo, start, limit - len(rows))
            marked = None
        first, selected = rows, list(rows)
        batch = self._unbroken_prefixes(tx, selected) if marked is None else _kept(rows, got.gaps)
        if len(rows) < limit or len(batch) >= limit:
            return first, batch, marked
        skip: set[tuple[str, str]] = set()
        for _ in range(MAX_RESELECTS - 1):
            kept = {row.seq for row in batch}
            skip |= {
                (row.aggregate_type, row.aggregate_id) for row in selected if row.seq not in kept
            }
            want = limit - len(batch)
            rows = tx.select_candidates(start, hi, want, skip=skip)
            if len(rows) < want and start > lo:
                rows += tx.select_candidates(lo, start, want - len(rows), skip=skip)
            selected += rows
            batch = self._unbroken_prefixes(tx, selected)
            if len(rows) < want or len(batch) >= limit:
                break
        return first, batch, None

    def _unbroken_prefixes(self, tx: RelayTransaction, rows: list[Row]) -> list[Row]:
        """Keep, per aggregate, only rows with no earlier pending row outside the batch."""
        max_seq: dict[tuple[str, str], int] = {}
        for row in rows:
            key = (row.aggregate_type, row.aggregate_id)
            if row.seq > max_seq.get(key, -1):
                max_seq[key] = row.seq
        pending = tx.pending_seqs(max_seq)
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

    def _lost(self, lease: Lease, report: PublishReport) -> None:
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
