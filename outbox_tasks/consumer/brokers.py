"""The consumer group's broker topology: its kombu queue definitions, declaring, re-binding and
deleting them, and the confirmed writer for dead letters, replays and forwards. The shared
plumbing (URLs, driver errors, connections, the Redis message format) is
:mod:`outbox_tasks.broker`.

An ordered group's partition queue *k* is bound to the slot routing keys of the slots of
partition *k* (``ConsumerGroup.partition_bindings``), so each event reaches exactly one of the
group's queues: RabbitMQ routes with the ``BCC`` header every message carries, the relay's Redis
link matches the slot key itself (kombu's Redis transport knows no headers exchange).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from outbox_tasks.broker import (
    PERSISTENT,
    broker_call,
    broker_errors,
    connection,
    forget,
    is_amqp,
    kombu,
    redis_client,
    released,
)
from outbox_tasks.consumer.group import ConsumerGroup, admin_group
from outbox_tasks.envelope import CONTENT_ENCODING, CONTENT_TYPE
from outbox_tasks.errors import ConfigurationError
from outbox_tasks.settings import Settings


def _queue(name: str, **options: Any) -> Any:
    return kombu("kombu.entity.Queue")(name, **options)


def kombu_queues(group: ConsumerGroup, exchange: str, amqp: bool) -> list[Any]:
    """The kombu Queue objects of the group: event queues (bound) and the dead-letter queue.

    Unordered: one queue bound with the group's patterns. Ordered: partition *k*'s queue bound
    with ``group.partition_bindings(k)`` (RabbitMQ: single-active-consumer as well).
    """

    topic: Any = kombu("kombu.entity.Exchange")(exchange, type="topic", durable=True)

    def bound(patterns: Sequence[str]) -> list[Any]:
        return [kombu("kombu.entity.binding")(topic, routing_key=p) for p in patterns]

    queues: list[Any]
    if group.ordered:
        arguments = {"x-single-active-consumer": True} if amqp else None
        queues = [
            _queue(
                group.partition_queue(k),
                bindings=bound(group.partition_bindings(k)),
                durable=True,
                queue_arguments=arguments,
            )
            for k in range(group.partitions)
        ]
    else:
        queues = [_queue(group.queue, bindings=bound(group.bindings), durable=True)]
    queues.append(_queue(group.dead_letter_queue, durable=True))
    return queues


def unbind(channel: Any, exchange: str, queue: str, patterns: Sequence[str]) -> None:
    """Remove the bindings ``patterns`` of ``queue`` to the topic ``exchange`` (missing ones
    are no error). kombu's Redis channel only forgets a binding in memory: there the binding
    table's members are removed directly."""
    if not patterns:
        return
    if hasattr(channel, "keyprefix_queue"):  # kombu's Redis channel
        topic: Any = kombu("kombu.transport.virtual.exchange.TopicExchange")(channel)
        members = [channel.sep.join([p, topic.key_to_pattern(p), queue]) for p in patterns]
        with channel.conn_or_acquire() as client, client.pipeline() as pipe:
            pipe.srem(channel.keyprefix_queue % (exchange,), *members)
            pipe.srem(channel.keyprefix_binding_permanent % (exchange,), *members)
            pipe.execute()
        return
    for pattern in patterns:
        channel.queue_unbind(queue=queue, exchange=exchange, routing_key=pattern)


def queue_depth(conn: Any, queue: str) -> int | None:
    """Messages in ``queue`` (RabbitMQ: ready ones; Redis: waiting and in flight); None when it
    does not exist (RabbitMQ; an empty Redis list does not exist either: 0)."""
    channel = conn.channel()
    try:
        if hasattr(channel, "keyprefix_queue"):  # kombu's Redis channel
            with channel.conn_or_acquire() as client:
                return int(client.llen(queue)) + int(client.llen(f"{queue}.inflight"))
        from amqp.exceptions import NotFound

        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except NotFound:  # the broker closed this channel
            return None
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def prepare_partitions(
    conn: Any, group: ConsumerGroup, exchange: str, previous: int | None
) -> None:
    """Before an ordered group's queues are declared with ``group.partitions``: drop the
    bindings of the layout they were routed with (``previous`` partitions, None: unknown) and of
    the pre-slot layout (the group's plain patterns), and delete the queues of partitions that
    no longer exist.

    Raises :class:`ConfigurationError` when the layout changes while a queue of the previous
    layout still holds messages: they were routed for it and must be handled with it first.
    """
    channel = conn.channel()
    try:
        plain = list(group.bindings)
        if previous is None or previous == group.partitions:
            for k in range(group.partitions):
                unbind(channel, exchange, group.partition_queue(k), plain)
            return
        before = admin_group(group, previous)
        waiting = {q: depth for q in before.queues if (depth := queue_depth(conn, q))}
        if waiting:
            raise ConfigurationError(
                f"consumer group {group.name} was routed with partitions={previous} and its "
                f"queues still hold messages ({waiting}); handle them with partitions="
                f"{previous} first (stop the relay's workers, let the group drain), then start "
                f"it with partitions={group.partitions}"
            )
        now = {
            group.partition_queue(k): set(group.partition_bindings(k))
            for k in range(group.partitions)
        }
        for k in range(previous):
            queue = before.partition_queue(k)
            stale = [p for p in before.partition_bindings(k) if p not in now.get(queue, ())]
            unbind(channel, exchange, queue, stale + plain)
            if queue not in now and queue_depth(conn, queue) is not None:
                channel.queue_delete(queue=queue, if_empty=True)
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def declare_queues(channel: Any, queues: Sequence[Any]) -> None:
    """Declare ``queues`` (with their bindings) on ``channel``.

    Raises :class:`ConfigurationError` when one exists with other arguments (RabbitMQ 406).
    """
    from amqp.exceptions import PreconditionFailed

    for queue in queues:
        try:
            queue(channel).declare()
        except PreconditionFailed as error:
            raise ConfigurationError(
                f"queue {queue.name!r} exists with other arguments than this consumer group "
                f"needs (ordered queues are single-active-consumer): {error}. Delete it or use "
                "another group name."
            ) from error


