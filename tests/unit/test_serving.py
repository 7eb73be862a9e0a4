"""Serving publish tasks (outbox_tasks.serving): a task keeps its leases while notifications for
their partitions keep coming, publishes new rows with no new claim, claims more up to its share,
hands back what is idle, and everything when its budget is spent. In memory; the end-to-end
latency is measured by ``python -m bench latency``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from outbox_tasks.partitioning import partition_of, slot_of
from outbox_tasks.relay import Relay
from outbox_tasks.schema import OutboxMessage
from outbox_tasks.serving import QUEUED_LATE_SECONDS, serve
from outbox_tasks.settings import Settings
from outbox_tasks.store.records import QUEUED_PREFIX, Lease
from outbox_tasks.testing import InMemoryRelayStore, ManualClock, RecordingPublisher

PARTITIONS = 4
SETTINGS = Settings(
    partitions=PARTITIONS, poll_interval_seconds=1.0, publish_task_seconds=5.0, batch_size=50
)


def aggregate_in(partition: int, n: int = 0) -> str:
    """The n-th aggregate id (of type Order) that lives in ``partition``."""
    found = 0
    for i in range(10_000):
        if partition_of(slot_of("Order", str(i)), PARTITIONS) == partition:
            if found == n:
                return str(i)
            found += 1
    raise AssertionError("no aggregate found")


def notification(partition: int) -> str:
    return str(slot_of("Order", aggregate_in(partition)))


class FakeWaiter:
    """Scripted notifications: each wait returns the next step's payloads (advancing the clock by
    the step's delay, at most the timeout), after running the step's action (rows committed)."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.steps: list[tuple[float, Callable[[], None], list[str]]] = []
        self.waits: list[float] = []
        self.listening = False
        self.can_listen = True

    def then(self, after: float, action: Callable[[], None], *payloads: str) -> FakeWaiter:
        self.steps.append((after, action, list(payloads)))
        return self

    def listen(self) -> bool:
        self.listening = self.can_listen
        return self.can_listen

    def wait(self, timeout: float) -> list[str] | None:
        self.waits.append(timeout)
        if not self.steps:
            self.clock.advance(timeout)
            return []
        after, action, payloads = self.steps[0]
        if after > timeout:
            self.clock.advance(timeout)
            self.steps[0] = (after - timeout, action, payloads)
            return []
        self.steps.pop(0)
        self.clock.advance(after)
        action()
        return payloads

    def unlisten(self) -> None:
        self.listening = False


class World:
    def __init__(self) -> None:
        self.clock = ManualClock()
        self.store = InMemoryRelayStore(clock=self.clock)
        self.publisher = RecordingPublisher()
        self.waiter = FakeWaiter(self.clock)

    def relay(self, owner: str = "me") -> Relay:
        return Relay(
            SETTINGS,
            self.store,
            self.publisher,
            owner=owner,
            clock=self.clock,
            jitter=lambda: 0.0,
        )

    def add(self, partition: int, count: int = 1, n: int = 0) -> Callable[[], None]:
        def action() -> None:
            self.store.add(
                *(
                    OutboxMessage(
                        aggregate_type="Order",
                        aggregate_id=aggregate_in(partition, n),
                        event_type="OrderCreated",
                        payload={},
                    )
                    for _ in range(count)
                )
            )

        return action

    def epoch(self, partition: int) -> int:
        record = self.store.lease(partition, PARTITIONS)
        return 0 if record is None else record.epoch

    def live(self, partition: int) -> bool:
        record = self.store.lease(partition, PARTITIONS)
        return record is not None and record.live(self.clock())


def streaming_past_the_budget() -> tuple[World, Relay, Lease]:
    """Partition 0 with a row, notified every 0.48 s past the 5 s budget, and its lease."""
    w = World()
    w.add(0)()
    for _ in range(11):
        w.waiter.then(0.48, w.add(0), notification(0))
    relay = w.relay()
    lease = relay.claim(0)
    assert lease is not None
    return w, relay, lease


def test_a_backlog_committed_long_ago_is_published_and_handed_back_without_waiting() -> None:
    w = World()
    w.add(0, 3)()
    w.clock.advance(SETTINGS.poll_interval_seconds)
    relay = w.relay()
    lease = relay.claim(0)
    assert lease is not None

    result = serve(relay, w.waiter, 0, lease.epoch, wall=w.clock)

    assert len(w.publisher.published_ids()) == 3
    assert w.waiter.waits == [0.0]  # only what was already there
    assert not w.live(0) and not w.waiter.listening
    assert result.more == [] and result.as_dict()["published"] == 3


def test_a_partition_whose_rows_are_fresh_waits_one_poll_interval_for_more() -> None:
    w = World()
    w.add(0, 3)()
    relay = w.relay()
    lease = relay.claim(0)
    assert lease is not None

    serve(relay, w.waiter, 0, lease.epoch, wall=w.clock)

    assert len(w.publisher.published_ids()) == 3
    assert w.waiter.waits == [SETTINGS.poll_interval_seconds]
    assert not w.live(0) and not w.waiter.listening


