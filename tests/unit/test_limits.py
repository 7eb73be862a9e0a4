"""What PostgreSQL and the brokers refuse is refused when an OutboxMessage is built, naming the
field (issue 11, item 5); the same checks serve the relay for rows written with plain SQL."""

from __future__ import annotations

from typing import Any

import pytest

from outbox_tasks import InvalidMessage, OutboxMessage
from outbox_tasks.limits import (
    DEFAULT_MAX_MESSAGE_BYTES,
    INT64_MAX,
    INT64_MIN,
    MAX_HEADERS_BYTES,
    MAX_ROUTING_KEY_BYTES,
    amqp_table_size,
    check_headers,
    check_message_size,
    check_name,
    check_routing_key,
    text_problem,
)

TEXT_FIELDS = ["aggregate_type", "aggregate_id", "event_type"]


def _message(**changes: Any) -> OutboxMessage:
    arguments: dict[str, Any] = {
        "aggregate_type": "Order",
        "aggregate_id": "42",
        "event_type": "OrderCreated",
        "payload": {"total": 1250},
    }
    arguments.update(changes)
    return OutboxMessage(**arguments)


@pytest.mark.parametrize("field", TEXT_FIELDS)
def test_a_nul_character_in_a_name_is_refused_naming_the_field(field: str) -> None:
    with pytest.raises(InvalidMessage, match=f"^{field} contains a NUL character"):
        _message(**{field: "Ord\x00er"})


@pytest.mark.parametrize("field", TEXT_FIELDS)
def test_a_lone_surrogate_in_a_name_is_refused_naming_the_field(field: str) -> None:
    with pytest.raises(InvalidMessage, match=f"^{field} contains a lone surrogate .*U\\+D800"):
        _message(**{field: "Order\ud800"})


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        pytest.param(
            {"tenant": "ac\x00me"}, "header 'tenant' value contains a NUL", id="nul-value"
        ),
        pytest.param(
            {"ten\x00ant": "acme"}, "header 'ten\\x00ant' name contains a NUL", id="nul-key"
        ),
        pytest.param({"tenant": "\udc80"}, "header 'tenant' value contains a lone", id="surrogate"),
        pytest.param({"\ud800": "x"}, "header '\\ud800' name contains a lone", id="surrogate-key"),
        pytest.param(
            {"ctx": {"user": {"name": "a\x00"}}},
            "header 'ctx.user.name' value contains a NUL",
            id="nested-nul",
        ),
        pytest.param(
            {"ctx": ["ok", "\ud800"]}, "header 'ctx[1]' value contains a lone", id="in-a-list"
        ),
        pytest.param(
            {"ctx": {"a\x00": 1}}, "header 'ctx.a\\x00' name contains a NUL", id="nested-key"
        ),
    ],
)
def test_a_header_postgresql_cannot_store_is_refused_naming_the_header(
    headers: dict[str, Any], named: str
) -> None:
    with pytest.raises(InvalidMessage) as caught:
        _message(headers=headers)

    assert str(caught.value).startswith(named)


def test_a_routing_key_of_more_than_255_utf8_bytes_is_refused_though_each_name_is_short() -> None:
    # 200 + 1 + 100 characters: each name is under 255 characters, the key is not.
    with pytest.raises(InvalidMessage, match=r"^routing key .* is 301 bytes in UTF-8; the limit"):
        _message(aggregate_type="A" * 200, event_type="E" * 100)


def test_a_routing_key_is_measured_in_bytes_not_characters() -> None:
    # 128 x "é" is 128 characters but 256 bytes.
    with pytest.raises(InvalidMessage, match="is 258 bytes in UTF-8") as caught:
        _message(aggregate_type="\u00e9" * 128, event_type="X")

    assert "aggregate_type (128 characters)" in str(caught.value)


def test_a_routing_key_of_exactly_255_bytes_is_accepted() -> None:
    aggregate_type = "\u00e9" * 100  # 200 bytes
    event_type = "E" * (MAX_ROUTING_KEY_BYTES - 200 - 1)

    message = _message(aggregate_type=aggregate_type, event_type=event_type)

    assert len(f"{message.aggregate_type}.{message.event_type}".encode()) == 255
    with pytest.raises(InvalidMessage, match="256 bytes"):
        _message(aggregate_type=aggregate_type, event_type=event_type + "E")


def test_a_long_aggregate_id_is_fine_because_it_is_not_in_the_routing_key() -> None:
    assert _message(aggregate_id="\u00e9" * 255).aggregate_id == "\u00e9" * 255


