"""Consumer groups: parked aggregates on the per-aggregate position.

An ordered consumer group parks an aggregate when one of its events exhausts its retries: the
later events of that aggregate go to the group's dead-letter queue, in order, until a replay has
handled them all or an operator unparks it. All columns are nullable: existing rows stay valid.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "outbox_consumer_position",
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column(
        "outbox_consumer_position", sa.Column("parked_event_id", sa.Uuid(), nullable=True)
    )
    op.add_column("outbox_consumer_position", sa.Column("parked_error", sa.Text(), nullable=True))
    op.add_column(
        "outbox_consumer_position", sa.Column("dead_sequence", sa.BigInteger(), nullable=True)
    )
    op.create_index(
        "ix_outbox_consumer_position_parked",
        "outbox_consumer_position",
        ["consumer_group"],
        unique=False,
        postgresql_where=sa.text("parked_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_outbox_consumer_position_parked",
        table_name="outbox_consumer_position",
        postgresql_where=sa.text("parked_at IS NOT NULL"),
    )
    op.drop_column("outbox_consumer_position", "dead_sequence")
    op.drop_column("outbox_consumer_position", "parked_error")
    op.drop_column("outbox_consumer_position", "parked_event_id")
    op.drop_column("outbox_consumer_position", "parked_at")
