"""Alembic owns the schema: the migrations build exactly the models, every step goes down and up
again, downgrading to base leaves nothing behind, and offline (--sql) mode works."""

from __future__ import annotations

import io
import re

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from outbox_tasks.schema import SLOT_EXPRESSION, Base
from tests.support import services

pytestmark = [
    pytest.mark.timeout(120),
    # Reflection does not know xid8 (outbox.txid); the type is checked through the catalog.
    pytest.mark.filterwarnings("ignore:Did not recognize type 'xid8':sqlalchemy.exc.SAWarning"),
]

OUTBOX_TABLES = {
    "outbox",
    "outbox_partition",
    "outbox_dead_letter",
    "outbox_dead_letter_audit",
    "outbox_consumer_receipt",
    "outbox_consumer_position",
    "outbox_aggregate",
    "outbox_aggregate_skip",
}
HEAD_TRIGGERS = {"outbox_wakeup", "outbox_assign_sequence", "outbox_record_skip"}
HEAD_FUNCTIONS = {"outbox_notify_wakeup", "outbox_assign_sequence", "outbox_record_skip"}
TABLES_BEFORE_0004 = OUTBOX_TABLES - {"outbox_aggregate", "outbox_aggregate_skip"}
CONTRACT_INDEXES = {
    "ix_outbox_pending": ("(slot, seq)", "(published_at IS NULL)"),
    "ix_outbox_aggregate_pending": (
        "(aggregate_type, aggregate_id, seq)",
        "(published_at IS NULL)",
    ),
    "ix_outbox_published_at": ("(published_at)", "(published_at IS NOT NULL)"),
}
AUTOVACUUM = {
    "autovacuum_vacuum_scale_factor=0.01",
    "autovacuum_vacuum_threshold=1000",
    "autovacuum_vacuum_insert_scale_factor=0.05",
    "autovacuum_analyze_scale_factor=0.02",
    "autovacuum_vacuum_cost_delay=1",
}


def _tables(conn: Connection) -> set[str]:
    return set(
        conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars()
    )


def _outbox_functions(conn: Connection) -> set[str]:
    return set(
        conn.execute(
            text(
                "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = 'public' AND p.proname LIKE 'outbox%'"
            )
        ).scalars()
    )


def _triggers(conn: Connection) -> set[str]:
    return set(
        conn.execute(
            text(
                "SELECT tgname FROM pg_trigger "
                "WHERE tgrelid = 'public.outbox'::regclass AND NOT tgisinternal"
            )
        ).scalars()
    )


def _reloptions(conn: Connection) -> set[str]:
    options = conn.execute(
        text("SELECT reloptions FROM pg_class WHERE oid = 'public.outbox'::regclass")
    ).scalar_one()
    return set(options or [])


def _has_outbox(conn: Connection) -> bool:
    return bool(conn.execute(text("SELECT to_regclass('public.outbox') IS NOT NULL")).scalar())


