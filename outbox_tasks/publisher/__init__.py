"""Publish batches of outbox messages to the broker without ever reordering an aggregate.

One :class:`BrokerPublisher` per worker process; its connection is opened on first use and
reused across batches. Two transports are supported, each by its own *link*:

* Redis (``redis://``, ``rediss://``; :mod:`~outbox_tasks.publisher.redis_link`): kombu's
  virtual exchange routing, but paid once per batch: one SMEMBERS of the binding table, then
  every LPUSH of the batch in one pipeline.
* AMQP (``amqp://``, ``amqps://``, ``pyamqp://``; :mod:`~outbox_tasks.publisher.amqp_link`):
  RabbitMQ publisher confirms, one *lane* per aggregate (a message goes out once its
  predecessor of the same aggregate is confirmed; aggregates do not wait for one another), so
  a nack can still stop the rest of its aggregate.

Every broker or network error becomes :class:`~outbox_tasks.errors.BrokerUnavailable` and drops
the connection; the next call reconnects. :class:`BatchResult` (module ``results``) says what
happened to each message.
"""

from __future__ import annotations

from outbox_tasks.publisher.broker_publisher import BrokerPublisher
from outbox_tasks.publisher.results import BatchResult

__all__ = ["BatchResult", "BrokerPublisher"]
