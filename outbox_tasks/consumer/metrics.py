"""Prometheus counters and gauges of consumer groups (prometheus_client imported on first use),
and :class:`Lag`, the measurement the lag gauges show."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Any, NamedTuple

from outbox_tasks.logs import event as log_event
from outbox_tasks.logs import get_logger

log = get_logger("consumer")


class Lag(NamedTuple):
    """Ready messages in the group's queues, and the age of the oldest one (None: empty or not
    measurable)."""

    messages: int
    oldest_age_seconds: float | None


class ConsumerMetrics:
    """Counters and gauges named as in ``outbox_tasks.metrics.METRIC_CATALOG``.

    Every update is guarded: a metrics failure never breaks handling.
    """

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge

        target = REGISTRY if registry is None else registry
        self.messages = Counter(
            "outbox_consumer_messages_total",
            "Messages a consumer group finished with, by outcome (handled, duplicate, stale, "
            "other_partition, dead_lettered, parked, invalid, requeued).",
            ["group", "outcome"],
            registry=target,
        )
        self.lag_messages = Gauge(
            "outbox_consumer_lag_messages",
            "Ready messages in the group's queues (partition queues summed).",
            ["group"],
            multiprocess_mode="max",
            registry=target,
        )
        self.oldest_age = Gauge(
            "outbox_consumer_oldest_message_age_seconds",
            "Age (now - occurred_at) of the oldest ready message in the group's queues.",
            ["group"],
            multiprocess_mode="max",
            registry=target,
        )

    def seed(self, group: str, outcomes: tuple[str, ...]) -> None:
        """Export every outcome of ``group`` at 0 (a dashboard shows 0, not "no data")."""
        with contextlib.suppress(Exception):
            for outcome in outcomes:
                self.messages.labels(group, outcome)

    def count(self, group: str, outcome: str) -> None:
        with contextlib.suppress(Exception):
            self.messages.labels(group, outcome).inc()

    def set_lag(self, group: str, value: Lag) -> None:
        """Set the lag gauges: age 0 when nothing waits, NaN when it cannot be measured."""
        age = value.oldest_age_seconds
        if age is None:
            age = 0.0 if value.messages == 0 else math.nan
        with contextlib.suppress(Exception):
            self.lag_messages.labels(group).set(value.messages)
            self.oldest_age.labels(group).set(age)


_default_metrics: list[ConsumerMetrics] = []
_metrics_lock = threading.Lock()


def default_metrics() -> ConsumerMetrics | None:
    """The process-wide metrics in the default registry (None if they cannot be created)."""
    with _metrics_lock:
        if not _default_metrics:
            try:
                _default_metrics.append(ConsumerMetrics())
            except Exception:  # e.g. names already registered by someone else
                log_event(log, logging.WARNING, "metrics_unavailable", "consumer metrics are off")
                return None
        return _default_metrics[0]
