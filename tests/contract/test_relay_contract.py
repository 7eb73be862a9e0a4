"""The relay store's contract, one set of assertions for the in-memory fakes and for PostgreSQL
(with the real broker publisher on Redis): claims, fenced writes, per-aggregate order, retries,
parking and replay, delete mode, and repartitioning. A fake that passes here can stand in for the
database in unit tests.

``test_contract_catches_broken_fakes.py`` shows these tests fail against a fake that ignores the
epoch fence or breaks the order."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from outbox_tasks.envelope import OutboundMessage
from outbox_tasks.partitioning import partition_of_aggregate
from outbox_tasks.publisher import BatchResult
from outbox_tasks.relay import Relay, claim_partition
from outbox_tasks.store.records import Failure
from outbox_tasks.testing import drain
from tests.contract.backends import Backend, RowState, Sent

UNTOUCHED = RowState(published=False, retry_count=0, waiting=False, parked=False)


def ids_of(sent: Sequence[Sent], aggregate: tuple[str, str] | None = None) -> list[str]:
    """Event ids in arrival order (first arrivals only), of one aggregate or of all."""
    seen: list[str] = []
    for s in sent:
        if (aggregate is None or s.aggregate == aggregate) and s.event_id not in seen:
            seen.append(s.event_id)
    return seen


def strs(ids: Sequence[uuid.UUID]) -> list[str]:
    return [str(i) for i in ids]


def test_a_claim_is_idempotent_while_its_lease_is_live(backend: Backend) -> None:
    settings = backend.settings.with_changes(partitions=1)
    backend.add(("Order", "1"))
    relay = backend.relay(settings, owner="A")

    lease = relay.claim(0)

    assert lease is not None
    assert relay.claim(0) is None
    assert claim_partition(backend.store, settings, owner="B", partition=0) is None
    report = relay.publish(0, lease.epoch)
    assert report.published == 1 and not report.lease_lost
    assert relay.claim(0) is None, "nothing is due: no lease"
    backend.add(("Order", "1"))
    again = relay.claim(0)
    assert again is not None and again.epoch == lease.epoch + 1


def test_a_stale_epoch_can_neither_mark_nor_fail_nor_release(backend: Backend) -> None:
    settings = backend.settings.with_changes(partitions=1)
    first, second = backend.add(("Order", "1"), ("Order", "2"))
    old = claim_partition(backend.store, settings, owner="old", partition=0)
    assert old is not None
    backend.expire_leases()
    new = claim_partition(backend.store, settings, owner="new", partition=0)
    assert new is not None and new.epoch == old.epoch + 1
    late_failure = Failure(id=second, retry_count=1, error="late", delay_seconds=None)

    with backend.store.transaction() as tx:
        assert not tx.mark_inflight(old, ids=[first], cursor_slot=0, lease_seconds=30)
        finish = tx.finish_batch(old, [first], [late_failure], delete_published=False)
        assert (finish.fenced_ok, finish.marked, finish.failed) == (False, 0, 0)
        assert not tx.release_lease(old)
        assert (
            tx.take_over_lease(
                partition_count=1, partition=0, epoch=old.epoch, owner="old", lease_seconds=30
            )
            is None
        )

    assert backend.row(first) == UNTOUCHED
    assert backend.row(second) == UNTOUCHED
    with backend.store.transaction() as tx:
        finish = tx.finish_batch(new, [first], [], delete_published=False)
        assert (finish.fenced_ok, finish.marked) == (True, 1)
    assert backend.row(first).published
    backend.expire_leases()
    with backend.store.transaction() as tx:
        assert not tx.release_lease(new), "an expired lease is no lease"


def test_a_holder_whose_lease_ran_out_mid_publish_changes_no_row(backend: Backend) -> None:
    """A is inside the broker call when its lease expires; B takes over and publishes everything;
    A's marks and its failure report then change nothing."""
    settings = backend.settings.with_changes(partitions=1)
    ids = backend.add(*[("Order", str(i % 3)) for i in range(6)])

    class TakenOverMidPublish:
        def publish_batch(self, messages: Sequence[OutboundMessage]) -> BatchResult:
            backend.expire_leases()
            assert drain(backend.relay(settings, owner="B")) == 6
            result = backend.publisher.publish_batch(messages[1:])
            return BatchResult(
                published=result.published, failed={messages[0].event_id: "late"}, skipped=[]
            )

    a = backend.relay(settings, owner="A")
    a.publisher = TakenOverMidPublish()
    lease = a.claim(0)
    assert lease is not None

    report = a.publish(0, lease.epoch)

    assert report.lease_lost and report.published == 0 and report.failed == 0
    assert all(backend.row(i) == RowState(True, 0, False, False) for i in ids)
    assert set(ids_of(backend.sent(6 + 5))) == set(strs(ids))


