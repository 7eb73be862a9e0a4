"""The message format on the wire (DESIGN 4.4): body, properties and headers of one event."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"

H_EVENT_ID = "outbox-event-id"
H_AGGREGATE_TYPE = "outbox-aggregate-type"
H_AGGREGATE_ID = "outbox-aggregate-id"
H_EVENT_TYPE = "outbox-event-type"
H_SEQUENCE = "outbox-sequence"
H_PARTITION = "outbox-partition"
H_EPOCH = "outbox-epoch"
H_ATTEMPT = "outbox-attempt"
H_REDELIVERED = "outbox-redelivered"

RESERVED_HEADERS = frozenset(
    {
        H_EVENT_ID,
        H_AGGREGATE_TYPE,
        H_AGGREGATE_ID,
        H_EVENT_TYPE,
        H_SEQUENCE,
        H_PARTITION,
        H_EPOCH,
        H_ATTEMPT,
        H_REDELIVERED,
    }
)


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One event, ready for the broker. ``body`` is the serialized JSON envelope."""

    event_id: str
    aggregate_type: str
    aggregate_id: str
    event_type: str
    sequence: int
    routing_key: str
    body: bytes
    headers: dict[str, Any]

    @property
    def aggregate_key(self) -> tuple[str, str]:
        """The per-aggregate ordering key."""
        return (self.aggregate_type, self.aggregate_id)


def routing_key(aggregate_type: str, event_type: str) -> str:
    """``<aggregate_type>.<event_type>``, so consumers bind with patterns like ``Order.*``."""
    return f"{aggregate_type}.{event_type}"


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def build_message(
    *,
    event_id: uuid.UUID | str,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    occurred_at: datetime,
    schema_version: int,
    sequence: int,
    payload_json: str,
    user_headers: Mapping[str, Any] | None,
    partition: int,
    epoch: int,
    attempt: int,
    redelivered: bool,
) -> OutboundMessage:
    """Build the wire form of one outbox row.

    ``payload_json`` is the payload as stored (jsonb rendered as text by PostgreSQL): it is
    spliced into the body as is, so a payload is never parsed and re-serialized on the hot path.
    User headers go in first so a user header can never shadow an ``outbox-*`` header.
    """
    eid = str(event_id)
    envelope = {
        "id": eid,
        "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id,
        "event_type": event_type,
        "occurred_at": occurred_at.isoformat(),
        "schema_version": schema_version,
        "sequence": sequence,
    }
    headers: dict[str, Any] = {
        k: v for k, v in (user_headers or {}).items() if k not in RESERVED_HEADERS
    }
    headers.update(
        {
            H_EVENT_ID: eid,
            H_AGGREGATE_TYPE: aggregate_type,
            H_AGGREGATE_ID: aggregate_id,
            H_EVENT_TYPE: event_type,
            H_SEQUENCE: sequence,
            H_PARTITION: partition,
            H_EPOCH: epoch,
            H_ATTEMPT: attempt,
            H_REDELIVERED: redelivered,
        }
    )
    head = json.dumps(envelope, separators=(",", ":"), default=_json_default)
    body = f'{head[:-1]},"payload":{payload_json}}}'.encode()
    return OutboundMessage(
        event_id=eid,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        event_type=event_type,
        sequence=sequence,
        routing_key=routing_key(aggregate_type, event_type),
        body=body,
        headers=headers,
    )


class StoredRow(Protocol):
    """The columns of an outbox row that make its message (read-only)."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def aggregate_type(self) -> str: ...
    @property
    def aggregate_id(self) -> str: ...
    @property
    def event_type(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def schema_version(self) -> int: ...
    @property
    def seq(self) -> int: ...
    @property
    def payload_json(self) -> str: ...
    @property
    def headers(self) -> dict[str, Any]: ...
    @property
    def retry_count(self) -> int: ...


def message_for_row(
    row: StoredRow, *, partition: int, epoch: int, redelivered: bool
) -> OutboundMessage:
    """The message for an outbox row. ``outbox-attempt`` is ``retry_count + 1``, plus one when
    the row may have been sent before (a redelivery is at least its second attempt)."""
    return build_message(
        event_id=row.id,
        aggregate_type=row.aggregate_type,
        aggregate_id=row.aggregate_id,
        event_type=row.event_type,
        occurred_at=row.created_at,
        schema_version=row.schema_version,
        sequence=row.seq,
        payload_json=row.payload_json,
        user_headers=row.headers,
        partition=partition,
        epoch=epoch,
        attempt=row.retry_count + 1 + int(redelivered),
        redelivered=redelivered,
    )
