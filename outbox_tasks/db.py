"""Engines and sessions: timeouts set at connect time, a deadline on every database wait, safe
after fork, errors translated.

Three layers bound how long a process can wait on PostgreSQL:

* the server's own timeouts (``statement_timeout``, ``lock_timeout``,
  ``idle_in_transaction_session_timeout``), set on every connection;
* the kernel's: TCP keepalives and ``tcp_user_timeout`` (``OUTBOX_TCP_USER_TIMEOUT_SECONDS``),
  for a peer that stops acknowledging (cable pulled, host gone);
* our own, at the application level (:class:`Deadlines`): a middlebox that keeps the client's
  TCP connection open and acknowledged while nothing comes back (PgBouncer, a load balancer, a
  NAT that lost its state) defeats both others, so every statement, commit, rollback and pool
  ping is watched by a thread that closes the connection's socket when the call overruns.
  The caller then gets an ordinary "server closed the connection" error, which becomes
  :class:`~outbox_tasks.errors.DatabaseUnavailable`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from outbox_tasks.errors import DatabaseUnavailable, OutboxError
from outbox_tasks.logs import event as log_event
from outbox_tasks.logs import get_logger
from outbox_tasks.settings import Settings

log = get_logger("db")

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def connect_args(
    settings: Settings,
    application_name: str | None = None,
    *,
    idle_in_transaction_seconds: float | None = None,
) -> dict[str, Any]:
    """libpq options applied to every new connection: session timeouts and the connect
    deadline (psycopg enforces ``connect_timeout`` on the client side).
    ``idle_in_transaction_seconds`` overrides ``OUTBOX_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS``."""
    idle = (
        settings.idle_in_transaction_timeout_seconds
        if idle_in_transaction_seconds is None
        else idle_in_transaction_seconds
    )

    def ms(seconds: float) -> int:
        return max(1, int(seconds * 1000))

    options = (
        f"-c statement_timeout={ms(settings.statement_timeout_seconds)} "
        f"-c lock_timeout={ms(settings.lock_timeout_seconds)} "
        f"-c idle_in_transaction_session_timeout={ms(idle)}"
    )
    return {
        "application_name": application_name or settings.application_name,
        "options": options,
        "connect_timeout": math.ceil(settings.database_connect_timeout_seconds),
    }


def keepalive_args(settings: Settings) -> dict[str, int]:
    """libpq TCP options from ``OUTBOX_TCP_USER_TIMEOUT_SECONDS`` (empty when it is 0).

    Keepalive probes start after a third of the bound and three unanswered probes, half a
    third apart, drop the connection: an idle reader learns of a dead peer within the bound.
    Unacknowledged data gives up after the bound (``tcp_user_timeout``, milliseconds)."""
    bound = settings.tcp_user_timeout_seconds
    if bound <= 0:
        return {}
    return {
        "keepalives": 1,
        "keepalives_idle": max(1, round(bound / 3)),
        "keepalives_interval": max(1, round(bound / 6)),
        "keepalives_count": 3,
        "tcp_user_timeout": max(1, int(bound * 1000)),
    }


# --- deadlines ------------------------------------------------------------------------------


@dataclass
class _Armed:
    connection: weakref.ref[psycopg.Connection[Any]]
    deadline: float
    seconds: float
    what: str


class Deadlines:
    """Closes the socket of a psycopg connection whose call overran its deadline.

    One daemon thread per process (started on first use, again after a fork). ``arm`` before a
    call that waits on the server, ``disarm`` after it; a call still running at its deadline
    has its socket shut down, which wakes the waiting thread with a connection error. The
    watch fires only while a command is in progress on the connection
    (``transaction_status == ACTIVE``), so a deadline left armed on a connection that went
    quiet (a commit whose end no hook reports) never closes an idle connection.

    Thread-safe. ``arm`` and ``disarm`` cost a dictionary update under a lock.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Condition()
        self._armed: dict[int, _Armed] = {}
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def after_fork_in_child(self) -> None:
        """Forget the parent's watches and thread (a child watches its own connections)."""
        self._reset()

    def arm(self, connection: psycopg.Connection[Any], seconds: float, what: str) -> None:
        """Watch ``connection`` for ``seconds`` from now (replaces an earlier watch of it)."""
        deadline = time.monotonic() + seconds
        with self._lock:
            self._armed[id(connection)] = _Armed(weakref.ref(connection), deadline, seconds, what)
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="outbox-db-deadlines", daemon=True
                )
                self._thread.start()
            if deadline < self._wake_at:
                self._lock.notify()

    def disarm(self, connection: psycopg.Connection[Any]) -> None:
        """Stop watching ``connection``. Once this returns, the watch cannot fire."""
        with self._lock:
            self._armed.pop(id(connection), None)

    @contextmanager
    def guard(
        self, connection: psycopg.Connection[Any], seconds: float, what: str
    ) -> Iterator[None]:
        """``arm`` around a block."""
        self.arm(connection, seconds, what)
        try:
            yield
        finally:
            self.disarm(connection)

    def armed(self) -> int:
        """How many connections are watched now (for tests and diagnostics)."""
        with self._lock:
            return len(self._armed)

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for key, armed in list(self._armed.items()):
                    if armed.deadline <= now:
                        del self._armed[key]
                        connection = armed.connection()
                        if connection is not None:
                            _close_if_busy(connection, armed)
                self._wake_at = min((a.deadline for a in self._armed.values()), default=math.inf)
                self._lock.wait(None if self._wake_at == math.inf else self._wake_at - now)


