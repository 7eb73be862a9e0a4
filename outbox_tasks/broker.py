"""Broker plumbing shared by the event publisher and the consumers (kombu, redis-py, py-amqp).

One home for: the broker URL schemes (:func:`broker_scheme`, :func:`is_amqp`), the ONE
classification of driver errors that mean "the broker is unavailable" (:func:`broker_errors`)
and the wrapper that turns them into :class:`~outbox_tasks.errors.BrokerUnavailable`
(:func:`broker_call`), the classification of everything else that can go wrong while publishing
(:func:`publish_fault`), connection release (:func:`release`, :func:`forget`, :func:`released`,
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
import socket
from collections.abc import Callable, Iterator
from typing import Any, Final

from outbox_tasks.errors import (
    ERROR_TEXT_MAX,
    BrokerUnavailable,
    ConfigurationError,
    InvalidMessage,
    OutboxError,
    describe_error,
)

__all__ = [
    "AMQP_SCHEMES",
    "BROKER_NACK",
    "BROKER_UNAVAILABLE",
    "INVALID_MESSAGE",
    "MESSAGE_REJECTED",
    "PERSISTENT",
    "REDIS_SCHEMES",
    "UNKNOWN_ERROR",
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
    "publish_fault",
    "publish_outage",
    "redis_client",
    "release",
    "released",
    "safe_url",
    "tcp_keepalive_options",
]

REDIS_SCHEMES: Final = frozenset({"redis", "rediss"})
AMQP_SCHEMES: Final = frozenset({"amqp", "amqps", "pyamqp"})
PERSISTENT: Final = 2
"""AMQP ``delivery_mode`` of a message the broker keeps on disk."""

ErrorTypes = tuple[type[BaseException], ...]

# --- what went wrong while publishing: one classification (the error_type metric label) -------
BROKER_UNAVAILABLE: Final = "broker_unavailable"
"""An outage: the broker as a whole cannot take messages now. Opens the circuit; no retry spent."""
MESSAGE_REJECTED: Final = "message_rejected"
"""The broker refused this message alone. Retried with backoff, then dead-lettered (parked)."""
BROKER_NACK: Final = "broker_nack"
"""Backpressure: a healthy broker did not take the message now (RabbitMQ ``basic.nack``: a bound
queue is full with ``x-overflow=reject-publish``, or a queue is unavailable). Retried without
spending the retry budget, for a bounded time, then dead-lettered. It may have reached the other
queues: every re-send is flagged ``outbox-redelivered``."""
INVALID_MESSAGE: Final = "invalid_message"
"""The relay's own check before sending (``outbox_tasks.limits``): the broker would refuse it
whatever happens. Dead-lettered at once."""
UNKNOWN_ERROR: Final = "unknown_error"
"""An exception nobody recognised: treated as refused for this message (logged with its type)."""

# Redis answers these to every write while it is out of memory, read-only, loading or failing
# over: the whole broker cannot take messages, not just this one.
_REDIS_OUTAGE_REPLIES: Final = (
    "OOM",
    "READONLY",
    "MISCONF",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "NOREPLICAS",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "NOAUTH",
    "NOPERM",
)
# AMQP reply codes of a channel error that is about the message itself: 406 PRECONDITION_FAILED
# (e.g. over RabbitMQ's max_message_size). Any other channel error (404 exchange gone, 403 no
# permission) holds for every message: an outage until someone fixes it.
_AMQP_MESSAGE_REPLY_CODES: Final = frozenset({406})


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


def tcp_keepalive_options(bound_seconds: float) -> dict[int, int]:
    """``socket_keepalive_options`` for redis-py (``setsockopt(IPPROTO_TCP, key, value)``) from
    ``OUTBOX_TCP_USER_TIMEOUT_SECONDS``: keepalive probes after a third of the bound, three of
    them half a third apart, and unacknowledged data dropped after the bound (Linux
    ``TCP_USER_TIMEOUT``, milliseconds). Empty when the bound is 0 or the platform lacks the
    options (the kernel's defaults apply)."""
    if bound_seconds <= 0:
        return {}
    wanted = {
        "TCP_KEEPIDLE": max(1, round(bound_seconds / 3)),
        "TCP_KEEPINTVL": max(1, round(bound_seconds / 6)),
        "TCP_KEEPCNT": 3,
        "TCP_USER_TIMEOUT": max(1, int(bound_seconds * 1000)),
    }
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


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


def publish_outage(error: BaseException, outage: ErrorTypes) -> bool:
    """True when ``error``, raised while publishing, means the broker as a whole cannot take
    messages now (``outage`` is :func:`broker_errors` of the URL): a connection error, a timeout,
    a channel error that is not about one message, Redis refusing every write (OOM, READONLY,
    ...). False for everything that may be this message's own fault."""
    if isinstance(error, BrokerUnavailable):
        return True
    if isinstance(error, OutboxError):
        return False
    reply_code = getattr(error, "reply_code", None)
    if _is_amqp_channel_error(error) and reply_code in _AMQP_MESSAGE_REPLY_CODES:
        return False
    if _is_redis_reply_error(error):
        return str(error).split(" ", 1)[0].upper() in _REDIS_OUTAGE_REPLIES
    return isinstance(error, outage)


def publish_fault(error: BaseException) -> str:
    """The error type (metric label) of an exception that escaped publishing and is not an
    outage (see :func:`publish_outage`): :data:`INVALID_MESSAGE` for our own checks,
    :data:`MESSAGE_REJECTED` for what the drivers say about one message (a frame that cannot be
    encoded, RabbitMQ's 406, a Redis error reply), :data:`UNKNOWN_ERROR` for anything else."""
    if isinstance(error, BrokerUnavailable):
        return BROKER_UNAVAILABLE
    if isinstance(error, InvalidMessage):
        return INVALID_MESSAGE
    if _is_encoding_error(error) or _is_amqp_channel_error(error) or _is_redis_reply_error(error):
        return MESSAGE_REJECTED
    return UNKNOWN_ERROR


def _is_amqp_channel_error(error: BaseException) -> bool:
    from amqp.exceptions import ChannelError

    return isinstance(error, ChannelError)


def _is_redis_reply_error(error: BaseException) -> bool:
    import redis.exceptions

    return isinstance(error, redis.exceptions.ResponseError)


def _is_encoding_error(error: BaseException) -> bool:
    import struct

    from amqp.exceptions import FrameSyntaxError

    # py-amqp: a short string over 255 bytes (struct.error), a value it cannot put in a table.
    return isinstance(error, struct.error | FrameSyntaxError | UnicodeError)


@contextlib.contextmanager
def broker_call(
    url: str,
    what: str,
    *,
    errors: ErrorTypes | None = None,
    on_failure: Callable[[], None] | None = None,
    limit: int = ERROR_TEXT_MAX,
    publishing: bool = False,
) -> Iterator[None]:
    """Run the block, translating broker outages into :class:`BrokerUnavailable`.

    ``errors`` is :func:`broker_errors` of ``url`` (computed here when not given). The
    message names the broker (never its password) and ``what`` was being done, with the
    driver's error described in at most ``limit`` characters; the driver error is kept as
    ``__cause__``. Our own errors (:class:`OutboxError`) and anything else pass through
    unchanged. ``on_failure`` runs first whatever the block raised: e.g. drop a connection that
    may hold half-read frames, so the next call starts fresh. ``publishing``: classify with
    :func:`publish_outage` (a 406 or a Redis error reply about one message is not an outage).
    """
    outage = broker_errors(url) if errors is None else errors
    try:
        yield
    except BaseException as error:
        if on_failure is not None:
            on_failure()
        is_outage = (
            publish_outage(error, outage)
            if publishing and isinstance(error, Exception)
            else isinstance(error, outage)
        )
        if is_outage and not isinstance(error, OutboxError):
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
