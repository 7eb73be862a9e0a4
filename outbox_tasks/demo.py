"""``outbox-tasks demo``: the whole system, live, with nothing installed but Python.

Services: when ``OUTBOX_DATABASE_URL`` is not set it starts an embedded PostgreSQL, when
``OUTBOX_BROKER_URL`` is not set an embedded Redis-compatible server (fakeredis); see
:mod:`outbox_tasks.embedded`. With the variables set it uses those services.

It creates the database if needed, migrates it, starts real Celery workers (with the metrics
endpoint), beat and Flower, writes orders (business row + outbox row in one transaction),
consumes the events from a queue bound to the exchange, and prints progress until the duration
ends or Ctrl-C (or SIGTERM). Then it stops everything cleanly, checks that every event written
arrived, in order per aggregate, and removes the embedded services and their data.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Numeric, Text, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from outbox_tasks.embedded import EmbeddedServices, Guard, free_port, no_interrupts
from outbox_tasks.settings import Settings, env_var


class DemoBase(DeclarativeBase):
    pass


class DemoShipment(DemoBase):
    """The demo consumer group's effect: one shipment per event, never two."""

    __tablename__ = "demo_shipment"
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    order_id: Mapped[int] = mapped_column(BigInteger)
    event_type: Mapped[str] = mapped_column(Text)


class DemoOrder(DemoBase):
    """The demo application's business table."""

    __tablename__ = "demo_order"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    customer: Mapped[str] = mapped_column(Text)
    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))


def add_demo_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="run workers, beat, Flower, a producer and a consumer, with live progress",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=0,
        help="seconds to produce before draining and stopping (0: until Ctrl-C)",
    )
    demo.add_argument(
        "--rate",
        type=float,
        default=40,
        # The demo's single consumer process (one transaction per event, against an embedded
        # Python Redis) handles about 100 events/s; stay below so latency shows the relay.
        help="orders per second, 2 events each (default 40)",
    )
    demo.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    demo.add_argument(
        "--flower-port",
        type=int,
        default=None,
        help="Flower port (default 5555, or a free port when 5555 is taken; 0: no Flower)",
    )
    demo.add_argument("--no-tty", action="store_true", help="plain progress lines, no redraw")
    demo.set_defaults(func=run_demo)


@dataclasses.dataclass
class _Tally:
    written: int = 0
    consumed: int = 0
    duplicates: int = 0
    order_violations: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def _ensure_database(settings: Settings) -> None:
    """Create the configured database when the server is there but the database is not."""
    import psycopg
    from psycopg import sql

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
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    print(f"created database {name}")


def _celery_env(settings: Settings) -> dict[str, str]:
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


def _usable_port(port: int, what: str, explicit: bool) -> int:
    """``port``, or a free one when ``port`` is taken and was not asked for explicitly."""
    if port == 0 or _port_free(port):
        return port
    if explicit:
        raise SystemExit(f"outbox-tasks demo: {what} port {port} is in use; choose another one")
    other = free_port()
    print(f"{what}: port {port} is in use, using {other}")
    return other


def _scrape(port: int, name: str) -> float | None:
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
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the demo like Ctrl-C does (cleanly), e.g. from a CI timeout or kill."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait_ready(procs: list[tuple[str, subprocess.Popen[bytes]]], workdir: Path) -> None:
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


def run_demo(args: argparse.Namespace) -> int:
    settings = Settings.from_env()  # every OUTBOX_* value checked before anything starts
    embed_db = not os.environ.get(env_var("database_url"), "").strip()
    embed_broker = not os.environ.get(env_var("broker_url"), "").strip()
    with _sigterm_as_interrupt():
        guard = Guard()
        try:
            if not (embed_db or embed_broker):
                print(
                    f"services: {env_var('database_url')} and {env_var('broker_url')} "
                    "(no embedded services)"
                )
                return _run(args, settings, guard)
            print(
                "services: embedded "
                + " and ".join(
                    name
                    for name, on in (("PostgreSQL", embed_db), ("Redis (fakeredis)", embed_broker))
                    if on
                )
                + f" (set {env_var('database_url')} / {env_var('broker_url')} to use real ones)"
            )
            services = EmbeddedServices(postgres=embed_db, redis=embed_broker, guard=guard)
            try:
                services.start()
                changes: dict[str, Any] = {}
                if services.database_url:
                    changes["database_url"] = services.database_url
                if services.broker_url:
                    changes["broker_url"] = services.broker_url
                return _run(args, settings.with_changes(**changes), guard)
            finally:
                services.stop()
                print("embedded services stopped, their data removed")
        finally:
            guard.close()


