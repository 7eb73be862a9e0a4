"""A publish task that keeps its leases while their partitions stay busy (issue 12).

Without it every burst of events costs a claim, a Celery message and a publish task that takes
the lease over, selects, publishes, finishes and releases (four to six transactions and two
hops for one event). Serving, the task that drained its partition stays: it listens for the
outbox trigger's NOTIFY itself and publishes new rows of the partitions it holds at once, with
no claim, no take-over and no Celery message. A notification for a partition nobody holds is
claimed in place, up to the process's fair share of the partitions, so one process serves
several partitions together.

What stays as it was: a partition is handed back when it has been idle for one poll interval
(another process may take it). At the end of the task's time budget (``publish_task_seconds``)
the partitions still busy are passed on to a continuation task the caller queues (their leases
kept, marked queued: a serving task with room takes them at once, a claim once the task is
late), up to ``CARRY_ROUNDS`` budgets in a row; then, and on errors, every lease is handed back
(fairness, warm shutdown) and a partition that still has work is claimed again at once by the
caller. Handing back at every budget end cost a 60-150 ms p99 tail at 200 events/s. Every
guarantee is the relay's: the leases, their fencing and the in-flight records are the same;
serving only decides when to select again. With the wake-up path off, or when the listening
connection fails, a task publishes once and returns, as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from outbox_tasks.logs import event, get_logger
from outbox_tasks.relay import Holding, PublishReport, Relay
from outbox_tasks.store.records import Lease
from outbox_tasks.wakeup import partitions_for

log = get_logger("serving")

# A claim that found a partition served by someone else is not tried again on every
# notification for it, only after this long (one round trip saved per notification).
CLAIM_RETRY_SECONDS = 0.5
# A serving task with room takes a lease granted for a publish task still in the queue at once
# (that task, when it runs, finds its epoch stale and does nothing). Waiting for the task to
# start costs the partition's events that wait when every pool process is serving: the queued
# task runs only when one of them ends its budget (bench latency measured 0.5-0.7 s p99 tails
# with a 0.5 s grace here).
TAKE_QUEUED_AFTER_SECONDS = 0.0
# Any claim (beat tick, wake-up listener) takes a lease queued for a publish task that has not
# started within this long (every pool process busy, or the worker shutting down with the task
# still in the queue): the partition waits seconds, not OUTBOX_LEASE_SECONDS.
QUEUED_LATE_SECONDS = 2.0
# A serving task passes its busy partitions on to its own continuation at the end of its
# budget (no hand-back, no claim, the partition never free in between), at most this many
# budgets in a row (30 s by default); then it hands everything back as before, so other
# processes and hosts get their share, and a worker of another partition count (a rolling
# repartitioning) can be granted the range while the old workers still run.
CARRY_ROUNDS = 6


class Waiter(Protocol):
    """What serving needs of ``wakeup.NotificationWaiter``: see its methods."""

    def listen(self) -> bool: ...
    def wait(self, timeout: float) -> list[str] | None: ...
    def unlisten(self) -> None: ...


@dataclass
class ServeReport:
    """What one serving task did: one report per lease it held (a partition handed back and
    claimed again has two); ``more`` lists the partitions handed back with work left (the
    caller claims them again at once); ``carried`` the leases passed on (the caller queues a
    continuation publish task for them, or hands them back)."""

    reports: list[PublishReport] = field(default_factory=list)
    more: list[int] = field(default_factory=list)
    carried: list[Lease] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "partitions": sorted({r.partition for r in self.reports}),
            "leases": len(self.reports),
            "batches": sum(r.batches for r in self.reports),
            "published": sum(r.published for r in self.reports),
            "failed": sum(r.failed for r in self.reports),
            "more": self.more,
            "carried": [lease.partition for lease in self.carried],
            "lease_lost": any(r.lease_lost for r in self.reports),
            "circuit_open": any(r.circuit_open for r in self.reports),
        }


def serve(
    relay: Relay,
    waiter: Waiter | None,
    partition: int | None = None,
    epoch: int | None = None,
    partition_count: int | None = None,
    *,
    granted: Sequence[Lease] = (),
    also: Sequence[tuple[int, int]] = (),
    share: int | None = None,
    carry: bool = False,
    continuing: bool = False,
    stopping: Callable[[], bool] = lambda: False,
    wall: Callable[[], float] = time.time,
) -> ServeReport:
    """Adopt the lease on ``partition`` (granted with ``epoch`` for this publish task), take the
    ``granted`` leases (this relay's own claims), publish their due rows, and keep serving
    them, and up to ``share`` partitions in all (default: every one), while they stay busy: a
    partition is busy while notifications for it keep coming, at most one poll interval apart.
    A partition counts as busy from the start if the newest row it published was committed
    within the last poll interval (``wall`` is the time now, in seconds since the epoch): a
    backlog loaded long ago is drained and handed back at once. ``also``: more (partition,
    epoch) leases to adopt (a continuation's). ``carry``: at the end of the budget, pass the
    busy partitions on (``ServeReport.carried``) instead of handing them back. ``continuing``:
    this task is a continuation; its adopted partitions count as busy from the start.
    ``stopping``:
    True once the worker shuts down; then the task hands everything back at its next wake-up
    (within a poll interval) and passes nothing on. Raises what the
    relay raises (``DatabaseUnavailable``: unmarked rows stay pending, the leases expire)."""
    n = partition_count or relay.settings.partitions
    server = _Server(
        relay, waiter, n, max(1, min(share or n, n)), wall, carry, continuing, stopping
    )
    adopt = [(partition, epoch)] if partition is not None and epoch is not None else []
    adopt += [(p, e) for p, e in also]
    # One connection for the task's many small transactions.
    with relay.store.session():
        server.run(adopt, granted)
    return server.result


@dataclass
class _Server:
    relay: Relay
    waiter: Waiter | None
    partition_count: int
    limit: int
    wall: Callable[[], float]
    carry: bool
    continuing: bool
    stopping: Callable[[], bool]
    result: ServeReport = field(default_factory=ServeReport)
    held: dict[int, Holding] = field(default_factory=dict)
    notified: dict[int, float] = field(default_factory=dict)
    """Partition -> when a notification for it last came."""
    refused: dict[int, float] = field(default_factory=dict)
    """Partition -> when a claim of it last found it taken (tried again after the grace)."""

    def run(self, adopt: list[tuple[int, int]], granted: Sequence[Lease]) -> None:
        relay, waiter, n = self.relay, self.waiter, self.partition_count
        now, idle = relay.clock, relay.settings.poll_interval_seconds
        listening = waiter is not None and waiter.listen()
        budget_end = now() + relay.settings.publish_task_seconds
        spent = False  # the budget ran out with the loop healthy: busy partitions carry on
        try:
            holdings = [relay.adopt(p, e, n) for p, e in adopt]
            adopted = len(holdings)
            holdings += [relay.hold(lease) for lease in granted]
            for i, holding in enumerate(holdings):
                self.result.reports.append(holding.report)
                if holding.lease is None:
                    continue
                self.held[holding.lease.partition] = holding
                if self.continuing and i < adopted:
                    # Busy when passed on: its next rows may not have come during the hop.
                    self.notified[holding.lease.partition] = now()
                relay.drain(holding, until=budget_end)
                newest = holding.report.newest_row_at
                if newest is not None and self.wall() - newest.timestamp() < idle:
                    # A stream, not a backlog: wait for its next rows.
                    self.notified[holding.lease.partition] = now()
            while (
                listening
                and waiter is not None
                and self.held
                and now() < budget_end
                and not self.stopping()
            ):
                for p in [p for p, h in self.held.items() if h.report.lease_lost]:
                    del self.held[p]  # someone else's lease now: nothing to hand back
                if relay.circuit.is_open:
                    break
                # A drain stopped by an outage: it must not wait here for the budget's end.
                for p in [p for p, h in self.held.items() if h.report.circuit_open]:
                    _hand_back(relay, self.held.pop(p), self.result)
                # Wait while a held partition is busy; else only take what is there.
                busy_until = max(
                    (self.notified[p] + idle for p in self.held if p in self.notified),
                    default=0.0,
                )
                payloads = waiter.wait(min(max(0.0, busy_until - now()), budget_end - now()))
                if payloads is None:
                    break  # not listening any more: behave as without the wake-up path
                for p in sorted(partitions_for(payloads, n)):
                    self.notified[p] = now()
                    serving = self.held.get(p) or self._claim(p)
                    if serving is not None:
                        relay.drain(serving, until=budget_end)
                # Hand back the partitions that were idle for a whole poll interval.
                for p in [p for p in self.held if now() - self.notified.get(p, -idle) >= idle]:
                    _hand_back(relay, self.held.pop(p), self.result)
            else:
                spent = listening and now() >= budget_end
            if spent and self.carry and not relay.circuit.is_open and not self.stopping():
                for p, holding in list(self.held.items()):
                    busy = now() - self.notified.get(p, -idle) < idle or holding.report.more
                    if busy and not holding.report.lease_lost:
                        del self.held[p]
                        if (lease := relay.pass_on(holding)) is not None:
                            self.result.carried.append(lease)
        finally:
            try:
                for holding in self.held.values():
                    _hand_back(relay, holding, self.result)
                self.held.clear()
            finally:
                if listening and waiter is not None:
                    waiter.unlisten()  # even when a hand-back failed: nobody reads it after us

    def _claim(self, partition: int) -> Holding | None:
        """Claim a notified partition nobody serves, if this task has room for it."""
        at = self.relay.clock()
        retry_at = self.refused.get(partition, at - CLAIM_RETRY_SECONDS) + CLAIM_RETRY_SECONDS
        if len(self.held) >= self.limit or at < retry_at:
            return None
        lease = self.relay.claim(
            partition, self.partition_count, take_queued_after=TAKE_QUEUED_AFTER_SECONDS
        )
        if lease is None:
            self.refused[partition] = at  # someone else serves it, or nothing is due
            return None
        holding = self.held[partition] = self.relay.hold(lease)
        self.result.reports.append(holding.report)
        return holding


def _hand_back(relay: Relay, holding: Holding, result: ServeReport) -> None:
    report = relay.release(holding)
    wanted = report.more and not report.circuit_open and not report.lease_lost
    if wanted and report.partition not in result.more:
        result.more.append(report.partition)
    event(
        log,
        logging.DEBUG,
        "lease_handed_back",
        "partition handed back",
        partition=report.partition,
        epoch=report.epoch,
        published=report.published,
        more=report.more,
    )
