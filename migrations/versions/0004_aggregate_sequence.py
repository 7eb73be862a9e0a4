"""Per-aggregate order without transaction ids: a gapless ``aggregate_sequence`` per aggregate.

- ``outbox_aggregate`` holds one counter row per aggregate (``last_sequence``). A BEFORE INSERT
  row trigger on ``outbox`` increments it (``INSERT ... ON CONFLICT DO UPDATE``) and stores the
  result in the new row's ``aggregate_sequence``. The counter row stays locked until the inserting
  transaction ends, so a second writer of the same aggregate waits for the first to commit or
  roll back: numbers have no holes (a rollback undoes the increment too) and, per aggregate,
  commit order is ``aggregate_sequence`` order. The trigger then draws ``seq`` again, after the
  lock, so ``seq`` (the envelope's ``sequence``) grows in the same order.
- ``outbox_aggregate_skip`` records the numbers that will never be published on purpose: an
  AFTER DELETE row trigger adds one when a dead-lettered, unpublished row is removed (a discard,
  a ``skip`` policy, an operator's DELETE). The relay tells consumers which number was published
  before each message, so such a gap is not mistaken for a lost event.
- ``outbox_consumer_position`` gets the consumer side: ``last_aggregate_sequence`` and
  ``parked_reason`` (``dead_lettered`` or ``gap``).
- ``ix_outbox_aggregate`` becomes the unique ``ix_outbox_aggregate_sequence`` (same leading
  columns, so the same lookups, and the database refuses a repeated number).

Existing rows are numbered 1, 2, 3 ... per aggregate in ``seq`` order and the counters start at
each aggregate's highest number. A row inserted as already published (archived history put back)
is left as it comes: it keeps its ``seq`` and ``aggregate_sequence`` (NULL allowed for history
only) and is never published again. This rewrites every outbox row under the migration's lock:
see docs/relay.md for the time it takes.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The counter row is updated once per event: leave room on its page for HOT updates, and vacuum
# it often (every update leaves a dead tuple).
COUNTER_STORAGE = {
    "fillfactor": "70",
    "autovacuum_vacuum_scale_factor": "0.01",
    "autovacuum_vacuum_threshold": "1000",
    "autovacuum_analyze_scale_factor": "0.05",
    "autovacuum_vacuum_cost_delay": "1",
}

ASSIGN_FUNCTION = """
CREATE FUNCTION outbox_assign_sequence() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    aggregate text := NEW.aggregate_type || chr(31) || NEW.aggregate_id;
    cached text := current_setting('outbox.sequence_counter', true);
    version tid;
    repeated boolean;
    ignored text;
BEGIN
    IF NEW.published_at IS NOT NULL THEN
        -- Published history put back (an archive restore): never sent again, so it keeps the
        -- numbers it comes with; the counter only moves up to cover them.
        IF NEW.aggregate_sequence IS NOT NULL THEN
            INSERT INTO outbox_aggregate AS a (aggregate_type, aggregate_id, last_sequence)
            VALUES (NEW.aggregate_type, NEW.aggregate_id, NEW.aggregate_sequence)
            ON CONFLICT (aggregate_type, aggregate_id)
            DO UPDATE SET last_sequence = excluded.last_sequence
            WHERE a.last_sequence < excluded.last_sequence;
        END IF;
        RETURN NEW;
    END IF;
    -- A bulk insert of one aggregate: its counter row is locked by this transaction already and
    -- its newest version is where the previous row left it. Update that version by ctid:
    -- through the primary key every version this transaction made would be visited again, and
    -- N rows would cost N^2.
    IF cached <> '' AND substr(cached, strpos(cached, ' ') + 1) = aggregate THEN
        UPDATE outbox_aggregate SET last_sequence = last_sequence + 1
        WHERE ctid = split_part(cached, ' ', 1)::tid
          AND aggregate_type = NEW.aggregate_type AND aggregate_id = NEW.aggregate_id
        RETURNING last_sequence, ctid INTO NEW.aggregate_sequence, version;
        repeated := version IS NOT NULL;
    END IF;
    IF version IS NULL THEN
        -- Locks the aggregate's counter row until this transaction ends: a concurrent writer
        -- of the same aggregate waits here, then sees the committed (or rolled-back) number.
        INSERT INTO outbox_aggregate AS a (aggregate_type, aggregate_id, last_sequence)
        VALUES (NEW.aggregate_type, NEW.aggregate_id, 1)
        ON CONFLICT (aggregate_type, aggregate_id)
        DO UPDATE SET last_sequence = a.last_sequence + 1,
                      repeat_in_transaction = (a.xmin = pg_current_xact_id()::xid)
        RETURNING a.last_sequence, a.ctid, a.repeat_in_transaction
        INTO NEW.aggregate_sequence, version, repeated;
    END IF;
    -- Remember where the counter row is only once the aggregate repeats in this transaction:
    -- a one-event transaction pays nothing for it. Transaction-local (reverted with a
    -- rolled-back savepoint, like the update it describes).
    IF repeated THEN
        ignored := set_config('outbox.sequence_counter', version::text || ' ' || aggregate, true);
    END IF;
    -- seq was drawn before the wait: draw it again so it grows in commit order per aggregate.
    NEW.seq := nextval('outbox_seq_seq'::regclass);
    RETURN NEW;