def shut_down(connection: Any) -> None:
    """Shut a psycopg connection's socket down (not close: the descriptor stays its owner's, so
    it cannot be reused under it); a call waiting on it fails at once. Any thread; a connection
    already closed is left alone."""
    try:
        duplicate = socket.socket(fileno=os.dup(connection.fileno()))
    except Exception:  # already closed
        return
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        duplicate.close()


def _close_if_busy(connection: psycopg.Connection[Any], armed: _Armed) -> None:
    """Shut the socket down if a command is still in progress (see :func:`shut_down`)."""
    try:
        if connection.closed or connection.info.transaction_status != TransactionStatus.ACTIVE:
            return
    except psycopg.Error:
        return
    shut_down(connection)
    log_event(
        log,
        logging.WARNING,
        "database_deadline",
        "a database call overran its deadline; its connection was closed",
        call=armed.what,
        deadline_seconds=round(armed.seconds, 3),
    )


DEADLINES = Deadlines()


def statement_deadline(settings: Settings) -> float:
    """Seconds a statement, commit or rollback may wait for its answer: the server's own
    ``statement_timeout`` plus a grace for its error to travel back."""
    return settings.statement_timeout_seconds + settings.database_deadline_grace_seconds


def relay_idle_in_transaction(settings: Settings) -> float:
    """The server-side bound on a relay session idle inside a transaction: at most one
    statement deadline. The relay's transactions never wait on anything but their own
    statements, so a session idle for longer lost its client (closed by its deadline behind a
    silent path the server cannot see); until the server ends it, its locks (the claim lock
    that serializes every grant, a partition's lease row, a batch's rows) stall the relay."""
    return min(settings.idle_in_transaction_timeout_seconds, statement_deadline(settings))


def _after_fork_in_child() -> None:
    DEADLINES.after_fork_in_child()
    # A pooled connection shared with the parent would interleave two processes' traffic on one
    # socket. Drop the child's references without closing the parent's sockets (close=False).
    for engine in list(_engines):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)

_FRESH = "outbox_fresh"


def _dbapi(conn: Connection) -> psycopg.Connection[Any] | None:
    """The psycopg connection under a SQLAlchemy one, or None when it is gone."""
    try:
        dbapi = conn.connection.dbapi_connection
    except exc.SQLAlchemyError:
        return None
    return dbapi if isinstance(dbapi, psycopg.Connection) else None