def test_each_aggregate_is_published_in_sequence_order(backend: Backend) -> None:
    settings = backend.settings.with_changes(partitions=3, batch_size=4)
    aggregates = [("Order", str(i % 6)) for i in range(60)]
    ids = backend.add(*aggregates)

    assert drain(backend.relay(settings)) == 60

    sent = backend.sent(60)
    assert sorted(ids_of(sent)) == sorted(strs(ids))
    for aggregate in set(aggregates):
        written = [str(i) for i, a in zip(ids, aggregates, strict=True) if a == aggregate]
        assert ids_of(sent, aggregate) == written, f"{aggregate} out of order"
        sequences = [s.sequence for s in sent if s.aggregate == aggregate]
        assert sequences == sorted(sequences)


def test_a_message_in_backoff_holds_back_its_aggregate_and_no_other(backend: Backend) -> None:
    # One failure: a retry in 1 s (jitter 0 takes half of the 2 s ceiling).
    settings = backend.settings.with_changes(
        partitions=1, backoff_base_seconds=2.0, backoff_max_seconds=2.0
    )
    p1, q1, p2, q2 = backend.add(("Order", "P"), ("Order", "Q"), ("Order", "P"), ("Order", "Q"))
    backend.publisher.fail(p1, times=1)
    relay = backend.relay(settings)

    drain(relay)

    assert ids_of(backend.sent(2)) == strs([q1, q2])
    assert backend.row(p1) == RowState(published=False, retry_count=1, waiting=True, parked=False)
    assert backend.row(p2) == UNTOUCHED
    backend.wait(1.2)
    drain(relay)
    assert ids_of(backend.sent(4), ("Order", "P")) == strs([p1, p2])
    assert backend.row(p1) == RowState(published=True, retry_count=1, waiting=False, parked=False)


def test_after_max_retries_a_message_parks_its_aggregate_and_the_others_flow(
    backend: Backend,
) -> None:
    settings = backend.settings.with_changes(
        partitions=1, max_retries=2, backoff_base_seconds=0.001, backoff_max_seconds=0.002
    )
    p1, q1, p2 = backend.add(("Order", "P"), ("Order", "Q"), ("Order", "P"))
    backend.publisher.fail(p1, times=None)
    relay = backend.relay(settings)

    for _ in range(10):
        drain(relay)
        if backend.row(p1).parked:
            break
        backend.wait(0.01)  # past the millisecond backoff

    assert backend.row(p1) == RowState(published=False, retry_count=3, waiting=False, parked=True)
    assert backend.publisher.attempts[str(p1)] == 3  # the first try and max_retries
    assert backend.row(p2) == UNTOUCHED
    q2, p3 = backend.add(("Order", "Q"), ("Order", "P"))
    drain(relay)
    assert ids_of(backend.sent(2)) == strs([q1, q2])
    assert backend.row(p3) == UNTOUCHED


def test_replay_puts_a_parked_aggregate_back_in_line_in_order(backend: Backend) -> None:
    settings = backend.settings.with_changes(partitions=1, max_retries=0)
    p1, q1, p2 = backend.add(("Order", "P"), ("Order", "Q"), ("Order", "P"))
    backend.publisher.fail(p1, times=None)
    relay = backend.relay(settings)
    drain(relay)
    assert backend.row(p1).parked
    backend.publisher.fail(p1, times=0)

    backend.replay("Order", "P")

    assert backend.row(p1) == UNTOUCHED
    assert drain(relay) == 2
    sent = backend.sent(3)
    assert ids_of(sent) == strs([q1, p1, p2])
    assert backend.row(p2).published