def _normalize(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


# --- (a) head on an empty database is exactly the models ---------------------------------------


def test_upgrading_an_empty_database_to_head_matches_the_models_exactly(
    alembic_config: Config, db_engine: Engine
) -> None:
    command.upgrade(alembic_config, "head")

    with db_engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        differences = compare_metadata(context, Base.metadata)
        assert _tables(conn) == OUTBOX_TABLES | {"alembic_version"}
        assert set(Base.metadata.tables) == OUTBOX_TABLES

    assert differences == []


def test_the_partial_index_predicates_are_in_the_database(
    alembic_config: Config, db_engine: Engine
) -> None:
    """Autogenerate does not compare index predicates, so compare pg_indexes with the models."""
    command.upgrade(alembic_config, "head")

    with db_engine.connect() as conn:
        actual = _index_definitions(conn, "outbox")
        expected = _model_partial_index_definitions(conn)

    assert {name for name, definition in actual.items() if " WHERE " in definition} == set(expected)
    for name, definition in expected.items():
        assert actual[name] == definition, name
    # The relay's queries rely on these predicates (the claim scan and the head-of-line check
    # read only pending rows; cleanup reads only published ones).
    for name, (columns, predicate) in CONTRACT_INDEXES.items():
        assert actual[name] == f"USING btree {columns} WHERE {predicate}", name
    for name in ("ix_outbox_aggregate_sequence", "ix_outbox_created_at", "pk_outbox"):
        assert " WHERE " not in actual[name], actual[name]


def _index_definitions(conn: Connection, table: str) -> dict[str, str]:
    """Index name -> the part of its definition from USING on (PostgreSQL's own rendering)."""
    rows = conn.execute(
        text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :table"),
        {"table": table},
    )
    return {name: definition[definition.index("USING ") :] for name, definition in rows}


def _model_partial_index_definitions(conn: Connection) -> dict[str, str]:
    """How PostgreSQL renders the models' partial indexes, built on a scratch copy of outbox."""
    conn.execute(text("CREATE TEMP TABLE index_probe (LIKE outbox)"))
    names: dict[str, str] = {}
    for index in Base.metadata.tables["outbox"].indexes:
        where = index.dialect_options["postgresql"]["where"]
        if where is None:
            continue
        columns = ", ".join(column.name for column in index.columns)
        probe = f"probe_{len(names)}"
        names[probe] = str(index.name)
        conn.execute(text(f"CREATE INDEX {probe} ON index_probe ({columns}) WHERE {where}"))
    probes = _index_definitions(conn, "index_probe")
    return {names[probe]: definition for probe, definition in probes.items()}


def test_the_slot_is_a_stored_generated_column_with_the_model_expression(
    alembic_config: Config, db_engine: Engine
) -> None:
    command.upgrade(alembic_config, "head")

    with db_engine.connect() as conn:
        column = conn.execute(
            text(
                "SELECT data_type, is_generated, generation_expression, is_nullable "
                "FROM information_schema.columns "
                "WHERE table_schema = 'public' AND table_name = 'outbox' AND column_name = 'slot'"
            )
        ).one()
        # PostgreSQL rewrites the expression; compare what it makes of the model's expression.
        conn.execute(
            text(
                "CREATE TEMP TABLE slot_probe (aggregate_type text, aggregate_id text, "
                f"slot smallint GENERATED ALWAYS AS ({SLOT_EXPRESSION}) STORED)"
            )
        )
        expected = conn.execute(
            text(
                "SELECT generation_expression FROM information_schema.columns "
                "WHERE table_name = 'slot_probe' AND column_name = 'slot'"
            )
        ).scalar_one()

    assert column.data_type == "smallint"
    assert column.is_generated == "ALWAYS"
    assert column.is_nullable == "NO"
    assert "md5" in column.generation_expression
    assert "1023" in column.generation_expression
    assert _normalize(column.generation_expression) == _normalize(expected)


def test_the_seed_columns_and_defaults_are_in_the_database(
    alembic_config: Config, db_engine: Engine
) -> None:
    command.upgrade(alembic_config, "head")

    with db_engine.connect() as conn:
        columns = {
            row.column_name: row
            for row in conn.execute(
                text(
                    "SELECT column_name, data_type, udt_name, column_default, is_nullable, "
                    "is_identity, identity_generation FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND table_name = 'outbox'"
                )
            )
        }

    assert columns["id"].udt_name == "uuid"
    assert columns["id"].column_default == "gen_random_uuid()"
    assert columns["payload"].udt_name == "jsonb"
    assert columns["txid"].udt_name == "xid8"
    assert columns["txid"].column_default == "pg_current_xact_id()"
    assert columns["seq"].is_identity == "YES"
    assert columns["seq"].identity_generation == "ALWAYS"
    assert columns["headers"].column_default == "'{}'::jsonb"
    assert columns["schema_version"].column_default == "1"
    assert columns["retry_count"].column_default == "0"
    assert columns["published_at"].is_nullable == "YES"
    for required in ("id", "aggregate_type", "aggregate_id", "event_type", "payload"):
        assert columns[required].is_nullable == "NO"
    # Everything beyond the seed's five columns has a default or is nullable, so a plain
    # INSERT of the seed columns works from any language (aggregate_sequence is nullable; the
    # outbox_assign_sequence trigger numbers every pending row: tests/integration).
    for name, column in columns.items():
        if name in ("id", "aggregate_type", "aggregate_id", "event_type", "payload", "slot"):
            continue
        assert (
            column.is_nullable == "YES"
            or column.column_default is not None
            or column.is_identity == "YES"
        ), name


def test_the_wakeup_trigger_is_statement_level_after_insert(
    alembic_config: Config, db_engine: Engine
) -> None:
    command.upgrade(alembic_config, "head")

    with db_engine.connect() as conn:
        trigger = conn.execute(
            text(
                "SELECT action_timing, event_manipulation, action_orientation, action_statement "
                "FROM information_schema.triggers "
                "WHERE event_object_table = 'outbox' AND trigger_name = 'outbox_wakeup'"
            )
        ).one()
        functions = _outbox_functions(conn)

    assert trigger.action_timing == "AFTER"
    assert trigger.event_manipulation == "INSERT"
    assert trigger.action_orientation == "STATEMENT"
    assert "outbox_notify_wakeup()" in trigger.action_statement
    assert functions == HEAD_FUNCTIONS


def test_the_wakeup_trigger_notifies_the_inserted_slots_on_commit(
    alembic_config: Config, db_engine: Engine
) -> None:
    command.upgrade(alembic_config, "head")
    url = db_engine.url.render_as_string(hide_password=False).replace("+psycopg", "")

    early: list[psycopg.Notify] = []
    with psycopg.connect(url, autocommit=True) as listener, psycopg.connect(url) as writer:
        listener.add_notify_handler(early.append)
        listener.execute("LISTEN outbox_wakeup")
        writer.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
            "VALUES ('Order', '1', 'OrderCreated', '{}'), ('Order', '2', 'OrderCreated', '{}'), "
            "('Order', '1', 'OrderPaid', '{}')"
        )
        listener.execute("SELECT 1")  # a round trip: anything already queued is delivered
        assert early == []  # NOTIFY is transactional: nothing before the commit
        listener.remove_notify_handler(early.append)
        writer.commit()
        [notify] = list(listener.notifies(timeout=10, stop_after=1))

    assert notify.channel == "outbox_wakeup"
    assert sorted(map(int, notify.payload.split(","))) == [102, 206]


