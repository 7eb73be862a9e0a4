"""Dead letters: messages that exhausted their retries, their parked aggregates, and what an
operator does about them (list, show, replay in order, discard with a reason, audit history).

How a message gets here: the relay, in the same fenced statement that records its last failure,
sets ``outbox.dead_lettered_at``. From then on the relay never selects it, and its aggregate's
later rows wait behind it (parked). The ``outbox.dead_letter`` task then:

- copies it into ``outbox_dead_letter`` with its history (attempts, last error, first and last
  failure time),
- publishes a copy to the dead-letter exchange (``OUTBOX_DEAD_LETTER_EXCHANGE``, same routing key),
- for event types whose policy is ``skip`` (``OUTBOX_EVENT_TYPE_POLICIES``), removes the outbox row
  so the aggregate flows on; the default policy ``park`` keeps it parked until an operator acts.

Replay puts the original outbox row back in line (same id, same ``seq``, retries reset), so it is
published before the aggregate's later rows. Discard removes it from the outbox (the dead-letter
copy stays) and unparks the aggregate. Both are idempotent and audited.
"""

from __future__ import annotations

import getpass
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

from sqlalchemy.engine import Connection, Engine

from outbox_tasks.broker import BROKER_NACK
from outbox_tasks.envelope import OutboundMessage, message_for_row
from outbox_tasks.errors import InvalidMessage, NotFound
from outbox_tasks.limits import MAX_ROUTING_KEY_BYTES, check_headers
from outbox_tasks.logs import event, get_logger
from outbox_tasks.partitioning import partition_of
from outbox_tasks.protocols import Publisher
from outbox_tasks.sending import send_batch
from outbox_tasks.settings import Settings
from outbox_tasks.store import deadletter as store
from outbox_tasks.store import reports
from outbox_tasks.store.deadletter import (
    UNRESOLVED_STATUSES,
    DeadLetterView,
    ExhaustedRow,
    Filters,
    MatchedDeadLetter,
)

# DeadLetterView and Filters are the shapes of the store's queries, and part of this API.
__all__ = [
    "H_DEAD_DROPPED",
    "H_DEAD_REASON",
    "H_DEAD_RETRIES",
    "DeadLetterView",
    "Filters",
    "Resolution",
    "collect",
    "counts",
    "dead_copy",
    "default_actor",
    "discard",
    "history",
    "list_dead_letters",
    "parse_ids",
    "replay",
    "sendable_copy",
    "show",
]

log = get_logger("deadletter")

H_DEAD_REASON = "outbox-dead-letter-reason"
H_DEAD_RETRIES = "outbox-dead-letter-retries"
# What of the original could not travel with the copy (see ``sendable_copy``).
H_DEAD_DROPPED = "outbox-dead-letter-dropped"
ENVELOPE_ALLOWANCE_BYTES = 8192


@dataclass
class Resolution:
    """What replay or discard did (or would do, with ``dry_run``)."""

    action: str
    dry_run: bool
    matched: list[uuid.UUID]
    changed: list[uuid.UUID]
    already_resolved: list[uuid.UUID]

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "dry_run": self.dry_run,
            "matched": [str(i) for i in self.matched],
            "changed": [str(i) for i in self.changed],
            "already_resolved": [str(i) for i in self.already_resolved],
        }


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = os.environ.get("USER", "unknown")
    return f"{user}@{os.uname().nodename}"


def sendable_copy(row: ExhaustedRow, max_message_bytes: int) -> ExhaustedRow:
    """The row its dead-letter copy is built from: a row dead-lettered because no broker would
    take it (``invalid_message``) would be refused again, so what cannot travel is left out and
    named in a header (user headers, or the payload; the record keeps both)."""
    dropped: list[str] = []
    headers: Any = row.headers
    try:
        check_headers(headers, reserved_prefix=None)
    except InvalidMessage as error:
        headers, dropped = {}, [f"headers ({error})"[:1000]]
    size = len(row.payload_json.encode())
    changes: dict[str, Any] = {}
    # The rest of the envelope (ids, names, a timestamp) fits in a few KiB.
    if size + ENVELOPE_ALLOWANCE_BYTES > max_message_bytes:
        changes["payload_json"] = "null"
        dropped.append(f"payload ({size} bytes)")
    if dropped:
        headers = {**headers, H_DEAD_DROPPED: "; ".join(dropped)}
    return replace(row, headers=headers, **changes)