def test_rows_a_crashed_holder_may_have_sent_are_resent_marked_redelivered(
    backend: Backend,
) -> None:
    settings = backend.settings.with_changes(partitions=1, batch_size=10)
    first = backend.add(*[("Order", str(i)) for i in range(3)])
    lease = claim_partition(backend.store, settings, owner="crashed", partition=0)
    assert lease is not None
    # What a publish does up to the broker call, then the process dies.
    with backend.store.transaction() as tx:
        rows = tx.select_candidates(lease.slot_lo, lease.slot_hi, 10)
        assert tx.mark_inflight(
            lease, ids=[r.id for r in rows], cursor_slot=lease.slot_lo, lease_seconds=30
        )
    [later] = backend.add(("Order", "new"))
    backend.expire_leases()

    assert drain(backend.relay(settings, owner="next")) == 4

    flags = {s.event_id: s.redelivered for s in backend.sent(4)}
    assert flags == {**dict.fromkeys(strs(first), True), str(later): False}


def test_a_broker_outage_opens_the_circuit_and_spends_no_retry(backend: Backend) -> None:
    settings = backend.settings.with_changes(partitions=1)
    ids = backend.add(("Order", "1"), ("Order", "1"))
    relay = backend.relay(settings)
    backend.publisher.unavailable = True
    lease = relay.claim(0)
    assert lease is not None

    report = relay.publish(0, lease.epoch)

    assert report.circuit_open and report.more and report.published == 0
    assert relay.claim(0) is None, "claims pause while the circuit is open"
    assert [backend.row(i) for i in ids] == [UNTOUCHED, UNTOUCHED]
    backend.publisher.unavailable = False
    backend.clock.advance(settings.circuit_max_seconds)  # the relay's clock: the circuit's delay
    assert drain(relay) == 2
    assert ids_of(backend.sent(2)) == strs(ids)


def test_in_delete_mode_published_rows_go_and_failed_ones_stay_with_their_failure(
    backend: Backend,
) -> None:
    settings = backend.settings.with_changes(
        partitions=1, cleanup_mode="delete", backoff_base_seconds=60.0, backoff_max_seconds=60.0
    )
    p1, q1, p2 = backend.add(("Order", "P"), ("Order", "Q"), ("Order", "P"))
    backend.publisher.fail(p1, times=1)

    assert drain(backend.relay(settings)) == 1

    assert ids_of(backend.sent(1)) == strs([q1])
    assert backend.gone(q1)
    assert backend.row(p1) == RowState(published=False, retry_count=1, waiting=True, parked=False)
    assert backend.row(p2) == UNTOUCHED


def test_a_new_partition_count_waits_for_the_old_leases_and_resends_their_batch(
    backend: Backend,
) -> None:
    """Repartitioning (1 -> 2): while the one lease of the old count is live, no partition of the
    new count is granted (their slots overlap it); once it expires, the new holders resend the
    batch it left in flight, flagged as redelivered, and send the rest unflagged."""
    one = backend.settings.with_changes(partitions=1, batch_size=3)
    two = backend.settings.with_changes(partitions=2)
    # Enough aggregates that both partitions of two have rows to claim.
    aggregates = [("Order", str(i)) for i in range(12)]
    assert {partition_of_aggregate(*a, 2) for a in aggregates} == {0, 1}
    backend.add(*aggregates)
    old = claim_partition(backend.store, one, owner="old", partition=0)
    assert old is not None
    with backend.store.transaction() as tx:
        batch = [r.id for r in tx.select_candidates(old.slot_lo, old.slot_hi, 3)]
        assert tx.mark_inflight(old, ids=batch, cursor_slot=old.slot_lo, lease_seconds=30)

    refused = [claim_partition(backend.store, two, owner="new", partition=p) for p in (0, 1)]

    assert refused == [None, None]
    backend.expire_leases()
    assert drain(backend.relay(two, owner="new")) == 12
    flagged = {s.event_id for s in backend.sent(12) if s.redelivered}
    assert flagged == set(strs(batch))


