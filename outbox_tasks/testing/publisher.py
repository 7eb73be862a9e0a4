"""A publisher for tests: records what it publishes, fails on demand."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from outbox_tasks.envelope import OutboundMessage
from outbox_tasks.errors import BrokerUnavailable
from outbox_tasks.protocols import Publisher
from outbox_tasks.publisher import BatchResult


class RecordingPublisher:
    """A publisher (``protocols.Publisher``) that keeps what it publishes, in order, and fails when
    told to.

    On its own it accepts every message. Given ``inner`` (a real ``BrokerPublisher``, say), it
    sends the messages it does not fail itself through ``inner`` and records what ``inner``
    accepted: planned failures on a real broker. Like the broker publisher, once a message of an
    aggregate fails, that aggregate's later messages in the batch are skipped.

    ``published``: the accepted messages in order (a message sent again appears again).
    ``attempts``: event id -> times it was offered for sending (failed attempts included).
    ``unavailable``: while True, every batch raises ``BrokerUnavailable`` (an outage) and
    nothing is attempted or recorded.

    Besides refusals (:meth:`fail`), it can nack (:meth:`nack`: backpressure, the broker kept
    other copies) and raise (:meth:`raise_on`: any exception, for the whole batch, after the
    messages before it went out, as a driver error mid-batch would).
    """

    def __init__(self, inner: Publisher | None = None) -> None:
        self.inner = inner
        self.published: list[OutboundMessage] = []
        self.attempts: dict[str, int] = {}
        self.unavailable = False
        self._failures: dict[str, tuple[int | None, str]] = {}
        self._nacks: dict[str, int | None] = {}
        self._raises: dict[str, tuple[int | None, BaseException]] = {}

    def nack(self, *event_ids: uuid.UUID | str, times: int | None = 1) -> None:
        """Nack each of these events for its next ``times`` attempts (None: always; 0: stop):
        reported as ``deferred`` and ``maybe_sent``, as RabbitMQ's nack of a full queue."""
        for event_id in event_ids:
            if times == 0:
                self._nacks.pop(str(event_id), None)
            else:
                self._nacks[str(event_id)] = times

    def raise_on(
        self, *event_ids: uuid.UUID | str, exception: BaseException, times: int | None = 1
    ) -> None:
        """Raise ``exception`` from ``publish_batch`` for the next ``times`` batches holding one
        of these events (None: always; 0: stop). The batch's messages before it are published
        (recorded) first: the caller cannot know which went out."""
        for event_id in event_ids:
            if times == 0:
                self._raises.pop(str(event_id), None)
            else:
                self._raises[str(event_id)] = (times, exception)

    def fail(
        self,
        *event_ids: uuid.UUID | str,
        times: int | None = 1,
        error: str = "RecordingPublisher: refused",
    ) -> None:
        """Refuse each of these events for its next ``times`` attempts (None: every attempt from
        now on; 0: no more), reporting ``error`` as the failure. A later call for an event
        replaces its plan."""
        for event_id in event_ids:
            if times == 0:
                self._failures.pop(str(event_id), None)
            else:
                self._failures[str(event_id)] = (times, error)

    def publish_batch(self, messages: Sequence[OutboundMessage]) -> BatchResult:
        if self.unavailable:
            raise BrokerUnavailable("broker unavailable (RecordingPublisher.unavailable)")
        failed: dict[str, str] = {}
        deferred: dict[str, str] = {}
        skipped: list[str] = []
        dead: set[tuple[str, str]] = set()
        sendable: list[OutboundMessage] = []
        for message in messages:
            if message.aggregate_key in dead:
                skipped.append(message.event_id)
                continue
            self.attempts[message.event_id] = self.attempts.get(message.event_id, 0) + 1
            exception = self._take_raise(message.event_id)
            if exception is not None:
                self.published.extend(sendable)  # already on their way when it broke
                raise exception
            error = self._take_failure(message.event_id)
            if error is not None:
                failed[message.event_id] = error
                dead.add(message.aggregate_key)
            elif self._take_nack(message.event_id):
                deferred[message.event_id] = "RecordingPublisher: nacked"
                dead.add(message.aggregate_key)
            else:
                sendable.append(message)
        maybe_sent: list[str] = []
        if self.inner is None:
            accepted = [m.event_id for m in sendable]
        else:
            outcome = self.inner.publish_batch(sendable)
            accepted = list(outcome.published)
            failed.update(outcome.failed)
            deferred.update(outcome.deferred)
            skipped.extend(outcome.skipped)
            maybe_sent = [i for i in outcome.maybe_sent if i not in deferred]
        ok = set(accepted)
        self.published.extend(m for m in sendable if m.event_id in ok)
        return BatchResult(
            published=accepted,
            failed=failed,
            skipped=skipped,
            deferred=deferred,
            maybe_sent=list(deferred) + maybe_sent,
        )

    def published_ids(self) -> list[str]:
        """Event ids of ``published``, in order."""
        return [m.event_id for m in self.published]

    def _take_nack(self, event_id: str) -> bool:
        if event_id not in self._nacks:
            return False
        times = self._nacks[event_id]
        if times is not None:
            if times <= 1:
                del self._nacks[event_id]
            else:
                self._nacks[event_id] = times - 1
        return True

    def _take_raise(self, event_id: str) -> BaseException | None:
        planned = self._raises.get(event_id)
        if planned is None:
            return None
        times, exception = planned
        if times is not None:
            if times <= 1:
                del self._raises[event_id]
            else:
                self._raises[event_id] = (times - 1, exception)
        return exception

    def _take_failure(self, event_id: str) -> str | None:
        planned = self._failures.get(event_id)
        if planned is None:
            return None
        times, error = planned
        if times is not None:
            if times <= 1:
                del self._failures[event_id]
            else:
                self._failures[event_id] = (times - 1, error)
        return error