class BrokerWriter:
    """A connection of its own for dead-letter and replay publishes (RabbitMQ: confirmed).

    Separate from the consuming connection so that waiting for a confirm never delivers
    another message into a handler that is still running.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.amqp = is_amqp(url)
        self._conn: Any = None
        self._producer: Any = None
        self._errors = broker_errors(url)

    def _ensure(self) -> Any:
        if self._producer is None:
            options: dict[str, Any] = (
                {
                    "confirm_publish": True,
                    "read_timeout": self.timeout,
                    "write_timeout": self.timeout,
                }
                if self.amqp
                else {"socket_timeout": self.timeout, "socket_connect_timeout": self.timeout}
            )
            conn: Any = connection(
                self.url, connect_timeout=self.timeout, transport_options=options
            )
            self._conn = conn
            conn.ensure_connection(max_retries=0)
            self._producer = kombu("kombu.messaging.Producer")(conn.channel())
        return self._producer

    def send(
        self,
        queue: str,
        body: bytes,
        headers: Mapping[str, Any],
        message_id: str,
        *,
        declare: Any = None,
    ) -> None:
        """Publish ``body`` to ``queue`` through the default exchange, persistent; on RabbitMQ
        return once the broker has confirmed it. ``declare`` is the kombu Queue to declare
        first (default: a plain durable queue of that name).

        Raises :class:`~outbox_tasks.errors.BrokerUnavailable` (and drops the connection; the
        next call reconnects) when the broker cannot be reached or does not confirm in time.
        """
        with broker_call(
            self.url, f"publishing to {queue}", errors=self._errors, on_failure=self.close
        ):
            producer = self._ensure()
            entity = declare if declare is not None else _queue(queue, durable=True)
            producer.publish(
                body,
                exchange="",
                routing_key=queue,
                headers=dict(headers),
                content_type=CONTENT_TYPE,
                content_encoding=CONTENT_ENCODING,
                delivery_mode=PERSISTENT,
                message_id=message_id or None,
                declare=[entity],
                retry=False,
                timeout=self.timeout,
            )

    def close(self) -> None:
        """Let the connection go without waiting for the broker. Idempotent."""
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            forget(conn, self.timeout)


def resolve(settings: Settings | None, url: str | None) -> tuple[Settings | None, str]:
    """``(settings, broker URL)``: ``url`` if given, else the settings' (from the environment
    when none are given) publish URL."""
    if url is not None:
        return settings, url
    settings = settings or Settings.from_env()
    return settings, settings.effective_publish_url


def exchange_name(settings: Settings | None, exchange: str | None = None) -> str:
    """``exchange`` if given, else the settings' exchange, else the default one."""
    return exchange or (settings.exchange if settings else Settings().exchange)


def declare_topology(
    group: ConsumerGroup | str,
    *,
    settings: Settings | None = None,
    url: str | None = None,
    exchange: str | None = None,
    partitions: int | None = None,
) -> None:
    """Create the group's queues and bindings (idempotent). Do it before the first events you
    want the group to see are published: a queue receives only what arrives after it is bound.
    """
    target = admin_group(group, partitions)
    settings, url = resolve(settings, url)
    exchange = exchange_name(settings, exchange)
    with released(url) as conn, broker_call(url, "declaring the group's queues"):
        if target.ordered:
            prepare_partitions(conn, target, exchange, None)
        declare_queues(conn.channel(), kombu_queues(target, exchange, is_amqp(url)))


def delete_topology(
    group: ConsumerGroup | str,
    *,
    settings: Settings | None = None,
    url: str | None = None,
    exchange: str | None = None,
    partitions: int | None = None,
) -> None:
    """Delete the group's queues (with their bindings), in-flight lists and dead-letter queue.
    Their messages are lost: for tests and for retiring a group."""
    target = admin_group(group, partitions)
    settings, url = resolve(settings, url)
    exchange = exchange_name(settings, exchange)
    amqp = is_amqp(url)
    with released(url) as conn:
        for queue in kombu_queues(target, exchange, amqp):
            channel = conn.channel()
            try:
                bound = queue(channel)
                if not amqp:
                    # kombu's Redis transport removes the bindings it knows of in this
                    # connection: declare them first, so the exchange stops routing here.
                    bound.declare()
                bound.delete()
            except Exception:
                pass
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
        if not amqp:
            with redis_client(url) as client:
                keys = [f"{q}.inflight" for q in target.queues]
                keys += [f"{target.dead_letter_queue}.replaying", f"{target.queue}.instances"]
                keys += [k for k in client.scan_iter(match=f"{target.queue}.inflight.*")]
                client.delete(*keys)
