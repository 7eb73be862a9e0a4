"""Alembic environment. The URL comes from the Alembic config (set by ``outbox-tasks migrate``
and the tests) or from ``OUTBOX_DATABASE_URL``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from outbox_tasks.schema import Base
from outbox_tasks.settings import Settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    return url or Settings.from_env().sqlalchemy_url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        context.configure(connection=connectable, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    # No statement_timeout here: a migration on a big table may legitimately take a while,
    # but never wait forever for a lock held by a busy relay.
    engine = create_engine(
        _url(),
        poolclass=pool.NullPool,
        connect_args={
            "application_name": "outbox_tasks.migrate",
            "options": "-c lock_timeout=30000",
        },
    )
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
