"""Isolated resources on the shared services: a fresh PostgreSQL database per test (cloned from a
migrated template), a Redis database number per test run, unique RabbitMQ names.

Everything is named with a random suffix so concurrent test runs, and the services' other users,
never see each other's data.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import redis

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("OUTBOX_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST = os.environ.get("OUTBOX_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("OUTBOX_TEST_REDIS_PORT", "6379"))
AMQP_URL = os.environ.get("OUTBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
# Redis databases a test run may take; 0 is left to the machine's other users.
REDIS_DBS = range(1, 16)


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def db_url(name: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


def admin_execute(*statements: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def drop_database(name: str) -> None:
    admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate(url: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("postgresql://", "postgresql+psycopg://"))
    command.upgrade(config, "head")


@contextmanager
def template_database() -> Iterator[str]:
    """A migrated database to clone per test (CREATE DATABASE ... TEMPLATE is a file copy)."""
    name = unique("outbox_tmpl")
    admin_execute(f'CREATE DATABASE "{name}"')
    try:
        migrate(db_url(name))
        yield name
    finally:
        drop_database(name)


@contextmanager
def fresh_database(template: str) -> Iterator[str]:
    name = unique("outbox_t")
    # A template must have no other connections while it is copied; retry briefly if a
    # concurrent clone holds it.
    for attempt in range(50):
        try:
            admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            break
        except psycopg.errors.ObjectInUse:
            if attempt == 49:
                raise
            time.sleep(0.05)
    try:
        yield db_url(name)
    finally:
        drop_database(name)


@contextmanager
def redis_database() -> Iterator[int]:
    """Take a Redis database number for this run (a lock key in db 0 says it is taken)."""
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    token = uuid.uuid4().hex
    for number in REDIS_DBS:
        key = f"outbox_tasks:test-db-lock:{number}"
        if client.set(key, token, nx=True, ex=3600):
            break
    else:
        raise RuntimeError("no free Redis database for tests (1..15 are all taken)")
    db = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
    db.flushdb()
    try:
        yield number
    finally:
        db.flushdb()
        if client.get(key) == token.encode():
            client.delete(key)
        client.close()
        db.close()
