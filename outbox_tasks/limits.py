"""What PostgreSQL and the brokers refuse, checked before a message is stored or sent.

Pure functions over plain values, shared by the producer (``OutboxMessage``) and the relay (rows
written with plain SQL bypass the builder). Each raises :class:`InvalidMessage` whose text starts
with the field it is about. The limits are the strictest of the supported transports, so a
message accepted on Redis is also accepted after a move to RabbitMQ:

* text columns and header strings: no NUL (PostgreSQL's ``text`` and ``jsonb`` refuse it) and no
  lone surrogate (not encodable as UTF-8);
* routing key ``<aggregate_type>.<event_type>``: at most 255 bytes of UTF-8 (AMQP short string);
* header names, at every nesting level: non-empty strings of at most 255 bytes (AMQP field-table
  keys are short strings); integers within a signed 64-bit range; only JSON values; at most
  64 KiB of headers in all, as JSON or as an AMQP table (they travel in one AMQP frame, 128 KiB
  by default on RabbitMQ, which closes the connection on a larger one);
  ``CC``/``BCC`` (RabbitMQ sender-selected distribution) must be lists of routing keys;
* message body: at most the broker's limit (RabbitMQ's ``max_message_size``, 128 MiB by
  default; Redis takes up to 512 MB per value, so the same setting bounds it there too).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from outbox_tasks.errors import InvalidMessage

MAX_NAME_CHARS: Final = 255
MAX_ROUTING_KEY_BYTES: Final = 255
MAX_HEADER_NAME_BYTES: Final = 255
MAX_HEADERS_BYTES: Final = 64 * 1024
DEFAULT_MAX_MESSAGE_BYTES: Final = 128 * 1024 * 1024
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
# RabbitMQ routes a message to these headers' routing keys as well, and closes the channel when
# they are not arrays of strings.
ROUTING_HEADERS: Final = frozenset({"CC", "BCC"})


def text_problem(value: str) -> str | None:
    """Why PostgreSQL or UTF-8 cannot carry ``value`` (None when it can)."""
    if "\x00" in value:
        return "contains a NUL character (\\u0000), which PostgreSQL refuses"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        return (
            f"contains a lone surrogate character (U+{code:04X}) at index {exc.start}, which is "
            "not valid UTF-8"
        )
    return None


def check_text(field: str, value: str) -> None:
    """Raise InvalidMessage naming ``field`` when ``value`` cannot be stored or sent as text."""
    problem = text_problem(value)
    if problem is not None:
        raise InvalidMessage(f"{field} {problem}; fix the string's content or encoding")


def check_name(field: str, value: object) -> str:
    """One of ``aggregate_type``, ``aggregate_id``, ``event_type``: a non-empty string of at
    most 255 characters that PostgreSQL can store. Returns it; raises InvalidMessage."""
    if not isinstance(value, str):
        raise InvalidMessage(f"{field} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidMessage(f"{field} must not be empty")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidMessage(
            f"{field} is {len(value)} characters long; the limit is {MAX_NAME_CHARS}"
        )
    check_text(field, value)
    return value


def routing_key_problem(routing_key: str) -> str | None:
    """Why an AMQP broker cannot take ``routing_key`` (None when it can)."""
    size = len(routing_key.encode("utf-8", "surrogatepass"))
    if size > MAX_ROUTING_KEY_BYTES:
        return (
            f"routing key is {size} bytes in UTF-8; the limit is {MAX_ROUTING_KEY_BYTES} "
            "(an AMQP short string)"
        )
    return None


def check_routing_key(aggregate_type: str, event_type: str) -> None:
    """``<aggregate_type>.<event_type>`` must fit an AMQP short string (255 bytes of UTF-8)."""
    size = len(f"{aggregate_type}.{event_type}".encode("utf-8", "surrogatepass"))
    if size > MAX_ROUTING_KEY_BYTES:
        raise InvalidMessage(
            f"routing key (aggregate_type.event_type) is {size} bytes in UTF-8; the limit is "
            f"{MAX_ROUTING_KEY_BYTES} (an AMQP short string): shorten aggregate_type "
            f"({len(aggregate_type)} characters) or event_type ({len(event_type)} characters)"
        )


def check_headers(headers: object, *, reserved_prefix: str | None = "outbox-") -> None:
    """User headers: a dict the transports can encode (see the module docstring).

    ``reserved_prefix``: top-level names starting with it (any case) are refused, None to allow
    them (the relay drops or overwrites them anyway). Raises InvalidMessage naming the header.
    """
    if not isinstance(headers, dict):
        raise InvalidMessage(f"headers must be a dict, got {type(headers).__name__}")
    if not headers:
        return  # the common case, checked once per message on the relay's hot path
    for key in headers:
        if not isinstance(key, str) or not key:
            raise InvalidMessage(f"header names must be non-empty strings, got {key!r}")
        if reserved_prefix and key.lower().startswith(reserved_prefix):
            raise InvalidMessage(
                f"header {key!r} is reserved: {reserved_prefix}* headers are set by the relay"
            )
    _check_table("", headers)
    for key in ROUTING_HEADERS & headers.keys():
        value = headers[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidMessage(
                f"header {key!r} must be a list of routing keys (RabbitMQ's sender-selected "
                f"distribution), got {type(value).__name__}"
            )
        for item in value:
            if len(item.encode()) > MAX_ROUTING_KEY_BYTES:
                raise InvalidMessage(
                    f"header {key!r} holds a routing key of {len(item.encode())} bytes; the "
                    f"limit is {MAX_ROUTING_KEY_BYTES}"
                )
    try:
        serialized = json.dumps(headers, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(
            f"headers must be JSON-serializable: {exc}. Convert the value to str, int, float, "
            "bool, None, list or dict before adding the message."
        ) from None
    size = max(len(serialized.encode()), amqp_table_size(headers))
    if size > MAX_HEADERS_BYTES:
        raise InvalidMessage(
            f"headers are {size} bytes encoded; the limit is {MAX_HEADERS_BYTES} (they travel "
            "in one AMQP frame). Put large data in the payload."
        )


def amqp_table_size(table: Mapping[str, Any]) -> int:
    """Bytes of ``table`` encoded as an AMQP 0-9-1 field table, as py-amqp writes it (a header
    frame larger than the broker's ``frame_max`` makes RabbitMQ close the whole connection)."""
    return 4 + sum(
        1 + len(k.encode("utf-8", "surrogatepass")) + _item_size(v) for k, v in table.items()
    )


def _item_size(value: object) -> int:
    if isinstance(value, str):
        return 5 + len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bool):
        return 2
    if isinstance(value, float):
        return 9
    if isinstance(value, int):
        return 5 if -2147483647 <= value <= 2147483647 else 9
    if isinstance(value, dict):
        return 1 + amqp_table_size(value)
    if isinstance(value, list | tuple):
        return 5 + sum(_item_size(v) for v in value)
    return 1  # None (void); other types were refused before


