"""A dead letter's copy must be sendable even when its message was dead-lettered because no
broker would take it (issue 11): what cannot travel is left out and named."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from outbox_tasks.deadletter import H_DEAD_DROPPED, H_DEAD_REASON, dead_copy, sendable_copy
from outbox_tasks.limits import MAX_ROUTING_KEY_BYTES
from outbox_tasks.settings import Settings
from outbox_tasks.store.deadletter import ExhaustedRow


def _row(**changes: Any) -> ExhaustedRow:
    fields: dict[str, Any] = {
        "id": uuid.uuid4(),
        "aggregate_type": "Order",
        "aggregate_id": "1",
        "event_type": "OrderCreated",
        "payload_json": '{"n":1}',
        "headers": {"traceparent": "00-ab-cd-01"},
        "schema_version": 1,
        "seq": 7,
        "slot": 3,
        "created_at": datetime(2024, 1, 1, tzinfo=UTC),
        "retry_count": 5,
        "aggregate_sequence": 2,
        "previous_aggregate_sequence": 1,
        "last_error": "invalid_message: routing key ...",
    }
    fields.update(changes)
    return ExhaustedRow(**fields)


def test_a_healthy_row_is_copied_unchanged() -> None:
    row = _row()

    assert sendable_copy(row, 1024 * 1024) == row


def test_headers_no_broker_takes_are_left_out_and_named() -> None:
    copy = sendable_copy(_row(headers={"n": 2**70, "ok": 1}), 1024 * 1024)

    assert set(copy.headers) == {H_DEAD_DROPPED}
    assert "64-bit" in copy.headers[H_DEAD_DROPPED]


def test_a_payload_too_big_for_the_broker_is_left_out_and_named() -> None:
    copy = sendable_copy(_row(payload_json='"' + "x" * 20_000 + '"'), 16_384)

    assert copy.payload_json == "null"
    assert copy.headers[H_DEAD_DROPPED] == "payload (20002 bytes)"
    assert copy.headers["traceparent"] == "00-ab-cd-01"


def test_a_routing_key_over_255_bytes_is_cut_at_a_character_boundary() -> None:
    message = dead_copy(_row(aggregate_type="\u00e9" * 200), Settings())

    assert len(message.routing_key.encode()) <= MAX_ROUTING_KEY_BYTES
    assert message.routing_key == "\u00e9" * 127
    assert message.aggregate_type == "\u00e9" * 200  # the body and headers keep the real name
    assert message.headers[H_DEAD_REASON].startswith("invalid_message")
