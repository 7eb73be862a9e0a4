"""The consumer process: :class:`Consumer` connects, takes its partitions, handles messages one
at a time and reconnects after outages."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import threading
import time
from collections import Counter

from sqlalchemy.engine import Engine

from outbox_tasks.broker import broker_errors, is_amqp, safe_url
from outbox_tasks.consumer.admin import lag
from outbox_tasks.consumer.brokers import BrokerWriter, kombu_queues
from outbox_tasks.consumer.group import ConsumerGroup
from outbox_tasks.consumer.locks import INSTANCE_BASE, INSTANCE_SPAN, Locks
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
    ) -> None:
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
        self.instance = random.randrange(INSTANCE_SPAN)
        self.outcomes: Counter[str] = Counter()
        self.ready = threading.Event()
        self._engine = engine
        self._stop = threading.Event()
        self._source: AmqpSource | RedisSource | None = None
        self._locks: Locks | None = None
        self._held: set[int] = set()
        self._processor: GroupProcessor | None = None

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
        self._processor = GroupProcessor(
            self.group,
            engine,
            writer,
            metrics=self.metrics,
            sleep=lambda seconds: not self._stop.wait(seconds),
            on_outcome=self._count,
        )
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
            source = RedisSource(self.url, group, self._on_delivery, timeout)
        self._source = source
        source.connect()
        source.declare(kombu_queues(group, self.settings.exchange, self.amqp))
        if group.ordered or not self.amqp:
            locks = Locks(self.settings, group)
            self._locks = locks
            locks.connect()
            locks.join(group.partitions)
            if not group.ordered and isinstance(source, RedisSource):
                if not locks.try_lock(INSTANCE_BASE + self.instance):
                    raise DatabaseUnavailable("consumer instance lock is taken; retrying")
                source.register_instance(self.instance)
        if not group.ordered:
            source.open(group.queue, None)
        next_rebalance = 0.0
        next_reclaim = 0.0
        next_lag = time.monotonic() + 1.0
        announced = False
        while not self._stop.is_set():
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
                    pid=os.getpid(),
                )
            source.drain(self.poll_seconds)

    def _on_delivery(self, delivery: Delivery, partition: int | None) -> None:
        processor = self._processor
        assert processor is not None
        if self._stop.is_set() or (partition is not None and partition not in self._held):
            delivery.requeue()
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

    def _rebalance(self) -> None:
        locks, source = self._locks, self._source
        assert locks is not None and source is not None
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
            )

    def _drop(self, partition: int) -> None:
        self._held.discard(partition)
        if self._source is not None:
            self._source.close_queue(self.group.partition_queue(partition))

    def _reclaim(self, source: RedisSource) -> None:
        locks = self._locks
        assert locks is not None
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
        source, self._source = self._source, None
        if source is not None:
            with contextlib.suppress(Exception):
                source.shutdown()
        self._held.clear()
        locks, self._locks = self._locks, None
        if locks is not None:
            locks.close()