def test_the_outbox_has_queue_table_autovacuum_settings(
    alembic_config: Config, db_engine: Engine
) -> None:
    command.upgrade(alembic_config, "head")

    with db_engine.connect() as conn:
        options = _reloptions(conn)

    assert options == AUTOVACUUM


# --- (b) every step goes down and up again -----------------------------------------------------


def test_every_revision_downgrades_and_upgrades_again_step_by_step(
    alembic_config: Config, db_engine: Engine
) -> None:
    script = ScriptDirectory.from_config(alembic_config)
    revisions = list(reversed(list(script.walk_revisions("base", "heads"))))
    assert [r.revision for r in revisions] == ["0001", "0002", "0003", "0004"]
    assert len(script.get_heads()) == 1

    for revision in revisions:
        previous = revision.down_revision or "base"
        assert isinstance(previous, str)
        command.upgrade(alembic_config, revision.revision)
        with db_engine.connect() as conn:
            snapshot = _schema_snapshot(conn)
            assert _current(conn) == revision.revision
        command.downgrade(alembic_config, previous)
        with db_engine.connect() as conn:
            assert _current(conn) == (None if previous == "base" else previous)
        command.upgrade(alembic_config, revision.revision)
        with db_engine.connect() as conn:
            assert _current(conn) == revision.revision
            assert _schema_snapshot(conn) == snapshot, revision.revision

    with db_engine.connect() as conn:
        assert _current(conn) == script.get_current_head()
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, Base.metadata) == []
        assert _triggers(conn) == HEAD_TRIGGERS
        assert _reloptions(conn) == AUTOVACUUM


