"""The AMQP link: a RabbitMQ channel in publisher-confirm mode, one *lane* per aggregate.

A message goes out only once its predecessor of the same aggregate is confirmed, so a nack can
still stop the rest of its aggregate before anything later of it is sent; lanes of different
aggregates are in flight together and never wait for one another.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

from amqp.exceptions import PreconditionFailed
from kombu.entity import Exchange

from outbox_tasks.broker import PERSISTENT
from outbox_tasks.envelope import CONTENT_ENCODING, CONTENT_TYPE, OutboundMessage
from outbox_tasks.errors import ConfigurationError
from outbox_tasks.publisher.results import BatchResult, encoding_failure

__all__ = ["NACK_REASON", "AmqpLink"]

NACK_REASON = (
    "not taken by the broker (basic.nack): a bound queue is full (x-overflow=reject-publish) or "
    "unavailable"
)

# kombu is only partly annotated: it is called through ``Any`` rather than through ignores.
_exchange: Any = Exchange


def _lanes(messages: Sequence[OutboundMessage]) -> list[deque[int]]:
    """Indexes of ``messages`` grouped by aggregate, in batch order within each group."""
    by_aggregate: dict[tuple[str, str], deque[int]] = {}
    for index, message in enumerate(messages):
        by_aggregate.setdefault(message.aggregate_key, deque()).append(index)
    return list(by_aggregate.values())


class AmqpLink:
    """A py-amqp channel in confirm mode: the only place that talks py-amqp directly.

    Raises driver errors as they come (and :class:`TimeoutError` for confirms not received in
    time); :class:`~outbox_tasks.publisher.BrokerPublisher` translates them and drops the link.
    """

    def __init__(self, conn: Any, exchange: str, exchange_type: str, timeout: float) -> None:
        self._raw: Any = conn.connection
        # py-amqp puts the socket back in blocking mode after connecting; give every later read
        # and write (channel open, declare, publish) a bound so a silent broker cannot hang us.
        self._raw.transport.sock.settimeout(timeout)
        self._channel: Any = conn.channel()
        self._exchange = exchange
        self._exchange_type = exchange_type
        self._timeout = timeout
        self._channel.confirm_select()
        self._channel.events["basic_ack"].add(self._on_ack)
        self._channel.events["basic_nack"].add(self._on_nack)
        self._channel.events["basic_return"].add(self._on_return)
        # Confirm delivery tags count publishes on the channel from 1.
        self._next_tag = 1
        self._unconfirmed: dict[int, int] = {}  # delivery tag -> message index
        self._settled: list[tuple[int, bool]] = []  # (message index, nacked), as confirmed
        self._returned: set[str] = set()  # event ids sent back as unroutable

    def alive(self) -> bool:
        # Handle whatever the broker said while we were idle (e.g. it closed the connection),
        # so a dead connection is replaced before any message is sent on it.
        try:
            self._raw.drain_events(timeout=0)
        except TimeoutError:
            return True
        except Exception:  # whatever it is, this connection is not worth keeping
            return False
        return True

    def declare(self) -> None:
        try:
            _exchange(self._exchange, type=self._exchange_type, durable=True).declare(
                channel=self._channel
            )
        except PreconditionFailed as exc:
            # The exchange exists with another type or durability: retrying cannot help.
            raise ConfigurationError(
                f"exchange {self._exchange!r} exists with settings other than "
                f"type={self._exchange_type!r}, durable=True: {exc}"
            ) from exc

    def publish(self, messages: Sequence[OutboundMessage]) -> BatchResult:
        """Send ``messages`` with every aggregate in its own lane: the first message of each at
        once, then each next one as soon as its predecessor is confirmed (never before). Lanes
        do not wait for one another, so a slow confirm holds back its own aggregate only."""
        wires: list[Any] = []
        errors: dict[int, str] = {}
        for index, message in enumerate(messages):
            wire, error = self._prepare(message)
            wires.append(wire)
            if error is not None:
                errors[index] = error

        lanes = _lanes(messages)
        lane_of = {index: lane for lane in lanes for index in lane}
        accepted: list[int] = []
        failed: dict[str, str] = {}
        deferred: dict[str, str] = {}
        skipped: list[str] = []
        unroutable = 0
        self._returned.clear()
        self._settled.clear()
        self._unconfirmed.clear()

        def send_head(lane: deque[int]) -> None:
            """Send the lane's next message, or fail it (it could not be encoded) and skip the
            rest of its aggregate."""
            index = lane.popleft()
            if index in errors:
                failed[messages[index].event_id] = errors[index]
                skipped.extend(messages[i].event_id for i in lane)
                lane.clear()
                return
            self._unconfirmed[self._next_tag] = index
            self._next_tag += 1
            self._channel.basic_publish(
                wires[index],
                exchange=self._exchange,
                routing_key=messages[index].routing_key,
                # Unroutable messages come back as basic.return before their ack: we only
                # count them, they are dropped exactly as without the flag.
                mandatory=True,
            )

        for lane in lanes:  # in batch order of each aggregate's first message
            send_head(lane)
        deadline = time.monotonic() + self._timeout
        while self._unconfirmed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Reported by the caller as BrokerUnavailable, with the URL.
                raise TimeoutError(
                    f"{len(self._unconfirmed)} publisher confirms not received within "
                    f"{self._timeout:g}s"
                )
            with suppress(TimeoutError):
                self._raw.drain_events(timeout=remaining)
            if not self._settled:
                continue
            deadline = time.monotonic() + self._timeout
            settled, self._settled = self._settled, []
            for index, nacked in settled:
                event_id = messages[index].event_id
                lane = lane_of[index]
                if nacked:
                    deferred[event_id] = NACK_REASON
                    skipped.extend(messages[i].event_id for i in lane)
                    lane.clear()
                    continue
                accepted.append(index)
                if event_id in self._returned:
                    unroutable += 1
                if lane:
                    send_head(lane)
        published = [messages[index].event_id for index in sorted(accepted)]
        # A nack says a queue did not take it, not that none did: the others keep their copy.
        return BatchResult(
            published, failed, skipped, unroutable, deferred=deferred, maybe_sent=list(deferred)
        )

    def _prepare(self, message: OutboundMessage) -> tuple[Any, str | None]:
        wire = self._channel.prepare_message(
            message.body,
            0,
            CONTENT_TYPE,
            CONTENT_ENCODING,
            message.headers,
            {"delivery_mode": PERSISTENT, "message_id": message.event_id},
        )
        try:
            # py-amqp encodes the properties only while writing the frame, and an encoding error
            # there is reported as a connection error. Encoding beforehand (private helper)
            # keeps a bad header this message's own failure.
            encoded = wire._serialize_properties()
        except Exception as exc:  # local encoding only, so the message's own fault
            return wire, encoding_failure(exc)
        # ... and the frame writer reuses these bytes instead of encoding them a second time
        # (the properties are the bulk of py-amqp's CPU time per message).
        wire._serialize_properties = lambda: encoded
        return wire, None

    def _settle(self, delivery_tag: int, multiple: bool, nacked: bool) -> None:
        if multiple:
            # Tags are inserted in increasing order, so the settled ones are a prefix.
            settled = []
            for tag in self._unconfirmed:
                if tag > delivery_tag:
                    break
                settled.append(tag)
        else:
            settled = [delivery_tag] if delivery_tag in self._unconfirmed else []
        for tag in settled:
            self._settled.append((self._unconfirmed.pop(tag), nacked))

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, nacked=False)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, nacked=True)

    def _on_return(self, exc: object, exchange: str, routing_key: str, message: Any) -> None:
        event_id = message.properties.get("message_id")
        if isinstance(event_id, str):
            self._returned.add(event_id)