END
$$
"""

SKIP_FUNCTION = """
CREATE FUNCTION outbox_record_skip() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_aggregate_skip (aggregate_type, aggregate_id, aggregate_sequence,
                                       event_id)
    VALUES (OLD.aggregate_type, OLD.aggregate_id, OLD.aggregate_sequence, OLD.id)
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$
"""

BACKFILL = """
UPDATE outbox o SET aggregate_sequence = n.number
FROM (
    SELECT id, row_number() OVER (PARTITION BY aggregate_type, aggregate_id ORDER BY seq) AS number
    FROM outbox
) AS n
WHERE o.id = n.id
"""

COUNTERS = """
INSERT INTO outbox_aggregate (aggregate_type, aggregate_id, last_sequence)
SELECT aggregate_type, aggregate_id, max(aggregate_sequence)
FROM outbox GROUP BY aggregate_type, aggregate_id
"""


def upgrade() -> None:
    op.create_table(
        "outbox_aggregate",
        sa.Column("aggregate_type", sa.Text(), nullable=False),
        sa.Column("aggregate_id", sa.Text(), nullable=False),
        sa.Column("last_sequence", sa.BigInteger(), nullable=False),
        sa.Column(
            "repeat_in_transaction",
            sa.Boolean(),
            server_default=sa.text("false"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("aggregate_type", "aggregate_id", name=op.f("pk_outbox_aggregate")),
    )
    settings = ", ".join(f"{k} = {v}" for k, v in COUNTER_STORAGE.items())
    op.execute(f"ALTER TABLE outbox_aggregate SET ({settings})")
    op.create_table(
        "outbox_aggregate_skip",
        sa.Column("aggregate_type", sa.Text(), nullable=False),
        sa.Column("aggregate_id", sa.Text(), nullable=False),
        sa.Column("aggregate_sequence", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column(
            "skipped_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint(
            "aggregate_type",
            "aggregate_id",
            "aggregate_sequence",
            name=op.f("pk_outbox_aggregate_skip"),
        ),
    )

    op.add_column("outbox", sa.Column("aggregate_sequence", sa.BigInteger(), nullable=True))
    op.execute(BACKFILL)
    op.execute(COUNTERS)
    # NULL only for published history inserted without a number (an archive written before
    # this migration, put back); a row waiting to be published always has one.
    op.create_check_constraint(
        op.f("ck_outbox_pending_rows_are_numbered"),
        "outbox",
        "published_at IS NOT NULL OR aggregate_sequence IS NOT NULL",
    )
    op.drop_index("ix_outbox_aggregate", table_name="outbox")
    op.create_index(
        "ix_outbox_aggregate_sequence",
        "outbox",
        ["aggregate_type", "aggregate_id", "aggregate_sequence"],
        unique=True,
    )
    op.execute(ASSIGN_FUNCTION)
    op.execute(
        "CREATE TRIGGER outbox_assign_sequence BEFORE INSERT ON outbox "
        "FOR EACH ROW EXECUTE FUNCTION outbox_assign_sequence()"
    )
    op.execute(SKIP_FUNCTION)
    op.execute(
        "CREATE TRIGGER outbox_record_skip AFTER DELETE ON outbox FOR EACH ROW "
        "WHEN (OLD.published_at IS NULL AND OLD.dead_lettered_at IS NOT NULL) "
        "EXECUTE FUNCTION outbox_record_skip()"
    )

    op.add_column(
        "outbox_consumer_position",
        sa.Column("last_aggregate_sequence", sa.BigInteger(), nullable=True),
    )
    op.add_column("outbox_consumer_position", sa.Column("parked_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("outbox_consumer_position", "parked_reason")
    op.drop_column("outbox_consumer_position", "last_aggregate_sequence")
    op.execute("DROP TRIGGER IF EXISTS outbox_record_skip ON outbox")
    op.execute("DROP FUNCTION IF EXISTS outbox_record_skip()")
    op.execute("DROP TRIGGER IF EXISTS outbox_assign_sequence ON outbox")
    op.execute("DROP FUNCTION IF EXISTS outbox_assign_sequence()")
    op.drop_index("ix_outbox_aggregate_sequence", table_name="outbox")
    op.create_index(
        "ix_outbox_aggregate", "outbox", ["aggregate_type", "aggregate_id"], unique=False
    )
    op.drop_constraint(op.f("ck_outbox_pending_rows_are_numbered"), "outbox", type_="check")
    op.drop_column("outbox", "aggregate_sequence")
    op.drop_table("outbox_aggregate_skip")
    op.drop_table("outbox_aggregate")
