"""Partition ownership: PostgreSQL advisory locks held on a dedicated connection."""

from __future__ import annotations

import contextlib
import zlib
from typing import Any, Final

from sqlalchemy import text
from sqlalchemy.orm import Session

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


_FENCE = text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = :pid "
    "AND classid::bigint = :key AND objid::bigint = :n AND objsubid = 2 "
    "AND mode = 'ExclusiveLock' AND granted)"
)


class _Locks:
    """Session-level advisory locks held on one autocommit connection: they live exactly as long
    as this process's connection, so a killed process frees its partitions at once."""

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
        try:
            conn = psycopg.connect(
                self.settings.libpq_url,
                autocommit=True,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
                **args,
            )
        except psycopg.Error as error:
            raise DatabaseUnavailable(f"consumer locks: {describe_error(error)}") from error
        self._conn = conn
        self.pid = int(self._one("SELECT pg_backend_pid()"))

    def _one(self, sql: str, *params: int) -> Any:
        import psycopg

        try:
            row = self._conn.execute(sql, params).fetchone()
        except psycopg.Error as error:
            raise DatabaseUnavailable(f"consumer locks: {describe_error(error)}") from error
        return None if row is None else row[0]

    def join(self, partitions: int) -> None:
        """Announce this process as a member running with ``partitions`` (0: unordered), after
        checking that no member runs the group with another partition count."""
        others = self._one(
            "SELECT array_agg(DISTINCT objid::bigint - %s) FROM pg_locks "
            "WHERE locktype = 'advisory' AND classid::bigint = %s AND objsubid = 2 "
            "AND objid::bigint BETWEEN %s AND %s",
            MEMBER_BASE,
            self.key,
            MEMBER_BASE,
            MEMBER_BASE + SLOT_COUNT,
        )
        conflicting = sorted(set(others or ()) - {partitions})
        if conflicting:
            raise ConfigurationError(
                f"consumer group {self.group.name} already runs with partitions="
                f"{conflicting[0]} (this process: {partitions}); stop every process of the group "
                "before changing its partition count"
            )
        self._one(
            "SELECT pg_advisory_lock_shared(%s::int4, %s::int4)", self.key, MEMBER_BASE + partitions
        )

    def members(self, partitions: int) -> int:
        return int(
            self._one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 2",
                self.key,
                MEMBER_BASE + partitions,
            )
        )

    def try_lock(self, n: int) -> bool:
        return bool(self._one("SELECT pg_try_advisory_lock(%s::int4, %s::int4)", self.key, n))

    def unlock(self, n: int) -> None:
        self._one("SELECT pg_advisory_unlock(%s::int4, %s::int4)", self.key, n)

    def fence(self, n: int) -> Fence:
        def holds(session: Session) -> bool:
            params = {"pid": self.pid, "key": self.key, "n": n}
            return bool(session.execute(_FENCE, params).scalar())

        return holds

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