def test_new_rows_of_a_held_partition_are_published_with_no_new_claim() -> None:
    w = World()
    w.add(0)()
    w.waiter.then(0.0, w.add(0, 2), notification(0)).then(0.3, w.add(0), notification(0))
    relay = w.relay()
    lease = relay.claim(0)
    assert lease is not None

    result = serve(relay, w.waiter, 0, lease.epoch, wall=w.clock)

    assert len(w.publisher.published_ids()) == 4
    assert w.epoch(0) == lease.epoch  # one lease throughout: no claim, no take-over
    assert result.as_dict()["leases"] == 1
    assert not w.live(0)
    # Handed back one poll interval after the last notification, not at the budget's end.
    assert w.clock() - (1_700_000_000.0 + 0.3) == SETTINGS.poll_interval_seconds


def test_a_notification_for_a_free_partition_is_claimed_in_place_up_to_the_share() -> None:
    w = World()
    w.add(0)()
    w.waiter.then(0.0, w.add(0), notification(0)).then(
        0.1, lambda: (w.add(1)(), w.add(2)()), notification(1), notification(2)
    )
    relay = w.relay()
    lease = relay.claim(0)
    assert lease is not None

    result = serve(relay, w.waiter, 0, lease.epoch, wall=w.clock, share=2)

    assert sorted(result.as_dict()["partitions"]) == [0, 1]  # type: ignore[type-var]
    assert len(w.publisher.published_ids()) == 3
    # Partition 2 was left for another process (its row waits for a claim).
    assert w.epoch(2) == 0


def test_an_idle_partition_is_handed_back_while_a_busy_one_is_kept() -> None:
    w = World()
    w.add(0)()
    w.waiter.then(0.0, lambda: (w.add(0)(), w.add(1)()), notification(0), notification(1))
    for _ in range(12):  # partition 1 keeps getting rows every 0.5 s
        w.waiter.then(0.5, w.add(1), notification(1))
    relay = w.relay()
    lease = relay.claim(0)
    assert lease is not None
    handed_back_at: dict[int, float] = {}
    release = relay.release

    def spy(holding: object) -> object:
        report = release(holding)  # type: ignore[arg-type]
        handed_back_at[report.partition] = w.clock()
        return report

    relay.release = spy  # type: ignore[method-assign]

    serve(relay, w.waiter, 0, lease.epoch, wall=w.clock)

    start = 1_700_000_000.0
    assert handed_back_at[0] - start <= 1.0 + 0.5  # idle one poll interval, then let go
    assert handed_back_at[1] - start >= SETTINGS.publish_task_seconds  # busy to the end


def test_at_the_end_of_the_budget_a_partition_with_rows_left_is_reported_for_a_claim() -> None:
    w = World()
    w.add(0)()
    for _ in range(10):  # rows keep coming until 4.5 s
        w.waiter.then(0.45, w.add(0), notification(0))
    # A row at 4.95 s whose notification was lost: left for the next holder.
    w.waiter.then(0.45, w.add(0), notification(3))
    relay = w.relay()
    lease = relay.claim(0)
    assert lease is not None

    result = serve(relay, w.waiter, 0, lease.epoch, wall=w.clock)

    assert not w.live(0)
    assert len(w.publisher.published_ids()) == 11
    assert sum(1 for r in w.store.rows() if r.pending) == 1
    assert result.more == [0]


def test_without_a_listening_connection_a_task_publishes_once_and_returns() -> None:
    for waiter_works in (False, None):
        w = World()
        w.add(0, 2)()
        w.waiter.can_listen = bool(waiter_works)
        w.waiter.then(0.0, w.add(0), notification(0))
        relay = w.relay()
        lease = relay.claim(0)
        assert lease is not None

        serve(relay, None if waiter_works is None else w.waiter, 0, lease.epoch, wall=w.clock)

        assert len(w.publisher.published_ids()) == 2
        assert w.waiter.waits == [] and not w.live(0)


def test_a_partition_another_process_serves_is_not_claimed_again_on_every_notification() -> None:
    w = World()
    w.add(1)()
    other = w.relay("other")
    assert other.claim(1) is not None  # another process serves partition 1
    w.add(0)()
    for _ in range(5):
        w.waiter.then(0.1, lambda: (w.add(0)(), w.add(1)()), notification(0), notification(1))
    relay = w.relay()
    lease = relay.claim(0)
    assert lease is not None
    claims: list[int] = []
    claim = relay.claim

    def spy(partition: int, partition_count: int | None = None, **options: Any) -> object:
        claims.append(partition)
        return claim(partition, partition_count, **options)

    relay.claim = spy  # type: ignore[method-assign]

    serve(relay, w.waiter, 0, lease.epoch, wall=w.clock)

    assert claims == [1]  # tried once; not again within the grace


