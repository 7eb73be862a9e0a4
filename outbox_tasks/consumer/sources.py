"""Where a consumer process receives messages: RabbitMQ (kombu, a channel per open queue) or
Redis (a reliable queue: in-flight lists given back when their owner is gone)."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from outbox_tasks.broker import (
    as_bytes,
    connection,
    decode_redis_item,
    kombu,
    mark_redelivered,
    release,
    released,
)
from outbox_tasks.consumer.brokers import declare_queues
from outbox_tasks.consumer.group import ConsumerGroup
from outbox_tasks.consumer.processing import Delivery
from outbox_tasks.logs import event as log_event
from outbox_tasks.logs import get_logger

log = get_logger("consumer")


class _Source(Protocol):
    def connect(self) -> None: ...
    def declare(self, queues: Sequence[Any]) -> None: ...
    def open(self, queue: str, partition: int | None) -> None: ...
    def close_queue(self, queue: str) -> None: ...
    def drain(self, timeout: float) -> None: ...
    def abandon(self) -> None: ...
    def shutdown(self) -> None: ...


OnDelivery = Callable[[Delivery, int | None], None]
Gate = Callable[[], bool]
"""May this process read a message now (it still owns what it reads from)?"""


def _always() -> bool:
    return True


class AmqpSource:
    """RabbitMQ through kombu: one channel per open queue, so closing it requeues exactly that
    queue's unacknowledged messages (in their original positions)."""

    def __init__(self, url: str, prefetch: int, on_delivery: OnDelivery, timeout: float) -> None:
        self.url = url
        self.prefetch = prefetch
        self.on_delivery = on_delivery
        self.timeout = timeout
        self._conn: Any = None
        self._open: dict[str, tuple[Any, Any]] = {}
        self._queues: dict[str, Any] = {}

    def connect(self) -> None:
        # Every wait on the socket has a deadline (reads outside drain_events, writes).
        options = {"read_timeout": self.timeout, "write_timeout": self.timeout}
        conn: Any = connection(self.url, connect_timeout=self.timeout, transport_options=options)
        self._conn = conn
        conn.ensure_connection(max_retries=0)

    def declare(self, queues: Sequence[Any]) -> None:
        channel = self._conn.channel()
        try:
            declare_queues(channel, queues)
        finally:
            with contextlib.suppress(Exception):
                channel.close()
        self._queues = {q.name: q for q in queues}

    def open(self, queue: str, partition: int | None) -> None:
        channel = self._conn.channel()
        channel.basic_qos(prefetch_size=0, prefetch_count=self.prefetch, a_global=False)

        def on_message(message: Any) -> None:
            delivery = Delivery(
                body=as_bytes(message.body),
                headers=dict(message.headers or {}),
                redelivered=bool(message.delivery_info.get("redelivered")),
                ack=message.ack,
                requeue=lambda: message.reject(requeue=True),
                message_id=message.properties.get("message_id"),
            )
            self.on_delivery(delivery, partition)

        consumer: Any = kombu("kombu.messaging.Consumer")(
            channel, queues=[self._queues[queue]], on_message=on_message, auto_declare=False
        )
        consumer.consume()
        self._open[queue] = (channel, consumer)

    def close_queue(self, queue: str) -> None:
        entry = self._open.pop(queue, None)
        if entry is not None:
            # Closing the channel requeues its unacknowledged messages; deliveries that arrive
            # while it closes are dropped by py-amqp (and requeued by the broker).
            entry[0].close()

    def drain(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            self._conn.drain_events(timeout=timeout)

    def abandon(self) -> None:
        """From any thread: shut the connection's socket down. The broker sees the connection
        close and requeues every unacknowledged message at once; the owner's next call fails."""
        with contextlib.suppress(Exception):
            self._conn.connection.transport.sock.shutdown(socket.SHUT_RDWR)

    def shutdown(self) -> None:
        conn, self._conn = self._conn, None
        self._open.clear()
        if conn is not None:
            release(conn, self.timeout)


# KEYS: in-flight list, queue; ARGV: the item, the item marked redelivered.
_REQUEUE: Final = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
end
"""


class RedisSource:
    """Redis as a reliable queue: LMOVE each message into an in-flight list, LREM it on ack.

    kombu's own Redis consumer gives unacknowledged messages back only after its visibility
    timeout (an hour by default) and re-routes them through the exchange (into every bound
    queue). Here each message waits in an in-flight list owned by the partition (ordered) or
    by the process (unordered) and goes back to the front of its own queue at once when the
    owner is known to be gone (PostgreSQL advisory lock free).
    """

    def __init__(
        self,
        url: str,
        group: ConsumerGroup,
        on_delivery: OnDelivery,
        timeout: float,
        gate: Gate = _always,
    ):
        self.url = url
        self.group = group
        self.on_delivery = on_delivery
        self.timeout = timeout
        self.gate = gate
        self.instance: int | None = None
        self._client: Any = None
        self._requeue: Any = None
        self._open: dict[str, tuple[str, int | None]] = {}
        self._turn = 0
        # Set by abandon(): the lists now belong to whoever takes over; touch nothing.
        self._abandoned = False

    def inflight_key(self, queue: str, partition: int | None) -> str:
        if partition is not None:
            return f"{queue}.inflight"
        return f"{queue}.inflight.{self.instance}"

    @property
    def instances_key(self) -> str:
        return f"{self.group.queue}.instances"

    def connect(self) -> None:
        import redis

        client: Any = redis.Redis.from_url(
            self.url, socket_timeout=self.timeout + 5, socket_connect_timeout=self.timeout
        )
        self._client = client
        self._requeue = client.register_script(_REQUEUE)
        client.ping()

    def declare(self, queues: Sequence[Any]) -> None:
        options = {"socket_timeout": self.timeout, "socket_connect_timeout": self.timeout}
        with released(self.url, transport_options=options) as conn:
            channel = conn.channel()
            declare_queues(channel, queues)

    def register_instance(self, instance: int) -> None:
        self.instance = instance
        self._client.sadd(self.instances_key, str(instance))

    def instances(self) -> list[int]:
        members = self._client.smembers(self.instances_key)
        return [int(m) for m in members if str(m, "ascii").isdigit()]

    def reclaim_instance(self, instance: int) -> int:
        """Give a dead process's in-flight messages back to the front of the queue."""
        inflight = f"{self.group.queue}.inflight.{instance}"
        moved = self._restore(inflight, self.group.queue)
        self._client.srem(self.instances_key, str(instance))
        return moved

    def _restore(self, inflight: str, queue: str) -> int:
        moved = 0
        while True:
            # Newest first to the front, so the oldest ends up first in line.
            item = self._client.lmove(inflight, queue, "LEFT", "RIGHT")
            if item is None:
                return moved
            moved += 1

    def open(self, queue: str, partition: int | None) -> None:
        inflight = self.inflight_key(queue, partition)
        restored = self._restore(inflight, queue)
        if restored:
            log_event(
                log,
                logging.WARNING,
                "inflight_restored",
                "messages left in flight by a previous holder went back to the queue",
                group=self.group.name,
                queue=queue,
                messages=restored,
            )
        self._open[queue] = (inflight, partition)

    def close_queue(self, queue: str) -> None:
        entry = self._open.pop(queue, None)
        if entry is not None:
            self._restore(entry[0], queue)

    def drain(self, timeout: float) -> None:
        queues = list(self._open.items())
        if not queues or self._abandoned or not self.gate():
            time.sleep(timeout)
            return
        count = len(queues)
        for i in range(count):
            queue, (inflight, partition) = queues[(self._turn + i) % count]
            item = self._client.lmove(queue, inflight, "RIGHT", "LEFT")
            if item is not None:
                self._turn = (self._turn + i + 1) % count
                self._dispatch(item, queue, inflight, partition)
                return
        queue, (inflight, partition) = queues[self._turn % count]
        self._turn = (self._turn + 1) % count
        wait = timeout if count == 1 else min(timeout, 0.05)
        item = self._client.blmove(queue, inflight, wait, "RIGHT", "LEFT")
        if item is not None:
            self._dispatch(item, queue, inflight, partition)

    def _dispatch(self, item: bytes, queue: str, inflight: str, partition: int | None) -> None:
        body, headers, redelivered, message_id = decode_redis_item(item)
        client = self._client
        script = self._requeue

        def ack() -> None:
            if not self._abandoned:
                client.lrem(inflight, 1, item)

        def requeue() -> None:
            # Back to the front only if still ours in flight (a new holder may have restored
            # it already): never a second copy ahead of what the new holder handles.
            if not self._abandoned:
                script(keys=[inflight, queue], args=[item, mark_redelivered(item)])

        self.on_delivery(
            Delivery(body, headers, redelivered, ack, requeue, message_id=message_id), partition
        )

    def abandon(self) -> None:
        """From any thread: stop reading, acknowledging and restoring. Messages left in flight
        are restored by whoever takes the partition (or reclaims this instance) over."""
        self._abandoned = True

    def shutdown(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            if not self._abandoned:  # else the lists wait for whoever takes over
                for queue in list(self._open):
                    self.close_queue(queue)
                if self.instance is not None:
                    client.srem(self.instances_key, str(self.instance))
        except Exception:  # broker gone: whoever takes over restores the in-flight list
            pass
        finally:
            self._client = None
            self._open.clear()
            with contextlib.suppress(Exception):
                client.close()
