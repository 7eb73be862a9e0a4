"""Partition ownership: PostgreSQL advisory locks held on a dedicated connection."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any, Final

from sqlalchemy.orm import Session

from outbox_tasks.consumer import store
from outbox_tasks.consumer.group import ConsumerGroup
from outbox_tasks.consumer.processing import Fence
from outbox_tasks.errors import ConfigurationError, DatabaseUnavailable, describe_error
from outbox_tasks.settings import SLOT_COUNT, Settings

# Advisory locks of a group are (group key, n): n < SLOT_COUNT is a partition; MEMBER_BASE + N is
# the shared "member of this group, running with N partitions" lock; INSTANCE_BASE + i is one
# process's liveness lock (unordered groups on Redis).
MEMBER_BASE: Final = 1_000_000
INSTANCE_BASE: Final = 1_100_000_000
INSTANCE_SPAN: Final = 1_000_000_000


def group_lock_key(group: str) -> int:
    """The first advisory-lock key of a group (31-bit, stable across processes and hosts)."""
    return zlib.crc32(f"outbox.consumer:{group}".encode()) & 0x7FFFFFFF


class Locks:
    """Session-level advisory locks held on one autocommit connection: they live exactly as long
    as this process's connection, so a killed process frees its partitions at once.

    Every call raises DatabaseUnavailable when the connection fails."""

    def __init__(self, settings: Settings, group: ConsumerGroup) -> None:
        self.settings = settings
        self.group = group
        self.key = group_lock_key(group.name)
        self.pid = 0
        self._conn: Any = None

    def connect(self) -> None:
        import psycopg

        from outbox_tasks.db import connect_args

        args = connect_args(self.settings, "outbox_tasks.consumer.locks")
        with _translated():
            self._conn = psycopg.connect(
                self.settings.libpq_url,
                autocommit=True,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
                **args,
            )
            self.pid = store.backend_pid(self._conn)

    def join(self, partitions: int) -> None:
        """Announce this process as a member running with ``partitions`` (0: unordered), after
        checking that no member runs the group with another partition count."""
        with _translated():
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
        with _translated():
            store.lock_shared(self._conn, self.key, MEMBER_BASE + partitions)

    def members(self, partitions: int) -> int:
        with _translated():
            return store.count_holders(self._conn, self.key, MEMBER_BASE + partitions)

    def try_lock(self, n: int) -> bool:
        with _translated():
            return store.try_lock(self._conn, self.key, n)

    def unlock(self, n: int) -> None:
        with _translated():
            store.unlock(self._conn, self.key, n)

    def fence(self, n: int) -> Fence:
        def holds(session: Session) -> bool:
            return store.holds_lock(session, pid=self.pid, key=self.key, n=n)

        return holds

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """psycopg errors -> DatabaseUnavailable (the driver is imported only when locks are used)."""
    import psycopg

    try:
        yield
    except psycopg.Error as error:
        raise DatabaseUnavailable(f"consumer locks: {describe_error(error)}") from error
