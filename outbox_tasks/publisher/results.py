"""What a publish call reports: :class:`BatchResult`, shared by the publisher and its links."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from outbox_tasks.errors import describe_error

FAILURE_TEXT_MAX: Final = 200
"""Bound, in characters, of the error description in a failure text or outage message."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What happened to each message of one :meth:`BrokerPublisher.publish_batch` call."""

    published: list[str]
    """Event ids accepted by the broker (unroutable ones included), in batch order."""
    failed: dict[str, str]
    """Event id -> short error text, for failures that are the message's own fault."""
    skipped: list[str]
    """Event ids not sent because an earlier message of the same aggregate failed."""
    unroutable: int = 0
    """Published messages that matched no binding and were dropped by the exchange."""
    deferred: dict[str, str] = field(default_factory=dict)
    """Event id -> reason, for messages a healthy broker did not take now (backpressure: a
    RabbitMQ ``basic.nack``, e.g. a bound queue full with ``x-overflow=reject-publish``)."""
    maybe_sent: list[str] = field(default_factory=list)
    """Event ids of ``failed`` or ``deferred`` messages that may have reached some queue all the
    same (a nack still lets the other bound queues keep their copy): a re-send must be flagged
    ``outbox-redelivered``."""


def encoding_failure(exc: BaseException) -> str:
    """The failure text of a message that could not be encoded (its own fault, never retried
    into success): ``"cannot encode message: TypeName: ..."``."""
    return f"cannot encode message: {describe_error(exc, limit=FAILURE_TEXT_MAX)}"
