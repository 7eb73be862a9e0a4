"""The wake-up path (DESIGN 4.5): LISTEN for the outbox trigger's NOTIFY and claim at once.

The trigger sends the distinct slots of each INSERT statement after commit (NOTIFY is
transactional). A listener thread gathers notifications for ``debounce`` seconds, maps slots to
partitions, and calls back once per burst. Polling stays the fallback: a lost notification
(listener restarting, connection dropped) only costs one beat tick.

A listener only reads, so a dead connection looks like a quiet one. It therefore proves its
connection alive: after ``probe_interval`` seconds without a notification it sends a no-op
(``LISTEN`` again) that must be answered within ``probe_deadline`` seconds, else the
connection is closed (:data:`outbox_tasks.db.DEADLINES`). After a failure it reconnects at
once, then backs off up to the probe interval; ``on_listening`` reports each change of state
(the worker turns it into a gauge).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psycopg

from outbox_tasks.db import DEADLINES, keepalive_args
from outbox_tasks.logs import event, get_logger
from outbox_tasks.partitioning import partition_of
from outbox_tasks.settings import Settings

CHANNEL = "outbox_wakeup"
log = get_logger("wakeup")


def partitions_for(payloads: Iterable[str], partitions: int) -> set[int]:
    """Map NOTIFY payloads (comma-separated slots) to partitions; ignore garbage."""
    result: set[int] = set()
    for payload in payloads:
        for raw in payload.split(","):
            item = raw.strip()
            if item.isdigit() and int(item) < 1024:
                result.add(partition_of(int(item), partitions))
    return result


class WakeupListener:
    """A daemon thread holding one LISTEN connection, proven alive by a probe with a deadline;
    reconnects at once after a failure, then with backoff."""

    def __init__(
        self,
        conninfo: str,
        partitions: int,
        on_partitions: Callable[[set[int]], None],
        *,
        debounce_seconds: float = 0.005,
        application_name: str = "outbox_tasks.wakeup",
        probe_interval_seconds: float = 5.0,
        probe_deadline_seconds: float = 5.0,
        connect_options: Mapping[str, Any] | None = None,
        on_listening: Callable[[bool], None] | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.partitions = partitions
        self.on_partitions = on_partitions
        self.debounce_seconds = debounce_seconds
        self.application_name = application_name
        self.probe_interval_seconds = probe_interval_seconds
        self.probe_deadline_seconds = probe_deadline_seconds
        # libpq options: connect_timeout, keepalives, tcp_user_timeout.
        self.connect_options = dict(connect_options or {"connect_timeout": 10})
        self.on_listening = on_listening
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self.listening = threading.Event()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        on_partitions: Callable[[set[int]], None],
        *,
        on_listening: Callable[[bool], None] | None = None,
    ) -> WakeupListener:
        """A listener configured from ``OUTBOX_*`` settings (URL, debounce, probe, deadlines,
        TCP keepalives)."""
        return cls(
            settings.wakeup_libpq_url,
            settings.partitions,
            on_partitions,
            debounce_seconds=settings.wakeup_debounce_seconds,
            probe_interval_seconds=settings.wakeup_probe_interval_seconds,
            probe_deadline_seconds=settings.database_connect_timeout_seconds,
            connect_options={
                "connect_timeout": max(2, round(settings.database_connect_timeout_seconds)),
                **keepalive_args(settings),
            },
            on_listening=on_listening,
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-wakeup", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _set_listening(self, listening: bool) -> None:
        if listening == self.listening.is_set():
            return
        if listening:
            self.listening.set()
        else:
            self.listening.clear()
        if self.on_listening is not None:
            try:
                self.on_listening(listening)
            except Exception:
                log.debug("on_listening failed", exc_info=True)

    def retry_delay(self, failures: int) -> float:
        """Seconds before the next connection attempt after ``failures`` failures in a row:
        none after the first (a dropped connection is usually back at once), then doubling
        from 0.5 s up to the probe interval."""
        if failures <= 1:
            return 0.0
        return min(0.5 * 2.0 ** (failures - 2), self.probe_interval_seconds)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception as error:
                self._set_listening(False)
                self._failures += 1
                delay = self.retry_delay(self._failures)
                event(
                    log,
                    logging.WARNING,
                    "wakeup_listener_error",
                    "wake-up listener lost its connection; polling covers until it is back",
                    error=str(error).strip()[:300],
                    retry_in_seconds=delay,
                )
                self._stop.wait(delay)
        self._set_listening(False)

    def _listen(self) -> None:
        with psycopg.connect(
            self.conninfo,
            autocommit=True,
            application_name=self.application_name,
            **self.connect_options,
        ) as conn:
            self._probe(conn, "wake-up listen")
            self._failures = 0
            self._set_listening(True)
            event(log, logging.INFO, "wakeup_listening", "listening for outbox inserts")
            proven = time.monotonic()
            while not self._stop.is_set():
                payloads = [n.payload for n in conn.notifies(timeout=1.0, stop_after=1)]
                if not payloads:
                    if time.monotonic() - proven >= self.probe_interval_seconds:
                        self._probe(conn, "wake-up probe")
                        proven = time.monotonic()
                    continue
                proven = time.monotonic()  # a notification proves the connection alive
                if self.debounce_seconds > 0:
                    payloads += [n.payload for n in conn.notifies(timeout=self.debounce_seconds)]
                wanted = partitions_for(payloads, self.partitions)
                if wanted:
                    try:
                        self.on_partitions(wanted)
                    except Exception as error:
                        event(
                            log,
                            logging.WARNING,
                            "wakeup_dispatch_failed",
                            "could not dispatch claims; the next tick will",
                            error=str(error)[:300],
                        )

    def _probe(self, conn: psycopg.Connection[Any], what: str) -> None:
        """``LISTEN`` (again: a no-op once listening) answered within the probe deadline."""
        with DEADLINES.guard(conn, self.probe_deadline_seconds, what):
            conn.execute(f"LISTEN {CHANNEL}")


class NotificationWaiter:
    """A LISTEN connection read on demand, with no thread: how a publish task that keeps its
    leases learns of new rows (``outbox_tasks.serving``).

    :meth:`listen` before the task's first select (so no insert committed after it goes
    unnoticed), :meth:`wait` between batches, :meth:`unlisten` when the task ends: a connection
    that listens while nobody reads it would make PostgreSQL queue notifications for it
    without bound. Any error closes the connection and reports "not listening"; the caller then
    behaves as without the wake-up path (the next :meth:`listen` reconnects).
    """

    def __init__(
        self,
        conninfo: str,
        *,
        application_name: str = "outbox_tasks.serve",
        connect_timeout: int = 10,
        deadline_seconds: float = 5.0,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.application_name = application_name
        self.connect_timeout = connect_timeout
        # Every statement on the connection is answered within this, or the connection is
        # closed (db.DEADLINES): a silently dead peer must not hang the publish task.
        self.deadline_seconds = deadline_seconds
        self.connect_options = dict(connect_options or {})
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    def listen(self) -> bool:
        """Start listening (connecting if needed); False when the database cannot be reached."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self.conninfo,
                    autocommit=True,
                    application_name=self.application_name,
                    connect_timeout=self.connect_timeout,
                    **self.connect_options,
                )
            with DEADLINES.guard(self._conn, self.deadline_seconds, "serving listen"):
                self._conn.execute(f"LISTEN {CHANNEL}")
        except Exception as error:
            self._broken(error)
            return False
        return True

    def wait(self, timeout: float) -> list[str] | None:
        """The payloads of the notifications that arrive within ``timeout`` seconds (at the
        first one, whatever else is already there, without waiting more); [] when none came;
        None when not listening (the connection failed and was closed)."""
        conn = self._conn
        if conn is None or conn.closed:
            return None
        try:
            payloads = [n.payload for n in conn.notifies(timeout=max(0.0, timeout), stop_after=1)]
            if payloads:
                payloads += [n.payload for n in conn.notifies(timeout=0.0)]
        except Exception as error:
            self._broken(error)
            return None
        return payloads

    def unlisten(self) -> None:
        """Stop listening and drop what was queued; the connection stays open for the next
        :meth:`listen`."""
        conn = self._conn
        if conn is None or conn.closed:
            return
        try:
            with DEADLINES.guard(conn, self.deadline_seconds, "serving unlisten"):
                conn.execute(f"UNLISTEN {CHANNEL}")
            for _ in conn.notifies(timeout=0.0):
                pass
        except Exception as error:
            self._broken(error)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _broken(self, error: Exception) -> None:
        event(
            log,
            logging.WARNING,
            "wakeup_waiter_error",
            "a publish task stopped listening for new rows; polling covers",
            error=str(error).strip()[:300],
        )
        self.close()
