"""In-memory stand-ins for unit tests: a relay store, a recording publisher and a manual clock.

The relay (``outbox_tasks.relay.Relay``) runs unchanged on them, with no PostgreSQL and no
broker, so a test of your own code around the outbox (what it writes, in which order, what
happens when a message keeps failing) runs in milliseconds::

    from outbox_tasks.relay import Relay
    from outbox_tasks.schema import OutboxMessage
    from outbox_tasks.settings import Settings
    from outbox_tasks.testing import InMemoryRelayStore, ManualClock, RecordingPublisher, drain

    def test_an_order_publishes_created_then_paid():
        clock = ManualClock()
        store = InMemoryRelayStore(clock=clock)
        publisher = RecordingPublisher()
        relay = Relay(Settings.from_env({}), store, publisher, owner="test", clock=clock)
        store.add(
            OutboxMessage(aggregate_type="Order", aggregate_id=7, event_type="OrderCreated",
                          payload={"total": "9.99"}),
            OutboxMessage(aggregate_type="Order", aggregate_id=7, event_type="OrderPaid",
                          payload={}),
        )
        assert drain(relay) == 2
        assert [m.event_type for m in publisher.published] == ["OrderCreated", "OrderPaid"]

Failures and time are in the test's hands. ``publisher.fail(event_id, times=2)`` refuses a
message twice: it backs off and holds back its aggregate while the others flow, and it parks once
it has failed more than ``max_retries`` times. ``clock.advance(seconds)`` lets a backoff or a
lease run out. ``publisher.unavailable = True`` is a broker outage (the relay's circuit opens; no
retry is spent). ``store.replay(aggregate_type, aggregate_id)`` puts a parked aggregate back in
line, as ``outbox-tasks dlq replay`` does.

The store keeps the PostgreSQL store's contract, checked by the same tests (``tests/contract``):
leases with epochs that expire on ``clock``, writes fenced by epoch, rows per aggregate in
``seq`` order with head-of-line blocking, retry counts and backoff, parking. What it does not
model: other transactions (its transactions run one at a time, so no row is ever locked or
invisible to it) and the dead-letter table.
"""

from outbox_tasks.testing.clock import ManualClock
from outbox_tasks.testing.publisher import RecordingPublisher
from outbox_tasks.testing.records import LeaseRecord, OutboxRecord
from outbox_tasks.testing.running import drain
from outbox_tasks.testing.store import InMemoryRelayStore, InMemoryRelayTransaction

__all__ = [
    "InMemoryRelayStore",
    "InMemoryRelayTransaction",
    "LeaseRecord",
    "ManualClock",
    "OutboxRecord",
    "RecordingPublisher",
    "drain",
]
