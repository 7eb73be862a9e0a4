"""``outbox-tasks demo``: the whole system, live, with nothing installed but Python.

Services: when ``OUTBOX_DATABASE_URL`` is not set it starts an embedded PostgreSQL, when
``OUTBOX_BROKER_URL`` is not set an embedded Redis-compatible server (fakeredis); see
:mod:`outbox_tasks.demo.embedded`. With the variables set it uses those services.

It creates the database if needed, migrates it, starts real Celery workers (with the metrics
endpoint), beat and Flower, writes orders (business row + outbox row in one transaction),
consumes the events from a queue bound to the exchange, and prints progress until the duration
ends or Ctrl-C (or SIGTERM). Then it stops everything cleanly, checks that every event written
arrived, in order per aggregate, and removes the embedded services and their data.
"""

from __future__ import annotations

import dataclasses
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
from decimal import Decimal
from pathlib import Path
from typing import Any

from outbox_tasks.demo.embedded import EmbeddedServices
from outbox_tasks.demo.environment import (
    celery_env,
    ensure_database,
    scrape,
    sigterm_as_interrupt,
    usable_port,
    wait_ready,
)
from outbox_tasks.demo.guard import Guard
from outbox_tasks.demo.latency import CommitToArrival, format_ms
from outbox_tasks.demo.models import DemoBase, DemoOrder, DemoShipment
from outbox_tasks.demo.processes import no_interrupts
from outbox_tasks.settings import Settings, env_var


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """What ``outbox-tasks demo`` was asked for."""

    duration: float = 0.0
    """Seconds to produce before draining and stopping (0: until Ctrl-C)."""
    rate: float = 40.0
    """Orders per second, two events each."""
    workers: int = 2
    """Celery worker processes."""
    flower_port: int | None = None
    """Flower's port; None: 5555, or a free port when 5555 is taken; 0: no Flower."""
    no_tty: bool = False
    """Plain progress lines, no redraw."""


@dataclasses.dataclass
class _Tally:
    written: int = 0
    consumed: int = 0
    duplicates: int = 0
    order_violations: int = 0
    latency: CommitToArrival = dataclasses.field(default_factory=CommitToArrival)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def run_demo(settings: Settings, options: DemoOptions) -> int:
    """Run the demo with ``settings`` (loaded, so checked, before anything starts); its exit
    code: 0 when every event written arrived in order (or a second Ctrl-C cut it short)."""
    embed_db = not os.environ.get(env_var("database_url"), "").strip()
    embed_broker = not os.environ.get(env_var("broker_url"), "").strip()
    with sigterm_as_interrupt():
        guard = Guard()
        try:
            if not (embed_db or embed_broker):
                print(
                    f"services: {env_var('database_url')} and {env_var('broker_url')} "
                    "(no embedded services)"
                )
                return _run(options, settings, guard)
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
                return _run(options, settings.with_changes(**changes), guard)
            finally:
                services.stop()
                print("embedded services stopped, their data removed")
        finally:
            guard.close()


def _run(options: DemoOptions, settings: Settings, guard: Guard) -> int:
    from sqlalchemy import event as sqlalchemy_event
    from sqlalchemy.orm import Session

    from outbox_tasks import migrate
    from outbox_tasks.consumer import (
        Consumer,
        ConsumerGroup,
        Event,
        declare_topology,
        delete_topology,
    )
    from outbox_tasks.db import make_engine
    from outbox_tasks.schema import OutboxMessage
    from outbox_tasks.store.events import pending_count

    explicit_metrics = bool(os.environ.get(env_var("metrics_port"), "").strip())
    metrics_port = usable_port(settings.metrics_port, "metrics", explicit_metrics)
    if metrics_port != settings.metrics_port:
        settings = settings.with_changes(metrics_port=metrics_port)
    flower_port = usable_port(
        5555 if options.flower_port is None else options.flower_port,
        "Flower",
        explicit=options.flower_port is not None,
    )

    ensure_database(settings)
    migrate.upgrade(settings, "head")
    print("database migrated")

    engine = make_engine(settings, application_name="outbox_tasks.demo")
    DemoBase.metadata.create_all(engine)  # the demo's own business table, not the outbox

    workdir = Path(tempfile.mkdtemp(prefix="outbox-demo-"))
    guard.remove(workdir)
    env = celery_env(settings)
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
        arrived = time.time()  # at entry, before the handler's work, as the benchmark stamps
        with tally.lock:
            tally.latency.arrived(event.id, arrived)
        session.add(
            DemoShipment(
                event_id=event.id, order_id=int(event.aggregate_id), event_type=event.event_type
            )
        )
        session.flush()

        def counted() -> None:
            with tally.lock:
                tally.consumed += 1
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
        interval = 1.0 / max(options.rate, 0.1)
        next_at = time.monotonic()
        n = 0
        while not stop_producing.is_set():
            with Session(engine) as session:
                with session.begin():
                    order = DemoOrder(customer=f"customer-{n % 97}", amount=Decimal("19.90"))
                    session.add(order)
                    session.flush()
                    events = [
                        OutboxMessage(
                            aggregate_type="Order",
                            aggregate_id=order.id,
                            event_type="OrderPlaced",
                            payload={"order_id": order.id, "amount": "19.90"},
                        ),
                        OutboxMessage(
                            aggregate_type="Order",
                            aggregate_id=order.id,
                            event_type="OrderConfirmed",
                            payload={"order_id": order.id},
                        ),
                    ]
                    session.add_all(events)
                    session.flush()  # the ids are drawn (uuid4 column default) at flush
                    ids = [e.id for e in events]
                committed = time.time()  # when the commit returned, as the benchmark stamps
            with tally.lock:
                tally.written += 2
                for event_id in ids:
                    tally.latency.committed(event_id, committed)
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
        with engine.connect() as conn:
            return pending_count(conn)

    def progress(final: bool = False) -> None:
        nonlocal previous
        now = time.monotonic()
        with tally.lock:
            written, consumed = tally.written, tally.consumed
            p50, p95, p99 = map(format_ms, tally.latency.percentiles_ms(50, 95, 99))
        rate = (consumed - previous[1]) / max(now - previous[0], 1e-6)
        previous = (now, consumed)
        line = (
            f"t={now - started:5.1f}s written={written} consumed={consumed} "
            f"pending={pending()} rate={rate:.0f}/s "
            f"commit->arrival p50={p50} p95={p95} p99={p99} "
            f"dup={group_consumer.outcomes['duplicate']} "
            f"order-violations={tally.order_violations}"
        )
        if options.no_tty or final or not sys.stdout.isatty():
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
            [*celery, "worker", "-c", str(options.workers), "-n", "demo@%h", "--loglevel", "INFO"],
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
        wait_ready(procs, workdir)
        print(
            f"producing {options.rate:g} orders/s (2 events each)"
            + (f" for {options.duration:g}s" if options.duration > 0 else "; Ctrl-C stops"),
            flush=True,
        )
        started = time.monotonic()
        previous = (started, 0)
        producer.start()
        while options.duration <= 0 or time.monotonic() - started < options.duration:
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
                published_metric = scrape(settings.metrics_port, "outbox_messages_published_total")
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