def install_deadlines(engine: Engine, settings: Settings) -> None:
    """Watch every wait of ``engine``'s connections (see :class:`Deadlines`):

    * statements, commits and rollbacks: :func:`statement_deadline`;
    * the setup queries of a new connection, the ping before a pooled connection is reused
      and the rollback when one is returned: ``OUTBOX_DATABASE_CONNECT_TIMEOUT_SECONDS``.

    The ping replaces SQLAlchemy's ``pool_pre_ping`` (which has no hook to watch it): it runs
    in the pool's ``checkout`` event, and a failed or overdue ping makes the pool open a fresh
    connection (``DisconnectionError``)."""
    statement = statement_deadline(settings)
    quick = settings.database_connect_timeout_seconds

    def on_connect(dbapi: Any, record: ConnectionPoolEntry) -> None:
        record.info[_FRESH] = True
        if isinstance(dbapi, psycopg.Connection):
            DEADLINES.arm(dbapi, quick, "connection setup")

    def on_checkout(dbapi: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection) -> None:
        if record.info.pop(_FRESH, False) or not isinstance(dbapi, psycopg.Connection):
            return
        raw: Any = dbapi  # the dialect's DBAPI protocol is looser than psycopg's types
        try:
            with DEADLINES.guard(dbapi, quick, "ping"):
                engine.dialect.do_ping(raw)
        except Exception as error:
            raise exc.DisconnectionError(f"ping failed: {_first_line(error)}") from error

    def on_reset(dbapi: Any, record: ConnectionPoolEntry, state: Any) -> None:
        if isinstance(dbapi, psycopg.Connection):
            DEADLINES.arm(dbapi, quick, "rollback on return")

    def on_checkin(dbapi: Any, record: ConnectionPoolEntry) -> None:
        if isinstance(dbapi, psycopg.Connection):
            DEADLINES.disarm(dbapi)

    def before_execute(conn: Connection, cursor: Any, statement_text: str, *args: Any) -> None:
        dbapi = getattr(cursor, "connection", None)
        if isinstance(dbapi, psycopg.Connection):
            DEADLINES.arm(dbapi, statement, "statement")

    def after_execute(
        conn: Connection,
        cursor: Any,
        statement_text: str,
        parameters: Any,
        context: Any,
        *args: Any,
    ) -> None:
        dbapi = getattr(cursor, "connection", None)
        if not isinstance(dbapi, psycopg.Connection):
            return
        options = getattr(context, "execution_options", None) or {}
        if options.get("stream_results") or options.get("yield_per"):
            # A server-side cursor fetches later, with no hook around it: keep it watched (the
            # watch fires only while a fetch is in progress).
            DEADLINES.arm(dbapi, statement, "streamed fetch")
        else:
            DEADLINES.disarm(dbapi)

    def on_error(context: ExceptionContext) -> None:
        dbapi = getattr(getattr(context, "cursor", None), "connection", None)
        if isinstance(dbapi, psycopg.Connection):
            DEADLINES.disarm(dbapi)

    def on_end(conn: Connection) -> None:
        # Fired before the COMMIT / ROLLBACK is sent; nothing reports its end, so the watch
        # stays armed until the next statement or the return to the pool (harmless: it only
        # fires while a command is in progress).
        dbapi = _dbapi(conn)
        if dbapi is not None:
            DEADLINES.arm(dbapi, statement, "commit or rollback")

    event.listen(engine.pool, "connect", on_connect, insert=True)
    event.listen(engine.pool, "checkout", on_checkout)
    event.listen(engine.pool, "reset", on_reset)
    event.listen(engine.pool, "checkin", on_checkin)
    event.listen(engine, "before_cursor_execute", before_execute)
    event.listen(engine, "after_cursor_execute", after_execute)
    event.listen(engine, "handle_error", on_error)
    event.listen(engine, "commit", on_end)
    event.listen(engine, "rollback", on_end)


def make_engine(
    settings: Settings,
    *,
    application_name: str | None = None,
    pool_size: int = 5,
    idle_in_transaction_seconds: float | None = None,
) -> Engine:
    """A sync engine (psycopg 3) whose every wait has a deadline (:func:`install_deadlines`);
    a pooled connection is pinged before reuse, so one killed by an outage is replaced.
    ``idle_in_transaction_seconds``: see :func:`connect_args` (relay engines pass
    :func:`relay_idle_in_transaction`)."""
    engine = create_engine(
        settings.sqlalchemy_url,
        connect_args={
            **connect_args(
                settings, application_name, idle_in_transaction_seconds=idle_in_transaction_seconds
            ),
            **keepalive_args(settings),
        },
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,  # our own ping, watched: install_deadlines
        pool_recycle=1800,
    )
    install_deadlines(engine, settings)
    _engines.add(engine)
    return engine


def make_async_engine(settings: Settings, *, application_name: str | None = None) -> AsyncEngine:
    """An asyncio engine for producers. Its waits are bounded by the connect deadline, the
    server's timeouts and TCP keepalives; bound a call further with ``asyncio.timeout``."""
    return create_async_engine(
        settings.sqlalchemy_url,
        connect_args={**connect_args(settings, application_name), **keepalive_args(settings)},
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
