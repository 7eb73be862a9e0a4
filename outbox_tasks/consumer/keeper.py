"""The heartbeat of a consumer process: proves its lock session alive to the other members of
its group, and gives everything up at once when it cannot.

The bounds (``I`` the heartbeat interval, ``D`` the lock connection's deadline, ``T`` the
group's takeover time; defaults 1 s, 2 s, 8 s):

* a member that has not finished a statement on its lock session for ``T`` seconds is silent:
  any other member terminates that session (:meth:`Locks.evict_stale`), which frees its
  partitions, then takes them and terminates the transactions that could still commit for them
  (:meth:`Locks.fence_out`);
* the silent member itself gives up within ``I + 2D`` seconds of its last successful heartbeat,
  well before anyone can evict it: its keeper calls ``on_lost``, which stops it from reading
  and handling and shuts down its broker and database connections (RabbitMQ requeues what it
  held at once, so the next holder receives it);
* so a partition whose holder went silent is handled again within about ``T + 2`` seconds.

:class:`ConnectionsInUse` tracks the handling connections a process has checked out, so that
giving up also ends the database calls its main thread may be waiting in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine

from outbox_tasks.consumer.locks import Locks
from outbox_tasks.db import shut_down
from outbox_tasks.errors import ConfigurationError, describe_error
from outbox_tasks.logs import event as log_event
from outbox_tasks.logs import get_logger

log = get_logger("consumer")


def check_bounds(interval_seconds: float, deadline_seconds: float, takeover_seconds: float) -> None:
    """Raise ConfigurationError unless a member gives up (``I + 2D``) at least a second before
    it can be evicted (``T``)."""
    if not interval_seconds > 0 or not deadline_seconds > 0:
        raise ConfigurationError("consumer heartbeat interval and deadline must be > 0 seconds")
    gives_up = interval_seconds + 2 * deadline_seconds
    if takeover_seconds < gives_up + 1:
        raise ConfigurationError(
            f"consumer takeover_seconds={takeover_seconds} is too short: a silent member gives "
            f"up after {gives_up:g} s (heartbeat interval + 2 x deadline), and must do so at "
            "least 1 s before it can be evicted"
        )


class Keeper:
    """A daemon thread that runs a heartbeat on ``locks`` every ``interval_seconds``.

    When a heartbeat fails (error, or its deadline passed), ``on_lost(reason)`` is called once,
    from the keeper's thread, and the keeper stops. :meth:`fresh` says whether the process may
    still read and handle messages: nothing is lost and the last heartbeat that succeeded
    started less than ``interval + 2 x deadline`` seconds ago (so a process resumed after a
    pause cannot read before its keeper has run again).
    """

    def __init__(
        self,
        locks: Locks,
        *,
        interval_seconds: float,
        on_lost: Callable[[str], None],
        group: str,
    ) -> None:
        self.locks = locks
        self.interval = interval_seconds
        self.bound = interval_seconds + 2 * locks.deadline
        self.on_lost = on_lost
        self.group = group
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._last_ok = time.monotonic()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, name=f"outbox-consumer-keeper-{self.group}", daemon=True
        )
        self._thread.start()

    def fresh(self) -> bool:
        return not self.lost.is_set() and time.monotonic() - self._last_ok < self.bound

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.bound + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            started = time.monotonic()
            try:
                self.locks.heartbeat()
            except Exception as error:
                if self._stop.is_set():
                    return
                self._give_up(describe_error(error))
                return
            self._last_ok = started

    def _give_up(self, reason: str) -> None:
        self.lost.set()
        log_event(
            log,
            logging.WARNING,
            "ownership_lost",
            "heartbeat failed: this process gives up its partitions and reconnects",
            group=self.group,
            error=reason,
            silent_seconds=round(time.monotonic() - self._last_ok, 3),
        )
        try:
            self.on_lost(reason)
        except Exception as error:  # giving up must not die half way on a logging problem
            log_event(
                log,
                logging.ERROR,
                "ownership_lost",
                "error while giving up",
                group=self.group,
                error=describe_error(error),
            )


class ConnectionsInUse:
    """The database connections an engine has checked out now, so that giving up can make the
    calls waiting on them fail at once (:meth:`shut_down_all`, any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: set[Any] = set()

    def watch(self, engine: Engine) -> None:
        sa_event.listen(engine, "checkout", self._on_checkout)
        sa_event.listen(engine, "checkin", self._on_checkin)

    def unwatch(self, engine: Engine) -> None:
        sa_event.remove(engine, "checkout", self._on_checkout)
        sa_event.remove(engine, "checkin", self._on_checkin)

    def shut_down_all(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for dbapi in connections:
            shut_down(dbapi)

    def _on_checkout(self, dbapi: Any, record: Any, proxy: Any) -> None:
        with self._lock:
            self._connections.add(dbapi)

    def _on_checkin(self, dbapi: Any, record: Any) -> None:
        with self._lock:
            if dbapi is None:  # an invalidated connection: forget the closed ones
                self._connections = {c for c in self._connections if not c.closed}
            else:
                self._connections.discard(dbapi)
