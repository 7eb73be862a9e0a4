"""The consumer process: :class:`Consumer` connects, takes its partitions, handles messages one
at a time, evicts silent members, gives up when it goes silent itself, and reconnects after
outages."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import threading
import time
from collections import Counter
from typing import Any

from sqlalchemy.engine import Engine

from outbox_tasks.broker import broker_call, broker_errors, is_amqp, released, safe_url
from outbox_tasks.consumer.admin import lag
from outbox_tasks.consumer.brokers import BrokerWriter, kombu_queues, prepare_partitions
from outbox_tasks.consumer.events import Event
from outbox_tasks.consumer.group import ConsumerGroup
from outbox_tasks.consumer.keeper import ConnectionsInUse, Keeper, check_bounds
from outbox_tasks.consumer.locks import INSTANCE_BASE, INSTANCE_SPAN, Locks, group_lock_key
from outbox_tasks.consumer.metrics import ConsumerMetrics, default_metrics
from outbox_tasks.consumer.processing import (
    REQUEUED,
    Delivery,
    GroupProcessor,
)
from outbox_tasks.consumer.sources import AmqpSource, RedisSource
from outbox_tasks.errors import (
    BrokerUnavailable,
    ConfigurationError,
    DatabaseUnavailable,
    PartitionLost,
    describe_error,
)
from outbox_tasks.logs import event as log_event
from outbox_tasks.logs import get_logger
from outbox_tasks.retry import backoff_delay
from outbox_tasks.settings import Settings

log = get_logger("consumer")


class Consumer:
    """Runs one consumer group in this process until :meth:`stop` (or the ``stop`` event).

    Single-threaded: one message at a time. Stopping finishes the message in hand (a retry wait
    is cut short and the message is given back to the broker), then gives back what was
    prefetched and releases the partitions. Broker and database outages are waited out with
    backoff; nothing is acknowledged before the handler's transaction has committed.

    Ownership (ordered groups, and unordered ones on Redis) is a PostgreSQL session kept alive
    by a heartbeat thread (:mod:`.keeper`): every ``heartbeat_interval_seconds`` a statement
    with a deadline of twice that. A member silent for ``takeover_seconds`` is evicted by the
    others; a member whose heartbeat fails gives everything up well before that. All members of
    a group must use the same values.
    """

    def __init__(
        self,
        group: ConsumerGroup,
        settings: Settings,
        *,
        engine: Engine | None = None,
        url: str | None = None,
        metrics: ConsumerMetrics | None = None,
        export_lag: bool = False,
        rebalance_interval_seconds: float = 1.0,
        reclaim_interval_seconds: float = 5.0,
        lag_interval_seconds: float = 15.0,
        poll_seconds: float = 0.2,
        heartbeat_interval_seconds: float = 1.0,
        takeover_seconds: float = 8.0,
    ) -> None:
        check_bounds(heartbeat_interval_seconds, 2 * heartbeat_interval_seconds, takeover_seconds)
        self.group = group
        self.settings = settings
        self.url = url or settings.effective_publish_url
        self.amqp = is_amqp(self.url)
        self.metrics = metrics if metrics is not None else default_metrics()
        self.export_lag = export_lag
        self.rebalance_interval = rebalance_interval_seconds
        self.reclaim_interval = reclaim_interval_seconds
        self.lag_interval = lag_interval_seconds
        self.poll_seconds = poll_seconds
        self.heartbeat_interval = heartbeat_interval_seconds
        self.takeover_seconds = takeover_seconds
        self.instance = random.randrange(INSTANCE_SPAN)
        self.outcomes: Counter[str] = Counter()
        self.ready = threading.Event()
        self._engine = engine
        self._stop = threading.Event()
        self._source: AmqpSource | RedisSource | None = None
        self._locks: Locks | None = None
        self._keeper: Keeper | None = None
        self._held: set[int] = set()
        self._processor: GroupProcessor | None = None
        self._queues: dict[str, Any] = {}
        self._writer: BrokerWriter | None = None
        # Handling connections checked out of the engine now, shut down when ownership is lost.
        self._in_use = ConnectionsInUse()

    @property
    def held_partitions(self) -> frozenset[int]:
        return frozenset(self._held)

    def stop(self) -> None:
        self._stop.set()

    def run(self, stop: threading.Event | None = None) -> None:
        if stop is not None:
            self._stop = stop
        owns_engine = self._engine is None
        from outbox_tasks.db import make_engine

        engine = self._engine or make_engine(
            self.settings, application_name="outbox_tasks.consumer", pool_size=2
        )
        timeout = self.settings.broker_timeout_seconds
        writer = BrokerWriter(self.url, timeout)
        self._writer = writer
        self._queues = {
            q.name: q for q in kombu_queues(self.group, self.settings.exchange, self.amqp)
        }
        self._processor = GroupProcessor(
            self.group,
            engine,
            writer,
            metrics=self.metrics,
            sleep=self._pause,
            on_outcome=self._count,
            forward=self._forward,
        )
        self._in_use.watch(engine)
        log_event(
            log,
            logging.INFO,
            "consumer_started",
            "consumer starting",
            group=self.group.name,
            bindings=list(self.group.bindings),
            partitions=self.group.partitions,
            broker=safe_url(self.url),
            pid=os.getpid(),
        )
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self._connected()
                except ConfigurationError:
                    raise
                except Exception as error:
                    failures += 1
                    delay = backoff_delay(
                        failures, base_seconds=0.5, max_seconds=10.0, jitter=random.random()
                    )
                    known = isinstance(
                        error, (BrokerUnavailable, DatabaseUnavailable, *broker_errors(self.url))
                    )
                    log_event(
                        log,
                        logging.WARNING if known else logging.ERROR,
                        "consumer_disconnected",
                        "consumer lost its broker or database; reconnecting",
                        group=self.group.name,
                        error=describe_error(error),
                        retry_in_seconds=round(delay, 3),
                        exc_info=not known,
                    )
                    self._teardown()
                    self._stop.wait(delay)
                else:
                    failures = 0
        finally:
            self._teardown()
            writer.close()
            self._in_use.unwatch(engine)
            if owns_engine:
                engine.dispose()
            log_event(
                log,
                logging.INFO,
                "consumer_stopped",
                "consumer stopped",
                group=self.group.name,
                outcomes=dict(self.outcomes),
            )

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def _connected(self) -> None:
        group = self.group
        timeout = self.settings.broker_timeout_seconds
        source: AmqpSource | RedisSource
        if self.amqp:
            source = AmqpSource(self.url, group.prefetch, self._on_delivery, timeout)
        else:
            source = RedisSource(self.url, group, self._on_delivery, timeout, gate=self._may_read)
        self._source = source
        source.connect()
        previous: int | None = None
        if group.ordered or not self.amqp:
            locks = Locks(self.settings, group, deadline_seconds=2 * self.heartbeat_interval)
            self._locks = locks
            locks.connect()
            locks.join(group.partitions)
            keeper = Keeper(
                locks,
                interval_seconds=self.heartbeat_interval,
                on_lost=lambda reason: self._give_up(locks, source),
                group=group.name,
            )
            self._keeper = keeper
            keeper.start()
            if group.ordered:
                previous = locks.layout()
                with (
                    released(
                        self.url,
                        connect_timeout=timeout,
                        transport_options=_timeouts(self.amqp, timeout),
                    ) as conn,
                    broker_call(self.url, "preparing the group's partition queues"),
                ):
                    prepare_partitions(conn, group, self.settings.exchange, previous)
            if not group.ordered and isinstance(source, RedisSource):
                if not locks.try_lock(INSTANCE_BASE + self.instance):
                    raise DatabaseUnavailable("consumer instance lock is taken; retrying")
                source.register_instance(self.instance)
        source.declare(list(self._queues.values()))
        if group.ordered and previous != group.partitions:
            assert self._locks is not None
            self._locks.record_layout(group.partitions)
        if not group.ordered:
            source.open(group.queue, None)
        next_rebalance = 0.0
        next_reclaim = 0.0
        next_lag = time.monotonic() + 1.0
        announced = False
        while not self._stop.is_set():
            self._check_owner()
            now = time.monotonic()
            if group.ordered and now >= next_rebalance:
                self._rebalance()
                next_rebalance = now + self.rebalance_interval
            if isinstance(source, RedisSource) and not group.ordered and now >= next_reclaim:
                self._reclaim(source)
                next_reclaim = now + self.reclaim_interval
            if self.export_lag and now >= next_lag:
                self._export_lag()
                next_lag = now + self.lag_interval
            if not announced:
                announced = True
                self.ready.set()
                log_event(
                    log,
                    logging.INFO,
                    "consumer_ready",
                    "consumer ready",
                    group=group.name,
                    queues=list(group.queues),
                    partitions_held=sorted(self._held),
                    lock_key=group_lock_key(group.name),
                    pid=os.getpid(),
                )
            if not self._may_read():
                # The heartbeat is late (e.g. this process was paused): read nothing until it
                # succeeds again or gives up.
                self._stop.wait(self.poll_seconds)
                continue
            source.drain(self.poll_seconds)

    # -- ownership ------------------------------------------------------------------------------

    def _may_read(self) -> bool:
        keeper = self._keeper
        return keeper is None or keeper.fresh()

    def _check_owner(self) -> None:
        keeper = self._keeper
        if keeper is not None and keeper.lost.is_set():
            raise DatabaseUnavailable("this process's heartbeat failed: it gave up its partitions")

    def _give_up(self, locks: Locks, source: AmqpSource | RedisSource) -> None:
        """From the keeper's thread, when the heartbeat failed: stop reading (the gate is
        closed already), let the broker requeue what this process holds, and make every
        database call of the main thread fail at once."""
        source.abandon()
        locks.abandon()
        self._in_use.shut_down_all()

    def _pause(self, seconds: float) -> bool:
        """Wait between attempts; False (stop retrying) when stopping or no longer the owner."""
        end = time.monotonic() + seconds
        while True:
            if self._stop.is_set() or not self._may_read():
                return False
            left = end - time.monotonic()
            if left <= 0:
                return True
            self._stop.wait(min(left, 0.1))

    def _forward(self, delivery: Delivery, event: Event, partition: int) -> None:
        writer = self._writer
        assert writer is not None
        queue = self.group.partition_queue(partition)
        headers = {k: v for k, v in delivery.headers.items()}
        writer.send(queue, delivery.body, headers, str(event.id), declare=self._queues[queue])

    def _on_delivery(self, delivery: Delivery, partition: int | None) -> None:
        processor = self._processor
        assert processor is not None
        if (
            self._stop.is_set()
            or (partition is not None and partition not in self._held)
            or not self._may_read()
        ):
            delivery.requeue()
            self._check_owner()
            return
        fence = self._locks.fence(partition) if self._locks and partition is not None else None
        try:
            processor.process(delivery, partition=partition, fence=fence)
        except PartitionLost:
            with contextlib.suppress(Exception):
                delivery.requeue()
            processor.record_outcome(REQUEUED, None)
            assert partition is not None
            log_event(
                log,
                logging.WARNING,
                "partition_lost",
                "this process no longer holds the partition; stopped consuming it",
                group=self.group.name,
                partition=partition,
            )
            self._drop(partition)
            # The lock connection is suspect: reconnect everything.
            raise DatabaseUnavailable("partition lock lost") from None
        except BaseException:
            with contextlib.suppress(Exception):
                delivery.requeue()
            raise

    def _evict(self, locks: Locks) -> None:
        evicted = locks.evict_stale(self.takeover_seconds)
        if evicted:
            log_event(
                log,
                logging.WARNING,
                "member_evicted",
                "members silent for the takeover time were evicted (sessions terminated)",
                group=self.group.name,
                backend_pids=evicted,
                takeover_seconds=self.takeover_seconds,
            )

    def _rebalance(self) -> None:
        locks, source = self._locks, self._source
        assert locks is not None and source is not None
        self._evict(locks)
        n = self.group.partitions
        members = max(locks.members(n), 1)
        share = math.ceil(n / members)
        held = sorted(self._held)
        if len(held) > share:
            for k in sorted(held, reverse=True)[: len(held) - share]:
                self._drop(k)
                locks.unlock(k)
                log_event(
                    log,
                    logging.INFO,
                    "partition_released",
                    "partition handed over (rebalancing)",
                    group=self.group.name,
                    partition=k,
                    members=members,
                )
            return
        start = self.instance % n
        for i in range(n):
            if len(self._held) >= share:
                break
            k = (start + i) % n
            if k in self._held or not locks.try_lock(k):
                continue
            # A previous holder's transaction that passed its fence must not commit after us.
            fenced = locks.fence_out(k)
            # Held before the consumer opens: a delivery that arrives while basic.consume is
            # being confirmed must be handled, not requeued behind the later ones.
            self._held.add(k)
            try:
                source.open(self.group.partition_queue(k), k)
            except BaseException:
                self._held.discard(k)
                with contextlib.suppress(Exception):
                    locks.unlock(k)
                raise
            log_event(
                log,
                logging.INFO,
                "partition_acquired",
                "partition acquired",
                group=self.group.name,
                partition=k,
                members=members,
                fenced_out=fenced,
            )

    def _drop(self, partition: int) -> None:
        self._held.discard(partition)
        if self._source is not None:
            self._source.close_queue(self.group.partition_queue(partition))

    def _reclaim(self, source: RedisSource) -> None:
        locks = self._locks
        assert locks is not None
        self._evict(locks)
        for instance in source.instances():
            if instance == self.instance or not 0 <= instance < INSTANCE_SPAN:
                continue
            if not locks.try_lock(INSTANCE_BASE + instance):
                continue  # alive
            try:
                moved = source.reclaim_instance(instance)
            finally:
                locks.unlock(INSTANCE_BASE + instance)
            if moved:
                log_event(
                    log,
                    logging.WARNING,
                    "instance_reclaimed",
                    "a stopped consumer's in-flight messages went back to the queue",
                    group=self.group.name,
                    instance=instance,
                    messages=moved,
                )

    def _export_lag(self) -> None:
        if self.metrics is None:
            return
        try:
            value = lag(self.group, url=self.url, peek=not self.group.ordered)
        except Exception as error:
            log_event(
                log,
                logging.DEBUG,
                "lag_unavailable",
                "could not measure lag",
                group=self.group.name,
                error=describe_error(error),
            )
            return
        self.metrics.set_lag(self.group.name, value)

    def _teardown(self) -> None:
        # Give messages back (close channels / restore in-flight lists) BEFORE releasing the
        # partitions, so the next holder cannot see a later message first.
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.stop()
        source, self._source = self._source, None
        if source is not None:
            with contextlib.suppress(Exception):
                source.shutdown()
        self._held.clear()
        locks, self._locks = self._locks, None
        if locks is not None:
            locks.close()


def _timeouts(amqp: bool, seconds: float) -> dict[str, float]:
    """kombu transport options: a deadline on every socket wait."""
    if amqp:
        return {"read_timeout": seconds, "write_timeout": seconds}
    return {"socket_timeout": seconds, "socket_connect_timeout": seconds}
