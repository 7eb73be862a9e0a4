"""The Redis link's per-batch template gives byte for byte what kombu's own encoding gives."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from kombu.transport.virtual.base import Base64

from outbox_tasks.envelope import build_message
from outbox_tasks.publisher.redis_link import kombu_payload, payload_encoder


class FakeChannel:
    """What the encoders read from kombu's virtual channel."""

    def __init__(self, body_encoding: str = "base64") -> None:
        self.body_encoding = body_encoding

    def encode_body(self, body: bytes, encoding: str | None = None) -> tuple[Any, str | None]:
        if encoding == "base64":
            return Base64().encode(body), encoding
        return body.decode(), encoding


def message(aggregate_id: str, headers: dict[str, Any] | None, event_type: str = "Created") -> Any:
    return build_message(
        event_id=uuid.uuid4(),
        aggregate_type='Ordér "quoted"',
        aggregate_id=aggregate_id,
        event_type=event_type,
        occurred_at=datetime(2024, 5, 17, 12, 30, tzinfo=UTC),
        schema_version=1,
        sequence=7,
        payload_json='{"a": "\\u00e9\\n", "n": [1, 2.5, null]}',
        user_headers=headers,
        partition=3,
        epoch=12,
        attempt=2,
        redelivered=True,
    )


MESSAGES = [
    message("1", None),
    message('ünï\\code\t"x"', {"traceparent": "00-abc-def-01", "nested": {"k": [1, None, "é"]}}),
    message("3", {"n": 1.5, "flag": False, "none": None}, event_type="Päid.v2"),
]


@pytest.mark.parametrize("exchange", ["outbox.events", 'ex "q" é'])
@pytest.mark.parametrize("priority", [0, 9])
def test_the_template_matches_kombus_encoding_byte_for_byte(exchange: str, priority: int) -> None:
    channel = FakeChannel()
    encode = payload_encoder(channel, exchange, "f" * 32, priority)

    for index, m in enumerate(MESSAGES):
        assert encode(m, index) == kombu_payload(
            channel, exchange, m, f"{'f' * 32}.{index}", priority
        )


def test_another_body_encoding_takes_kombus_general_path() -> None:
    channel = FakeChannel(body_encoding="identity")
    encode = payload_encoder(channel, "outbox.events", "tag", 0)

    assert encode(MESSAGES[0], 4) == kombu_payload(
        channel, "outbox.events", MESSAGES[0], "tag.4", 0
    )
    assert '"body_encoding": "identity"' in encode(MESSAGES[0], 4)


def test_headers_that_cannot_be_encoded_raise_as_kombus_encoding_does() -> None:
    bad = message("1", {"x": object()})
    encode = payload_encoder(FakeChannel(), "outbox.events", "tag", 0)

    with pytest.raises(TypeError):
        encode(bad, 0)
