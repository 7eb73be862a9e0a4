"""Tables, as SQLAlchemy 2 typed models. Alembic (``migrations/``) owns the DDL; runtime code never
runs DDL. ``OutboxMessage`` is also the producer API: add one to your session inside the
transaction that changes your business rows.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    DateTime,
    FetchedValue,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import UserDefinedType

from outbox_tasks.errors import InvalidMessage, PayloadTooLarge
from outbox_tasks.limits import MAX_NAME_CHARS, check_headers, check_name, check_routing_key

log = logging.getLogger("outbox_tasks.producer")

PAYLOAD_WARN_BYTES = 64 * 1024
# json escapes NUL as \u0000; an odd run of backslashes before "u0000" is that escape.
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
PAYLOAD_MAX_BYTES = 1024 * 1024
MAX_NAME_LENGTH = MAX_NAME_CHARS

# The slot is a stable hash of the aggregate: md5 is immutable (allowed in a generated column),
# the same on every PostgreSQL version and easy to compute in any language (see slot_of()).
SLOT_EXPRESSION = (
    "((('x' || substr(md5(aggregate_type || chr(31) || aggregate_id), 1, 8))::bit(32)::integer"
    " & 1023))::smallint"
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class XID8(UserDefinedType[int]):
    """PostgreSQL's 64-bit transaction id type (``pg_current_xact_id()``)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        # psycopg has no loader for xid8 and returns its text form.
        return lambda value: None if value is None else int(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _json_type_error(what: str, exc: TypeError) -> InvalidMessage:
    # json's message names the offending type ("Object of type Decimal is not JSON
    # serializable"); keep it and say what to do.
    return InvalidMessage(
        f"{what} must be JSON-serializable: {exc}. Convert the value to str, int, float, bool, "
        "None, list or dict before adding the message."
    )


class OutboxMessage(Base):
    """One event, written in the same transaction as the business change it describes.

    ``session.add(OutboxMessage(aggregate_type="Order", aggregate_id=order.id,
    event_type="OrderCreated", payload={...}))``. Validated when built, so nothing the database or
    a broker would refuse reaches the caller's commit (``outbox_tasks.limits``): names non-empty,
    at most 255 characters, without NUL or lone surrogates, routing key at most 255 bytes;
    headers the transports can encode; payload JSON-serializable and at most 1 MB (a warning over
    64 KB). Raises InvalidMessage naming the field. Nothing is published before the caller's
    transaction commits.
    """

    __tablename__ = "outbox"

    id: Mapped[uuid.UUID] = mapped_column(
        Uuid, default=uuid.uuid4, server_default=text("gen_random_uuid()")
    )
    aggregate_type: Mapped[str] = mapped_column(Text)
    aggregate_id: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(Text)
    payload: Mapped[Any] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retry_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True))
    # Kept for the contract (DESIGN 3); ordering no longer reads it (docs/relay.md).
    txid: Mapped[int] = mapped_column(XID8, server_default=text("pg_current_xact_id()"))
    # 1, 2, 3 ... per aggregate, no holes: set by the outbox_assign_sequence trigger (migration
    # 0004), which also draws ``seq`` again so both grow in commit order per aggregate.
    # NULL only for published history put back without one (docs/cleanup.md).
    aggregate_sequence: Mapped[int | None] = mapped_column(
        BigInteger, server_default=FetchedValue()
    )
    slot: Mapped[int] = mapped_column(SmallInteger, Computed(SLOT_EXPRESSION, persisted=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    headers: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    schema_version: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    first_failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    dead_lettered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        PrimaryKeyConstraint("id"),
        CheckConstraint("aggregate_type <> ''", name="aggregate_type_not_empty"),
        CheckConstraint("aggregate_id <> ''", name="aggregate_id_not_empty"),
        CheckConstraint("event_type <> ''", name="event_type_not_empty"),
        CheckConstraint("retry_count >= 0", name="retry_count_not_negative"),
        CheckConstraint(
            "published_at IS NOT NULL OR aggregate_sequence IS NOT NULL",
            name="pending_rows_are_numbered",
        ),
        # The claim scan: pending rows of a slot range, slot-major then seq (DESIGN 4.3).
        Index(
            "ix_outbox_pending",
            "slot",
            "seq",
            postgresql_where=text("published_at IS NULL"),
        ),
        # Head-of-line checks: the pending rows of one aggregate in seq order.
        Index(
            "ix_outbox_aggregate_pending",
            "aggregate_type",
            "aggregate_id",
            "seq",
            postgresql_where=text("published_at IS NULL"),
        ),
        # Rows in backoff or parked: tiny, read on every claim to skip blocked aggregates.
        Index(
            "ix_outbox_blocked",
            "slot",
            postgresql_where=text(
                "published_at IS NULL AND (next_attempt_at IS NOT NULL "
                "OR dead_lettered_at IS NOT NULL)"
            ),
        ),
        # Lookups by aggregate; unique: the database itself refuses a repeated number.
        Index(
            "ix_outbox_aggregate_sequence",
            "aggregate_type",
            "aggregate_id",
            "aggregate_sequence",
            unique=True,
        ),
        Index("ix_outbox_created_at", "created_at"),
        # Retention cleanup deletes by age of publication.
        Index(
            "ix_outbox_published_at",
            "published_at",
            postgresql_where=text("published_at IS NOT NULL"),
        ),
    )

    def __init__(self, **kwargs: Any) -> None:
        if "aggregate_id" in kwargs:
            kwargs["aggregate_id"] = _aggregate_id_text(kwargs["aggregate_id"])
        kwargs.setdefault("id", uuid.uuid4())
        kwargs.setdefault("headers", {})
        kwargs.setdefault("schema_version", 1)
        for name in ("aggregate_type", "aggregate_id", "event_type"):
            check_name(name, kwargs.get(name))
        check_routing_key(kwargs["aggregate_type"], kwargs["event_type"])
        if "payload" not in kwargs:
            raise InvalidMessage("payload is required (use {} for an event without data)")
        validate_payload(kwargs["payload"])
        validate_headers(kwargs["headers"])
        version = kwargs["schema_version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidMessage(f"schema_version must be an integer >= 1, got {version!r}")
        super().__init__(**kwargs)

    def __repr__(self) -> str:
        return (
            f"OutboxMessage(id={self.id}, aggregate={self.aggregate_type}/{self.aggregate_id}, "
            f"event_type={self.event_type})"
        )


def _aggregate_id_text(value: object) -> str:
    if isinstance(value, bool):
        raise InvalidMessage("aggregate_id must be a str, int or UUID, got bool")
    if isinstance(value, str | int | uuid.UUID):
        return str(value)
    raise InvalidMessage(f"aggregate_id must be a str, int or UUID, got {type(value).__name__}")


def validate_payload(payload: Any) -> int:
    """Check a payload and return its serialized size in bytes. Raises InvalidMessage."""
    try:
        # ensure_ascii=False: measure real UTF-8 bytes, as jsonb stores them.
        serialized = json.dumps(payload, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        size = len(serialized.encode())
    except UnicodeEncodeError:
        raise InvalidMessage(
            "payload contains a lone surrogate character, which is not valid UTF-8 and which "
            "PostgreSQL's jsonb refuses; fix the string's encoding"
        ) from None
    except TypeError as exc:
        raise _json_type_error("payload", exc) from None
    except ValueError as exc:
        raise InvalidMessage(
            f"payload must be JSON-serializable: {exc}. NaN and Infinity are not JSON; "
            "send them as strings or null."
        ) from None
    if _ESCAPED_NUL.search(serialized):
        raise InvalidMessage(
            "payload contains a NUL character (\\u0000), which PostgreSQL's jsonb refuses; "
            "remove it or encode the binary data (base64)"
        )
    if size > PAYLOAD_MAX_BYTES:
        raise PayloadTooLarge(
            f"payload is {size} bytes serialized; the limit is {PAYLOAD_MAX_BYTES} bytes (1 MB). "
            "Store large data elsewhere and put a reference in the event."
        )
    if size > PAYLOAD_WARN_BYTES:
        log.warning(
            "outbox payload is large",
            extra={"action": "payload_large", "size_bytes": size, "warn_bytes": PAYLOAD_WARN_BYTES},
        )
    return size


def validate_headers(headers: Any) -> None:
    """Check user headers (see ``outbox_tasks.limits.check_headers``). Raises InvalidMessage."""
    check_headers(headers)


class OutboxPartition(Base):
    """One lease per partition of one partition count (generation).

    ``epoch`` grows on every grant; every write a lease holder makes checks it in the same
    statement (fencing). ``inflight_ids`` holds the batch that is at the broker, so the next
    holder knows exactly which rows may have been sent already (``outbox-redelivered``);
    ``redeliver_ids`` are those rows, still pending, as of the last grant.
    """

    __tablename__ = "outbox_partition"

    partition_count: Mapped[int] = mapped_column(SmallInteger)
    partition: Mapped[int] = mapped_column(SmallInteger)
    slot_lo: Mapped[int] = mapped_column(SmallInteger)
    slot_hi: Mapped[int] = mapped_column(SmallInteger)
    owner: Mapped[str | None] = mapped_column(Text)
    epoch: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    leased_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    granted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    inflight_ids: Mapped[list[uuid.UUID] | None] = mapped_column(ARRAY(Uuid))
    redeliver_ids: Mapped[list[uuid.UUID] | None] = mapped_column(ARRAY(Uuid))
    cursor_slot: Mapped[int | None] = mapped_column(SmallInteger)
    last_published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    published_count: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))

    __table_args__ = (
        PrimaryKeyConstraint("partition_count", "partition"),
        CheckConstraint("slot_lo < slot_hi", name="slot_range"),
    )


class OutboxAggregate(Base):
    """One counter per aggregate: the last ``aggregate_sequence`` handed out.

    Written only by the ``outbox_assign_sequence`` trigger, in the inserting transaction (its row
    lock is what makes a second writer of the aggregate wait). Never reset or deleted by outbox
    code: a consumer group may hold a high-water mark for the aggregate (docs/relay.md).
    """

    __tablename__ = "outbox_aggregate"

    aggregate_type: Mapped[str] = mapped_column(Text)
    aggregate_id: Mapped[str] = mapped_column(Text)
    last_sequence: Mapped[int] = mapped_column(BigInteger)
    # True when the last increment came from the transaction that made the one before (a bulk
    # insert of the aggregate): the trigger then remembers where the row is for the next one.
    repeat_in_transaction: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))

    __table_args__ = (PrimaryKeyConstraint("aggregate_type", "aggregate_id"),)


