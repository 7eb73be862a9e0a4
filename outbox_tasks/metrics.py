"""Prometheus metrics the relay counts. Names are part of the contract (DESIGN 7).

Labels stay low-cardinality: aggregate and event *types*, error *types*, never an id. Every
update goes through the relay's safe observer, so a metrics failure never breaks publishing.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from outbox_tasks.store import Row

# Every metric outbox_tasks exports: (name, type, labels). Dashboards and alert rules may use only
# these (a test checks it). Histograms add _bucket/_sum/_count; counter names include _total.
METRIC_CATALOG: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("outbox_pending_messages", "gauge", ()),
    ("outbox_oldest_pending_age_seconds", "gauge", ()),
    ("outbox_dead_letter_messages", "gauge", ()),
    ("outbox_parked_aggregates", "gauge", ()),
    ("outbox_partitions_unowned", "gauge", ()),
    ("outbox_table_dead_tuples", "gauge", ()),
    ("outbox_table_last_autovacuum_timestamp_seconds", "gauge", ()),
    ("outbox_relay_last_success_timestamp_seconds", "gauge", ()),
    ("outbox_circuit_open", "gauge", ()),
    ("outbox_lease_lost_total", "counter", ()),
    ("outbox_publish_errors_total", "counter", ("error_type",)),
    ("outbox_messages_published_total", "counter", ("aggregate_type", "event_type")),
    ("outbox_publish_latency_seconds", "histogram", ()),
    ("outbox_batch_size", "histogram", ()),
    ("outbox_batch_duration_seconds", "histogram", ()),
    ("outbox_consumer_messages_total", "counter", ("group", "outcome")),
    ("outbox_consumer_lag_messages", "gauge", ("group",)),
    ("outbox_consumer_oldest_message_age_seconds", "gauge", ("group",)),
)

# 5 ms .. 5 min: resolves both the wake-up path and a backlog draining.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class RelayMetrics:
    """The relay's counters; implements relay.Observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        self.published = Counter(
            "outbox_messages_published_total",
            "Messages published to the broker and marked.",
            ["aggregate_type", "event_type"],
            **kw,  # type: ignore[arg-type]
        )
        self.errors = Counter(
            "outbox_publish_errors_total",
            "Publish errors by type (message_rejected, broker_unavailable, lease_lost, ...).",
            ["error_type"],
            **kw,  # type: ignore[arg-type]
        )
        self.latency = Histogram(
            "outbox_publish_latency_seconds",
            "Time from the outbox insert to its publication.",
            buckets=LATENCY_BUCKETS,
            **kw,  # type: ignore[arg-type]
        )
        self.lease_lost_total = Counter(
            "outbox_lease_lost_total",
            "Leases lost while publishing.",
            **kw,  # type: ignore[arg-type]
        )
        self.batch_size = Histogram(
            "outbox_batch_size",
            "Rows published per batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
            **kw,  # type: ignore[arg-type]
        )
        self.batch_duration = Histogram(
            "outbox_batch_duration_seconds",
            "Time to publish and mark one batch.",
            **kw,  # type: ignore[arg-type]
        )
        self.circuit_open = Gauge(
            "outbox_circuit_open",
            "1 while the broker outage circuit is open in this process.",
            multiprocess_mode="max",
            **kw,  # type: ignore[arg-type]
        )
        self.last_success = Gauge(
            "outbox_relay_last_success_timestamp_seconds",
            "Unix time of the last batch published and marked.",
            multiprocess_mode="max",
            **kw,  # type: ignore[arg-type]
        )

    def batch_published(
        self,
        partition: int,
        rows: Sequence[Row],
        published: set[str],
        seconds: float,
        latencies: Sequence[float],
    ) -> None:
        tally = Tally((r.aggregate_type, r.event_type) for r in rows if str(r.id) in published)
        for (aggregate_type, event_type), count in tally.items():
            self.published.labels(aggregate_type, event_type).inc(count)
        for value in latencies:
            self.latency.observe(max(value, 0.0))
        self.batch_size.observe(len(published))
        self.batch_duration.observe(seconds)
        if published:
            self.last_success.set_to_current_time()

    def message_failed(self, error_type: str) -> None:
        self.errors.labels(error_type).inc()

    def lease_lost(self, partition: int) -> None:
        self.lease_lost_total.inc()
        self.errors.labels("lease_lost").inc()

    def circuit_changed(self, is_open: bool) -> None:
        self.circuit_open.set(1 if is_open else 0)
        if is_open:
            self.errors.labels("broker_unavailable").inc()
