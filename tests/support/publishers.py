"""Publishers for tests: the real one, wrapped to misbehave on purpose."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from outbox_tasks.envelope import OutboundMessage
from outbox_tasks.publisher import BatchResult, BrokerPublisher


@dataclass
class RefusingPublisher:
    """Wraps the real publisher and fails every attempt of chosen events (a poison message)."""

    inner: BrokerPublisher
    refuse: set[str] = field(default_factory=set)
    attempts: dict[str, int] = field(default_factory=dict)

    def publish_batch(self, messages: Sequence[OutboundMessage]) -> BatchResult:
        failed: dict[str, str] = {}
        dead_aggregates: set[tuple[str, str]] = set()
        sendable = []
        skipped = []
        for m in messages:
            if m.aggregate_key in dead_aggregates:
                skipped.append(m.event_id)
            elif m.event_id in self.refuse:
                self.attempts[m.event_id] = self.attempts.get(m.event_id, 0) + 1
                failed[m.event_id] = "PoisonError: refused by test"
                dead_aggregates.add(m.aggregate_key)
            else:
                sendable.append(m)
        result = self.inner.publish_batch(sendable)
        return BatchResult(
            published=result.published,
            failed={**failed, **result.failed},
            skipped=skipped + result.skipped,
        )
