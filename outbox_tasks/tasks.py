"""Celery tasks: thin wrappers over the relay. Each worker process builds its own engine and
broker publisher after fork, on first use."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from typing import Any

from celery import bootsteps
from celery.signals import worker_init, worker_process_shutdown, worker_shutdown
from celery.worker.control import control_command, inspect_command
from sqlalchemy.engine import Engine

from outbox_tasks import deadletter
from outbox_tasks.celery import app, settings
from outbox_tasks.cleanup import run_cleanup
from outbox_tasks.db import make_engine, translate_errors
from outbox_tasks.errors import BrokerUnavailable, DatabaseUnavailable
from outbox_tasks.logs import configure, event, get_logger
from outbox_tasks.metrics import (
    SNAPSHOT,
    RelayMetrics,
    enable_multiprocess,
    pool_gauge,
    process_exited,
    serve,
)
from outbox_tasks.publisher import BrokerPublisher
from outbox_tasks.relay import Relay
from outbox_tasks.status import collect_status, db_snapshot
from outbox_tasks.store.relay import PostgresRelayStore
from outbox_tasks.wakeup import WakeupListener

log = get_logger("tasks")


class _ProcessRuntime:
    """The relay of this process, rebuilt after fork (sockets are never shared across a fork)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.relay: Relay | None = None
        self.engine: Engine | None = None
        self.metrics: RelayMetrics | None = None
        self.dead_publisher: BrokerPublisher | None = None
        self.dead_publisher_pid: int | None = None

    def get_dead_publisher(self) -> BrokerPublisher:
        """Publisher to the dead-letter exchange, per process."""
        if self.dead_publisher is None or self.dead_publisher_pid != os.getpid():
            self.dead_publisher_pid = os.getpid()
            self.dead_publisher = BrokerPublisher(
                settings.effective_publish_url,
                settings.dead_letter_exchange,
                timeout_seconds=settings.broker_timeout_seconds,
            )
        return self.dead_publisher

    def get(self) -> Relay:
        if self.relay is None or self.pid != os.getpid():
            self.pid = os.getpid()
            configure()
            self.engine = engine = make_engine(settings, pool_size=2)
            publisher = BrokerPublisher(
                settings.effective_publish_url,
                settings.exchange,
                timeout_seconds=settings.broker_timeout_seconds,
            )
            if self.metrics is None:
                self.metrics = RelayMetrics()
            self.relay = Relay(
                settings,
                PostgresRelayStore(engine),
                publisher,
                owner=f"{socket.gethostname()}:{self.pid}",
                observer=self.metrics,
            )
        return self.relay

    def get_engine(self) -> Engine:
        """This process's engine (the relay's store uses it; so do the maintenance tasks)."""
        self.get()
        assert self.engine is not None
        return self.engine


runtime = _ProcessRuntime()


def _enqueue_publish(partition: int, epoch: int, partition_count: int) -> None:
    publish.apply_async(args=(partition, epoch, partition_count), expires=settings.lease_seconds)


def claim_and_dispatch(
    relay: Relay, partitions: list[int], partition_count: int | None = None
) -> list[int]:
    """Claim each partition; enqueue a publish task for every lease granted."""
    granted = []
    for partition in partitions:
        lease = relay.claim(partition, partition_count)
        if lease is not None:
            _enqueue_publish(partition, lease.epoch, lease.partition_count)
            granted.append(partition)
    return granted


@app.task(name="outbox.claim")
def claim(partition: int | None = None, partition_count: int | None = None) -> dict[str, Any]:
    """Lease partitions that have due rows (all of them when ``partition`` is None) and hand
    each lease to a publish task. Idempotent: live leases are left alone.

    ``partition_count`` is the count ``partition`` belongs to (drain chaining passes it): while
    OUTBOX_PARTITIONS is being changed, the claim may run on a worker configured with the other
    count. Granting is safe across counts (overlapping live leases are refused)."""
    relay = runtime.get()
    n = partition_count or settings.partitions
    wanted = list(range(n)) if partition is None else [partition]
    try:
        granted = claim_and_dispatch(relay, wanted, n)
    except DatabaseUnavailable as error:
        event(log, logging.WARNING, "database_unavailable", "claim skipped", error=str(error))
        return {"granted": [], "error": "database_unavailable"}
    return {"granted": granted}


@app.task(name="outbox.publish")
def publish(partition: int, epoch: int, partition_count: int) -> dict[str, Any]:
    """Publish a leased partition's due rows in order until drained or out of time."""
    relay = runtime.get()
    try:
        report = relay.publish(partition, epoch, partition_count)
    except DatabaseUnavailable as error:
        # Nothing is lost: unmarked rows stay pending; the lease expires; a later claim resends.
        event(
            log,
            logging.WARNING,
            "database_unavailable",
            "publish stopped",
            error=str(error),
            partition=partition,
        )
        return {"partition": partition, "epoch": epoch, "error": "database_unavailable"}
    if report.more and not report.circuit_open and not report.lease_lost:
        # Drain chaining: a full partition does not wait for the next beat tick.
        claim.apply_async(
            args=(partition, partition_count),
            expires=max(settings.poll_interval_seconds * 3, 1.0),
        )
    return report.as_dict()


