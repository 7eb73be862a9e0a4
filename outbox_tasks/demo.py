"""``outbox-tasks demo``: the whole system, live, on the services named by ``OUTBOX_*``.

It creates the database if needed, migrates it, starts real Celery workers, beat and Flower,
writes orders (business row + outbox row in one transaction), consumes the events from a queue
bound to the exchange, and prints progress until the duration ends or Ctrl-C. Then it stops
everything cleanly and checks that every event written arrived, in order per aggregate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, Numeric, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from outbox_tasks.settings import Settings, env_var


class DemoBase(DeclarativeBase):
    pass


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
        "--rate", type=float, default=100, help="orders per second, 2 events each (default 100)"
    )
    demo.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    demo.add_argument("--flower-port", type=int, default=5555, help="Flower port (0: no Flower)")
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


def run_demo(args: argparse.Namespace) -> int:
    from kombu.connection import Connection
    from kombu.entity import Exchange, Queue
    from sqlalchemy.orm import Session

    from outbox_tasks.cli import _alembic_config
    from outbox_tasks.db import make_engine
    from outbox_tasks.schema import OutboxMessage

    settings = Settings.from_env()
    _ensure_database(settings)
    from alembic import command

    command.upgrade(_alembic_config(settings), "head")

    engine = make_engine(settings, application_name="outbox_tasks.demo")
    DemoBase.metadata.create_all(engine)  # the demo's own business table, not the outbox

    workdir = Path(tempfile.mkdtemp(prefix="outbox-demo-"))
    env = _celery_env(settings)
    celery = [sys.executable, "-m", "celery", "-A", "outbox_tasks"]
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(name: str, argv: list[str]) -> None:
        log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        procs.append(
            (
                name,
                subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=workdir,
                    start_new_session=True,
                ),
            )
        )

    exchange = Exchange(settings.exchange, type="topic", durable=True)
    queue = Queue(
        f"outbox.demo.{uuid.uuid4().hex[:8]}",
        exchange,
        routing_key="#",
        auto_delete=False,
        durable=True,
    )
    tally = _Tally()
    stop_producing = threading.Event()
    stop_consuming = threading.Event()
    last_seq: dict[str, int] = {}
    seen: set[str] = set()

    def on_message(body: Any, message: Any) -> None:
        data = json.loads(message.body)
        occurred = datetime.fromisoformat(data["occurred_at"])
        with tally.lock:
            if data["id"] in seen:
                tally.duplicates += 1
            else:
                seen.add(data["id"])
                tally.consumed += 1
                tally.latencies.append((datetime.now(UTC) - occurred).total_seconds())
                key = data["aggregate_id"]
                if data["sequence"] < last_seq.get(key, -1):
                    tally.order_violations += 1
                last_seq[key] = max(last_seq.get(key, -1), data["sequence"])
        message.ack()

    ready = threading.Event()

    def consume() -> None:
        with (
            Connection(settings.effective_publish_url) as conn,
            conn.Consumer([queue], callbacks=[on_message], accept=["json"]),
        ):
            ready.set()
            while not stop_consuming.is_set():
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:
                    continue

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

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    if not ready.wait(15):
        raise SystemExit("outbox-tasks demo: could not bind the demo queue on the broker")
    spawn(
        "worker",
        [*celery, "worker", "-c", str(args.workers), "-n", "demo@%h", "--loglevel", "INFO"],
    )
    spawn("beat", [*celery, "beat", "--loglevel", "INFO", "-s", str(workdir / "beat-schedule")])
    password = secrets.token_urlsafe(9)
    if args.flower_port:
        spawn(
            "flower",
            [
                *celery,
                "flower",
                f"--port={args.flower_port}",
                "--address=127.0.0.1",
                f"--basic-auth=demo:{password}",
            ],
        )
        print(f"Flower: http://127.0.0.1:{args.flower_port}  (user demo, password {password})")
    print(f"logs: {workdir}")
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()

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
            f"dup={tally.duplicates} order-violations={tally.order_violations}"
        )
        if args.no_tty or final or not sys.stdout.isatty():
            print(line, flush=True)
        else:
            print("\r" + line.ljust(120), end="", flush=True)

    previous_handler = signal.getsignal(signal.SIGINT)
    try:
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
        print("\nstopping: draining what was written...")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        stop_producing.set()
        producer.join(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with tally.lock:
                done = tally.consumed >= tally.written
            if done:
                break
            time.sleep(0.2)
        progress(final=True)
        for _name, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        stop_consuming.set()
        consumer.join(5)
        try:
            with Connection(settings.effective_publish_url) as conn:
                queue(conn.default_channel).delete()
        except Exception:
            print("note: could not delete the demo queue", queue.name)
        engine.dispose()
    ok = tally.consumed == tally.written and tally.order_violations == 0
    print(
        f"demo {'OK' if ok else 'FAILED'}: {tally.written} events written, {tally.consumed} "
        f"consumed, {tally.duplicates} duplicates, {tally.order_violations} order violations"
    )
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs kept in {workdir}")
    return 0 if ok or (interrupted and tally.order_violations == 0) else 1
