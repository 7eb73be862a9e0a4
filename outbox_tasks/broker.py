"""Broker plumbing shared by the event publisher and the consumers (kombu, redis-py, py-amqp).

One home for: the broker URL schemes (:func:`broker_scheme`, :func:`is_amqp`), the ONE
classification of driver errors that mean "the broker is unavailable" (:func:`broker_errors`)
and the wrapper that turns them into :class:`~outbox_tasks.errors.BrokerUnavailable`
(:func:`broker_call`), connection release (:func:`release`, :func:`forget`, :func:`released`,
:func:`redis_client`) and the message format of kombu's Redis transport
(:func:`decode_redis_item`, :func:`mark_redelivered`, :func:`as_bytes`).

kombu and redis are imported on first use only, so importing this module (and the consumer API
built on it) stays cheap.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
from collections.abc import Callable, Iterator
from typing import Any, Final

from outbox_tasks.errors import (
    ERROR_TEXT_MAX,
    BrokerUnavailable,
    ConfigurationError,
    OutboxError,
    describe_error,
)

__all__ = [
    "AMQP_SCHEMES",
    "PERSISTENT",
    "REDIS_SCHEMES",
    "as_bytes",
    "broker_call",
    "broker_errors",
    "broker_scheme",
    "connection",
    "decode_redis_item",
    "forget",
    "is_amqp",
    "kombu",
    "mark_redelivered",
    "redis_client",
    "release",
    "released",
    "safe_url",
]

REDIS_SCHEMES: Final = frozenset({"redis", "rediss"})
AMQP_SCHEMES: Final = frozenset({"amqp", "amqps", "pyamqp"})
PERSISTENT: Final = 2
"""AMQP ``delivery_mode`` of a message the broker keeps on disk."""

ErrorTypes = tuple[type[BaseException], ...]


def kombu(path: str) -> Any:
    """A kombu class or function by dotted path, imported on first use.

    kombu is only partly annotated: it is called through ``Any`` rather than through ignores.
    """
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def connection(url: str, **options: Any) -> Any:
    """A kombu ``Connection`` for ``url`` (no I/O until it is used)."""
    return kombu("kombu.connection.Connection")(url, **options)


def safe_url(url: str) -> str:
    """``url`` with its password masked, for messages and logs."""
    return str(kombu("kombu.utils.url.maybe_sanitize_url")(url))


def broker_scheme(url: str) -> str:
    """The lower-cased scheme of a supported broker URL (``redis``, ``amqp``...).

    Raises :class:`ConfigurationError` for any other URL.
    """
    scheme = url.partition("://")[0].lower()
    if scheme not in REDIS_SCHEMES and scheme not in AMQP_SCHEMES:
        raise ConfigurationError(
            f"broker URL {safe_url(url)!r}: expected a redis://, rediss://, amqp://, "
            "amqps:// or pyamqp:// URL"
        )
    return scheme


def is_amqp(url: str) -> bool:
    """True for RabbitMQ (AMQP 0-9-1) URLs, False for Redis; :class:`ConfigurationError` else."""
    return broker_scheme(url) in AMQP_SCHEMES


def broker_errors(url: str) -> ErrorTypes:
    """The driver exceptions that mean "broker unavailable" for ``url``'s transport.

    Built from the transport class only: no I/O. Anything else raised while talking to the
    broker is a bug or the message's own fault, never an outage.
    """
    import redis.exceptions

    operational_error = kombu("kombu.exceptions.OperationalError")
    probe = connection(url)
    transport_errors: ErrorTypes = tuple(probe.connection_errors) + tuple(probe.channel_errors)
    # kombu's Redis transport lists KeyError among its connection errors; catching it would turn
    # our own bugs into "broker unavailable", so it is left out.
    kept = tuple(e for e in transport_errors if not issubclass(e, LookupError))
    return (
        *kept,
        operational_error,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        OSError,  # includes socket.timeout, ConnectionRefusedError, ConnectionResetError
    )


@contextlib.contextmanager
def broker_call(
    url: str,
    what: str,
    *,
    errors: ErrorTypes | None = None,
    on_failure: Callable[[], None] | None = None,
    limit: int = ERROR_TEXT_MAX,
) -> Iterator[None]:
    """Run the block, translating broker outages into :class:`BrokerUnavailable`.

    ``errors`` is :func:`broker_errors` of ``url`` (computed here when not given). The
    message names the broker (never its password) and ``what`` was being done, with the
    driver's error described in at most ``limit`` characters; the driver error is kept as
    ``__cause__``. Our own errors (:class:`OutboxError`) and anything else pass through
    unchanged. ``on_failure`` runs first whatever the block raised: e.g. drop a connection that
    may hold half-read frames, so the next call starts fresh.
    """
    outage = broker_errors(url) if errors is None else errors
    try:
        yield
    except BaseException as error:
        if on_failure is not None:
            on_failure()
        if isinstance(error, outage) and not isinstance(error, OutboxError):
            raise BrokerUnavailable(
                f"broker {safe_url(url)} unavailable while {what}: "
                f"{describe_error(error, limit=limit)}"
            ) from error
        raise


def forget(conn: Any, timeout: float) -> None:
    """Let a kombu connection's sockets go without talking to the broker, which may be gone."""
    # Called while another error is being handled: never let cleanup hide it.
    with contextlib.suppress(Exception):
        conn.collect(socket_timeout=timeout)


def release(conn: Any, timeout: float) -> None:
    """Close a kombu connection politely, or just forget it if the broker does not answer."""
    try:
        conn.release()
    except Exception:
        # Closing must not fail: whatever the broker's state, just let the sockets go.
        forget(conn, timeout)


@contextlib.contextmanager
def released(url: str, **options: Any) -> Iterator[Any]:
    """A kombu connection for one piece of work, released (quietly) after it."""
    conn: Any = connection(url, **options)
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.release()


@contextlib.contextmanager
def redis_client(url: str, **options: Any) -> Iterator[Any]:
    """A redis-py client for one piece of work, closed after it."""
    import redis

    client: Any = redis.Redis.from_url(url, **options)
    try:
        yield client
    finally:
        client.close()


def decode_redis_item(item: bytes) -> tuple[bytes, dict[str, Any], bool, str | None]:
    """A message as kombu's Redis transport stores it -> (body, headers, redelivered, id).

    An item that is not kombu's JSON comes back as its own body, with no headers.
    """
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


def mark_redelivered(item: bytes) -> bytes:
    """A kombu Redis item flagged as redelivered (unchanged if it is not kombu's JSON)."""
    try:
        raw = json.loads(item)
        raw.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
        return json.dumps(raw).encode()
    except (ValueError, TypeError, AttributeError):
        return item


def as_bytes(body: Any) -> bytes:
    """A decoded kombu message body as bytes (JSON for anything that is not text or bytes)."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, bytearray | memoryview):
        return bytes(body)
    return json.dumps(body).encode()
