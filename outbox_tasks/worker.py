"""The worker process around the tasks: its per-process runtime (engine, relay, publishers,
rebuilt after fork), the metrics endpoint and the Celery signals that run it, the wake-up
bootstep, and the remote-control commands (their client side is ``outbox_tasks.control``).

A Celery worker imports this module on start (``outbox_tasks.celery.WORKER_MODULES``).
Settings come from the app's module, built once per process.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from celery import bootsteps
from celery.signals import (
    before_task_publish,
    worker_init,
    worker_process_shutdown,
    worker_shutdown,
    worker_shutting_down,
)
from celery.worker import state as worker_state
from celery.worker.control import control_command, inspect_command
from sqlalchemy.engine import Engine

from outbox_tasks.celery import PUBLISH_TASK, app, settings
from outbox_tasks.db import keepalive_args, make_engine, relay_idle_in_transaction
from outbox_tasks.deployment import (
    DATABASE_HEADER,
    NamespaceConflict,
    NamespaceLease,
    claim_namespace,
    foreign_reason,
    identify,
)
from outbox_tasks.errors import describe_error
from outbox_tasks.logs import configure, event, get_logger
from outbox_tasks.metrics import (
    SNAPSHOT,
    RelayMetrics,
    WakeupMetrics,
    enable_multiprocess,
    pid_alive,
    pool_gauge,
    process_exited,
    serve,
)
from outbox_tasks.publisher import BrokerPublisher
from outbox_tasks.relay import Relay, claim_partition, hand_back
from outbox_tasks.settings import Settings
from outbox_tasks.store.records import Lease
from outbox_tasks.store.relay import PostgresRelayStore
from outbox_tasks.wakeup import NotificationWaiter, WakeupListener

log = get_logger("worker")


class Claimer(Protocol):
    """Claims partitions and hands back a lease it could not dispatch (a Relay is one)."""

    def claim(
        self, partition: int, partition_count: int | None = None, *, queued: bool = False
    ) -> Lease | None: ...

    def hand_back(self, lease: Lease) -> bool: ...


# Set when this worker starts shutting down; shared memory made before the pool forks.
_SHUTTING_DOWN = multiprocessing.RawValue("b", 0)


def shutting_down() -> bool:  # in any of this worker's processes
    return bool(_SHUTTING_DOWN.value)


class ProcessRuntime:
    """What one worker process uses: one engine (the relay and the maintenance tasks share it),
    the relay, the dead-letter publisher. Built on first use and rebuilt in a forked child:
    sockets are never shared across a fork."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pid: int | None = None
        self._engine: Engine | None = None
        self._relay: Relay | None = None
        self._dead_publisher: BrokerPublisher | None = None
        self._waiter: NotificationWaiter | None = None
        # Kept across forks: the metric objects belong to the process registry, not a socket.
        self._metrics: RelayMetrics | None = None
        # Pool processes of this worker (set in the main process before the pool forks).
        self.concurrency: int | None = None

    def _this_process(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            configure()
            self._engine = None
            self._relay = None
            self._dead_publisher = None
            self._waiter = None  # the parent's socket: never used (nor closed) here

    def engine(self) -> Engine:
        """This process's engine (a pool of two connections)."""
        self._this_process()
        if self._engine is None:
            self._engine = make_engine(
                self.settings,
                pool_size=2,
                idle_in_transaction_seconds=relay_idle_in_transaction(self.settings),
            )
        return self._engine

    def relay(self) -> Relay:
        """This process's relay, publishing to OUTBOX_PUBLISH_URL / OUTBOX_EXCHANGE."""
        self._this_process()
        if self._relay is None:
            publisher = BrokerPublisher(
                self.settings.effective_publish_url,
                self.settings.exchange,
                timeout_seconds=self.settings.broker_timeout_seconds,
            )
            self._relay = Relay(
                self.settings,
                PostgresRelayStore(self.engine()),
                publisher,
                owner=f"{socket.gethostname()}:{self._pid}",
                observer=self.metrics(),
            )
        return self._relay

    def metrics(self) -> RelayMetrics:
        """The relay's metrics, created once per worker (kept across forks)."""
        if self._metrics is None:
            self._metrics = RelayMetrics()
        return self._metrics

    def waiter(self) -> NotificationWaiter | None:
        """This process's LISTEN connection for serving publish tasks; None with the wake-up
        path off (OUTBOX_WAKEUP_ENABLED=false)."""
        self._this_process()
        if not self.settings.wakeup_enabled:
            return None
        if self._waiter is None:
            self._waiter = NotificationWaiter(
                self.settings.libpq_url,
                application_name=f"{self.settings.application_name}.serve",
                connect_timeout=max(2, round(self.settings.database_connect_timeout_seconds)),
                deadline_seconds=self.settings.database_connect_timeout_seconds,
                connect_options=keepalive_args(self.settings),
            )
        return self._waiter

    def share(self) -> int:
        """How many partitions one process serves at most: its fair share of this worker's
        (all of them when the pool size is unknown)."""
        if not self.concurrency:
            return self.settings.partitions
        return -(-self.settings.partitions // self.concurrency)

    def dead_publisher(self) -> BrokerPublisher:
        """This process's publisher to the dead-letter exchange."""
        self._this_process()
        if self._dead_publisher is None:
            self._dead_publisher = BrokerPublisher(
                self.settings.effective_publish_url,
                self.settings.dead_letter_exchange,
                timeout_seconds=self.settings.broker_timeout_seconds,
            )
        return self._dead_publisher


# The one place the worker side takes the settings from: the tasks and steps use runtime.settings.
runtime = ProcessRuntime(settings)


@dataclass
class Dispatched:
    """What :func:`claim_and_dispatch` did: the partitions whose publish task is queued, and
    why it stopped early (the Celery broker refused a task), if it did."""

    granted: list[int] = field(default_factory=list)
    error: str | None = None


def claim_and_dispatch(
    claimer: Claimer,
    partitions: Iterable[int],
    partition_count: int | None = None,
    *,
    at_most: int | None = None,
) -> Dispatched:
    """Claim each partition (at most ``at_most`` granted); enqueue an ``outbox.publish`` task
    for every lease granted (it expires with the lease). The lease is marked queued until the
    task takes it over, so a serving task may take it if the queue holds it up
    (``outbox_tasks.serving``).

    A lease whose task could not be enqueued (Celery's broker unreachable or timing out, or any
    other error of the send) is handed back at once, so the partition does not wait out
    ``OUTBOX_LEASE_SECONDS``, and the remaining partitions are left to the next tick. Raises
    ``DatabaseUnavailable`` from the claims (a lease granted before stays until it expires)."""
    dispatched = Dispatched()
    for partition in partitions:
        if at_most is not None and len(dispatched.granted) >= at_most:
            break
        lease = claimer.claim(partition, partition_count, queued=True)
        if lease is None:
            continue
        try:
            app.send_task(
                PUBLISH_TASK,
                args=(partition, lease.epoch, lease.partition_count),
                expires=runtime.settings.lease_seconds,
            )
        except Exception as error:
            dispatched.error = describe_error(error)
            event(
                log,
                logging.WARNING,
                "publish_enqueue_failed",
                "could not enqueue a publish task; its lease is handed back",
                partition=partition,
                epoch=lease.epoch,
                error=dispatched.error,
            )
            claimer.hand_back(lease)
            return dispatched
        dispatched.granted.append(partition)
    return dispatched


# --- remote control ----------------------------------------------------------------------------


# Their names are the client's (``outbox_tasks.control``): SNAPSHOT_COMMAND, CIRCUIT_COMMAND.
@control_command(args=[("snapshot", dict)], signature="<snapshot>")
def outbox_metrics_snapshot(state: Any, snapshot: dict[str, float]) -> dict[str, bool]:
    """Remote control command: store the latest database snapshot for the metrics endpoint."""
    SNAPSHOT.update(snapshot, time.time())
    return {"ok": True}


@inspect_command()
def outbox_circuit(state: Any) -> dict[str, Any]:
    """Inspect command for `outbox-tasks status`: is the broker circuit open in this worker's
    pool? (Read from the pool's metric files, where every process records its circuit.)"""
    directory = MetricsServer.directory
    if directory is None:
        return {"open": None}
    value = pool_gauge(directory, "outbox_circuit_open", alive=MetricsServer.alive)
    return {"open": None if value is None else bool(value)}


# --- the metrics endpoint -----------------------------------------------------------------------


class MetricsServer:
    """The worker's Prometheus endpoint (main process), summing the pool's metrics.

    Before every scrape and every ``outbox_circuit`` reading, the gauges of processes no longer
    in the pool are dropped (:meth:`alive`): a pool process killed with ``kill -9`` never says
    it exited, and its open circuit must not outlive it.
    """

    directory: str | None = None
    worker: Any = None  # the WorkController, whose pool lists the live processes

    @classmethod
    def alive(cls, pid: int) -> bool:
        """Is ``pid`` this main process or a live process of its pool?"""
        if not pid_alive(pid):
            return False
        if pid == os.getpid():
            return True
        try:
            return pid in cls.worker.pool.info["processes"]
        except Exception:  # no pool yet, or a pool without processes (solo, threads)
            return True

    @classmethod
    def start(cls, port: int) -> None:
        if not port or cls.directory is not None:
            return
        cls.directory = tempfile.mkdtemp(prefix="outbox-metrics-")
        # Before the pool forks, so every child writes its metrics where we read them.
        enable_multiprocess(cls.directory)
        # Created here, in the main process, so every known label is served at 0 from the
        # first scrape (the pool's processes inherit them).
        runtime.metrics()
        try:
            serve(port, cls.directory, alive=cls.alive)
        except OSError as error:
            event(
                log,
                logging.WARNING,
                "metrics_unavailable",
                "metrics endpoint not started; publishing is not affected",
                port=port,
                error=str(error),
            )
            return
        event(log, logging.INFO, "metrics_serving", "metrics endpoint up", port=port)

    @classmethod
    def stop(cls) -> None:
        if cls.directory is not None:
            shutil.rmtree(cls.directory, ignore_errors=True)
            cls.directory = None


# --- this deployment (outbox_tasks.deployment) --------------------------------------------------


class Deployment:
    """The worker's database identity (learnt at start, inherited by the pool) and the lease
    on its namespace."""

    identity: str | None = None
    lease: NamespaceLease | None = None

    @classmethod
    def start(cls) -> None:
        """Learn the database's identity and claim the namespace on the broker. A namespace
        another database holds stops the worker with one line; an unreachable database or
        broker only skips the check (the per-task check still guards)."""
        try:
            engine = make_engine(settings, pool_size=1, application_name="outbox_tasks.identity")
            try:
                cls.identity = identify(engine)
            finally:
                engine.dispose()
            if claim_namespace(settings, cls.identity):
                cls.lease = NamespaceLease(settings, cls.identity)
                cls.lease.start()
        except NamespaceConflict as error:
            sys.stderr.write(f"outbox_tasks: configuration error: {error}\n")
            raise SystemExit(2) from None
        except Exception as error:
            event(
                log,
                logging.WARNING,
                "namespace_unchecked",
                "could not check that this deployment's namespace is its own",
                namespace=settings.namespace,
                error=str(error),
            )

    @classmethod
    def stop(cls) -> None:
        if cls.lease is not None:
            cls.lease.stop()


def refuse_foreign(request: Any) -> dict[str, Any] | None:
    """For a task of another deployment: log it and return the task's result (it does
    nothing); None for our own tasks."""
    reason = foreign_reason(request, settings, Deployment.identity)
    if reason is None:
        return None
    event(
        log,
        logging.ERROR,
        "foreign_task",
        "task of another deployment dropped, not acted on",
        task=getattr(request, "task", None),
        reason=reason,
    )
    return {"ignored": reason}


@before_task_publish.connect
def _stamp_database(
    sender: str | None = None, headers: dict[str, Any] | None = None, **kwargs: Any
) -> None:
    if headers is not None and Deployment.identity is not None:
        headers.setdefault(DATABASE_HEADER, Deployment.identity)


@worker_init.connect
def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    configure()
    MetricsServer.worker = sender
    Deployment.start()
    runtime.concurrency = getattr(sender, "concurrency", None)
    try:
        MetricsServer.start(runtime.settings.metrics_port)
    except Exception as error:
        event(log, logging.WARNING, "metrics_unavailable", "metrics setup failed", error=str(error))
    # Before the pool forks: objects made so far (imports, the app) leave the collector's
    # care, so the children do not copy the pages the collector would write to (about
    # 25 MiB of PSS less with two pool processes).
    gc.collect()
    gc.freeze()


@worker_process_shutdown.connect
def _on_pool_process_exit(pid: int | None = None, **kwargs: Any) -> None:
    if MetricsServer.directory is not None:
        with contextlib.suppress(Exception):
            process_exited(os.getpid())


@worker_shutting_down.connect
def _on_worker_shutting_down(sender: Any = None, **kwargs: Any) -> None:
    _SHUTTING_DOWN.value = 1


@worker_shutdown.connect
def _on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    MetricsServer.stop()
    Deployment.stop()


# --- the wake-up bootstep -----------------------------------------------------------------------


class StoreClaimer:
    """Claims for the wake-up listener, which only claims (publish tasks publish): no relay,
    no publisher, the relay's claim on ``engine``."""

    def __init__(self, settings: Settings, engine: Engine, owner: str) -> None:
        self.settings = settings
        self.store = PostgresRelayStore(engine)
        self.owner = owner

    def claim(
        self, partition: int, partition_count: int | None = None, *, queued: bool = False
    ) -> Lease | None:
        return claim_partition(
            self.store,
            self.settings,
            owner=self.owner,
            partition=partition,
            partition_count=partition_count,
            queued=queued,
        )

    def hand_back(self, lease: Lease) -> bool:
        return hand_back(self.store, lease)


def free_pool_processes(worker: Any) -> int | None:
    """Pool processes of ``worker`` (Celery's WorkController) with no task received for them
    (running or waiting); None when the pool size is unknown."""
    concurrency = getattr(worker, "concurrency", None)
    if not concurrency:
        return None
    return max(0, int(concurrency) - len(worker_state.reserved_requests))


class WakeupStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs the NOTIFY listener in the worker's main process (OUTBOX_WAKEUP_ENABLED)."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.listener: WakeupListener | None = None
        self.engine: Engine | None = None

    def start(self, worker: Any) -> None:
        settings = runtime.settings
        if not settings.wakeup_enabled:
            return
        configure()
        self.engine = make_engine(
            settings,
            pool_size=1,
            application_name="outbox_tasks.wakeup",
            idle_in_transaction_seconds=relay_idle_in_transaction(settings),
        )
        owner = f"{socket.gethostname()}:{os.getpid()}:wakeup"
        claimer = StoreClaimer(settings, self.engine, owner)
        gauge = WakeupMetrics()
        gauge.listening(False)

        def on_partitions(partitions: set[int]) -> None:
            # A publish task per free pool process at most: serving tasks (which hear the same
            # notification) claim the rest in place, with no task queued behind them.
            free = free_pool_processes(worker)
            if free and not shutting_down():  # a stopping worker runs no more tasks
                claim_and_dispatch(claimer, sorted(partitions), at_most=free)

        self.listener = WakeupListener.from_settings(
            settings, on_partitions, on_listening=gauge.listening
        )
        self.listener.start()

    def stop(self, worker: Any) -> None:
        _SHUTTING_DOWN.value = 1  # any shutdown (also a remote one) runs this before the pool
        if self.listener is not None:
            self.listener.stop()
        if self.engine is not None:
            self.engine.dispose()


app.steps["worker"].add(WakeupStep)
