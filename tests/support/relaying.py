"""Drive the relay in-process, as the Celery tasks would, for integration tests."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from outbox_tasks.relay import Publisher, Relay
from outbox_tasks.settings import Settings
from outbox_tasks.store.relay import PostgresRelayStore
from tests.support.kit import Collector, wait_until


def make_relay(settings: Settings, engine: Engine, publisher: Publisher, owner: str = "t") -> Relay:
    return Relay(settings, PostgresRelayStore(engine), publisher, owner=owner, jitter=lambda: 0.0)


def drain(relay: Relay, rounds: int = 50) -> int:
    """Claim and publish every partition until nothing is left to do; returns rows published."""
    total = 0
    for _ in range(rounds):
        progressed = False
        for partition in range(relay.settings.partitions):
            lease = relay.claim(partition)
            if lease is None:
                continue
            report = relay.publish(partition, lease.epoch)
            total += report.published
            progressed = progressed or report.published > 0 or report.failed > 0
        if not progressed:
            break
    return total


def wait_for(collector: Collector, count: int) -> None:
    """Until the collector has ``count`` messages. kombu's Redis consumer reads one message per
    round trip, so a big batch takes a while to read on a busy machine: allow for it."""
    wait_until(
        lambda: collector.count() >= count, timeout=10 + count / 200, what=f"{count} messages"
    )
