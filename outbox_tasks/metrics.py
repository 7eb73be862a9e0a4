"""Prometheus metrics the relay counts. Names are part of the contract (DESIGN 7).

Labels stay low-cardinality: aggregate and event *types*, error *types*, never an id. Every
update goes through the relay's safe observer, so a metrics failure never breaks publishing.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from outbox_tasks.broker import (
    BROKER_NACK,
    BROKER_UNAVAILABLE,
    INVALID_MESSAGE,
    MESSAGE_REJECTED,
    UNKNOWN_ERROR,
)
from outbox_tasks.store.records import Row

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
    ("outbox_relay_stalled_seconds", "gauge", ()),
    ("outbox_metrics_snapshot_timestamp_seconds", "gauge", ()),
    ("outbox_circuit_open", "gauge", ()),
    ("outbox_wakeup_listening", "gauge", ()),
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

# Every value ``outbox_publish_errors_total{error_type}`` can take. Each starts at 0 as soon as
# the metrics exist, so a dashboard shows 0 rather than "no data" and rate() works from the start.
# The classification is ``outbox_tasks.sending``'s (docs/runbook.md has an entry for each).
PUBLISH_ERROR_TYPES: tuple[str, ...] = (
    BROKER_UNAVAILABLE,
    MESSAGE_REJECTED,
    BROKER_NACK,
    INVALID_MESSAGE,
    UNKNOWN_ERROR,
    "lease_lost",
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
    """The relay's counters; implements protocols.Observer."""

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
            "Publish errors by type (" + ", ".join(PUBLISH_ERROR_TYPES) + ").",
            ["error_type"],
            **kw,  # type: ignore[arg-type]
        )
        for error_type in PUBLISH_ERROR_TYPES:
            self.errors.labels(error_type)  # exported at 0 from now on
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
            multiprocess_mode="livemax",
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


class WakeupMetrics:
    """The wake-up listener's state, set by the worker's main process (where it runs)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        self.gauge = Gauge(
            "outbox_wakeup_listening",
            "1 while the wake-up listener holds a live LISTEN connection; 0 while it is down "
            "(latency falls back to the poll interval).",
            multiprocess_mode="livemax",
            **kw,  # type: ignore[arg-type]
        )

    def listening(self, is_listening: bool) -> None:
        self.gauge.set(1 if is_listening else 0)


# --- database-derived gauges ----------------------------------------------------------------
# ``outbox.export_metrics`` computes them on a schedule (never per scrape) and broadcasts the
# snapshot to every worker, whose main process serves it: every endpoint reports the same fresh
# values, and the database is queried once per interval for the whole cluster.

DB_GAUGES: dict[str, str] = {
    "outbox_pending_messages": "Unpublished rows in the outbox (dead letters not included).",
    "outbox_oldest_pending_age_seconds": "Age of the oldest unpublished row (no dead letters).",
    "outbox_dead_letter_messages": "Dead-lettered messages not yet replayed or discarded.",
    "outbox_parked_aggregates": "Aggregates held behind a dead letter.",
    "outbox_partitions_unowned": "Partitions with due rows and no live lease.",
    "outbox_table_dead_tuples": "Dead tuples in the outbox table (bloat until vacuumed).",
    "outbox_table_last_autovacuum_timestamp_seconds": "Unix time of the last autovacuum.",
    "outbox_relay_stalled_seconds": (
        "How long due rows have waited while nothing was published (0: not stalled)."
    ),
}

SNAPSHOT_TIMESTAMP = "outbox_metrics_snapshot_timestamp_seconds"


class SnapshotCollector(Collector):
    """Serves the latest database snapshot received by this process, and when it came
    (``outbox_metrics_snapshot_timestamp_seconds``; the collector's creation time until the
    first one): a snapshot that stops coming means the relay cannot reach its database or its
    Celery broker, or beat is down."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.values: dict[str, float] = {}
        self.received_at: float | None = None
        self.started_at = clock()

    def update(self, values: dict[str, float], received_at: float) -> None:
        self.values = {k: float(v) for k, v in values.items() if k in DB_GAUGES}
        self.received_at = received_at

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, value in self.values.items():
            family = GaugeMetricFamily(name, DB_GAUGES[name])
            family.add_metric([], value)
            yield family
        stamp = GaugeMetricFamily(
            SNAPSHOT_TIMESTAMP,
            "Unix time the latest database snapshot arrived (process start until one does).",
        )
        stamp.add_metric([], self.received_at or self.started_at)
        yield stamp


SNAPSHOT = SnapshotCollector()


def enable_multiprocess(directory: str) -> None:
    """Make metrics created from now on (in this process and its forked children) write to
    ``directory``, so the parent can serve the sum over its pool. Must run before the fork."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def serve(
    port: int,
    directory: str,
    address: str = "0.0.0.0",
    alive: Callable[[int], bool] | None = None,
) -> CollectorRegistry:
    """Serve the pool's metrics plus the database snapshot on ``port`` (Prometheus text format).

    Before every scrape, the live gauges of processes that are gone (``alive``, default
    :func:`pid_alive`) are dropped, so a pool process killed with its circuit open does not
    keep ``outbox_circuit_open`` at 1.
    """
    registry = CollectorRegistry()
    registry.register(PoolCollector(directory, alive))
    registry.register(SNAPSHOT)
    start_http_server(port, addr=address, registry=registry)
    return registry


class PoolCollector(Collector):
    """The sum over a pool's metric files, read after dropping the dead processes' gauges."""

    def __init__(self, directory: str, alive: Callable[[int], bool] | None = None) -> None:
        self.directory = directory
        self.alive = alive
        self._inner = multiprocess.MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        prune_dead_processes(self.directory, self.alive)
        metrics: Iterable[Metric] = self._inner.collect()  # type: ignore[no-untyped-call]
        return metrics


def pool_gauge(
    directory: str, name: str, alive: Callable[[int], bool] | None = None
) -> float | None:
    """The value the endpoint would serve for one of the pool's gauges (e.g. the circuit), read
    the same way: dead processes' gauges dropped first. None when no live process has it."""
    values_seen = [
        sample.value
        for family in PoolCollector(directory, alive).collect()
        if family.name == name
        for sample in family.samples
    ]
    return max(values_seen) if values_seen else None


def process_exited(pid: int) -> None:
    """Drop a dead pool process's live gauges (its counters still count)."""
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# ``gauge_livemax_1234.db``: prometheus_client's per-process file of the "live" gauge modes,
# the only files that must disappear with their process (counters and histograms keep counting).
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(?P<pid>\d+)\.db$")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a running process (not a zombie waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    with contextlib.suppress(OSError):
        # Linux: "1234 (name) Z ...": a killed child stays a zombie until its parent reaps it.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    return True


def prune_dead_processes(directory: str, alive: Callable[[int], bool] | None = None) -> list[int]:
    """Drop the live gauges of every process in ``directory`` for which ``alive`` (default
    :func:`pid_alive`) is false: a pool process killed with ``kill -9`` never says it exited.
    Returns the pids dropped. Never raises for a file that vanished meanwhile."""
    check = alive or pid_alive
    dropped: set[int] = set()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        match = _LIVE_GAUGE_FILE.match(name)
        if match is None:
            continue
        pid = int(match["pid"])
        if pid in dropped or check(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
        dropped.add(pid)
    return sorted(dropped)
