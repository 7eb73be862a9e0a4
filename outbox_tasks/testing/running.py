"""Run the relay in-process until there is nothing left to publish."""

from __future__ import annotations

from outbox_tasks.relay import Relay


def drain(relay: Relay, rounds: int = 50) -> int:
    """Claim and publish every partition until a round makes no progress or ``rounds`` are done,
    as the Celery tasks would; returns the number of rows published."""
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
