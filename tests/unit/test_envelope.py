"""The wire format (DESIGN 4.4): body keys, payload spliced verbatim, outbox-* headers."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from outbox_tasks.envelope import (
    CONTENT_TYPE,
    RESERVED_HEADERS,
    OutboundMessage,
    build_message,
    parse_slot_binding,
    routing_key,
    slot_binding_pattern,
    slot_routing_key,
)
from outbox_tasks.partitioning import SLOT_COUNT, aligned_blocks, slot_of, slot_range

EVENT_ID = uuid.UUID("0b7e8c3c-6f41-4a57-9a53-3a4d2c1e9f00")
OCCURRED_AT = datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC)
BODY_KEYS = {
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "occurred_at",
    "schema_version",
    "sequence",
    "aggregate_sequence",
    "previous_aggregate_sequence",
    "payload",
}
OUTBOX_HEADERS = {
    "outbox-event-id",
    "outbox-aggregate-type",
    "outbox-aggregate-id",
    "outbox-event-type",
    "outbox-sequence",
    "outbox-aggregate-sequence",
    "outbox-previous-aggregate-sequence",
    "outbox-partition",
    "outbox-epoch",
    "outbox-attempt",
    "outbox-redelivered",
}
ROUTING_HEADERS = {"BCC"}  # RabbitMQ's extra routing keys, removed before delivery


def _build(**changes: Any) -> OutboundMessage:
    arguments: dict[str, Any] = {
        "event_id": EVENT_ID,
        "aggregate_type": "Order",
        "aggregate_id": "42",
        "event_type": "OrderCreated",
        "occurred_at": OCCURRED_AT,
        "schema_version": 2,
        "sequence": 1234,
        "aggregate_sequence": 5,
        "previous_aggregate_sequence": 4,
        "payload_json": '{"total": 12.50, "items": [1, 2]}',
        "user_headers": {"traceparent": "00-abc-def-01"},
        "partition": 3,
        "epoch": 17,
        "attempt": 2,
        "redelivered": True,
    }
    arguments.update(changes)
    return build_message(**arguments)


def test_the_body_has_exactly_the_documented_keys() -> None:
    body = json.loads(_build().body)

    assert set(body) == BODY_KEYS


def test_the_body_carries_the_row_values() -> None:
    body = json.loads(_build().body)

    assert body["id"] == str(EVENT_ID)
    assert body["aggregate_type"] == "Order"
    assert body["aggregate_id"] == "42"
    assert body["event_type"] == "OrderCreated"
    assert body["occurred_at"] == "2024-05-17T12:30:45.123456+00:00"
    assert datetime.fromisoformat(body["occurred_at"]) == OCCURRED_AT
    assert body["schema_version"] == 2
    assert body["sequence"] == 1234
    assert body["aggregate_sequence"] == 5
    assert body["previous_aggregate_sequence"] == 4
    assert body["payload"] == {"total": 12.5, "items": [1, 2]}


def test_the_payload_is_spliced_into_the_body_verbatim() -> None:
    payload_json = '{"total": 12.50, "note": "caf\u00e9 \\"quoted\\"", "big": 12345678901234567890}'

    message = _build(payload_json=payload_json)

    assert message.body.endswith(b',"payload":' + payload_json.encode() + b"}")
    # Not re-serialized: 12.50 keeps its trailing zero and the big integer keeps every digit.
    assert b"12.50" in message.body
    assert json.loads(message.body)["payload"]["big"] == 12345678901234567890


def test_payloads_that_are_not_objects_are_spliced_too() -> None:
    for payload_json in ("[1, 2, 3]", '"text"', "7", "null", "{}"):
        body = json.loads(_build(payload_json=payload_json).body)
        assert body["payload"] == json.loads(payload_json)


def test_the_body_is_utf8_json_even_with_awkward_names() -> None:
    message = _build(
        aggregate_type='Ord"er', aggregate_id="caf\u00e9/\\1", event_type="Cr\u00e9\u00e9"
    )

    body = json.loads(message.body.decode("utf-8"))

    assert body["aggregate_type"] == 'Ord"er'
    assert body["aggregate_id"] == "caf\u00e9/\\1"
    assert body["event_type"] == "Cr\u00e9\u00e9"


def test_the_headers_have_all_eleven_outbox_headers() -> None:
    headers = _build().headers

    assert {name for name in headers if name.startswith("outbox-")} == OUTBOX_HEADERS
    assert RESERVED_HEADERS == OUTBOX_HEADERS
    assert headers["outbox-event-id"] == str(EVENT_ID)
    assert headers["outbox-aggregate-type"] == "Order"
    assert headers["outbox-aggregate-id"] == "42"
    assert headers["outbox-event-type"] == "OrderCreated"
    assert headers["outbox-sequence"] == 1234
    assert headers["outbox-aggregate-sequence"] == 5
    assert headers["outbox-previous-aggregate-sequence"] == 4
    assert headers["outbox-partition"] == 3
    assert headers["outbox-epoch"] == 17
    assert headers["outbox-attempt"] == 2
    assert headers["outbox-redelivered"] is True


def test_the_body_is_exactly_what_json_dumps_gives_for_the_envelope() -> None:
    message = _build(aggregate_type='Ord"er', payload_json='{"a": [1, 2.50]}')

    expected = json.dumps(
        {
            "id": str(EVENT_ID),
            "aggregate_type": 'Ord"er',
            "aggregate_id": "42",
            "event_type": "OrderCreated",
            "occurred_at": OCCURRED_AT.isoformat(),
            "schema_version": 2,
            "sequence": 1234,
            "aggregate_sequence": 5,
            "previous_aggregate_sequence": 4,
            "payload": "PAYLOAD",
        },
        separators=(",", ":"),
    ).replace('"PAYLOAD"', '{"a": [1, 2.50]}')
    assert message.body == expected.encode()


def test_a_gap_left_on_purpose_shows_as_a_lower_previous_number() -> None:
    message = _build(aggregate_sequence=9, previous_aggregate_sequence=6)

    assert json.loads(message.body)["previous_aggregate_sequence"] == 6
    assert message.headers["outbox-previous-aggregate-sequence"] == 6
    assert message.aggregate_sequence == 9


def test_without_numbers_neither_the_body_nor_the_headers_mention_them() -> None:
    message = _build(aggregate_sequence=None, previous_aggregate_sequence=None)

    assert set(json.loads(message.body)) == BODY_KEYS - {
        "aggregate_sequence",
        "previous_aggregate_sequence",
    }
    assert "outbox-aggregate-sequence" not in message.headers
    assert message.aggregate_sequence is None


def test_a_first_delivery_is_not_marked_redelivered() -> None:
    headers = _build(attempt=1, redelivered=False).headers

    assert headers["outbox-redelivered"] is False
    assert headers["outbox-attempt"] == 1


def test_user_headers_travel_with_the_message() -> None:
    headers = _build(user_headers={"traceparent": "00-abc-def-01", "tenant": "acme"}).headers

    assert headers["traceparent"] == "00-abc-def-01"
    assert headers["tenant"] == "acme"
    assert len(headers) == len(OUTBOX_HEADERS) + len(ROUTING_HEADERS) + 2


def test_a_user_header_cannot_shadow_an_outbox_header() -> None:
    forged: dict[str, Any] = {name: "forged" for name in OUTBOX_HEADERS}

    headers = _build(user_headers={**forged, "tenant": "acme"}).headers

    assert "forged" not in headers.values()
    assert headers["outbox-epoch"] == 17
    assert headers["outbox-event-id"] == str(EVENT_ID)
    assert headers["tenant"] == "acme"


def test_no_user_headers_gives_only_the_outbox_headers_and_the_slot_route() -> None:
    assert set(_build(user_headers=None).headers) == OUTBOX_HEADERS | ROUTING_HEADERS
    assert set(_build(user_headers={}).headers) == OUTBOX_HEADERS | ROUTING_HEADERS


def test_the_routing_key_is_aggregate_type_dot_event_type() -> None:
    message = _build(aggregate_type="Order", event_type="OrderShipped")

    assert message.routing_key == "Order.OrderShipped"
    assert routing_key("Invoice", "InvoicePaid") == "Invoice.InvoicePaid"


def test_the_message_exposes_its_identity_and_ordering_key() -> None:
    message = _build(event_id=str(EVENT_ID))

    assert message.event_id == str(EVENT_ID)
    assert message.sequence == 1234
    assert message.aggregate_key == ("Order", "42")
    assert CONTENT_TYPE == "application/json"


def test_the_slot_routing_key_spells_the_slot_in_ten_bits_before_the_routing_key() -> None:
    message = _build(slot=5)

    assert message.slot_key == "outbox-slot.0.0.0.0.0.0.0.1.0.1.Order.OrderCreated"
    assert message.headers["BCC"] == [message.slot_key]
    assert slot_routing_key(1023, "A.B") == "outbox-slot." + ".".join("1" * 10) + ".A.B"


def test_a_producers_own_routing_headers_follow_the_slot_routing_key() -> None:
    headers = _build(user_headers={"CC": ["Audit.All"], "BCC": ["Audit.Secret"]}).headers

    assert headers["CC"] == ["Audit.All"]
    assert headers["BCC"] == [
        slot_routing_key(slot_of("Order", "42"), "Order.OrderCreated"),
        "Audit.Secret",
    ]


def test_without_a_slot_the_message_is_routed_by_its_aggregates_slot() -> None:
    message = _build(aggregate_type="Invoice", aggregate_id="7")

    assert message.slot_key == slot_routing_key(slot_of("Invoice", "7"), "Invoice.OrderCreated")


def _topic_match(pattern: str, key: str) -> bool:
    """AMQP topic matching for patterns made of words and ``*`` (no ``#``)."""
    words, parts = pattern.split("."), key.split(".")
    return len(words) == len(parts) and all(
        w in ("*", p) for w, p in zip(words, parts, strict=True)
    )


@pytest.mark.parametrize("partitions", [1, 2, 3, 7, 8, 100, 1024])
def test_slot_binding_patterns_of_a_partition_match_exactly_its_slots(partitions: int) -> None:
    for partition in range(partitions):
        lo, hi = slot_range(partition, partitions)
        patterns = [slot_binding_pattern(s, b, "Order.*") for s, b in aligned_blocks(lo, hi)]
        matched = {
            slot
            for slot in range(SLOT_COUNT)
            if any(_topic_match(p, slot_routing_key(slot, "Order.Placed")) for p in patterns)
        }

        assert matched == set(range(lo, hi))
        assert len(patterns) <= 18


def test_a_slot_binding_pattern_needs_an_aligned_block() -> None:
    with pytest.raises(ValueError):
        slot_binding_pattern(3, 2, "#")
    assert slot_binding_pattern(0, 10, "#") == "outbox-slot." + ".".join("*" * 10) + ".#"


def test_a_slot_binding_pattern_parses_back_to_its_slots_and_routing_pattern() -> None:
    assert parse_slot_binding(slot_binding_pattern(256, 8, "Order.*")) == (256, 512, "Order.*")
    assert parse_slot_binding(slot_binding_pattern(0, 10, "#.Paid")) == (0, 1024, "#.Paid")
    assert parse_slot_binding(slot_binding_pattern(341, 0, "A.b.c")) == (341, 342, "A.b.c")
    assert parse_slot_binding("Order.*") is None
    assert parse_slot_binding("outbox-slot.*.1.*.*.*.*.*.*.*.*.Order.*") is None