def test_a_serving_task_with_room_takes_a_lease_whose_queued_task_has_not_started() -> None:
    w = World()
    w.add(0)()
    w.add(1)()
    # A tick claimed partition 1 for a publish task that waits behind busy pool processes.
    assert w.relay("tick").claim(1, queued=True) is not None
    for _ in range(6):
        w.waiter.then(0.2, w.add(1), notification(1))
    relay = w.relay()
    lease = relay.claim(0)
    assert lease is not None
    taken_at: list[float] = []
    claim = relay.claim

    def spy(partition: int, partition_count: int | None = None, **options: Any) -> object:
        got = claim(partition, partition_count, **options)
        if got is not None:
            taken_at.append(w.clock())
        return got

    relay.claim = spy  # type: ignore[method-assign]
    start = w.clock()

    result = serve(relay, w.waiter, 0, lease.epoch, wall=w.clock)

    assert 1 in result.as_dict()["partitions"]  # type: ignore[operator]
    assert sum(1 for r in w.store.rows() if r.pending) == 0
    assert taken_at == [start + 0.2], "at the first notification, not after a grace"


def test_at_the_end_of_the_budget_busy_partitions_pass_on_to_a_continuation_still_leased() -> None:
    w = World()
    w.add(0)()
    w.add(1)()
    for _ in range(11):  # partition 0 keeps getting rows past the budget; 1 has none
        w.waiter.then(0.48, w.add(0), notification(0))
    relay = w.relay()
    granted = [relay.claim(0), relay.claim(1)]
    assert None not in granted

    result = serve(relay, w.waiter, granted=[g for g in granted if g], carry=True, wall=w.clock)

    assert [lease.partition for lease in result.carried] == [0]
    record = w.store.lease(0, PARTITIONS)
    assert record is not None and record.live(w.clock())
    assert record.epoch == result.carried[0].epoch, "the same lease, not a new grant"
    assert (record.owner or "").startswith(QUEUED_PREFIX)
    assert not w.live(1), "an idle partition is handed back"
    assert result.more == []
    # The continuation adopts it, with no claim, and publishes what came meanwhile.
    published = len(w.publisher.published_ids())
    w.add(0)()
    w.waiter.steps.clear()
    nxt = serve(w.relay("continuation"), w.waiter, 0, result.carried[0].epoch, wall=w.clock)
    assert nxt.reports[0].epoch == result.carried[0].epoch and nxt.reports[0].published >= 1
    assert len(w.publisher.published_ids()) == published + nxt.reports[0].published
    assert not any(r.pending for r in w.store.rows())


def test_without_carry_every_lease_is_handed_back_at_the_end_of_the_budget() -> None:
    w, relay, lease = streaming_past_the_budget()

    result = serve(relay, w.waiter, 0, lease.epoch, wall=w.clock)

    assert result.carried == [] and not w.live(0)


def test_a_passed_on_lease_waits_for_its_task_until_it_is_late_then_any_claim_takes_it() -> None:
    w, relay, lease = streaming_past_the_budget()
    result = serve(relay, w.waiter, 0, lease.epoch, carry=True, wall=w.clock)
    assert len(result.carried) == 1
    tick = w.relay("tick")
    w.add(0)()

    assert tick.claim(0, take_queued_after=QUEUED_LATE_SECONDS) is None, "its task may start"
    w.clock.advance(QUEUED_LATE_SECONDS)
    taken = tick.claim(0, take_queued_after=QUEUED_LATE_SECONDS)

    assert taken is not None and taken.epoch == result.carried[0].epoch + 1
    late = serve(w.relay("late"), w.waiter, 0, result.carried[0].epoch, wall=w.clock)
    assert late.as_dict()["published"] == 0, "the late task finds its lease gone"
    assert w.epoch(0) == taken.epoch


def test_when_the_worker_shuts_down_a_serving_task_hands_everything_back_and_carries_nothing() -> (
    None
):
    w, relay, lease = streaming_past_the_budget()
    shutdown_at = w.clock() + 1.0

    result = serve(
        relay,
        w.waiter,
        0,
        lease.epoch,
        carry=True,
        stopping=lambda: w.clock() >= shutdown_at,
        wall=w.clock,
    )

    assert result.carried == [] and not w.live(0)
    assert w.clock() - shutdown_at < SETTINGS.poll_interval_seconds, "not the whole budget"


def test_a_continuation_keeps_a_passed_on_partition_although_no_row_came_during_the_hop() -> None:
    w, relay, lease = streaming_past_the_budget()
    first = serve(relay, w.waiter, 0, lease.epoch, carry=True, wall=w.clock)
    (carried,) = first.carried
    w.waiter.steps.clear()
    w.waiter.then(0.3, w.add(0), notification(0))  # the stream goes on after the hop
    served_at: list[float] = []
    nxt = w.relay("next")
    drain = nxt.drain

    def spy(holding: Any, *, until: float) -> int:
        published = drain(holding, until=until)
        if published:
            served_at.append(w.clock())
        return published

    nxt.drain = spy  # type: ignore[method-assign]
    start = w.clock()

    serve(nxt, w.waiter, 0, carried.epoch, continuing=True, wall=w.clock)

    assert served_at == [start + 0.3], "still held when the next row came"
