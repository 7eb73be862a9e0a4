"""Wake-up NOTIFY trigger on the outbox and autovacuum tuned for a queue table.

The trigger is statement-level: one NOTIFY per INSERT statement (not per row) carrying the
distinct slots it touched. NOTIFY is transactional, so a wake-up is never delivered before the
insert commits. Relays that do not listen (OUTBOX_WAKEUP_ENABLED=false) pay only the NOTIFY.

Autovacuum: an outbox is a queue table; every published row becomes a dead tuple (on publish in
retain/archive mode, on delete in delete mode). Vacuum after 1% churn instead of the default 20%.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AUTOVACUUM = {
    "autovacuum_vacuum_scale_factor": "0.01",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_vacuum_insert_scale_factor": "0.05",
    "autovacuum_analyze_scale_factor": "0.02",
    "autovacuum_vacuum_cost_delay": "1",
}


def upgrade() -> None:
    settings = ", ".join(f"{k} = {v}" for k, v in AUTOVACUUM.items())
    op.execute(f"ALTER TABLE outbox SET ({settings})")
    op.execute(
        """
        CREATE FUNCTION outbox_notify_wakeup() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            slots text;
        BEGIN
            SELECT string_agg(DISTINCT slot::text, ',') INTO slots FROM new_rows;
            IF slots IS NOT NULL THEN
                PERFORM pg_notify('outbox_wakeup', slots);
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER outbox_wakeup AFTER INSERT ON outbox
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify_wakeup()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS outbox_wakeup ON outbox")
    op.execute("DROP FUNCTION IF EXISTS outbox_notify_wakeup()")
    op.execute("ALTER TABLE outbox RESET (" + ", ".join(AUTOVACUUM) + ")")