def dead_copy(row: ExhaustedRow, settings: Settings, resend: bool = False) -> OutboundMessage:
    """The message sent to the dead-letter exchange: the original, plus why it died and its
    retries; a routing key over 255 bytes is cut (at a character boundary) to fit."""
    message = message_for_row(
        row, partition=partition_of(row.slot, settings.partitions), epoch=0, redelivered=resend
    )
    message.headers[H_DEAD_REASON] = (row.last_error or "")[:1000]
    message.headers[H_DEAD_RETRIES] = row.retry_count
    key = message.routing_key.encode()
    if len(key) > MAX_ROUTING_KEY_BYTES:
        message = replace(
            message, routing_key=key[:MAX_ROUTING_KEY_BYTES].decode("utf-8", "ignore")
        )
    return message


def collect(
    engine: Engine, settings: Settings, publisher: Publisher, *, limit: int = 500
) -> dict[str, int]:
    """The ``outbox.dead_letter`` task: record newly exhausted messages, publish their copies to
    the dead-letter exchange, and drop the outbox rows of ``skip``-policy event types.

    The copy is published before the dead letter is recorded: a crash in between re-publishes the
    copy on the next run (at least once), never loses it. A copy the broker refuses for good is
    not retried for ever: the dead letter is recorded without it (logged), so an operator sees
    it and can replay or discard it. A copy nacked (backpressure) waits for the next run. No
    single row can stop the others (``sending.send_batch``); an outage raises
    ``BrokerUnavailable`` and the next run tries again.
    """
    with engine.begin() as conn:
        rows = store.select_exhausted(conn, limit)
        if not rows:
            return {"recorded": 0, "skipped": 0}
        sendable = [sendable_copy(r, settings.max_message_bytes) for r in rows]
        sent = send_batch(
            publisher,
            sendable,
            lambda row, resend: dead_copy(cast(ExhaustedRow, row), settings, resend),
            max_message_bytes=settings.max_message_bytes,
        )
        published = set(sent.published)
        refused = {
            event_id: refusal
            for event_id, refusal in sent.refused.items()
            if refusal.error_type != BROKER_NACK
        }
        recorded: list[ExhaustedRow] = []
        skipped_ids = []
        for row in rows:
            if str(row.id) not in published and str(row.id) not in refused:
                continue  # nacked or behind one: try again next run
            policy = settings.event_type_policies.get(row.event_type, "park")
            store.record_dead_letter(conn, row.id, "skipped" if policy == "skip" else "parked")
            recorded.append(row)
            if policy == "skip":
                skipped_ids.append(row.id)
        store.drop_skipped(conn, skipped_ids)
    for event_id, refusal in refused.items():
        event(
            log,
            logging.ERROR,
            "dead_letter_copy_refused",
            "the broker refused a dead-letter copy; the dead letter is recorded without it",
            event_id=event_id,
            error_type=refusal.error_type,
            error=refusal.text[:300],
        )
    if recorded:
        event(
            log,
            logging.WARNING,
            "dead_lettered",
            "messages dead-lettered; their aggregates are parked until replay or discard",
            count=len(recorded),
            skipped=len(skipped_ids),
            aggregates=len({(r.aggregate_type, r.aggregate_id) for r in recorded}),
        )
    return {"recorded": len(recorded), "skipped": len(skipped_ids)}


def list_dead_letters(
    engine: Engine,
    filters: Filters,
    *,
    status: str | None = "parked",
    limit: int = 50,
    offset: int = 0,
) -> list[DeadLetterView]:
    """Dead letters matching the filters, oldest first (the order replay uses)."""
    with engine.connect() as conn:
        return store.select_dead_letters(conn, filters, status=status, limit=limit, offset=offset)


def show(engine: Engine, event_id: uuid.UUID) -> DeadLetterView:
    """One dead letter in full (payload, headers, error history). Raises NotFound."""
    with engine.connect() as conn:
        view = store.select_dead_letter(conn, event_id)
    if view is None:
        raise NotFound(f"no dead letter with id {event_id} (see `outbox-tasks dlq list`)")
    return view


