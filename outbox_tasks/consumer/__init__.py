"""Consumer groups: idempotent, optionally ordered handling of outbox events (DESIGN 6).

A *consumer group* is a name, binding patterns (``Order.*``) and a handler
``on_event(event, session)``. Every event is handled in ONE database transaction that also
inserts the group's receipt for the event id; the broker message is acknowledged only after that
commit. A redelivered event finds its receipt and is skipped (outcome ``duplicate``), so the
handler's effects happen once even though delivery is at least once.

* **Unordered groups** share one durable queue ``outbox.consumer.<group>``; any number of
  processes read it.
* **Ordered groups** (``partitions=N``) have N queues ``outbox.consumer.<group>.p<k>``, each
  bound to the slot routing keys of partition k's slots, so each event reaches one of them. One
  process at a time consumes a partition queue: it holds a PostgreSQL advisory lock for
  (group, k) on a dedicated connection, kept visibly alive by a heartbeat; a member that goes
  silent is evicted by the others after ``takeover_seconds`` and its open transactions are
  fenced out (RabbitMQ queues are also single-active-consumer). A per-aggregate high-water mark
  (``outbox_consumer_position``) drops stale redeliveries (outcome ``stale``).
* **Failures** are retried in-process with capped exponential backoff, then the message goes to
  the plain durable queue ``outbox.consumer.<group>.dead``. An ordered group then parks the
  aggregate: its later events follow it to the dead-letter queue, in order, until
  :func:`replay_dead_letters` has handled them or an operator calls :func:`unpark`.

Runnable as a process (``outbox-tasks consume``, :class:`Consumer`) or, for unordered groups,
inside Celery workers (``outbox_tasks.consumer_celery``). This package does not import Celery,
and imports kombu and redis only when it talks to a broker: handler modules can import
:class:`Event` cheaply. docs/consumers.md is the user guide.

Modules, lowest first; each imports only modules listed above it (no cycles)::

    events      the event a handler sees, parsed from an envelope
    group       the group: bindings, handler, partitions, retry policy, queue names
    store       every SQL statement: receipts, positions and parking, advisory locks
    metrics     Prometheus counters and gauges; :class:`Lag`
    brokers     the group's broker topology: queues, declare/delete, dead-letter writer
    processing  one message: receipts, order, retries, dead letters; the outcomes
    sources     receiving from RabbitMQ or Redis
    locks       partition ownership (advisory locks on a dedicated connection), eviction
    keeper      the heartbeat thread: proves ownership alive, gives it up when it cannot
    admin       lag, dead letters waiting, parked aggregates, unpark
    replay      dead letters back to the group's queues
    runner      the process: :class:`Consumer`
    __main__    ``python -m outbox_tasks.consumer``: the commands of outbox_tasks.cli

Import from ``outbox_tasks.consumer``: the names in ``__all__`` are the API (also the one
``outbox_tasks.consumer_celery`` is built on).
"""

from __future__ import annotations

from outbox_tasks.consumer.admin import dead_letter_count, lag, parked_aggregates, unpark
from outbox_tasks.consumer.brokers import (
    BrokerWriter,
    declare_topology,
    delete_topology,
    kombu_queues,
)
from outbox_tasks.consumer.events import Event, EventHandler, parse_event
from outbox_tasks.consumer.group import QUEUE_PREFIX, ConsumerGroup, load_handler
from outbox_tasks.consumer.locks import (
    FENCE_BASE,
    INSTANCE_BASE,
    INSTANCE_SPAN,
    MEMBER_BASE,
    group_lock_key,
)
from outbox_tasks.consumer.metrics import ConsumerMetrics, Lag, default_metrics
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
from outbox_tasks.consumer.store import ParkedAggregate
from outbox_tasks.errors import InvalidEvent, PartitionLost

__all__ = [
    "DEAD_LETTERED",
    "DEAD_LETTER_HEADERS",
    "DUPLICATE",
    "FENCE_BASE",
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
    "BrokerWriter",
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
    "dead_letter_count",
    "declare_topology",
    "default_metrics",
    "delete_topology",
    "group_lock_key",
    "kombu_queues",
    "lag",
    "load_handler",
    "parked_aggregates",
    "parse_event",
    "replay_dead_letters",
    "unpark",
]
