"""Partition ownership: PostgreSQL advisory locks held on a dedicated connection, proven alive by
a heartbeat, and the eviction of members that went silent.

Every call on the lock connection has a deadline (``outbox_tasks.db.DEADLINES``: a watchdog
shuts the connection's socket down when a call overruns it; a server that stopped answering on a
connection the network keeps open would otherwise block the call for hours), and the call fails
with DatabaseUnavailable.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any, Final

from sqlalchemy.orm import Session

from outbox_tasks.consumer import store
from outbox_tasks.consumer.group import ConsumerGroup
from outbox_tasks.consumer.processing import Fence
from outbox_tasks.db import shut_down
from outbox_tasks.errors import ConfigurationError, DatabaseUnavailable, describe_error
from outbox_tasks.settings import SLOT_COUNT, Settings

# Advisory locks of a group are (group key, n): n < SLOT_COUNT is a partition; MEMBER_BASE + N is
# the shared "member of this group, running with N partitions" lock; FENCE_BASE + k is partition
# k's fence lock, taken shared by every handling transaction of k (see store.holds_lock);
# INSTANCE_BASE + i is one process's liveness lock (unordered groups on Redis).
MEMBER_BASE: Final = 1_000_000
FENCE_BASE: Final = 2_000_000
INSTANCE_BASE: Final = 1_100_000_000
INSTANCE_SPAN: Final = 1_000_000_000
# How long an eviction waits for a terminated session to end (and free its locks).
_TERMINATE_WAIT_MS: Final = 2000


def group_lock_key(group: str) -> int:
    """The first advisory-lock key of a group (31-bit, stable across processes and hosts)."""
    return zlib.crc32(f"outbox.consumer:{group}".encode()) & 0x7FFFFFFF


class Locks:
    """Session-level advisory locks held on one autocommit connection: they live exactly as long
    as this process's connection, so a killed process frees its partitions at once, and a
    silent one (its heartbeat stopped) is evicted by the others (:meth:`evict_stale`).

    Thread-safe (psycopg serializes calls on the connection). Every call raises
    DatabaseUnavailable when the connection fails or the call overruns ``deadline_seconds``.
    """

    def __init__(
        self, settings: Settings, group: ConsumerGroup, *, deadline_seconds: float = 2.0
    ) -> None:
        self.settings = settings
        self.group = group
        self.key = group_lock_key(group.name)
        self.deadline = deadline_seconds
        self.pid = 0
        self._conn: Any = None

    def connect(self) -> None:
        import psycopg

        from outbox_tasks.db import connect_args, keepalive_args

        args: dict[str, Any] = {
            **connect_args(self.settings, "outbox_tasks.consumer.locks"),
            **keepalive_args(self.settings),
        }
        with self._translated("connect"):
            self._conn = psycopg.connect(self.settings.libpq_url, autocommit=True, **args)
        with self._call("backend pid"):
            self.pid = store.backend_pid(self._conn)

    def join(self, partitions: int) -> None:
        """Announce this process as a member running with ``partitions`` (0: unordered), after
        checking that no member runs the group with another partition count."""
        with self._call("join"):
            others = store.locked_offsets(
                self._conn, self.key, MEMBER_BASE, MEMBER_BASE + SLOT_COUNT
            )
        conflicting = sorted(set(others) - {partitions})
        if conflicting:
            raise ConfigurationError(
                f"consumer group {self.group.name} already runs with partitions="
                f"{conflicting[0]} (this process: {partitions}); stop every process of the group "
                "before changing its partition count"
            )
        with self._call("join"):
            store.lock_shared(self._conn, self.key, MEMBER_BASE + partitions)

    def members(self, partitions: int) -> int:
        with self._call("members"):
            return store.count_holders(self._conn, self.key, MEMBER_BASE + partitions)

    def try_lock(self, n: int) -> bool:
        with self._call("try lock"):
            return store.try_lock(self._conn, self.key, n)

    def unlock(self, n: int) -> None:
        with self._call("unlock"):
            store.unlock(self._conn, self.key, n)

    def heartbeat(self) -> None:
        with self._call("heartbeat"):
            store.heartbeat(self._conn)

    def evict_stale(self, stale_seconds: float) -> list[int]:
        """Terminate the sessions of members silent for ``stale_seconds`` (their locks are freed
        once they end); their backend pids."""
        with self._call("evict", extra=_TERMINATE_WAIT_MS / 1000):
            return store.evict_stale(
                self._conn,
                self.key,
                spare_low=FENCE_BASE,
                spare_high=FENCE_BASE + SLOT_COUNT,
                stale_seconds=stale_seconds,
                wait_ms=_TERMINATE_WAIT_MS,
            )

    def fence_out(self, partition: int) -> int:
        """After taking ``partition``: end every transaction of a previous holder that could
        still commit for it (sessions holding its fence lock); how many were terminated."""
        with self._call("fence out", extra=_TERMINATE_WAIT_MS / 1000):
            return store.terminate_holders(
                self._conn, self.key, FENCE_BASE + partition, wait_ms=_TERMINATE_WAIT_MS
            )

    def layout(self) -> int | None:
        with self._call("layout"):
            return store.select_layout(self._conn, self.group.name)

    def record_layout(self, partitions: int) -> None:
        with self._call("layout"):
            store.record_layout(self._conn, self.group.name, partitions)

    def fence(self, n: int) -> Fence:
        def holds(session: Session) -> bool:
            return store.holds_lock(session, pid=self.pid, key=self.key, n=n, fence=FENCE_BASE + n)

        return holds

    def abandon(self) -> None:
        """From any thread: make every call on the lock connection fail at once (its socket is
        shut down; the server ends the session when it notices, or when it is evicted)."""
        conn = self._conn
        if conn is not None:
            shut_down(conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def _call(self, what: str, *, extra: float = 0.0) -> Iterator[None]:
        from outbox_tasks.db import DEADLINES

        conn = self._conn
        if conn is None:
            raise DatabaseUnavailable(f"consumer locks: {what}: not connected")
        with (
            DEADLINES.guard(conn, self.deadline + extra, f"consumer locks: {what}"),
            self._translated(what),
        ):
            yield

    @contextlib.contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """psycopg errors -> DatabaseUnavailable (the driver is imported only when locks are
        used)."""
        import psycopg

        try:
            yield
        except psycopg.Error as error:
            raise DatabaseUnavailable(f"consumer locks: {what}: {describe_error(error)}") from error