def test_a_header_name_of_more_than_255_utf8_bytes_is_refused_at_any_depth() -> None:
    _message(headers={"k" * 255: 1, "ctx": {"n" * 255: 1}})

    with pytest.raises(InvalidMessage, match="name is 256 bytes in UTF-8; the limit is 255"):
        _message(headers={"\u00e9" * 128: 1})
    with pytest.raises(InvalidMessage, match=r"^header 'ctx.n+' name is 256 bytes"):
        _message(headers={"ctx": {"n" * 256: 1}})


@pytest.mark.parametrize("value", [INT64_MIN, INT64_MAX, 0, -1, 2**31])
def test_header_integers_within_64_bits_are_accepted(value: int) -> None:
    assert _message(headers={"n": value}).headers == {"n": value}


@pytest.mark.parametrize("value", [INT64_MAX + 1, INT64_MIN - 1, 10**30])
def test_a_header_integer_beyond_64_bits_is_refused_with_the_fix(value: int) -> None:
    with pytest.raises(InvalidMessage, match=r"does not fit a signed 64-bit integer.*as a string"):
        _message(headers={"n": value})


def test_headers_over_64_kib_are_refused_naming_the_size() -> None:
    with pytest.raises(InvalidMessage, match=f"the limit is {MAX_HEADERS_BYTES}"):
        _message(headers={"big": "x" * MAX_HEADERS_BYTES})


@pytest.mark.parametrize("name", ["CC", "BCC"])
def test_rabbitmq_routing_headers_must_be_lists_of_routing_keys(name: str) -> None:
    assert _message(headers={name: ["Order.Audited"]}).headers == {name: ["Order.Audited"]}
    with pytest.raises(InvalidMessage, match=f"header '{name}' must be a list of routing keys"):
        _message(headers={name: "Order.Audited"})
    with pytest.raises(InvalidMessage, match="routing key of 256 bytes"):
        _message(headers={name: ["k" * 256]})


def test_a_header_value_of_a_non_json_type_is_refused_naming_the_header_and_type() -> None:
    with pytest.raises(InvalidMessage, match="header 'at' value of type bytes"):
        _message(headers={"at": b"\x00"})


def test_the_relay_may_allow_outbox_headers_it_overwrites_anyway() -> None:
    check_headers({"outbox-custom": "x"}, reserved_prefix=None)
    with pytest.raises(InvalidMessage, match="reserved"):
        check_headers({"outbox-custom": "x"})


def test_text_problem_is_none_for_any_valid_unicode() -> None:
    assert text_problem("Bestellung \u00fcber \u20ac 5 \U0001f600 \u0001") is None
    assert text_problem("a\x00") is not None
    assert text_problem("\udfff") is not None


def test_check_name_returns_the_name_and_refuses_what_it_cannot_store() -> None:
    assert check_name("event_type", "OrderCreated") == "OrderCreated"
    with pytest.raises(InvalidMessage, match=r"^event_type contains a NUL"):
        check_name("event_type", "\x00")


def test_check_routing_key_counts_the_dot() -> None:
    check_routing_key("a" * 127, "b" * 127)
    with pytest.raises(InvalidMessage):
        check_routing_key("a" * 128, "b" * 127)


def test_the_message_size_limit_defaults_to_rabbitmqs_128_mib() -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES == 128 * 1024 * 1024
    check_message_size(100, 100)
    with pytest.raises(
        InvalidMessage, match="message body is 101 bytes; the broker's limit is 100"
    ):
        check_message_size(101, 100)


def test_headers_are_measured_as_the_amqp_table_rabbitmq_receives() -> None:
    # 20,000 small integers: 40 KB of JSON but 100 KB as an AMQP array (5 bytes each), over
    # RabbitMQ's 128 KiB frame once the other properties are added.
    many = list(range(10)) * 2_000

    with pytest.raises(InvalidMessage, match="bytes encoded; the limit is 65536"):
        _message(headers={"many": many})


def test_amqp_table_size_is_what_py_amqp_writes() -> None:
    from amqp.serialization import dumps

    headers = {
        "s": "caf\u00e9",
        "i": 7,
        "big": INT64_MAX,
        "f": 1.5,
        "b": True,
        "n": None,
        "d": {"x": [1, "y", {"z": False}]},
    }

    assert amqp_table_size(headers) == len(dumps("F", [headers]))