def _check_table(path: str, table: Mapping[Any, Any]) -> None:
    """Names and values of one header table; ``path`` is where it sits ("" at the top)."""
    for key, value in table.items():
        if not isinstance(key, str) or not key:
            raise InvalidMessage(f"header names must be non-empty strings, got {key!r}")
        name = f"{path}.{key}" if path else key
        problem = text_problem(key)
        if problem is not None:
            raise InvalidMessage(f"header {name!r} name {problem}")
        size = len(key.encode())
        if size > MAX_HEADER_NAME_BYTES:
            raise InvalidMessage(
                f"header {name!r} name is {size} bytes in UTF-8; the limit is "
                f"{MAX_HEADER_NAME_BYTES} (an AMQP short string)"
            )
        _check_value(name, value)


def _check_value(path: str, value: object) -> None:
    if isinstance(value, str):
        problem = text_problem(value)
        if problem is not None:
            raise InvalidMessage(f"header {path!r} value {problem}")
    elif isinstance(value, bool) or value is None or isinstance(value, float):
        return  # NaN and infinities are refused with the JSON check
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidMessage(
                f"header {path!r} value {value} does not fit a signed 64-bit integer (AMQP); "
                "send it as a string"
            )
    elif isinstance(value, dict):
        _check_table(path, value)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(f"{path}[{index}]", item)
    else:
        raise InvalidMessage(
            f"header {path!r} value of type {type(value).__name__} is not JSON-serializable: "
            "convert it to str, int, float, bool, None, list or dict"
        )


def check_message_size(size_bytes: int, limit_bytes: int) -> None:
    """The serialized message body against the broker's limit (``OUTBOX_MAX_MESSAGE_BYTES``)."""
    if size_bytes > limit_bytes:
        raise InvalidMessage(
            f"message body is {size_bytes} bytes; the broker's limit is {limit_bytes} "
            "(OUTBOX_MAX_MESSAGE_BYTES, RabbitMQ's max_message_size)"
        )
