"""The event a handler sees: :class:`Event`, parsed from an outbox envelope and its headers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy.orm import Session

from outbox_tasks.envelope import H_ATTEMPT, H_REDELIVERED
from outbox_tasks.errors import InvalidEvent


@dataclass(frozen=True, slots=True)
class Event:
    """One outbox event as a handler sees it: the envelope (DESIGN 4.4), typed.

    ``redelivered`` is True when the relay marked the message as re-sent
    (``outbox-redelivered``) or the broker delivered it before; it is a hint only: idempotency
    does not depend on it. ``attempt`` is this consumer's attempt at handling it (1 first, 2 after
    one failure...); ``publish_attempt`` is the relay's (``outbox-attempt``).

    ``aggregate_sequence`` is the event's gapless number within its aggregate (1, 2, 3 ...) and
    ``previous_aggregate_sequence`` the number the relay published before it (lower than
    ``aggregate_sequence - 1`` when the events between were dropped on purpose); both None for a
    message from a relay older than migration 0004.
    """

    id: uuid.UUID
    aggregate_type: str
    aggregate_id: str
    event_type: str
    occurred_at: datetime
    schema_version: int
    sequence: int
    payload: Any
    headers: Mapping[str, Any]
    redelivered: bool = False
    attempt: int = 1
    aggregate_sequence: int | None = None
    previous_aggregate_sequence: int | None = None

    @property
    def aggregate_key(self) -> tuple[str, str]:
        return (self.aggregate_type, self.aggregate_id)

    @property
    def publish_attempt(self) -> int:
        value = self.headers.get(H_ATTEMPT, 1)
        return value if isinstance(value, int) and not isinstance(value, bool) else 1


EventHandler = Callable[[Event, Session], None]
"""``on_event(event, session)``: do the work with ``session``; never commit it (the consumer
commits, together with the receipt). Raise to fail the attempt."""


def truthy(value: object) -> bool:
    """A header flag: ``"1"``, ``"true"``, ``"yes"`` (any case) or a truthy non-string."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _whole(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEvent(f"envelope field {name!r} must be an integer, got {value!r}")
    return value


def _text_field(data: Mapping[str, Any], name: str) -> str:
    value = data[name]
    if not isinstance(value, str) or not value:
        raise InvalidEvent(f"envelope field {name!r} must be a non-empty string, got {value!r}")
    return value


def aware_time(value: object) -> datetime:
    """An ISO 8601 time, in UTC when it names no zone; ValueError when it is not one."""
    moment = datetime.fromisoformat(str(value))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


_ENVELOPE_FIELDS: Final = (
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "occurred_at",
    "schema_version",
    "sequence",
    "payload",
)


def parse_event(
    body: bytes | str,
    headers: Mapping[str, Any] | None = None,
    *,
    redelivered: bool = False,
    attempt: int = 1,
) -> Event:
    """The typed view of one message body (JSON envelope) and its headers.

    Raises :class:`InvalidEvent` when the body is not an outbox envelope.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidEvent(f"body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidEvent("body is not a JSON object")
    missing = [name for name in _ENVELOPE_FIELDS if name not in data]
    if missing:
        raise InvalidEvent("envelope lacks " + ", ".join(missing))
    try:
        event_id = uuid.UUID(str(data["id"]))
    except ValueError:
        raise InvalidEvent(f"envelope id {data['id']!r} is not a UUID") from None
    occurred = data["occurred_at"]
    try:
        occurred_at = aware_time(occurred)
    except ValueError:
        raise InvalidEvent(f"envelope occurred_at {occurred!r} is not an ISO 8601 time") from None
    header_map = dict(headers or {})
    return Event(
        id=event_id,
        aggregate_type=_text_field(data, "aggregate_type"),
        aggregate_id=_text_field(data, "aggregate_id"),
        event_type=_text_field(data, "event_type"),
        occurred_at=occurred_at,
        schema_version=_whole(data["schema_version"], "schema_version"),
        sequence=_whole(data["sequence"], "sequence"),
        payload=data["payload"],
        headers=header_map,
        redelivered=redelivered or truthy(header_map.get(H_REDELIVERED)),
        attempt=attempt,
        aggregate_sequence=_optional_whole(data, "aggregate_sequence"),
        previous_aggregate_sequence=_optional_whole(data, "previous_aggregate_sequence"),
    )


def _optional_whole(data: Mapping[str, Any], name: str) -> int | None:
    value = data.get(name)
    return None if value is None else _whole(value, name)
