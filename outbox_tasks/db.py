"""Engines and sessions: timeouts set at connect time, safe after fork, errors translated."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from outbox_tasks.errors import DatabaseUnavailable, OutboxError
from outbox_tasks.settings import Settings

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A pooled connection shared with the parent would interleave two processes' traffic on one
    # socket. Drop the child's references without closing the parent's sockets (close=False).
    for engine in list(_engines):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def connect_args(settings: Settings, application_name: str | None = None) -> dict[str, Any]:
    """libpq options applied to every new connection."""

    def ms(seconds: float) -> int:
        return max(1, int(seconds * 1000))

    options = (
        f"-c statement_timeout={ms(settings.statement_timeout_seconds)} "
        f"-c lock_timeout={ms(settings.lock_timeout_seconds)} "
        f"-c idle_in_transaction_session_timeout="
        f"{ms(settings.idle_in_transaction_timeout_seconds)}"
    )
    return {
        "application_name": application_name or settings.application_name,
        "options": options,
        "connect_timeout": 10,
    }


def make_engine(
    settings: Settings, *, application_name: str | None = None, pool_size: int = 5
) -> Engine:
    """A sync engine (psycopg 3). Pre-ping so a connection killed by an outage is replaced."""
    engine = create_engine(
        settings.sqlalchemy_url,
        connect_args=connect_args(settings, application_name),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
    )
    _engines.add(engine)
    return engine


def make_async_engine(settings: Settings, *, application_name: str | None = None) -> AsyncEngine:
    return create_async_engine(
        settings.sqlalchemy_url,
        connect_args=connect_args(settings, application_name),
        pool_pre_ping=True,
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def is_connection_error(error: BaseException) -> bool:
    """True for errors that say "the database is unreachable or timed out", not "bad SQL"."""
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, exc.OperationalError | exc.InterfaceError | exc.TimeoutError)


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn driver errors into the documented hierarchy at the boundary."""
    try:
        yield
    except OutboxError:
        raise
    except (exc.DBAPIError, exc.TimeoutError) as error:
        if is_connection_error(error):
            raise DatabaseUnavailable(
                f"{what}: database unavailable: {_first_line(error)}"
            ) from error
        raise
    except OSError as error:
        raise DatabaseUnavailable(f"{what}: database unavailable: {error}") from error


def _first_line(error: BaseException) -> str:
    orig = getattr(error, "orig", None) or error
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
