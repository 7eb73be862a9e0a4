"""Broker plumbing: kombu and redis, imported on first use only. Broker URLs and the mapping of
driver errors to BrokerUnavailable, the group's queue definitions, the confirmed writer for
dead letters and replays, the Redis transport's message format, and topology declare/delete."""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

from outbox_tasks.consumer.group import ConsumerGroup, _admin_group
from outbox_tasks.consumer.processing import _describe
from outbox_tasks.envelope import CONTENT_ENCODING, CONTENT_TYPE
from outbox_tasks.errors import BrokerUnavailable, ConfigurationError, OutboxError
from outbox_tasks.settings import Settings

_REDIS_SCHEMES: Final = frozenset({"redis", "rediss"})
_AMQP_SCHEMES: Final = frozenset({"amqp", "amqps", "pyamqp"})


def _kombu(path: str) -> Any:
    """A kombu class or function, imported on first use (kombu is untyped: called as Any)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _connection(url: str, **options: Any) -> Any:
    return _kombu("kombu.connection.Connection")(url, **options)


@contextlib.contextmanager
def _released(url: str, **options: Any) -> Iterator[Any]:
    """A kombu connection for one piece of work, released (quietly) after it."""
    conn: Any = _connection(url, **options)
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.release()


@contextlib.contextmanager
def _redis_client(url: str, **options: Any) -> Iterator[Any]:
    """A redis client for one piece of work, closed after it."""
    import redis

    client: Any = redis.Redis.from_url(url, **options)
    try:
        yield client
    finally:
        client.close()


def _queue(name: str, **options: Any) -> Any:
    return _kombu("kombu.entity.Queue")(name, **options)


def _scheme(url: str) -> str:
    scheme = url.partition("://")[0].lower()
    if scheme not in _REDIS_SCHEMES | _AMQP_SCHEMES:
        raise ConfigurationError(
            "broker URL: expected a redis://, rediss://, amqp://, amqps:// or pyamqp:// URL"
        )
    return scheme


def _is_amqp(url: str) -> bool:
    return _scheme(url) in _AMQP_SCHEMES


def _safe(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def _broker_errors(url: str) -> tuple[type[BaseException], ...]:
    import redis.exceptions
    from kombu.exceptions import OperationalError

    probe: Any = _connection(url)
    errors = tuple(probe.connection_errors) + tuple(probe.channel_errors)
    kept = tuple(e for e in errors if not issubclass(e, LookupError))
    return (
        *kept,
        OperationalError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        OSError,
    )


def _kombu_queues(group: ConsumerGroup, exchange: str, amqp: bool) -> list[Any]:
    """The kombu Queue objects of the group: event queues (bound) and the dead-letter queue."""

    topic: Any = _kombu("kombu.entity.Exchange")(exchange, type="topic", durable=True)
    bindings = [
        _kombu("kombu.entity.binding")(topic, routing_key=pattern) for pattern in group.bindings
    ]
    arguments = {"x-single-active-consumer": True} if amqp and group.ordered else None
    queues: list[Any] = [
        _queue(name, bindings=bindings, durable=True, queue_arguments=arguments)
        for name in group.queues
    ]
    queues.append(_queue(group.dead_letter_queue, durable=True))
    return queues


def _declare(channel: Any, queues: Sequence[Any]) -> None:
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


class _BrokerWriter:
    """A connection of its own for dead-letter and replay publishes (RabbitMQ: confirmed).

    Separate from the consuming connection so that waiting for a confirm never delivers
    another message into a handler that is still running.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.amqp = _is_amqp(url)
        self._conn: Any = None
        self._producer: Any = None
        self._errors = _broker_errors(url)
        self._declared: dict[str, Any] = {}

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
            conn: Any = _connection(
                self.url, connect_timeout=self.timeout, transport_options=options
            )
            self._conn = conn
            conn.ensure_connection(max_retries=0)
            self._producer = _kombu("kombu.messaging.Producer")(conn.channel())
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
        try:
            producer = self._ensure()
            entity = declare if declare is not None else _queue(queue, durable=True)
            producer.publish(
                body,
                exchange="",
                routing_key=queue,
                headers=dict(headers),
                content_type=CONTENT_TYPE,
                content_encoding=CONTENT_ENCODING,
                delivery_mode=2,
                message_id=message_id or None,
                declare=[entity],
                retry=False,
                timeout=self.timeout,
            )
        except self._errors as error:
            self.close()
            raise BrokerUnavailable(
                f"broker {_safe(self.url)} unavailable while publishing to {queue}: "
                f"{_describe(error)}"
            ) from error
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect(socket_timeout=self.timeout)


def _decode_redis_item(item: bytes) -> tuple[bytes, dict[str, Any], bool, str | None]:
    """A message as kombu's Redis transport stores it -> (body, headers, redelivered, id)."""
    try:
        raw = json.loads(item)
        props = raw.get("properties") or {}
        body = raw.get("body", "")
        if props.get("body_encoding") == "base64":
            data = base64.b64decode(body)
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
        headers = raw.get("headers") or {}
        info = props.get("delivery_info") or {}
        redelivered = bool(info.get("redelivered") or raw.get("redelivered"))
        message_id = props.get("message_id")
        return data, dict(headers), redelivered, message_id if isinstance(message_id, str) else None
    except (ValueError, TypeError, AttributeError):
        return item, {}, False, None


def _mark_redelivered(item: bytes) -> bytes:
    try:
        raw = json.loads(item)
        raw.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
        return json.dumps(raw).encode()
    except (ValueError, TypeError, AttributeError):
        return item


def _as_bytes(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, bytearray | memoryview):
        return bytes(body)
    return json.dumps(body).encode()


@contextlib.contextmanager
def _broker_call(url: str, what: str) -> Iterator[None]:
    """Broker driver errors -> BrokerUnavailable, naming the broker (never its password)."""
    errors = _broker_errors(url)
    try:
        yield
    except OutboxError:
        raise
    except errors as error:
        raise BrokerUnavailable(
            f"broker {_safe(url)} unavailable while {what}: {_describe(error)}"
        ) from error


def _resolve(settings: Settings | None, url: str | None) -> tuple[Settings | None, str]:
    if url is not None:
        return settings, url
    settings = settings or Settings.from_env()
    return settings, settings.effective_publish_url


def _exchange_name(settings: Settings | None, exchange: str | None = None) -> str:
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
    target = _admin_group(group, partitions)
    settings, url = _resolve(settings, url)
    exchange_name = _exchange_name(settings, exchange)
    with _released(url) as conn, _broker_call(url, "declaring the group's queues"):
        _declare(conn.channel(), _kombu_queues(target, exchange_name, _is_amqp(url)))


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
    target = _admin_group(group, partitions)
    settings, url = _resolve(settings, url)
    exchange_name = _exchange_name(settings, exchange)
    amqp = _is_amqp(url)
    with _released(url) as conn:
        for queue in _kombu_queues(target, exchange_name, amqp):
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
            with _redis_client(url) as client:
                keys = [f"{q}.inflight" for q in target.queues]
                keys += [f"{target.dead_letter_queue}.replaying", f"{target.queue}.instances"]
                keys += [k for k in client.scan_iter(match=f"{target.queue}.inflight.*")]
                client.delete(*keys)
