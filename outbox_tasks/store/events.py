"""SQL of the operator's event catalog (``outbox-tasks events``) and of the demo, one named
function per statement. The functions take an open SQLAlchemy ``Connection`` (the caller owns the
transaction), except :func:`create_database`, which needs a connection of its own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.engine import Connection

_EVENT_VOLUMES = text(
    "SELECT aggregate_type, event_type, count(*) AS total, "
    "count(*) FILTER (WHERE published_at IS NULL) AS pending, "
    "max(schema_version) AS schema_version, max(created_at) AS last_seen "
    "FROM outbox WHERE created_at > clock_timestamp() - make_interval(secs => :s) "
    "GROUP BY 1, 2 ORDER BY 3 DESC"
)


def event_volumes(conn: Connection, *, since_seconds: float) -> Sequence[Row[Any]]:
    """Per (aggregate type, event type) of the rows written in the last ``since_seconds``: the
    columns ``aggregate_type``, ``event_type``, ``total``, ``pending``, ``schema_version`` (the
    highest seen) and ``last_seen`` (created_at), busiest first."""
    return conn.execute(_EVENT_VOLUMES, {"s": since_seconds}).all()


_PENDING_COUNT = text("SELECT count(*) FROM outbox WHERE published_at IS NULL")


def pending_count(conn: Connection) -> int:
    """Outbox rows not yet published (the demo's progress line)."""
    return int(conn.execute(_PENDING_COUNT).scalar_one())


def create_database(admin_conninfo: str, name: str) -> None:
    """CREATE DATABASE ``name`` (quoted as an identifier) through ``admin_conninfo`` (a libpq
    URL to another database of the server, e.g. ``postgres``). Outside a transaction, as
    PostgreSQL requires. Raises psycopg's errors (e.g. DuplicateDatabase)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