def test_a_lease_held_for_a_publish_task_stuck_in_the_queue_can_be_taken_after_a_grace(
    backend: Backend,
) -> None:
    """A claim for a queued publish task marks its lease queued; a serving process may take it
    once the task has not started within the grace; the task then finds its lease gone. A lease
    its task took over is never taken so."""
    settings = backend.settings.with_changes(partitions=1)
    backend.add(("Order", "1"))
    queued = claim_partition(backend.store, settings, owner="tick", partition=0, queued=True)
    assert queued is not None
    server = backend.relay(settings, owner="server")

    # A grace far longer than the time between two statements on a loaded machine.
    assert server.claim(0, take_queued_after=30.0) is None, "within the grace: left alone"
    assert server.claim(0) is None, "without asking: a live lease"
    backend.wait(0.3)
    taken = server.claim(0, take_queued_after=0.2)

    assert taken is not None and taken.epoch == queued.epoch + 1
    stuck = backend.relay(settings, owner="stuck").publish(0, queued.epoch)
    assert stuck.published == 0 and not stuck.lease_lost
    assert server.publish(0, taken.epoch).published == 1
    # A lease its publish task has taken over is no queued lease.
    backend.add(("Order", "1"))
    again = claim_partition(backend.store, settings, owner="tick", partition=0, queued=True)
    assert again is not None
    holder = backend.relay(settings, owner="holder")
    with backend.store.transaction() as tx:
        adopted = tx.take_over_lease(
            partition_count=1, partition=0, epoch=again.epoch, owner="holder", lease_seconds=30
        )
    assert adopted is not None
    backend.wait(0.3)
    assert server.claim(0, take_queued_after=0.2) is None
    assert holder.publish(0, again.epoch).published == 1


def test_a_lease_passed_on_goes_to_one_continuation_and_to_a_claim_only_once_it_is_late(
    backend: Backend,
) -> None:
    """``pass_on`` keeps a held lease for the next publish task under a new epoch, marked
    queued: the old epoch is stale, a plain claim leaves it alone, one continuation adopts it
    (a second copy of that task cannot), and a claim takes it only once its task is late."""
    settings = backend.settings.with_changes(partitions=1)
    backend.add(("Order", "1"))
    holder = backend.relay(settings, owner="holder")
    holding = holder.adopt(*_granted(holder))
    assert holding.lease is not None
    old = holding.lease.epoch

    kept = holder.pass_on(holding)

    assert kept is not None and kept.epoch == old + 1
    assert backend.relay(settings, owner="tick").claim(0) is None, "still leased"
    assert backend.relay(settings, owner="stale").publish(0, old).published == 0
    assert backend.relay(settings, owner="next").publish(0, kept.epoch).published == 1
    # The first copy took it over (and handed it back): a second copy of the task is stale.
    backend.add(("Order", "1"))
    again = holder.adopt(*_granted(holder))
    assert again.lease is not None
    passed = holder.pass_on(again)
    assert passed is not None
    first = backend.relay(settings, owner="first").adopt(0, passed.epoch)
    assert first.lease is not None
    assert backend.relay(settings, owner="copy").adopt(0, passed.epoch).lease is None
    first.report.more = False
    backend.relay(settings, owner="first").release(first)
    # Queued and late: any claim takes it.
    backend.add(("Order", "1"))
    late = holder.pass_on(holder.adopt(*_granted(holder)))
    assert late is not None
    tick = backend.relay(settings, owner="tick")
    assert tick.claim(0, take_queued_after=30.0) is None, "its task may still start"
    backend.wait(0.3)
    taken = tick.claim(0, take_queued_after=0.2)
    assert taken is not None and taken.epoch == late.epoch + 1
    # A holder whose lease was taken over passes nothing on.
    stale = backend.relay(settings, owner="stale")
    lost = stale.adopt(0, late.epoch)
    assert lost.lease is None


def _granted(relay: Relay) -> tuple[int, int]:
    lease = relay.claim(0)
    assert lease is not None
    return lease.partition, lease.epoch


def test_held_partitions_are_those_with_a_live_lease_taken_over_not_queued_ones(
    backend: Backend,
) -> None:
    settings = backend.settings.with_changes(partitions=1)
    backend.add(("Order", "1"))
    relay = backend.relay(settings, owner="holder")
    assert relay.held_partitions() == set()
    queued = relay.claim(0, queued=True)
    assert queued is not None
    assert relay.held_partitions() == set(), "queued for a task: a serving task may take it"
    holding = relay.adopt(0, queued.epoch)
    assert relay.held_partitions() == {0}
    holding.report.more = False
    relay.release(holding)
    assert relay.held_partitions() == set()