def test_each_revision_adds_what_it_says(alembic_config: Config, db_engine: Engine) -> None:
    command.upgrade(alembic_config, "0001")
    with db_engine.connect() as conn:
        assert _tables(conn) == TABLES_BEFORE_0004 | {"alembic_version"}
        assert _triggers(conn) == set()
        assert _reloptions(conn) == set()

    command.upgrade(alembic_config, "0002")
    with db_engine.connect() as conn:
        assert _triggers(conn) == {"outbox_wakeup"}
        assert _reloptions(conn) == AUTOVACUUM

    command.downgrade(alembic_config, "0001")
    with db_engine.connect() as conn:
        assert _triggers(conn) == set()
        assert _reloptions(conn) == set()
        assert _outbox_functions(conn) == set()


def test_downgrading_to_base_leaves_no_outbox_tables_or_functions(
    alembic_config: Config, db_engine: Engine
) -> None:
    command.upgrade(alembic_config, "head")
    with db_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "VALUES ('Order', '1', 'OrderCreated', '{}')"
            )
        )

    command.downgrade(alembic_config, "base")

    with db_engine.connect() as conn:
        assert not _has_outbox(conn)
        assert _tables(conn) == {"alembic_version"}
        assert _outbox_functions(conn) == set()
        assert _current(conn) is None
        leftovers = conn.execute(
            text(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relname LIKE '%outbox%'"
            )
        ).scalars()
        assert list(leftovers) == []  # no index, sequence or view left behind


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _schema_snapshot(conn: Connection) -> list[tuple[str, ...]]:
    """Tables, columns, indexes, constraints, triggers, functions and options of the schema."""
    rows = conn.execute(
        text(
            """
            SELECT 'column', table_name || '.' || column_name,
                   concat_ws(' ', udt_name, is_nullable, column_default, generation_expression,
                             identity_generation)
            FROM information_schema.columns WHERE table_schema = 'public'
            UNION ALL
            SELECT 'index', indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
            UNION ALL
            SELECT 'constraint', conname, pg_get_constraintdef(c.oid)
            FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
            WHERE n.nspname = 'public'
            UNION ALL
            SELECT 'trigger', tgname, pg_get_triggerdef(t.oid)
            FROM pg_trigger t WHERE NOT tgisinternal
            UNION ALL
            SELECT 'function', p.proname, md5(p.prosrc)
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'public'
            UNION ALL
            SELECT 'options', c.relname, array_to_string(c.reloptions, ',')
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.reloptions IS NOT NULL
            ORDER BY 1, 2, 3
            """
        )
    )
    return [tuple(str(value) for value in row) for row in rows]


# --- (c) offline mode --------------------------------------------------------------------------


def test_offline_mode_prints_the_sql_of_every_revision() -> None:
    buffer = io.StringIO()
    config = Config(str(services.ROOT / "alembic.ini"), output_buffer=buffer)
    config.set_main_option("sqlalchemy.url", "postgresql+psycopg://nobody@offline.invalid/outbox")

    command.upgrade(config, "head", sql=True)

    sql = buffer.getvalue()
    assert "CREATE TABLE outbox (" in sql
    assert "CREATE TABLE outbox_partition (" in sql
    assert "GENERATED ALWAYS AS" in sql
    assert "CREATE INDEX ix_outbox_pending ON outbox (slot, seq) WHERE published_at IS NULL" in sql
    assert "CREATE TRIGGER outbox_wakeup" in sql
    assert "ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.01" in sql
    assert "INSERT INTO alembic_version (version_num) VALUES ('0001')" in sql
    assert "UPDATE alembic_version SET version_num='0002'" in sql
    assert sql.count("COMMIT;") >= 2  # one transaction per migration


def test_offline_mode_prints_the_downgrade_too() -> None:
    buffer = io.StringIO()
    config = Config(str(services.ROOT / "alembic.ini"), output_buffer=buffer)
    config.set_main_option("sqlalchemy.url", "postgresql+psycopg://nobody@offline.invalid/outbox")

    command.downgrade(config, "head:base", sql=True)

    sql = buffer.getvalue()
    assert "DROP TRIGGER IF EXISTS outbox_wakeup ON outbox" in sql
    assert "DROP TABLE outbox;" in sql
    assert "DELETE FROM alembic_version" in sql