@app.task(name="outbox.dead_letter")
def dead_letter() -> dict[str, Any]:
    """Record exhausted messages, publish their copies to the dead-letter exchange, drop the
    rows of skip-policy event types (their aggregates flow on)."""
    engine = runtime.get_engine()
    try:
        with translate_errors("dead_letter"):
            return deadletter.collect(engine, settings, runtime.get_dead_publisher())
    except (DatabaseUnavailable, BrokerUnavailable) as error:
        event(
            log, logging.WARNING, "dead_letter_skipped", "dead-letter run skipped", error=str(error)
        )
        return {"error": type(error).__name__}


@app.task(name="outbox.cleanup")
def cleanup() -> dict[str, Any]:
    """Remove published rows (OUTBOX_CLEANUP_MODE), old consumer receipts and resolved dead
    letters in short batches; one run at a time per database."""
    engine = runtime.get_engine()
    try:
        with translate_errors("cleanup"):
            report = run_cleanup(
                engine, settings, max_seconds=min(settings.cleanup_interval_seconds, 900.0)
            )
    except DatabaseUnavailable as error:
        event(log, logging.WARNING, "database_unavailable", "cleanup stopped", error=str(error))
        return {"error": "database_unavailable"}
    return report.as_dict()


@app.task(name="outbox.export_metrics")
def export_metrics() -> dict[str, float]:
    """Refresh the database-derived gauges: one reading, broadcast to every worker, whose main
    process serves it on its metrics endpoint."""
    engine = runtime.get_engine()
    try:
        with translate_errors("export_metrics"):
            snapshot = db_snapshot(collect_status(engine, settings))
    except DatabaseUnavailable as error:
        event(
            log, logging.WARNING, "database_unavailable", "metrics export skipped", error=str(error)
        )
        return {}
    app.control.broadcast("outbox_metrics_snapshot", arguments={"snapshot": snapshot})
    return snapshot


@control_command(args=[("snapshot", dict)], signature="<snapshot>")
def outbox_metrics_snapshot(state: Any, snapshot: dict[str, float]) -> dict[str, bool]:
    """Remote control command: store the latest database snapshot for the metrics endpoint."""
    SNAPSHOT.update(snapshot, time.time())
    return {"ok": True}


@inspect_command()
def outbox_circuit(state: Any) -> dict[str, Any]:
    """Inspect command for `outbox-tasks status`: is the broker circuit open in this worker's
    pool? (Read from the pool's metric files, where every process records its circuit.)"""
    directory = _MetricsServer.directory
    if directory is None:
        return {"open": None}
    value = pool_gauge(directory, "outbox_circuit_open")
    return {"open": None if value is None else bool(value)}


class _MetricsServer:
    """The worker's Prometheus endpoint (main process), summing the pool's metrics."""

    directory: str | None = None

    @classmethod
    def start(cls) -> None:
        if not settings.metrics_port or cls.directory is not None:
            return
        cls.directory = tempfile.mkdtemp(prefix="outbox-metrics-")
        # Before the pool forks, so every child writes its metrics where we read them.
        enable_multiprocess(cls.directory)
        try:
            serve(settings.metrics_port, cls.directory)
        except OSError as error:
            event(
                log,
                logging.WARNING,
                "metrics_unavailable",
                "metrics endpoint not started; publishing is not affected",
                port=settings.metrics_port,
                error=str(error),
            )
            return
        event(
            log, logging.INFO, "metrics_serving", "metrics endpoint up", port=settings.metrics_port
        )

    @classmethod
    def stop(cls) -> None:
        if cls.directory is not None:
            shutil.rmtree(cls.directory, ignore_errors=True)
            cls.directory = None


@worker_init.connect
def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    configure()
    try:
        _MetricsServer.start()
    except Exception as error:
        event(log, logging.WARNING, "metrics_unavailable", "metrics setup failed", error=str(error))


@worker_process_shutdown.connect
def _on_pool_process_exit(pid: int | None = None, **kwargs: Any) -> None:
    if _MetricsServer.directory is not None:
        with contextlib.suppress(Exception):
            process_exited(os.getpid())


@worker_shutdown.connect
def _on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    _MetricsServer.stop()


class WakeupStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs the NOTIFY listener in the worker's main process (OUTBOX_WAKEUP_ENABLED)."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.listener: WakeupListener | None = None
        self.relay: Relay | None = None
        self.engine: Engine | None = None

    def start(self, worker: Any) -> None:
        if not settings.wakeup_enabled:
            return
        configure()
        self.engine = make_engine(settings, pool_size=1, application_name="outbox_tasks.wakeup")
        self.relay = Relay(
            settings,
            PostgresRelayStore(self.engine),
            publisher=_NoPublisher(),
            owner=f"{socket.gethostname()}:{os.getpid()}:wakeup",
        )
        relay = self.relay

        def on_partitions(partitions: set[int]) -> None:
            claim_and_dispatch(relay, sorted(partitions))

        self.listener = WakeupListener(
            settings.libpq_url,
            settings.partitions,
            on_partitions,
            debounce_seconds=settings.wakeup_debounce_seconds,
        )
        self.listener.start()

    def stop(self, worker: Any) -> None:
        if self.listener is not None:
            self.listener.stop()
        if self.engine is not None:
            self.engine.dispose()


class _NoPublisher:
    """The wake-up relay only claims; publishing happens in publish tasks."""

    def publish_batch(self, messages: Any) -> Any:
        raise RuntimeError("the wake-up listener does not publish")


app.steps["worker"].add(WakeupStep)
