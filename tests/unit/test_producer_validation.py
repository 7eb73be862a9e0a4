"""OutboxMessage refuses bad messages when it is built, before any database is involved."""

from __future__ import annotations

import logging
import math
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from outbox_tasks import InvalidMessage, OutboxMessage, PayloadTooLarge
from outbox_tasks.schema import PAYLOAD_MAX_BYTES, PAYLOAD_WARN_BYTES, validate_payload


def _message(**changes: Any) -> OutboxMessage:
    arguments: dict[str, Any] = {
        "aggregate_type": "Order",
        "aggregate_id": "42",
        "event_type": "OrderCreated",
        "payload": {"total": 1250},
    }
    arguments.update(changes)
    return OutboxMessage(**arguments)


def test_a_valid_message_gets_an_id_empty_headers_and_schema_version_one() -> None:
    message = _message()

    assert isinstance(message.id, uuid.UUID)
    assert message.headers == {}
    assert message.schema_version == 1
    assert message.payload == {"total": 1250}


def test_every_message_gets_its_own_id() -> None:
    assert _message().id != _message().id


def test_an_explicit_id_headers_and_schema_version_are_kept() -> None:
    event_id = uuid.uuid4()

    message = _message(id=event_id, headers={"traceparent": "00-abc-def-01"}, schema_version=3)

    assert message.id == event_id
    assert message.headers == {"traceparent": "00-abc-def-01"}
    assert message.schema_version == 3


@pytest.mark.parametrize(
    ("aggregate_id", "stored"),
    [
        pytest.param("A-17", "A-17", id="str"),
        pytest.param(42, "42", id="int"),
        pytest.param(-7, "-7", id="negative-int"),
        pytest.param(10**30, str(10**30), id="big-int"),
        pytest.param(
            uuid.UUID("12345678-1234-5678-1234-567812345678"),
            "12345678-1234-5678-1234-567812345678",
            id="uuid",
        ),
    ],
)
def test_the_aggregate_id_is_stored_as_text(aggregate_id: object, stored: str) -> None:
    assert _message(aggregate_id=aggregate_id).aggregate_id == stored


@pytest.mark.parametrize(
    ("aggregate_id", "type_name"),
    [
        pytest.param(True, "bool", id="bool"),
        pytest.param(False, "bool", id="bool-false"),
        pytest.param(4.2, "float", id="float"),
        pytest.param(None, "NoneType", id="none"),
        pytest.param(b"42", "bytes", id="bytes"),
        pytest.param(("Order", 1), "tuple", id="tuple"),
    ],
)
def test_an_aggregate_id_of_another_type_is_refused_naming_the_type(
    aggregate_id: object, type_name: str
) -> None:
    with pytest.raises(
        InvalidMessage, match=f"aggregate_id must be a str, int or UUID, got {type_name}"
    ):
        _message(aggregate_id=aggregate_id)


@pytest.mark.parametrize("field", ["aggregate_type", "aggregate_id", "event_type"])
@pytest.mark.parametrize("value", ["", "   ", "\t\n"], ids=["empty", "spaces", "whitespace"])
def test_an_empty_name_is_refused(field: str, value: str) -> None:
    with pytest.raises(InvalidMessage, match=f"{field} must not be empty"):
        _message(**{field: value})


@pytest.mark.parametrize("field", ["aggregate_type", "aggregate_id", "event_type"])
def test_a_missing_name_is_refused(field: str) -> None:
    arguments: dict[str, Any] = {
        "aggregate_type": "Order",
        "aggregate_id": "42",
        "event_type": "OrderCreated",
        "payload": {},
    }
    del arguments[field]

    with pytest.raises(InvalidMessage, match=field):
        OutboxMessage(**arguments)


@pytest.mark.parametrize("field", ["aggregate_type", "event_type"])
def test_a_name_that_is_not_a_string_is_refused(field: str) -> None:
    with pytest.raises(InvalidMessage, match=f"{field} must be a string, got int"):
        _message(**{field: 7})


@pytest.mark.parametrize("field", ["aggregate_type", "aggregate_id", "event_type"])
def test_a_name_longer_than_255_characters_is_refused(field: str) -> None:
    # aggregate_type and event_type share the 255-byte routing key (tests/unit/test_limits.py).
    shortened = {"aggregate_type": "O", "event_type": "E"}
    assert getattr(_message(**{**shortened, field: "x" * 253}), field) == "x" * 253
    if field == "aggregate_id":
        assert _message(aggregate_id="x" * 255).aggregate_id == "x" * 255
    with pytest.raises(InvalidMessage, match="256 characters long; the limit is 255"):
        _message(**{field: "x" * 256})


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({}, id="empty-object"),
        pytest.param({"nested": {"list": [1, 2.5, "x", None, True]}}, id="nested-object"),
        pytest.param([1, 2, 3], id="list"),
        pytest.param("text", id="string"),
        pytest.param(7, id="int"),
        pytest.param(None, id="null"),
        pytest.param({"caf\u00e9": "\u2603"}, id="unicode"),
    ],
)
def test_json_payloads_are_accepted(payload: object) -> None:
    assert _message(payload=payload).payload == payload


