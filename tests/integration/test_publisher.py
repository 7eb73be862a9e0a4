# kombu is only partly annotated.
# mypy: disable-error-code="no-untyped-call"
"""BrokerPublisher against real Redis and RabbitMQ, read back by plain kombu consumers.

Every test uses its own exchange and queue names (uuid suffix) and deletes them afterwards;
Redis runs in the database number this test run owns (``redis_url`` from the conftest).
Outages are simulated with a TCP proxy in front of the real service, never by touching it.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import redis.client
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.message import Message
from kombu.messaging import Consumer, Producer

from outbox_tasks.envelope import CONTENT_ENCODING, CONTENT_TYPE, OutboundMessage
from outbox_tasks.errors import BrokerUnavailable, ConfigurationError
from outbox_tasks.publisher import BatchResult, BrokerPublisher
from outbox_tasks.publisher.amqp_link import NACK_REASON
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(90)

TIMEOUT = 1.0  # publisher timeout in outage tests: short, so "within the timeout" is quick
SLACK = 1.5  # allowed on top of TIMEOUT for connection teardown and a busy machine


def event(
    aggregate_id: str,
    sequence: int,
    event_type: str = "Created",
    *,
    aggregate_type: str = "Order",
    headers: dict[str, Any] | None = None,
) -> OutboundMessage:
    event_id = str(uuid.uuid4())
    body = json.dumps(
        {"id": event_id, "aggregate_id": aggregate_id, "sequence": sequence, "note": "café ✓"},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()
    return OutboundMessage(
        event_id=event_id,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        event_type=event_type,
        sequence=sequence,
        routing_key=f"{aggregate_type}.{event_type}",
        body=body,
        headers={
            "outbox-event-id": event_id,
            "outbox-sequence": sequence,
            "tenant": "acme",
            **(headers or {}),
        },
    )


def ids(messages: list[OutboundMessage]) -> list[str]:
    return [m.event_id for m in messages]


class Broker:
    """One real broker as a test sees it: a unique exchange, queues bound to it, a consumer."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.suffix = uuid.uuid4().hex[:10]
        self.exchange = Exchange(f"test.publisher.{self.suffix}", type="topic", durable=True)
        # A short BRPOP makes closing a Redis consumer quick (it waits for the pending BRPOP).
        self.conn = Connection(
            url, transport_options={"polling_interval": 0.1} if kind == "redis" else {}
        )
        self.queues: list[Queue] = []
        self.publishers: list[BrokerPublisher] = []

    def publisher(self, url: str | None = None, **options: Any) -> BrokerPublisher:
        publisher = BrokerPublisher(url or self.url, self.exchange.name, **options)
        self.publishers.append(publisher)
        return publisher

    def bind(self, routing_key: str, **arguments: Any) -> Queue:
        """A queue bound to the test exchange, declared (so bound) before anything is sent."""
        queue = Queue(
            f"test.publisher.{self.suffix}.q{len(self.queues)}",
            self.exchange,
            routing_key=routing_key,
            queue_arguments=arguments or None,
        )
        queue(self.conn.default_channel).declare()
        self.queues.append(queue)
        return queue

    def drain(self, queue: Queue, expected: int, timeout: float = 10.0) -> list[Message]:
        """Consume ``expected`` messages, then wait a little more to catch any extra one."""
        received: list[Message] = []

        def on_message(body: Any, message: Message) -> None:
            received.append(message)
            message.ack()

        settle_until: float | None = None
        deadline = time.monotonic() + timeout
        with Consumer(self.conn, [queue], callbacks=[on_message], accept=[CONTENT_TYPE]):
            while True:
                now = time.monotonic()
                if settle_until is None and len(received) >= expected:
                    settle_until = now + 0.3
                until = settle_until if settle_until is not None else deadline
                if now >= until:
                    break
                with suppress(socket.timeout):
                    self.conn.drain_events(timeout=until - now)
        return received

    def close(self) -> None:
        for publisher in self.publishers:
            publisher.close()
        if self.kind == "redis":
            client = redis.Redis.from_url(self.url)
            for key in client.scan_iter(match=f"*{self.suffix}*"):
                client.delete(key)
            client.close()
        else:
            channel = self.conn.default_channel
            for queue in self.queues:
                with suppress(Exception):
                    queue(channel).delete()
            with suppress(Exception):
                self.exchange(channel).delete()
        self.conn.release()


