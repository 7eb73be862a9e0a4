"""Drive the relay in-process, as the Celery tasks would, for integration tests."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from outbox_tasks.protocols import Publisher
from outbox_tasks.relay import Relay
from outbox_tasks.settings import Settings
from outbox_tasks.store.relay import PostgresRelayStore
from outbox_tasks.testing import drain
from tests.support.kit import Collector, wait_until

__all__ = ["drain", "make_relay", "wait_for"]


def make_relay(settings: Settings, engine: Engine, publisher: Publisher, owner: str = "t") -> Relay:
    return Relay(settings, PostgresRelayStore(engine), publisher, owner=owner, jitter=lambda: 0.0)


def wait_for(collector: Collector, count: int) -> None:
    """Until the collector has ``count`` messages. kombu's Redis consumer reads one message per
    round trip, so a big batch takes a while to read on a busy machine: allow for it."""
    wait_until(
        lambda: collector.count() >= count, timeout=10 + count / 200, what=f"{count} messages"
    )
