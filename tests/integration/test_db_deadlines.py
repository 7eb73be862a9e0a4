"""Every database wait has a deadline (issue 13), also behind a middlebox that keeps the TCP
connection open and acknowledged while nothing comes back (the proxy's blackhole).

Short timeouts keep these tests quick: statement_timeout 1 s + grace 1 s, connect 2 s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks.db import DEADLINES, keepalive_args, make_engine, translate_errors
from outbox_tasks.errors import DatabaseUnavailable
from outbox_tasks.settings import Settings
from tests.support.faults import via
from tests.support.tcpproxy import TcpProxy

STATEMENT = 1.0
GRACE = 1.0
CONNECT = 2.0


@pytest.fixture
def proxy(tcp_proxy: Callable[[str, int], TcpProxy]) -> TcpProxy:
    return tcp_proxy("127.0.0.1", 5432)


@pytest.fixture
def quick(settings: Settings, proxy: TcpProxy) -> Settings:
    host, port = proxy.address
    return settings.with_changes(
        database_url=via(settings.database_url, host, port),
        statement_timeout_seconds=STATEMENT,
        database_deadline_grace_seconds=GRACE,
        database_connect_timeout_seconds=CONNECT,
    )


@pytest.fixture
def engine_via_proxy(quick: Settings) -> Iterator[Engine]:
    engine = make_engine(quick, application_name="deadline.tests", pool_size=1)
    yield engine
    engine.dispose()


def one(engine: Engine, sql: str = "SELECT 1") -> object:
    with translate_errors("test"), engine.connect() as conn:
        return conn.execute(text(sql)).scalar()


def timed(call: Callable[[], object]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        call()
    except BaseException as error:
        return time.monotonic() - started, error
    return time.monotonic() - started, None


def test_a_statement_behind_a_silent_middlebox_fails_at_its_deadline_not_for_ever(
    engine_via_proxy: Engine, proxy: TcpProxy
) -> None:
    assert one(engine_via_proxy) == 1
    with engine_via_proxy.connect() as conn:
        conn.execute(text("SELECT 1"))
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable), translate_errors("test"):
            conn.execute(text("SELECT 2"))
        took = time.monotonic() - started

    # Not before the server's own timeout could have answered; soon after it.
    assert STATEMENT + GRACE - 0.1 <= took < STATEMENT + GRACE + 1.5, took


def test_a_pooled_connection_gone_silent_costs_one_ping_and_one_connect_deadline(
    engine_via_proxy: Engine, proxy: TcpProxy
) -> None:
    assert one(engine_via_proxy) == 1
    proxy.blackhole()

    took, error = timed(lambda: one(engine_via_proxy))

    assert isinstance(error, DatabaseUnavailable), error
    # The ping (CONNECT) notices the dead connection, then each fresh connection attempt
    # (the pool tries twice) waits at most CONNECT.
    assert took < 3 * CONNECT + 1.5, took


def test_after_the_partition_the_engine_works_again_although_old_connections_stay_silent(
    engine_via_proxy: Engine, proxy: TcpProxy
) -> None:
    assert one(engine_via_proxy) == 1
    proxy.blackhole()
    with pytest.raises(DatabaseUnavailable):
        one(engine_via_proxy)
    proxy.restore(revive_held=False)  # like a NAT that lost its state

    took, error = timed(lambda: one(engine_via_proxy))

    assert error is None, error
    assert took < CONNECT + 1.5, took


def test_a_commit_behind_a_silent_middlebox_fails_at_its_deadline(
    engine_via_proxy: Engine, proxy: TcpProxy
) -> None:
    def commit_while_blackholed() -> None:
        with translate_errors("test"), engine_via_proxy.begin() as conn:
            conn.execute(text("SELECT 1"))
            proxy.blackhole()

    took, error = timed(commit_while_blackholed)

    assert isinstance(error, DatabaseUnavailable), error
    assert took < STATEMENT + GRACE + 1.5, took


def test_a_slow_statement_within_the_server_timeout_is_not_cut(engine_via_proxy: Engine) -> None:
    took, error = timed(lambda: one(engine_via_proxy, "SELECT pg_sleep(0.8)"))

    assert error is None, error
    assert took >= 0.8


def test_an_idle_transaction_past_the_deadline_is_left_alone(engine_via_proxy: Engine) -> None:
    with translate_errors("test"), engine_via_proxy.begin() as conn:
        conn.execute(text("SELECT 1"))
        time.sleep(STATEMENT + GRACE + 0.5)  # the application thinking, not the database
        assert conn.execute(text("SELECT 2")).scalar() == 2


def test_the_server_timeout_still_answers_first_when_the_path_is_healthy(
    engine_via_proxy: Engine,
) -> None:
    took, error = timed(lambda: one(engine_via_proxy, "SELECT pg_sleep(5)"))

    assert error is not None and "statement timeout" in str(error), error
    assert took < STATEMENT + GRACE, took


def test_the_watch_fires_only_while_a_command_is_in_progress(
    quick: Settings, proxy: TcpProxy
) -> None:
    conninfo = f"host={proxy.address[0]} port={proxy.address[1]} dbname={dbname(quick)}"
    with psycopg.connect(conninfo, autocommit=True, user="root", **keepalive_args(quick)) as conn:
        DEADLINES.arm(conn, 0.2, "idle")
        time.sleep(0.6)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # idle: left alone

        proxy.blackhole()
        DEADLINES.arm(conn, 0.5, "test")
        took, error = timed(lambda: conn.execute("SELECT 1"))
        assert isinstance(error, psycopg.OperationalError), error
        assert took < 1.5, took


def dbname(settings: Settings) -> str:
    return settings.database_url.rsplit("/", 1)[1]
