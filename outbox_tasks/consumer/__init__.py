"""Consumer groups: idempotent, optionally ordered handling of outbox events (DESIGN 6).

A *consumer group* is a name, binding patterns (``Order.*``) and a handler
``on_event(event, session)``. Every event is handled in ONE database transaction that also
inserts the group's receipt for the event id; the broker message is acknowledged only after that
commit. A redelivered event finds its receipt and is skipped (outcome ``duplicate``), so the
handler's effects happen once even though delivery is at least once.

* **Unordered groups** share one durable queue ``outbox.consumer.<group>``; any number of
  processes read it.
* **Ordered groups** (``partitions=N``) have N queues ``outbox.consumer.<group>.p<k>``, each
  bound with the group's patterns, so each holds every event. One process at a time consumes a
  partition queue: it holds a PostgreSQL advisory lock for (group, k) on a dedicated connection
  (RabbitMQ queues are also single-active-consumer), and handles only the events whose aggregate
  falls in partition k, acknowledging the others without effect. A per-aggregate high-water mark
  (``outbox_consumer_position``) drops stale redeliveries (outcome ``stale``).
* **Failures** are retried in-process with capped exponential backoff, then the message goes to
  the plain durable queue ``outbox.consumer.<group>.dead``. An ordered group then parks the
  aggregate: its later events follow it to the dead-letter queue, in order, until
  :func:`replay_dead_letters` has handled them or an operator calls :func:`unpark`.

Runnable as a process (``outbox-tasks consume``, :class:`Consumer`) or, for unordered groups,
inside Celery workers (``outbox_tasks.consumer_celery``). This package does not import Celery,
and imports kombu and redis only when it talks to a broker: handler modules can import
:class:`Event` cheaply. docs/consumers.md is the user guide.

Modules: ``events`` (the event), ``group`` (the group), ``processing`` (one message: receipts,
positions, retries, dead letters), ``brokers`` (kombu/redis plumbing, topology),
``sources`` (receiving), ``locks`` (partition ownership), ``runner`` (the process),
``metrics``, ``admin`` (lag, parked aggregates, unpark), ``replay`` and ``cli``. Import from
``outbox_tasks.consumer``: the names below are the API.
"""

from __future__ import annotations

from outbox_tasks.consumer.admin import (
    Lag,
    ParkedAggregate,
    dead_letter_count,
    lag,
    parked_aggregates,
    unpark,
)
from outbox_tasks.consumer.brokers import BrokerWriter as BrokerWriter
from outbox_tasks.consumer.brokers import declare_topology, delete_topology
from outbox_tasks.consumer.brokers import kombu_queues as kombu_queues
from outbox_tasks.consumer.cli import add_consume_parser, main, run_consume
from outbox_tasks.consumer.events import Event, EventHandler, parse_event
from outbox_tasks.consumer.group import QUEUE_PREFIX, ConsumerGroup, load_handler
from outbox_tasks.consumer.locks import INSTANCE_BASE, INSTANCE_SPAN, MEMBER_BASE, group_lock_key
from outbox_tasks.consumer.metrics import ConsumerMetrics, default_metrics
from outbox_tasks.consumer.processing import (
    DEAD_LETTER_HEADERS,
    DEAD_LETTERED,
    DUPLICATE,
    H_CONSUMER_ATTEMPTS,
    H_CONSUMER_DEAD_AT,
    H_CONSUMER_ERROR,
    H_CONSUMER_GROUP,
    H_CONSUMER_REASON,
    H_CONSUMER_REPLAYED,
    HANDLED,
    INVALID,
    OTHER_PARTITION,
    OUTCOMES,
    PARKED,
    REQUEUED,
    STALE,
    DeadLetterSink,
    Delivery,
    Fence,
    GroupProcessor,
)
from outbox_tasks.consumer.replay import replay_dead_letters
from outbox_tasks.consumer.runner import Consumer
from outbox_tasks.consumer.sources import OnDelivery
from outbox_tasks.errors import InvalidEvent, PartitionLost

# The API. ``BrokerWriter`` and ``kombu_queues``, imported above, are not: they are shared with
# outbox_tasks.consumer_celery.
__all__ = [
    "DEAD_LETTERED",
    "DEAD_LETTER_HEADERS",
    "DUPLICATE",
    "HANDLED",
    "H_CONSUMER_ATTEMPTS",
    "H_CONSUMER_DEAD_AT",
    "H_CONSUMER_ERROR",
    "H_CONSUMER_GROUP",
    "H_CONSUMER_REASON",
    "H_CONSUMER_REPLAYED",
    "INSTANCE_BASE",
    "INSTANCE_SPAN",
    "INVALID",
    "MEMBER_BASE",
    "OTHER_PARTITION",
    "OUTCOMES",
    "PARKED",
    "QUEUE_PREFIX",
    "REQUEUED",
    "STALE",
    "Consumer",
    "ConsumerGroup",
    "ConsumerMetrics",
    "DeadLetterSink",
    "Delivery",
    "Event",
    "EventHandler",
    "Fence",
    "GroupProcessor",
    "InvalidEvent",
    "Lag",
    "OnDelivery",
    "ParkedAggregate",
    "PartitionLost",
    "add_consume_parser",
    "dead_letter_count",
    "declare_topology",
    "default_metrics",
    "delete_topology",
    "group_lock_key",
    "lag",
    "load_handler",
    "main",
    "parked_aggregates",
    "parse_event",
    "replay_dead_letters",
    "run_consume",
    "unpark",
]