def _resolve(
    engine: Engine,
    filters: Filters,
    *,
    action: str,
    actor: str,
    reason: str | None,
    dry_run: bool,
    per_row: Callable[[Connection, MatchedDeadLetter], None],
    rate_per_second: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Resolution:
    if filters.empty and not filters.everything:
        raise InvalidMessage(
            f"{action} needs an id, an aggregate or other filters, or --all: refusing to act on "
            "every dead letter by accident"
        )
    with engine.connect() as conn:
        rows = store.select_matching(conn, filters)
    if filters.ids and len(rows) < len(set(filters.ids)):
        missing = set(filters.ids) - {r.id for r in rows}
        raise NotFound("no dead letter with id " + ", ".join(sorted(str(m) for m in missing)))
    result = Resolution(
        action=action,
        dry_run=dry_run,
        matched=[r.id for r in rows],
        changed=[],
        already_resolved=[r.id for r in rows if r.status not in UNRESOLVED_STATUSES],
    )
    if dry_run:
        result.changed = [r.id for r in rows if r.status in UNRESOLVED_STATUSES]
        return result
    status = "replayed" if action == "replay" else "discarded"
    for row in rows:
        if row.status not in UNRESOLVED_STATUSES:
            continue
        with engine.begin() as conn:
            if not store.resolve_dead_letter(
                conn, row.id, status=status, actor=actor, reason=reason
            ):
                continue  # resolved concurrently by someone else: idempotent
            per_row(conn, row)
            store.insert_audit(
                conn,
                actor=actor,
                action=action,
                event_id=row.id,
                aggregate_type=row.aggregate_type,
                aggregate_id=row.aggregate_id,
                reason=reason,
                details={"seq": row.seq},
            )
        result.changed.append(row.id)
        if rate_per_second:
            sleep(1.0 / rate_per_second)
    event(
        log,
        logging.INFO,
        f"dead_letter_{action}",
        f"dead letters {status}",
        count=len(result.changed),
        actor=actor,
    )
    return result


def replay(
    engine: Engine,
    filters: Filters,
    *,
    actor: str,
    reason: str | None = None,
    dry_run: bool = False,
    rate_per_second: float | None = 50.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Resolution:
    """Put dead letters back in line, oldest first, at most ``rate_per_second``."""

    def requeue(conn: Connection, row: MatchedDeadLetter) -> None:
        if not store.requeue_outbox_row(conn, row.id):
            store.reinsert_outbox_row(conn, row.id)

    return _resolve(
        engine,
        filters,
        action="replay",
        actor=actor,
        reason=reason,
        dry_run=dry_run,
        per_row=requeue,
        rate_per_second=rate_per_second,
        sleep=sleep,
    )


def discard(
    engine: Engine, filters: Filters, *, actor: str, reason: str, dry_run: bool = False
) -> Resolution:
    """Drop dead letters for good (the dead-letter copy stays) and unpark their aggregates."""
    if not reason or not reason.strip():
        raise InvalidMessage("discard needs a reason (--reason): it is kept in the audit trail")

    def remove(conn: Connection, row: MatchedDeadLetter) -> None:
        store.remove_outbox_row(conn, row.id)

    return _resolve(
        engine,
        filters,
        action="discard",
        actor=actor,
        reason=reason,
        dry_run=dry_run,
        per_row=remove,
    )


def history(
    engine: Engine, *, limit: int = 50, event_id: uuid.UUID | None = None
) -> list[dict[str, Any]]:
    """The newest ``limit`` audit lines (all, or those of ``event_id``), newest first, as dicts:
    id, at, actor, action, event_id, aggregate_type, aggregate_id, reason, details."""
    with engine.connect() as conn:
        entries = store.select_audit(conn, limit=limit, event_id=event_id)
    return [asdict(e) for e in entries]


def counts(engine: Engine) -> dict[str, int]:
    """Unresolved dead letters and parked aggregates (the same reading status and metrics use)."""
    with engine.connect() as conn:
        totals = reports.outbox_totals(conn)
    return {"dead_letters": totals.parked_messages, "parked_aggregates": totals.parked_aggregates}


def parse_ids(values: Sequence[str]) -> tuple[uuid.UUID, ...]:
    try:
        return tuple(uuid.UUID(v) for v in values)
    except ValueError:
        raise InvalidMessage(
            f"not an event id: {', '.join(values)} (ids look like 1b4e28ba-2fa1-11d2-883f-...)"
        ) from None
