"""Shared fixtures: real services, isolated per test.

- ``database_url``: a fresh PostgreSQL database per test, cloned from a template migrated once
  per run (cloning is a file copy: ~100 ms instead of running every migration).
- ``redis_db``: a Redis database number owned by this test run, flushed around every test.
- ``settings``: a Settings object pointing at both, with unique exchange names.
- ``tcp_proxy``: a factory of TCP proxies a test can cut and restore (broker or database down).

When a service is missing, its tests fail under CI=true and are skipped otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis as redis_lib
from sqlalchemy.engine import Engine

from outbox_tasks.db import make_engine
from outbox_tasks.settings import Settings
from tests.support import services
from tests.support.tcpproxy import proxy_factory

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

tcp_proxy = pytest.fixture(proxy_factory, name="tcp_proxy")


def _require(name: str, host: str, port: int) -> None:
    if services.reachable(host, port):
        return
    message = (
        f"{name} is not reachable at {host}:{port}; start it (see README, 'Running the tests')"
    )
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _scrub_outbox_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's OUTBOX_* variables."""
    for key in list(os.environ):
        if key.startswith("OUTBOX_") and not key.startswith("OUTBOX_TEST_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    _require("PostgreSQL", "127.0.0.1", 5432)
    with services.template_database() as name:
        yield name


@pytest.fixture
def database_url(template_db: str) -> Iterator[str]:
    with services.fresh_database(template_db) as url:
        yield url


@pytest.fixture(scope="session")
def _redis_db_number() -> Iterator[int]:
    _require("Redis", services.REDIS_HOST, services.REDIS_PORT)
    with services.redis_database() as number:
        yield number


@pytest.fixture
def redis_db(_redis_db_number: int) -> Iterator[int]:
    client = redis_lib.Redis(
        host=services.REDIS_HOST, port=services.REDIS_PORT, db=_redis_db_number
    )
    client.flushdb()
    yield _redis_db_number
    client.flushdb()
    client.close()


@pytest.fixture
def redis_url(redis_db: int) -> str:
    return f"redis://{services.REDIS_HOST}:{services.REDIS_PORT}/{redis_db}"


@pytest.fixture
def amqp_url() -> str:
    _require("RabbitMQ", "127.0.0.1", 5672)
    return services.AMQP_URL


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    return Settings.from_env(
        {},
        database_url=database_url,
        broker_url=redis_url,
        exchange=services.unique("outbox.events"),
        dead_letter_exchange=services.unique("outbox.dead"),
        metrics_port=0,
    )


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    eng = make_engine(settings, application_name="outbox_tasks.tests")
    yield eng
    eng.dispose()
