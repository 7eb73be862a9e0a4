"""Consumer groups inside Celery workers, so their handlers show in Flower (UNORDERED groups).

``install(app, group)`` adds two things to a Celery app:

* a worker *consumer bootstep* that reads the group's queue ``outbox.consumer.<group>`` on the
  worker's broker connection and turns every event into a task message, then acknowledges the
  event;
* the task ``outbox.consume(group, envelope)`` (queue ``outbox.consume``), which runs the event
  through the same :class:`~outbox_tasks.consumer.GroupProcessor` as the process form: receipt
  and handler in one transaction, in-process retries with backoff, then the group's dead-letter
  queue. It acknowledges late and is requeued if its worker process dies, so an event is never
  lost between the two steps; a second run finds the receipt and does nothing.

What it does NOT do (use ``outbox-tasks consume --partitions N`` for these):

* **ordered groups**: Celery runs tasks concurrently and in any order, so ``install`` refuses a
  group with ``partitions``;
* events on a broker other than Celery's: the bootstep reads through the worker's own broker
  connection, so ``OUTBOX_PUBLISH_URL`` must be unset or equal to the Celery broker URL.

A handler failure is retried in the task (the worker slot waits between attempts); after the
last attempt the event is dead-lettered and the task fails with :class:`EventDeadLettered`, so
Flower shows it red with the handler's error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy.engine import Engine

from outbox_tasks.broker import as_bytes, is_amqp, kombu
from outbox_tasks.consumer import (
    DEAD_LETTERED,
    INVALID,
    BrokerWriter,
    ConsumerGroup,
    Delivery,
    GroupProcessor,
    default_metrics,
    kombu_queues,
)
from outbox_tasks.errors import ConfigurationError, EventDeadLettered, describe_error
from outbox_tasks.logs import event as log_event
from outbox_tasks.logs import get_logger
from outbox_tasks.settings import Settings

__all__ = ["CONSUME_QUEUE", "TASK_NAME", "EventDeadLettered", "install", "install_configured"]

TASK_NAME: Final = "outbox.consume"
CONSUME_QUEUE: Final = "outbox.consume"

log = get_logger("consumer.celery")


@dataclass(frozen=True, slots=True)
class _Installed:
    group: ConsumerGroup
    settings: Settings


_groups: dict[str, _Installed] = {}
_apps_with_task: set[int] = set()
_lock = threading.Lock()


def install(
    app: Any,
    group_config: ConsumerGroup | Mapping[str, Any],
    *,
    settings: Settings | None = None,
    queue: str = CONSUME_QUEUE,
) -> ConsumerGroup:
    """Make the workers of ``app`` consume an unordered group (see the module docstring).

    ``group_config``: a :class:`ConsumerGroup`, or a mapping with ``name``, ``bind`` and
    ``handler`` (``"module:function"``) and optional fields. ``settings`` (default: from the
    ``OUTBOX_*`` environment) gives the database, the exchange and the dead-letter broker.
    Call it before the worker starts (at import of the app module).
    """
    group = ConsumerGroup.from_config(group_config)
    if group.ordered:
        raise ConfigurationError(
            f"consumer group {group.name} is ordered (partitions={group.partitions}): the Celery "
            "form handles unordered groups only; run it with `outbox-tasks consume "
            f"--partitions {group.partitions}`"
        )
    settings = settings or Settings.from_env()
    broker = str(app.conf.broker_url or "")
    if _normalized(settings.effective_publish_url) != _normalized(broker):
        raise ConfigurationError(
            f"consumer group {group.name}: events are published to a broker other than "
            "Celery's (OUTBOX_PUBLISH_URL differs from the Celery broker URL); the Celery form "
            "reads through the worker's broker connection. Run `outbox-tasks consume` instead."
        )
    with _lock:
        if group.name in _groups:
            raise ConfigurationError(f"consumer group {group.name} is already installed")
        _groups[group.name] = _Installed(group, settings)
        if id(app) not in _apps_with_task:
            _apps_with_task.add(id(app))
            _register_task(app)
            _add_task_queue(app, queue)
    app.steps["consumer"].add(_step_for(app, group, settings, queue))
    return group


def install_configured(app: Any, settings: Settings | None = None) -> list[ConsumerGroup]:
    """Install every group listed in the app's ``outbox_consumer_groups`` setting (a list of
    mappings or ConsumerGroup objects, e.g. from the module named by OUTBOX_CELERY_CONFIG).
    Nothing configured: nothing happens."""
    configured = app.conf.get("outbox_consumer_groups") or ()
    return [install(app, entry, settings=settings) for entry in configured]


def _normalized(url: str) -> str:
    return url.strip().rstrip("/")


def _add_task_queue(app: Any, queue: str) -> None:
    queues = app.conf.task_queues
    if queues is None:
        return  # Celery creates missing queues; start workers with -Q including it
    if any(getattr(q, "name", q) == queue for q in queues):
        return
    exchange = kombu("kombu.entity.Exchange")(queue, type="direct")
    app.conf.task_queues = [
        *queues,
        kombu("kombu.entity.Queue")(queue, exchange, routing_key=queue),
    ]


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


class _Runtime:
    """Per worker process (rebuilt after fork): engine, dead-letter writer, processors."""

    def __init__(self) -> None:
        self.pid = -1
        self.engines: dict[str, Engine] = {}
        self.processors: dict[str, GroupProcessor] = {}
        self.writers: list[BrokerWriter] = []

    def processor(self, name: str) -> GroupProcessor:
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.engines.clear()
            self.processors.clear()
            self.writers.clear()
        found = self.processors.get(name)
        if found is not None:
            return found
        installed = _groups.get(name)
        if installed is None:
            raise ConfigurationError(
                f"consumer group {name!r} is not installed in this worker (install(app, ...) "
                "must run when the app module is imported)"
            )
        from outbox_tasks.db import make_engine

        settings = installed.settings
        key = settings.database_url
        engine = self.engines.get(key)
        if engine is None:
            engine = make_engine(settings, application_name="outbox_tasks.consumer", pool_size=2)
            self.engines[key] = engine
        writer = BrokerWriter(settings.effective_publish_url, settings.broker_timeout_seconds)
        self.writers.append(writer)
        processor = GroupProcessor(installed.group, engine, writer, metrics=default_metrics())
        self.processors[name] = processor
        return processor


_runtime = _Runtime()


def consume_envelope(group: str, envelope: Mapping[str, Any], *, redelivered: bool = False) -> str:
    """The body of the ``outbox.consume`` task: handle one event of an installed group."""
    processor = _runtime.processor(group)

    def requeue() -> None:
        from celery.exceptions import Reject

        raise Reject("given back to the broker", requeue=True)

    delivery = Delivery(
        body=as_bytes(envelope.get("body", b"")),
        headers=dict(envelope.get("headers") or {}),
        redelivered=bool(envelope.get("redelivered")) or redelivered,
        ack=_nothing,
        requeue=requeue,
        message_id=envelope.get("message_id"),
    )
    outcome = processor.process(delivery)
    if outcome in (DEAD_LETTERED, INVALID):
        raise EventDeadLettered(
            f"consumer group {group}: event {envelope.get('message_id')} went to "
            f"{processor.group.dead_letter_queue} ({outcome})"
        )
    return outcome


def _nothing() -> None:
    return None


def _register_task(app: Any) -> None:
    def consume(task: Any, group: str, envelope: dict[str, Any]) -> str:
        info = getattr(task.request, "delivery_info", None) or {}
        return consume_envelope(group, envelope, redelivered=bool(info.get("redelivered")))

    app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        acks_on_failure_or_timeout=True,
    )(consume)


# --------------------------------------------------------------------------------------------
# The worker bootstep
# --------------------------------------------------------------------------------------------


def _step_for(app: Any, group: ConsumerGroup, settings: Settings, queue: str) -> type:
    from celery import bootsteps

    entities = kombu_queues(group, settings.exchange, is_amqp(settings.effective_publish_url))
    event_queue, dead_letter_queue = entities[0], entities[-1]

    def get_consumers(step: Any, channel: Any) -> list[Any]:
        dead_letter_queue(channel).declare()

        def on_message(message: Any) -> None:
            envelope = {
                "body": as_bytes(message.body).decode("utf-8", "replace"),
                "headers": dict(message.headers or {}),
                "redelivered": bool(message.delivery_info.get("redelivered")),
                "message_id": message.properties.get("message_id"),
            }
            try:
                app.send_task(TASK_NAME, args=(group.name, envelope), queue=queue)
            except Exception as error:
                log_event(
                    log,
                    logging.ERROR,
                    "consume_task_not_sent",
                    "could not enqueue outbox.consume; the event goes back to its queue",
                    group=group.name,
                    error=describe_error(error),
                )
                time.sleep(1.0)
                message.requeue()
                return
            message.ack()

        consumer = kombu("kombu.messaging.Consumer")(
            channel, queues=[event_queue], on_message=on_message, auto_declare=True
        )
        consumer.qos(prefetch_count=group.prefetch)
        return [consumer]

    base: Any = bootsteps.ConsumerStep
    return type(
        f"OutboxConsumerStep_{group.name}",
        (base,),
        {
            "name": f"outbox_tasks.consumer_celery.{group.name}",
            "get_consumers": get_consumers,
            "__module__": __name__,
        },
    )