class OutboxAggregateSkip(Base):
    """An ``aggregate_sequence`` that will never be published, on purpose.

    Written by the ``outbox_record_skip`` trigger when a dead-lettered, unpublished outbox row is
    deleted (discard, ``skip`` policy, an operator's DELETE). The relay reads it to tell
    consumers which number was published before a message (``previous_aggregate_sequence``).
    """

    __tablename__ = "outbox_aggregate_skip"

    aggregate_type: Mapped[str] = mapped_column(Text)
    aggregate_id: Mapped[str] = mapped_column(Text)
    aggregate_sequence: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    skipped_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )

    __table_args__ = (PrimaryKeyConstraint("aggregate_type", "aggregate_id", "aggregate_sequence"),)


class DeadLetter(Base):
    """A message that exhausted its retries, with its history and how it was resolved."""

    __tablename__ = "outbox_dead_letter"

    id: Mapped[uuid.UUID] = mapped_column(Uuid)
    aggregate_type: Mapped[str] = mapped_column(Text)
    aggregate_id: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(Text)
    payload: Mapped[Any] = mapped_column(JSONB)
    headers: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    schema_version: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    seq: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    errors: Mapped[list[Any]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    first_failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    dead_lettered_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )
    status: Mapped[str] = mapped_column(Text, server_default=text("'parked'"))
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resolved_by: Mapped[str | None] = mapped_column(Text)
    resolution_reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        PrimaryKeyConstraint("id"),
        CheckConstraint(
            "status IN ('parked', 'skipped', 'replayed', 'discarded')", name="status_known"
        ),
        Index("ix_outbox_dead_letter_aggregate", "aggregate_type", "aggregate_id", "seq"),
        Index("ix_outbox_dead_letter_status", "status", "dead_lettered_at"),
    )


