"""The demo's surroundings: its database (created when missing), the environment and ports of
the Celery processes it starts, their readiness, the metrics it scrapes, SIGTERM as Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from outbox_tasks.demo.processes import free_port
from outbox_tasks.settings import Settings, env_var


def ensure_database(settings: Settings) -> None:
    """Create the configured database when the server is there but the database is not."""
    import psycopg

    from outbox_tasks.store.events import create_database

    try:
        psycopg.connect(settings.libpq_url, connect_timeout=5).close()
        return
    except psycopg.OperationalError as error:
        if "does not exist" not in str(error):
            raise SystemExit(
                f"outbox-tasks demo: cannot reach PostgreSQL at {env_var('database_url')}: "
                f"{str(error).strip()}\nStart PostgreSQL or point {env_var('database_url')} at "
                "one (README: 'Run the demo')."
            ) from None
    info = psycopg.conninfo.conninfo_to_dict(settings.libpq_url)
    name = str(info.get("dbname"))
    info["dbname"] = "postgres"
    admin = psycopg.conninfo.make_conninfo("", **{k: str(v) for k, v in info.items() if v})
    create_database(admin, name)
    print(f"created database {name}")


def celery_env(settings: Settings) -> dict[str, str]:
    """The environment of the Celery processes: ours without OUTBOX_*, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(settings.to_env())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def usable_port(port: int, what: str, explicit: bool) -> int:
    """``port``, or a free one when ``port`` is taken and was not asked for explicitly."""
    if port == 0 or _port_free(port):
        return port
    if explicit:
        raise SystemExit(f"outbox-tasks demo: {what} port {port} is in use; choose another one")
    other = free_port()
    print(f"{what}: port {port} is in use, using {other}")
    return other


def scrape(port: int, name: str) -> float | None:
    """The sum of metric ``name`` on the workers' endpoint, or None if it does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    except OSError:
        return None
    total = None
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the demo like Ctrl-C does (cleanly), e.g. from a CI timeout or kill."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_ready(procs: list[tuple[str, subprocess.Popen[bytes]]], workdir: Path) -> None:
    """Until the worker logs 'ready.' and beat has started, so the first orders do not queue
    up behind the workers' start (which would show as seconds of latency)."""
    markers = {"worker": "ready.", "beat": "beat: Starting..."}
    waiting = {name for name, _ in procs if name in markers}
    started = time.monotonic()
    print("waiting for the worker and beat to be ready...", flush=True)
    while waiting and time.monotonic() - started < 120:
        for name, proc in procs:
            if proc.poll() is not None:
                raise SystemExit(
                    f"outbox-tasks demo: {name} exited; see {workdir / (name + '.log')}"
                )
            if name in waiting:
                log = (workdir / f"{name}.log").read_text(errors="replace")
                if markers[name] in log:
                    waiting.discard(name)
        time.sleep(0.2)
    if waiting:
        print(f"still not ready after 120s: {', '.join(sorted(waiting))}; starting anyway")
    else:
        print(f"ready in {time.monotonic() - started:.1f}s")