@pytest.fixture
def redis_broker(redis_url: str) -> Iterator[Broker]:
    broker = Broker("redis", redis_url)
    yield broker
    broker.close()


@pytest.fixture
def amqp_broker(amqp_url: str) -> Iterator[Broker]:
    broker = Broker("amqp", amqp_url)
    yield broker
    broker.close()


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> Broker:
    fixture: Broker = request.getfixturevalue(f"{request.param}_broker")
    return fixture


def through(proxy: TcpProxy, url: str) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    host, port = proxy.address
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def proxy_for(tcp_proxy: Callable[[str, int], TcpProxy], url: str) -> TcpProxy:
    parts = urlsplit(url)
    assert parts.hostname is not None
    return tcp_proxy(parts.hostname, parts.port or (6379 if url.startswith("redis") else 5672))


# --------------------------------------------------------------------------------------------
# Both transports
# --------------------------------------------------------------------------------------------


def test_a_batch_reaches_a_topic_bound_queue_in_order_as_ordinary_kombu_messages(
    broker: Broker,
) -> None:
    queue = broker.bind("Order.*")
    batch = [event(f"order-{n % 3}", n // 3) for n in range(12)]

    result = broker.publisher().publish_batch(batch)

    assert result == BatchResult(published=ids(batch), failed={}, skipped=[], unroutable=0)
    received = broker.drain(queue, expected=len(batch))
    assert [m.properties["message_id"] for m in received] == ids(batch)
    for message, sent in zip(received, batch, strict=True):
        assert message.headers == sent.headers
        assert message.content_type == CONTENT_TYPE
        assert message.content_encoding == CONTENT_ENCODING
        assert message.properties["delivery_mode"] == 2
        assert message.delivery_info["routing_key"] == sent.routing_key
        # py-amqp hands a body with a content_encoding over already decoded; Redis does not.
        body = message.body if isinstance(message.body, bytes) else message.body.encode()
        assert body == sent.body
        assert message.decode() == json.loads(sent.body)
        assert json.loads(message.body)["note"] == "café ✓"


def test_messages_go_to_every_matching_queue_and_only_there(broker: Broker) -> None:
    orders = broker.bind("Order.*")
    created = broker.bind("*.Created")
    everything = broker.bind("#")
    order_created, order_paid = event("o-1", 1, "Created"), event("o-1", 2, "Paid")
    customer_created = event("c-1", 1, "Created", aggregate_type="Customer")
    # In wave order already (AMQP sends one message per aggregate at a time).
    batch = [order_created, customer_created, order_paid]

    result = broker.publisher().publish_batch(batch)

    assert result.published == ids(batch)
    assert result.unroutable == 0

    def received(queue: Queue, expected: int) -> list[str]:
        return [m.properties["message_id"] for m in broker.drain(queue, expected)]

    assert received(orders, 2) == ids([order_created, order_paid])
    assert received(created, 2) == ids([order_created, customer_created])
    assert received(everything, 3) == ids(batch)


def test_a_message_whose_headers_cannot_be_encoded_fails_alone_and_skips_only_its_aggregate(
    broker: Broker,
) -> None:
    queue = broker.bind("#")
    a1, a3, a4 = event("a", 1), event("a", 3), event("a", 4)
    a2 = event("a", 2, headers={"not-encodable": object()})
    b1, b2 = event("b", 1), event("b", 2)
    batch = [a1, b1, a2, b2, a3, a4]

    result = broker.publisher().publish_batch(batch)

    assert result.published == ids([a1, b1, b2])
    assert list(result.failed) == [a2.event_id]
    assert "cannot encode" in result.failed[a2.event_id]
    assert result.skipped == ids([a3, a4])
    received = broker.drain(queue, expected=3)
    assert [m.properties["message_id"] for m in received] == ids([a1, b1, b2])


def test_an_unroutable_message_is_dropped_and_counted_as_published(broker: Broker) -> None:
    queue = broker.bind("Order.*")
    routed, lost, routed_after = (
        event("o", 1),
        event("i", 1, aggregate_type="Invoice"),
        event("o", 2),
    )

    result = broker.publisher().publish_batch([routed, lost, routed_after])

    assert result.published == ids([routed, lost, routed_after])
    assert result.unroutable == 1
    assert result.failed == {}
    assert result.skipped == []
    received = broker.drain(queue, expected=2)
    assert [m.properties["message_id"] for m in received] == ids([routed, routed_after])


def test_one_publisher_reuses_its_connection_across_batches(broker: Broker) -> None:
    queue = broker.bind("#")
    publisher = broker.publisher()
    batches = [[event("o", 10 * b + n) for n in range(3)] for b in range(4)]

    assert publisher.publish_batch(batches[0]).published == ids(batches[0])
    connection = publisher._conn
    for batch in batches[1:]:
        assert publisher.publish_batch(batch).published == ids(batch)
        assert publisher._conn is connection

    received = broker.drain(queue, expected=12)
    assert [m.properties["message_id"] for m in received] == [
        e for batch in batches for e in ids(batch)
    ]


def test_an_empty_batch_does_not_even_connect() -> None:
    publisher = BrokerPublisher("redis://127.0.0.1:1/0", "nowhere", timeout_seconds=TIMEOUT)

    assert publisher.publish_batch([]) == BatchResult(published=[], failed={}, skipped=[])
    publisher.close()


@pytest.mark.parametrize(
    "url",
    ["redis://:s3cr3t@127.0.0.1:1/0", "amqp://guest:s3cr3t@127.0.0.1:1//"],
    ids=["redis", "amqp"],
)
def test_a_dead_broker_raises_broker_unavailable_at_once_naming_the_url_without_password(
    url: str,
) -> None:
    publisher = BrokerPublisher(url, "events", timeout_seconds=TIMEOUT)

    for call in (publisher.declare, lambda: publisher.publish_batch([event("o", 1)])):
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as raised:
            call()
        assert time.monotonic() - started < TIMEOUT + SLACK
        assert "127.0.0.1:1" in str(raised.value)
        assert "s3cr3t" not in str(raised.value)
    publisher.close()
    publisher.close()


def test_a_broker_that_goes_down_raises_and_the_next_call_after_it_is_back_reconnects(
    broker: Broker, tcp_proxy: Callable[[str, int], TcpProxy]
) -> None:
    queue = broker.bind("#")
    proxy = proxy_for(tcp_proxy, broker.url)
    publisher = broker.publisher(through(proxy, broker.url), timeout_seconds=TIMEOUT)
    before, during, after = [event("o", 1)], [event("o", 2)], [event("o", 3), event("o", 4)]
    assert publisher.publish_batch(before).published == ids(before)

    proxy.cut()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        publisher.publish_batch(during)
    assert time.monotonic() - started < TIMEOUT + SLACK

    proxy.restore()
    assert publisher.publish_batch(after).published == ids(after)
    received = broker.drain(queue, expected=3)
    assert [m.properties["message_id"] for m in received] == ids(before + after)


def test_a_connection_dropped_while_idle_is_replaced_without_failing_the_next_batch(
    broker: Broker, tcp_proxy: Callable[[str, int], TcpProxy]
) -> None:
    queue = broker.bind("#")
    proxy = proxy_for(tcp_proxy, broker.url)
    publisher = broker.publisher(through(proxy, broker.url), timeout_seconds=TIMEOUT)
    first, second = [event("o", 1)], [event("o", 2)]
    assert publisher.publish_batch(first).published == ids(first)

    proxy.cut()  # resets the idle connection
    proxy.restore()

    assert publisher.publish_batch(second).published == ids(second)
    received = broker.drain(queue, expected=2)
    assert [m.properties["message_id"] for m in received] == ids(first + second)


def test_a_broker_that_stops_answering_raises_broker_unavailable_within_the_timeout(
    broker: Broker, tcp_proxy: Callable[[str, int], TcpProxy]
) -> None:
    queue = broker.bind("#")
    proxy = proxy_for(tcp_proxy, broker.url)
    url = through(proxy, broker.url)
    publisher = broker.publisher(url, timeout_seconds=TIMEOUT)
    first = event("o", 1)
    assert publisher.publish_batch([first]).published == [first.event_id]

    proxy.blackhole()
    during = [event("o", 2), event("p", 1)]
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        publisher.publish_batch(during)
    assert time.monotonic() - started < TIMEOUT + SLACK
    # A new connection to a silent broker is bounded by the timeout too.
    fresh = broker.publisher(url, timeout_seconds=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        fresh.declare()
    assert time.monotonic() - started < TIMEOUT + SLACK

    proxy.restore()
    # As the relay does: the failed batch is retried, followed by newer events.
    retried = [during[0], during[1], event("o", 3), event("p", 2)]
    assert publisher.publish_batch(retried).published == ids(retried)
    received = [m.properties["message_id"] for m in broker.drain(queue, expected=5)]
    assert set(ids(retried)) <= set(received)
    # Bytes held back by the silent broker may arrive as well (at least once), but the first
    # time each event shows up, it is in its aggregate's order.
    sequence = {m.event_id: (m.aggregate_id, m.sequence) for m in [first, *retried]}
    firsts = list(dict.fromkeys(received))
    for aggregate in ("o", "p"):
        seen = [sequence[i][1] for i in firsts if sequence[i][0] == aggregate]
        assert seen == sorted(seen)


def test_close_is_idempotent_and_the_publisher_reconnects_after_it(broker: Broker) -> None:
    queue = broker.bind("#")
    publisher = broker.publisher()
    first, second = [event("o", 1)], [event("o", 2)]
    assert publisher.publish_batch(first).published == ids(first)

    publisher.close()
    publisher.close()

    assert publisher.publish_batch(second).published == ids(second)
    received = broker.drain(queue, expected=2)
    assert [m.properties["message_id"] for m in received] == ids(first + second)


def test_is_amqp_tells_the_transports_apart() -> None:
    assert not BrokerPublisher("redis://127.0.0.1:6379/0", "x").is_amqp
    assert not BrokerPublisher("rediss://127.0.0.1:6379/0", "x").is_amqp
    assert BrokerPublisher("amqp://guest:guest@127.0.0.1:5672//", "x").is_amqp
    assert BrokerPublisher("pyamqp://guest:guest@127.0.0.1:5672//", "x").is_amqp


@pytest.mark.parametrize(
    ("url", "exchange", "options"),
    [
        ("memory://", "x", {}),
        ("sqs://", "x", {}),
        ("redis://127.0.0.1:6379/0", "", {}),
        ("redis://127.0.0.1:6379/0", "x", {"exchange_type": "fanout"}),
        ("amqp://127.0.0.1//", "x", {"exchange_type": "nonsense"}),
        ("amqp://127.0.0.1//", "x", {"timeout_seconds": 0}),
        ("amqp://127.0.0.1//", "x", {"timeout_seconds": float("inf")}),
    ],
)
def test_a_bad_setting_is_a_configuration_error_before_any_connection(
    url: str, exchange: str, options: dict[str, Any]
) -> None:
    with pytest.raises(ConfigurationError):
        BrokerPublisher(url, exchange, **options)


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


class RedisSpy:
    """Records the commands every redis-py client of this process sends, pipelines apart."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.direct: list[str] = []
        self.pipelines: list[list[str]] = []
        execute_command = redis.client.Redis.execute_command
        execute = redis.client.Pipeline.execute

        def spy_command(client: Any, *args: Any, **options: Any) -> Any:
            self.direct.append(str(args[0]).upper())
            return execute_command(client, *args, **options)

        def spy_execute(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            self.pipelines.append([str(c[0][0]).upper() for c in pipe.command_stack])
            return execute(pipe, *args, **kwargs)

        monkeypatch.setattr(redis.client.Redis, "execute_command", spy_command)
        monkeypatch.setattr(redis.client.Pipeline, "execute", spy_execute)

    def reset(self) -> None:
        self.direct.clear()
        self.pipelines.clear()


def test_a_redis_batch_reads_the_binding_table_once_and_pushes_in_one_pipeline(
    redis_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    orders = redis_broker.bind("Order.*")
    everything = redis_broker.bind("#")
    publisher = redis_broker.publisher()
    warm_up = [event("warm", 0)]
    publisher.publish_batch(warm_up)  # connects and declares
    spy = RedisSpy(monkeypatch)
    batch = [event(f"o-{n % 7}", n, "Created" if n % 2 else "Paid") for n in range(200)]
    batch.append(event("i", 1, aggregate_type="Invoice"))  # reaches "#" only

    result = publisher.publish_batch(batch)

    assert result.published == ids(batch)
    assert spy.direct == ["SMEMBERS"]
    # One LPUSH per destination list, carrying every payload of the batch in send order.
    assert spy.pipelines == [["LPUSH", "LPUSH"]]
    monkeypatch.undo()
    assert len(redis_broker.drain(orders, expected=201)) == 201
    assert len(redis_broker.drain(everything, expected=202)) == 202


def test_a_redis_message_is_stored_exactly_as_kombus_producer_stores_it(
    redis_broker: Broker,
) -> None:
    queue = redis_broker.bind("Order.*")
    message = event("o", 1)
    channel = redis_broker.conn.default_channel
    Producer(channel, redis_broker.exchange).publish(
        message.body,
        routing_key=message.routing_key,
        content_type=CONTENT_TYPE,
        content_encoding=CONTENT_ENCODING,
        headers=message.headers,
        message_id=message.event_id,
        delivery_mode=2,
    )

    redis_broker.publisher().publish_batch([message])

    client = redis.Redis.from_url(redis_broker.url)
    ours, kombus = (json.loads(raw) for raw in client.lrange(queue.name, 0, -1))
    client.close()
    assert ours["properties"].pop("delivery_tag") != kombus["properties"].pop("delivery_tag")
    assert ours == kombus


def test_an_unroutable_redis_message_is_not_parked_in_kombus_undeliver_queue(
    redis_broker: Broker,
) -> None:
    redis_broker.bind("Order.*")
    client = redis.Redis.from_url(redis_broker.url)
    undeliver_before = client.llen("ae.undeliver")
    lost = [event("i", n, aggregate_type="Invoice") for n in range(5)]

    result = redis_broker.publisher().publish_batch(lost)

    assert result.unroutable == 5
    assert result.published == ids(lost)
    assert client.llen("ae.undeliver") == undeliver_before
    client.close()


def test_a_redis_batch_with_no_binding_at_all_is_all_unroutable(redis_broker: Broker) -> None:
    batch = [event("o", 1), event("o", 2)]

    result = redis_broker.publisher().publish_batch(batch)

    assert result == BatchResult(published=ids(batch), failed={}, skipped=[], unroutable=2)


# --------------------------------------------------------------------------------------------
# RabbitMQ
# --------------------------------------------------------------------------------------------


def test_a_rabbitmq_nack_defers_that_message_as_maybe_sent_and_skips_the_rest_of_its_aggregate(
    amqp_broker: Broker,
) -> None:
    observer = amqp_broker.bind("#")
    # A full queue that rejects publishes makes RabbitMQ nack what is routed to it.
    amqp_broker.bind("Order.Rejected", **{"x-max-length": 0, "x-overflow": "reject-publish"})
    a1, a2, a3 = event("a", 1), event("a", 2, "Rejected"), event("a", 3, "Shipped")
    b1, b2 = event("b", 1), event("b", 2, "Shipped")

    result = amqp_broker.publisher().publish_batch([a1, a2, a3, b1, b2])

    # Backpressure, not the message's fault (issue 11, item 2).
    assert result.failed == {}
    assert result.deferred == {a2.event_id: NACK_REASON}
    assert result.maybe_sent == [a2.event_id]
    assert result.skipped == [a3.event_id]
    assert result.published == ids([a1, b1, b2])
    seen = [m.properties["message_id"] for m in amqp_broker.drain(observer, expected=3)]
    # A nacked message may still have reached other queues; a3 must reach none.
    assert [i for i in seen if i != a2.event_id] == ids([a1, b1, b2])


def test_rabbitmq_sends_a_message_only_once_its_aggregates_predecessor_is_confirmed(
    amqp_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = amqp_broker.bind("#")
    a1, a2, a3 = event("a", 1), event("a", 2), event("a", 3)
    b1, b2 = event("b", 1), event("b", 2)
    c1 = event("c", 1)
    batch = [a1, a2, a3, b1, b2, c1]
    publisher = amqp_broker.publisher()
    publisher.declare()
    link: Any = publisher._link
    publish = link._channel.basic_publish
    sent: list[str] = []
    in_flight_at_send: list[set[str]] = []

    def spy(wire: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(wire.properties["message_id"])
        in_flight_at_send.append({batch[i].event_id for i in link._unconfirmed.values()})
        return publish(wire, *args, **kwargs)

    monkeypatch.setattr(link._channel, "basic_publish", spy)

    result = publisher.publish_batch(batch)

    assert result.published == ids(batch)
    # The first message of every aggregate goes out at once, without waiting for the others ...
    assert sent[:3] == ids([a1, b1, c1])
    # ... and no message is sent while an earlier one of its aggregate is unconfirmed.
    for event_id, in_flight in zip(sent, in_flight_at_send, strict=True):
        aggregate = next(m.aggregate_id for m in batch if m.event_id == event_id)
        assert not {m.event_id for m in batch if m.aggregate_id == aggregate} & (
            in_flight - {event_id}
        )
    assert sorted(sent) == sorted(ids(batch))
    received = [m.properties["message_id"] for m in amqp_broker.drain(queue, expected=6)]
    for aggregate in ([a1, a2, a3], [b1, b2]):
        assert [i for i in received if i in ids(aggregate)] == ids(aggregate)


def test_rabbitmq_lanes_do_not_wait_for_one_another(
    amqp_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    amqp_broker.bind("#")
    long_lane = [event("a", n) for n in range(1, 6)]
    others = [event(f"o{n}", 1) for n in range(5)]
    publisher = amqp_broker.publisher()
    publisher.declare()
    link: Any = publisher._link
    publish = link._channel.basic_publish
    wait = link._raw.drain_events
    trace: list[str] = []  # "send <event id>" and "wait", in the order they happened

    def send_spy(message: Any, *args: Any, **kwargs: Any) -> Any:
        trace.append(f"send {message.properties['message_id']}")
        return publish(message, *args, **kwargs)

    def wait_spy(*args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        if timeout != 0:  # py-amqp polls with timeout=0 inside basic_publish: not a wait
            trace.append("wait")
        return wait(*args, timeout=timeout, **kwargs)

    monkeypatch.setattr(link._channel, "basic_publish", send_spy)
    monkeypatch.setattr(link._raw, "drain_events", wait_spy)

    result = publisher.publish_batch([*long_lane, *others])

    assert result.published == ids([*long_lane, *others])
    # All six aggregates' first messages went out before the link waited for any confirm.
    heads = [f"send {m.event_id}" for m in [long_lane[0], *others]]
    assert trace[:6] == heads, trace


def test_declare_creates_a_durable_topic_exchange_and_is_idempotent(amqp_broker: Broker) -> None:
    publisher = amqp_broker.publisher()

    publisher.declare()
    publisher.declare()

    # Redeclaring with the same settings succeeds only if they are equal (else 406).
    channel = amqp_broker.conn.default_channel
    amqp_broker.exchange(channel).declare()
    channel.exchange_declare(exchange=amqp_broker.exchange.name, type="topic", passive=True)


def test_an_exchange_that_exists_with_another_type_is_a_configuration_error(
    amqp_broker: Broker,
) -> None:
    amqp_broker.publisher().declare()  # a topic exchange
    other = amqp_broker.publisher(exchange_type="direct")

    with pytest.raises(ConfigurationError, match="exists with settings other than"):
        other.declare()
    other.close()