class DeadLetterAudit(Base):
    """Who replayed or discarded what, when and why."""

    __tablename__ = "outbox_dead_letter_audit"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    event_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    aggregate_type: Mapped[str | None] = mapped_column(Text)
    aggregate_id: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))

    __table_args__ = (
        PrimaryKeyConstraint("id"),
        Index("ix_outbox_dead_letter_audit_event_id", "event_id"),
    )


class ConsumerReceipt(Base):
    """Proof that a consumer group handled an event, written with the handler's effects."""

    __tablename__ = "outbox_consumer_receipt"

    consumer_group: Mapped[str] = mapped_column(Text)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    processed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )

    __table_args__ = (
        PrimaryKeyConstraint("consumer_group", "event_id"),
        Index("ix_outbox_consumer_receipt_processed_at", "processed_at"),
    )


class ConsumerPosition(Base):
    """Per consumer group and aggregate, the highest sequence handled (drops stale redeliveries),
    and whether the aggregate is parked (ordered groups; see ``outbox_tasks.consumer``).

    ``last_aggregate_sequence`` is the highest ``aggregate_sequence`` handled (None: the group
    has not handled one yet, so it accepts the next it sees); ``parked_reason`` says why the
    aggregate is parked: ``dead_lettered`` (an event exhausted its retries) or ``gap`` (an
    event arrived after a missing one).

    ``dead_sequence`` is the highest sequence of the aggregate sent to the group's dead-letter
    queue: a parked aggregate resumes by itself once a replay has handled up to it.
    """

    __tablename__ = "outbox_consumer_position"

    consumer_group: Mapped[str] = mapped_column(Text)
    aggregate_type: Mapped[str] = mapped_column(Text)
    aggregate_id: Mapped[str] = mapped_column(Text)
    last_sequence: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )
    # Ordered groups park an aggregate when one of its events exhausts its retries; its later
    # events go to the dead-letter queue until a replay handles them or an operator unparks it.
    parked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    parked_event_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    parked_error: Mapped[str | None] = mapped_column(Text)
    dead_sequence: Mapped[int | None] = mapped_column(BigInteger)
    last_aggregate_sequence: Mapped[int | None] = mapped_column(BigInteger)
    parked_reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        PrimaryKeyConstraint("consumer_group", "aggregate_type", "aggregate_id"),
        Index(
            "ix_outbox_consumer_position_parked",
            "consumer_group",
            postgresql_where=text("parked_at IS NOT NULL"),
        ),
    )


def slot_of(aggregate_type: str, aggregate_id: str) -> int:
    """The slot PostgreSQL computes for an aggregate (same md5 hash as SLOT_EXPRESSION)."""
    import hashlib

    digest = hashlib.md5(f"{aggregate_type}\x1f{aggregate_id}".encode(), usedforsecurity=False)
    return int(digest.hexdigest()[:8], 16) & 1023
