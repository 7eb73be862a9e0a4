"""Create the outbox, partition-lease, dead-letter and consumer tables.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import UserDefinedType


class XID8(UserDefinedType):  # type: ignore[type-arg]
    """PostgreSQL's xid8, frozen here so this migration never changes with the models."""

    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "xid8"


revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("aggregate_type", sa.Text(), nullable=False),
        sa.Column("aggregate_id", sa.Text(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retry_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("txid", XID8(), server_default=sa.text("pg_current_xact_id()"), nullable=False),
        sa.Column(
            "slot",
            sa.SmallInteger(),
            sa.Computed(
                "((('x' || substr(md5(aggregate_type || chr(31) || aggregate_id), 1, 8))::bit(32)::integer & 1023))::smallint",
                persisted=True,
            ),
            nullable=False,
        ),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "headers",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("schema_version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dead_lettered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("aggregate_id <> ''", name=op.f("ck_outbox_aggregate_id_not_empty")),
        sa.CheckConstraint("aggregate_type <> ''", name=op.f("ck_outbox_aggregate_type_not_empty")),
        sa.CheckConstraint("event_type <> ''", name=op.f("ck_outbox_event_type_not_empty")),
        sa.CheckConstraint("retry_count >= 0", name=op.f("ck_outbox_retry_count_not_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    op.create_index(
        "ix_outbox_aggregate", "outbox", ["aggregate_type", "aggregate_id"], unique=False
    )
    op.create_index(
        "ix_outbox_aggregate_pending",
        "outbox",
        ["aggregate_type", "aggregate_id", "seq"],
        unique=False,
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.create_index(
        "ix_outbox_blocked",
        "outbox",
        ["slot"],
        unique=False,
        postgresql_where=sa.text(
            "published_at IS NULL AND (next_attempt_at IS NOT NULL OR dead_lettered_at IS NOT NULL)"
        ),
    )
    op.create_index("ix_outbox_created_at", "outbox", ["created_at"], unique=False)
    op.create_index(
        "ix_outbox_pending",
        "outbox",
        ["slot", "seq"],
        unique=False,
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.create_index(
        "ix_outbox_published_at",
        "outbox",
        ["published_at"],
        unique=False,
        postgresql_where=sa.text("published_at IS NOT NULL"),
    )
    op.create_table(
        "outbox_consumer_position",
        sa.Column("consumer_group", sa.Text(), nullable=False),
        sa.Column("aggregate_type", sa.Text(), nullable=False),
        sa.Column("aggregate_id", sa.Text(), nullable=False),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint(
            "consumer_group",
            "aggregate_type",
            "aggregate_id",
            name=op.f("pk_outbox_consumer_position"),
        ),
    )
    op.create_table(
        "outbox_consumer_receipt",
        sa.Column("consumer_group", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column(
            "processed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint(
            "consumer_group", "event_id", name=op.f("pk_outbox_consumer_receipt")
        ),
    )
    op.create_index(
        "ix_outbox_consumer_receipt_processed_at",
        "outbox_consumer_receipt",
        ["processed_at"],
        unique=False,
    )
    op.create_table(
        "outbox_dead_letter",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("aggregate_type", sa.Text(), nullable=False),
        sa.Column("aggregate_id", sa.Text(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "headers",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("schema_version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "errors",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "dead_lettered_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("status", sa.Text(), server_default=sa.text("'parked'"), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.Text(), nullable=True),
        sa.Column("resolution_reason", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('parked', 'skipped', 'replayed', 'discarded')",
            name=op.f("ck_outbox_dead_letter_status_known"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_dead_letter")),
    )
    op.create_index(
        "ix_outbox_dead_letter_aggregate",
        "outbox_dead_letter",
        ["aggregate_type", "aggregate_id", "seq"],
        unique=False,
    )
    op.create_index(
        "ix_outbox_dead_letter_status",
        "outbox_dead_letter",
        ["status", "dead_lettered_at"],
        unique=False,
    )
    op.create_table(
        "outbox_dead_letter_audit",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=True),
        sa.Column("aggregate_type", sa.Text(), nullable=True),
        sa.Column("aggregate_id", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "details",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_dead_letter_audit")),
    )
    op.create_index(
        "ix_outbox_dead_letter_audit_event_id",
        "outbox_dead_letter_audit",
        ["event_id"],
        unique=False,
    )
    op.create_table(
        "outbox_partition",
        sa.Column("partition_count", sa.SmallInteger(), nullable=False),
        sa.Column("partition", sa.SmallInteger(), nullable=False),
        sa.Column("slot_lo", sa.SmallInteger(), nullable=False),
        sa.Column("slot_hi", sa.SmallInteger(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=True),
        sa.Column("epoch", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("granted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("inflight_ids", postgresql.ARRAY(sa.Uuid()), nullable=True),
        sa.Column("redeliver_ids", postgresql.ARRAY(sa.Uuid()), nullable=True),
        sa.Column("cursor_slot", sa.SmallInteger(), nullable=True),
        sa.Column("last_published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("published_count", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.CheckConstraint("slot_lo < slot_hi", name=op.f("ck_outbox_partition_slot_range")),
        sa.PrimaryKeyConstraint("partition_count", "partition", name=op.f("pk_outbox_partition")),
    )


def downgrade() -> None:
    op.drop_table("outbox_partition")
    op.drop_index("ix_outbox_dead_letter_audit_event_id", table_name="outbox_dead_letter_audit")
    op.drop_table("outbox_dead_letter_audit")
    op.drop_index("ix_outbox_dead_letter_status", table_name="outbox_dead_letter")
    op.drop_index("ix_outbox_dead_letter_aggregate", table_name="outbox_dead_letter")
    op.drop_table("outbox_dead_letter")
    op.drop_index("ix_outbox_consumer_receipt_processed_at", table_name="outbox_consumer_receipt")
    op.drop_table("outbox_consumer_receipt")
    op.drop_table("outbox_consumer_position")
    op.drop_index(
        "ix_outbox_published_at",
        table_name="outbox",
        postgresql_where=sa.text("published_at IS NOT NULL"),
    )
    op.drop_index(
        "ix_outbox_pending", table_name="outbox", postgresql_where=sa.text("published_at IS NULL")
    )
    op.drop_index("ix_outbox_created_at", table_name="outbox")
    op.drop_index(
        "ix_outbox_blocked",
        table_name="outbox",
        postgresql_where=sa.text(
            "published_at IS NULL AND (next_attempt_at IS NOT NULL OR dead_lettered_at IS NOT NULL)"
        ),
    )
    op.drop_index(
        "ix_outbox_aggregate_pending",
        table_name="outbox",
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.drop_index("ix_outbox_aggregate", table_name="outbox")
    op.drop_table("outbox")
