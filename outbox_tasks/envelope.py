"""The message format on the wire (DESIGN 4.4): body, properties and headers of one event."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

from outbox_tasks.schema import slot_of
from outbox_tasks.settings import SLOT_COUNT

CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"

H_EVENT_ID = "outbox-event-id"
H_AGGREGATE_TYPE = "outbox-aggregate-type"
H_AGGREGATE_ID = "outbox-aggregate-id"
H_EVENT_TYPE = "outbox-event-type"
H_SEQUENCE = "outbox-sequence"
H_AGGREGATE_SEQUENCE = "outbox-aggregate-sequence"
H_PREVIOUS_AGGREGATE_SEQUENCE = "outbox-previous-aggregate-sequence"
H_PARTITION = "outbox-partition"
H_EPOCH = "outbox-epoch"
H_ATTEMPT = "outbox-attempt"
H_REDELIVERED = "outbox-redelivered"
# RabbitMQ's sender-selected distribution: extra routing keys, removed by the broker before
# delivery. Every message carries its slot routing key there first (see slot_routing_key), then
# the producer's own BCC keys, if any.
H_BCC = "BCC"

RESERVED_HEADERS = frozenset(
    {
        H_EVENT_ID,
        H_AGGREGATE_TYPE,
        H_AGGREGATE_ID,
        H_EVENT_TYPE,
        H_SEQUENCE,
        H_AGGREGATE_SEQUENCE,
        H_PREVIOUS_AGGREGATE_SEQUENCE,
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
    aggregate_sequence: int | None = None
    slot: int | None = None
    slot_key: str = ""
    """The slot routing key (:func:`slot_routing_key`), also in the ``BCC`` header."""

    @property
    def aggregate_key(self) -> tuple[str, str]:
        """The per-aggregate ordering key."""
        return (self.aggregate_type, self.aggregate_id)


_quote = json.encoder.encode_basestring_ascii


def routing_key(aggregate_type: str, event_type: str) -> str:
    """``<aggregate_type>.<event_type>``, so consumers bind with patterns like ``Order.*``."""
    return f"{aggregate_type}.{event_type}"


SLOT_ROUTE: Final = "outbox-slot"
"""First word of every slot routing key and slot binding pattern."""
SLOT_BITS: Final = 10
assert 1 << SLOT_BITS == SLOT_COUNT
# Slot -> its bits as topic words, most significant first ("0.0.0.0.0.0.0.1.0.1" for 5).
_SLOT_WORDS: Final = tuple(".".join(format(s, f"0{SLOT_BITS}b")) for s in range(SLOT_COUNT))


def slot_routing_key(slot: int, routing_key: str) -> str:
    """``outbox-slot.<the slot's 10 bits, one word each>.<routing key>``: the second key every
    event is routed with, so a queue can be bound to a range of slots with topic patterns
    (:func:`slot_binding_pattern`). It travels in the ``BCC`` header: RabbitMQ routes with it
    and removes the header before delivery; the relay's Redis link routes with it itself (there
    the header stays in the message, unused)."""
    return f"{SLOT_ROUTE}.{_SLOT_WORDS[slot]}.{routing_key}"


def slot_binding_pattern(start: int, free_bits: int, pattern: str) -> str:
    """The topic pattern that matches the slot routing keys of the slots
    ``[start, start + 2**free_bits)`` (``start`` a multiple of that size) whose routing key
    matches ``pattern``: ``outbox-slot.0.1.*.*.*.*.*.*.*.*.Order.*`` is slots 256-511 of
    ``Order.*``."""
    if not 0 <= free_bits <= SLOT_BITS or start % (1 << free_bits) or not 0 <= start < SLOT_COUNT:
        raise ValueError(f"slots {start}+2**{free_bits} are not an aligned block")
    fixed = _SLOT_WORDS[start].split(".")[: SLOT_BITS - free_bits]
    return ".".join([SLOT_ROUTE, *fixed, *(["*"] * free_bits), pattern])


def parse_slot_binding(pattern: str) -> tuple[int, int, str] | None:
    """The inverse of :func:`slot_binding_pattern`: ``(first slot, end slot, routing-key
    pattern)``, or None when ``pattern`` is not one."""
    words = pattern.split(".", SLOT_BITS + 1)
    if len(words) != SLOT_BITS + 2 or words[0] != SLOT_ROUTE:
        return None
    bits = words[1 : SLOT_BITS + 1]
    fixed = len(bits) - len([b for b in bits if b == "*"])
    if any(b not in ("0", "1") for b in bits[:fixed]) or any(b != "*" for b in bits[fixed:]):
        return None
    start = int("".join(bits[:fixed]) or "0", 2) << (SLOT_BITS - fixed)
    return start, start + (1 << (SLOT_BITS - fixed)), words[-1]


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
    aggregate_sequence: int | None = None,
    previous_aggregate_sequence: int | None = None,
    slot: int | None = None,
) -> OutboundMessage:
    """Build the wire form of one outbox row.

    ``aggregate_sequence`` is the row's gapless per-aggregate number (1, 2, 3 ...);
    ``previous_aggregate_sequence`` the number published before it for the aggregate (0 for the
    first; lower than ``aggregate_sequence - 1`` when the numbers between were dropped on purpose,
    e.g. a discarded dead letter). Each goes into the body and a header when given.

    ``slot`` is the row's slot (computed from the aggregate when None); it becomes the
    message's slot routing key, first in the ``BCC`` header (a producer's own ``BCC`` keys
    follow it).

    ``payload_json`` is the payload as stored (jsonb rendered as text by PostgreSQL): it is
    spliced into the body as is, so a payload is never parsed and re-serialized on the hot path.
    User headers go in first so a user header can never shadow an ``outbox-*`` header.
    """
    eid = str(event_id)
    headers: dict[str, Any] = (
        {k: v for k, v in user_headers.items() if k not in RESERVED_HEADERS} if user_headers else {}
    )
    headers[H_EVENT_ID] = eid
    headers[H_AGGREGATE_TYPE] = aggregate_type
    headers[H_AGGREGATE_ID] = aggregate_id
    headers[H_EVENT_TYPE] = event_type
    headers[H_SEQUENCE] = sequence
    numbers = ""
    if aggregate_sequence is not None:
        headers[H_AGGREGATE_SEQUENCE] = aggregate_sequence
        numbers = f',"aggregate_sequence":{int(aggregate_sequence)}'
        if previous_aggregate_sequence is not None:
            headers[H_PREVIOUS_AGGREGATE_SEQUENCE] = previous_aggregate_sequence
            numbers += f',"previous_aggregate_sequence":{int(previous_aggregate_sequence)}'
    headers[H_PARTITION] = partition
    headers[H_EPOCH] = epoch
    headers[H_ATTEMPT] = attempt
    headers[H_REDELIVERED] = redelivered
    key = routing_key(aggregate_type, event_type)
    if slot is None:
        slot = slot_of(aggregate_type, aggregate_id)
    slot_key = slot_routing_key(slot, key)
    extra = headers.get(H_BCC)
    headers[H_BCC] = [slot_key, *extra] if isinstance(extra, list) else [slot_key]
    # Byte for byte what json.dumps(envelope, separators=(",", ":")) gave, without building
    # the dict and walking it: the three names are the only free text (escaped by the C
    # encoder json.dumps uses), the rest is a uuid, an ISO timestamp and integers.
    body = (
        f'{{"id":"{eid}","aggregate_type":{_quote(aggregate_type)},'
        f'"aggregate_id":{_quote(aggregate_id)},"event_type":{_quote(event_type)},'
        f'"occurred_at":"{occurred_at.isoformat()}","schema_version":{int(schema_version)},'
        f'"sequence":{int(sequence)}{numbers},"payload":{payload_json}}}'
    ).encode()
    return OutboundMessage(
        event_id=eid,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        event_type=event_type,
        sequence=sequence,
        routing_key=key,
        body=body,
        headers=headers,
        aggregate_sequence=aggregate_sequence,
        slot=slot,
        slot_key=slot_key,
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
    @property
    def aggregate_sequence(self) -> int: ...
    @property
    def previous_aggregate_sequence(self) -> int: ...
    @property
    def slot(self) -> int: ...


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
        aggregate_sequence=row.aggregate_sequence,
        previous_aggregate_sequence=row.previous_aggregate_sequence,
        slot=row.slot,
    )