def test_a_missing_payload_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="payload is required"):
        OutboxMessage(aggregate_type="Order", aggregate_id="42", event_type="OrderCreated")


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        pytest.param({"total": Decimal("12.50")}, "Decimal", id="decimal"),
        pytest.param({"tags": {"a", "b"}}, "set", id="set"),
        pytest.param({"at": datetime(2024, 1, 1, tzinfo=UTC)}, "datetime", id="datetime"),
        pytest.param({"id": uuid.uuid4()}, "UUID", id="uuid"),
        pytest.param(b"raw", "bytes", id="bytes"),
        pytest.param({"ratio": math.nan}, "NaN", id="nan"),
        pytest.param({"ratio": math.inf}, "Infinity", id="infinity"),
    ],
)
def test_a_payload_that_is_not_json_is_refused_naming_the_type(payload: object, named: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        _message(payload=payload)

    message = str(caught.value)
    assert "payload must be JSON-serializable" in message
    assert named in message


def test_a_payload_over_one_megabyte_is_refused_naming_the_size_and_the_limit() -> None:
    payload = {"blob": "x" * PAYLOAD_MAX_BYTES}
    size = PAYLOAD_MAX_BYTES + len('{"blob":""}')

    with pytest.raises(PayloadTooLarge) as caught:
        _message(payload=payload)

    assert isinstance(caught.value, InvalidMessage)
    assert f"payload is {size} bytes" in str(caught.value)
    assert f"the limit is {PAYLOAD_MAX_BYTES} bytes" in str(caught.value)


def test_a_payload_of_exactly_the_limit_is_accepted_and_one_byte_more_is_not() -> None:
    at_limit = "x" * (PAYLOAD_MAX_BYTES - 2)  # the quotes make up the last two bytes

    assert validate_payload(at_limit) == PAYLOAD_MAX_BYTES
    with pytest.raises(PayloadTooLarge):
        validate_payload(at_limit + "x")


def test_a_large_payload_logs_a_warning_with_its_size(caplog: pytest.LogCaptureFixture) -> None:
    payload = "x" * (PAYLOAD_WARN_BYTES + 1)

    with caplog.at_level(logging.WARNING, logger="outbox_tasks.producer"):
        _message(payload=payload)

    [record] = [r for r in caplog.records if r.name == "outbox_tasks.producer"]
    assert record.levelno == logging.WARNING
    assert record.size_bytes == PAYLOAD_WARN_BYTES + 3  # type: ignore[attr-defined]
    assert record.warn_bytes == PAYLOAD_WARN_BYTES  # type: ignore[attr-defined]


def test_a_payload_under_the_warning_size_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="outbox_tasks.producer"):
        _message(payload="x" * (PAYLOAD_WARN_BYTES - 2))

    assert [r for r in caplog.records if r.name == "outbox_tasks.producer"] == []


def test_user_headers_are_accepted() -> None:
    headers = {"traceparent": "00-abc-def-01", "tenant": "acme", "retries": 3}

    assert _message(headers=headers).headers == headers


@pytest.mark.parametrize(
    "name",
    ["outbox-epoch", "outbox-event-id", "Outbox-Attempt", "OUTBOX-REDELIVERED", "outbox-custom"],
)
def test_a_reserved_outbox_header_is_refused(name: str) -> None:
    with pytest.raises(InvalidMessage, match="reserved"):
        _message(headers={name: "forged"})


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        pytest.param(["traceparent"], "headers must be a dict, got list", id="list"),
        pytest.param("traceparent=1", "headers must be a dict, got str", id="string"),
        pytest.param({"": "x"}, "non-empty strings", id="empty-name"),
        pytest.param({1: "x"}, "non-empty strings", id="int-name"),
        pytest.param({"tenant": Decimal("1")}, "Decimal", id="decimal-value"),
        pytest.param({"ratio": math.nan}, "headers must be JSON-serializable", id="nan-value"),
    ],
)
def test_malformed_headers_are_refused(headers: object, match: str) -> None:
    with pytest.raises(InvalidMessage, match=match):
        _message(headers=headers)


@pytest.mark.parametrize(
    "version",
    [
        pytest.param(0, id="zero"),
        pytest.param(-1, id="negative"),
        pytest.param(True, id="bool"),
        pytest.param("2", id="string"),
        pytest.param(1.5, id="float"),
        pytest.param(None, id="none"),
    ],
)
def test_a_schema_version_that_is_not_a_positive_integer_is_refused(version: object) -> None:
    with pytest.raises(InvalidMessage, match="schema_version must be an integer >= 1"):
        _message(schema_version=version)


def test_a_later_schema_version_is_kept() -> None:
    assert _message(schema_version=7).schema_version == 7


def test_invalid_messages_are_value_errors_for_callers_that_catch_those() -> None:
    with pytest.raises(ValueError):
        _message(event_type="")


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"note": "a\x00b"}, id="nul-in-a-value"),
        pytest.param({"a\x00b": 1}, id="nul-in-a-key"),
        pytest.param({"note": "\ud800"}, id="lone-surrogate"),
    ],
)
def test_a_payload_postgresql_cannot_store_as_jsonb_is_refused(payload: object) -> None:
    with pytest.raises(InvalidMessage):
        _message(payload=payload)


def test_the_payload_size_is_its_utf8_size() -> None:
    assert validate_payload("\u00e9" * 10) == len(('"' + "\u00e9" * 10 + '"').encode())