def _run(args: argparse.Namespace, settings: Settings, guard: Guard) -> int:
    from sqlalchemy import event as sqlalchemy_event
    from sqlalchemy.orm import Session

    from outbox_tasks.cli import _alembic_config
    from outbox_tasks.consumer import (
        Consumer,
        ConsumerGroup,
        Event,
        declare_topology,
        delete_topology,
    )
    from outbox_tasks.db import make_engine
    from outbox_tasks.schema import OutboxMessage

    explicit_metrics = bool(os.environ.get(env_var("metrics_port"), "").strip())
    metrics_port = _usable_port(settings.metrics_port, "metrics", explicit_metrics)
    if metrics_port != settings.metrics_port:
        settings = settings.with_changes(metrics_port=metrics_port)
    flower_port = _usable_port(
        5555 if args.flower_port is None else args.flower_port,
        "Flower",
        explicit=args.flower_port is not None,
    )

    _ensure_database(settings)
    from alembic import command

    command.upgrade(_alembic_config(settings), "head")
    print("database migrated")

    engine = make_engine(settings, application_name="outbox_tasks.demo")
    DemoBase.metadata.create_all(engine)  # the demo's own business table, not the outbox

    workdir = Path(tempfile.mkdtemp(prefix="outbox-demo-"))
    guard.remove(workdir)
    env = _celery_env(settings)
    celery = [sys.executable, "-m", "celery", "-A", "outbox_tasks"]
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(name: str, argv: list[str]) -> None:
        log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            start_new_session=True,  # Ctrl-C is ours: we stop them in order (warm shutdown)
        )
        guard.kill_group(proc.pid)
        procs.append((name, proc))

    tally = _Tally()
    stop_producing = threading.Event()
    stop_consuming = threading.Event()
    last_seq: dict[str, int] = {}

    def on_event(event: Event, session: Session) -> None:
        """The demo's consumer-group handler: ship the order. Its receipt commits with it, so a
        redelivered event is skipped by the group and never ships twice."""
        session.add(
            DemoShipment(
                event_id=event.id, order_id=int(event.aggregate_id), event_type=event.event_type
            )
        )
        session.flush()
        latency = (datetime.now(UTC) - event.occurred_at).total_seconds()

        def counted() -> None:
            with tally.lock:
                tally.consumed += 1
                tally.latencies.append(latency)
                key = event.aggregate_id
                if event.sequence < last_seq.get(key, -1):
                    tally.order_violations += 1
                last_seq[key] = max(last_seq.get(key, -1), event.sequence)

        # Count only what committed.
        sqlalchemy_event.listen(session, "after_commit", lambda _s: counted(), once=True)

    group = ConsumerGroup(
        name=f"demo-{uuid.uuid4().hex[:6]}", bindings=("Order.*",), handler=on_event
    )
    declare_topology(group, settings=settings)
    group_consumer = Consumer(group, settings)
    consumer = threading.Thread(target=group_consumer.run, args=(stop_consuming,), daemon=True)

    def produce() -> None:
        interval = 1.0 / max(args.rate, 0.1)
        next_at = time.monotonic()
        n = 0
        while not stop_producing.is_set():
            with Session(engine) as session, session.begin():
                order = DemoOrder(customer=f"customer-{n % 97}", amount=Decimal("19.90"))
                session.add(order)
                session.flush()
                session.add(
                    OutboxMessage(
                        aggregate_type="Order",
                        aggregate_id=order.id,
                        event_type="OrderPlaced",
                        payload={"order_id": order.id, "amount": "19.90"},
                    )
                )
                session.add(
                    OutboxMessage(
                        aggregate_type="Order",
                        aggregate_id=order.id,
                        event_type="OrderConfirmed",
                        payload={"order_id": order.id},
                    )
                )
            with tally.lock:
                tally.written += 2
            n += 1
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                stop_producing.wait(delay)

    producer = threading.Thread(target=produce, daemon=True)
    interrupted = False
    started = time.monotonic()
    previous = (started, 0)

    def pending() -> int:
        from sqlalchemy import text

        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                ).scalar_one()
            )

    def progress(final: bool = False) -> None:
        nonlocal previous
        now = time.monotonic()
        with tally.lock:
            written, consumed = tally.written, tally.consumed
            lat = sorted(tally.latencies[-2000:])
        rate = (consumed - previous[1]) / max(now - previous[0], 1e-6)
        previous = (now, consumed)
        p50 = f"{lat[len(lat) // 2] * 1000:.0f}ms" if lat else "-"
        p99 = f"{lat[int(len(lat) * 0.99)] * 1000:.0f}ms" if lat else "-"
        line = (
            f"t={now - started:5.1f}s written={written} consumed={consumed} "
            f"pending={pending()} rate={rate:.0f}/s latency p50={p50} p99={p99} "
            f"dup={group_consumer.outcomes['duplicate']} "
            f"order-violations={tally.order_violations}"
        )
        if args.no_tty or final or not sys.stdout.isatty():
            print(line, flush=True)
        else:
            print("\r" + line.ljust(120), end="", flush=True)

    published_metric: float | None = None
    try:
        consumer.start()
        if not group_consumer.ready.wait(30):
            raise SystemExit("outbox-tasks demo: the consumer group could not start")
        spawn(
            "worker",
            [*celery, "worker", "-c", str(args.workers), "-n", "demo@%h", "--loglevel", "INFO"],
        )
        spawn("beat", [*celery, "beat", "--loglevel", "INFO", "-s", str(workdir / "beat-schedule")])
        if settings.metrics_port:
            print(
                f"metrics: http://127.0.0.1:{settings.metrics_port}/metrics  (workers, Prometheus)"
            )
        password = secrets.token_hex(8)
        if flower_port:
            spawn(
                "flower",
                [
                    *celery,
                    "flower",
                    f"--port={flower_port}",
                    "--address=127.0.0.1",
                    f"--basic-auth=demo:{password}",
                ],
            )
            print(f"Flower: http://127.0.0.1:{flower_port}  (user demo, password {password})")
        print(f"logs: {workdir}")
        _wait_ready(procs, workdir)
        print(
            f"producing {args.rate:g} orders/s (2 events each)"
            + (f" for {args.duration:g}s" if args.duration > 0 else "; Ctrl-C stops"),
            flush=True,
        )
        started = time.monotonic()
        previous = (started, 0)
        producer.start()
        while args.duration <= 0 or time.monotonic() - started < args.duration:
            time.sleep(1.0)
            progress()
            for name, proc in procs:
                if proc.poll() is not None:
                    raise SystemExit(
                        f"outbox-tasks demo: {name} exited; see {workdir / (name + '.log')}"
                    )
    except KeyboardInterrupt:
        interrupted = True
        print("\nstopping: draining what was written (Ctrl-C again skips the wait)...")
    finally:
        stop_producing.set()
        try:
            if producer.is_alive():
                producer.join(10)
            deadline = time.monotonic() + 60
            while procs and time.monotonic() < deadline:
                with tally.lock:
                    done = tally.consumed >= tally.written
                if done:
                    break
                time.sleep(0.2)
        except KeyboardInterrupt:
            interrupted = True
            print("\nstopping without waiting for the rest")
        with no_interrupts():
            progress(final=True)
            if settings.metrics_port and procs:
                published_metric = _scrape(settings.metrics_port, "outbox_messages_published_total")
            for _name, proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for _name, proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            stop_consuming.set()
            consumer.join(10)
            tally.duplicates = group_consumer.outcomes["duplicate"]
            try:
                delete_topology(group, settings=settings)
            except Exception:
                print(f"note: could not delete the demo group's queues ({group.name})")
            engine.dispose()
    ok = tally.consumed == tally.written and tally.order_violations == 0
    # Stopped by a second Ctrl-C before the rest arrived: not a failure of the relay.
    cut_short = interrupted and not ok and tally.order_violations == 0
    if published_metric is not None:
        print(f"metrics: outbox_messages_published_total={published_metric:.0f}")
    verdict = "OK" if ok else "stopped early" if cut_short else "FAILED"
    print(
        f"demo {verdict}: {tally.written} events written, {tally.consumed} "
        f"consumed, {tally.duplicates} duplicates, {tally.order_violations} order violations"
    )
    if ok or cut_short:
        shutil.rmtree(workdir, ignore_errors=True)
        return 0
    print(f"logs kept in {workdir}")
    return 1
