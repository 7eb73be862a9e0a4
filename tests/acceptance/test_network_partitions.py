"""Silent network partitions (issue 13): every connection path of a running relay is
blackholed for 30 s, then restored, while a producer writes 20 events/s over 100 aggregates.

A blackhole keeps the TCP connection open and acknowledged and forwards nothing, as a
middlebox does that answers for the peer (PgBouncer, a load balancer, a NAT that lost its
state); after the restore the connections it held stay silent for ever (only new connections
work), so a client recovers only if every one of its waits has a deadline. The cut (connections
reset, port refusing) is the control.

One worker (``-c 2``) and beat, with the default timeouts, lease and poll interval (what a new
user runs). After the restore every committed event arrives within 15 s (database, Celery
broker) or 10 s (the event broker), nothing is lost, no retry is spent, every duplicate says
``outbox-redelivered``, per-aggregate order holds, and no pool process is left blocked in a
task. Each case prints its recovery time (run with ``-s``).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks.settings import Settings
from tests.support.cluster import CELERY, Cluster, Proc, cluster, settings_env
from tests.support.faults import (
    actions,
    bulk_collecting,
    count_action,
    double_marks,
    install_audit,
    outbox_totals,
    producing,
    retry_increments,
    via,
)
from tests.support.kit import Collector, collecting, pending_count, wait_until
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.slow

OUTAGE = 30.0
# A task running longer than this after the recovery is a pool process left blocked.
BLOCKED_AFTER = 20.0


@dataclass(frozen=True)
class Route:
    """One connection path: which service the proxy stands in front of, which setting of the
    worker and beat points at the proxy, and how soon everything must arrive after the
    restore."""

    name: str
    port: int
    setting: str
    bound: float
    amqp: bool = False


DATABASE = Route("database", 5432, "database_url", 15.0)
CELERY_BROKER = Route("Celery broker (Redis)", 6379, "broker_url", 15.0)
EVENT_BROKER_REDIS = Route("event broker (Redis)", 6379, "publish_url", 10.0)
EVENT_BROKER_AMQP = Route("event broker (RabbitMQ)", 5672, "publish_url", 10.0, amqp=True)
WAKEUP = Route("wake-up connection", 5432, "wakeup_database_url", 15.0)

PATHS = [DATABASE, CELERY_BROKER, EVENT_BROKER_REDIS, EVENT_BROKER_AMQP, WAKEUP]


def path_id(path: Route) -> str:
    return path.name.split(" (")[0].replace(" ", "-").lower() + ("-amqp" if path.amqp else "")


# --- checks ------------------------------------------------------------------------------------


def all_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {str(r[0]) for r in conn.execute(text("SELECT id FROM outbox"))}


def drained(engine: Engine, consumer: Collector, total: int) -> bool:
    return len(consumer.unique_ids()) >= total and pending_count(engine) == 0


def unmarked_duplicates(consumer: Collector) -> list[tuple[str, int]]:
    """Later copies of an id that do not say ``outbox-redelivered: true``."""
    seen: set[str] = set()
    unmarked = []
    for m in consumer.snapshot():
        if m.id in seen and m.headers.get("outbox-redelivered") is not True:
            unmarked.append((m.id, m.sequence))
        seen.add(m.id)
    return unmarked


def active_tasks(settings: Settings, workdir: Path) -> dict[str, list[dict[str, Any]]]:
    """``celery inspect active``: per worker, the tasks its pool processes are running."""
    result = subprocess.run(
        [*CELERY, "inspect", "active", "--json", "--timeout", "5"],
        env=settings_env(settings),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"inspect active gave no answer: {result.stdout}\n{result.stderr}"
    answer: dict[str, list[dict[str, Any]]] = json.loads(lines[-1])
    return answer


def blocked_tasks(settings: Settings, workdir: Path) -> list[str]:
    """Tasks that have been running for longer than BLOCKED_AFTER (``time_start`` is Unix
    time)."""
    now = time.time()
    return [
        f"{worker}: {task['name']} pid {task.get('worker_pid')} for "
        f"{now - float(task['time_start']):.0f} s"
        for worker, tasks in active_tasks(settings, workdir).items()
        for task in tasks
        if task.get("time_start") and now - float(task["time_start"]) > BLOCKED_AFTER
    ]


# --- the scenario ------------------------------------------------------------------------------


@contextmanager
def consumer_for(settings: Settings) -> Iterator[Collector]:
    url = settings.effective_publish_url
    if url.startswith("amqp"):
        with collecting(url, settings.exchange) as consumer:
            yield consumer
    else:
        with bulk_collecting(url, settings.exchange) as consumer:
            yield consumer


def start(c: Cluster, settings: Settings) -> tuple[Proc, Proc]:
    worker = c.worker("worker", concurrency=2, settings=settings)
    beat = c.beat(settings=settings)
    c.wait_ready(worker)
    c.wait_ready(beat)
    if settings.wakeup_enabled:
        wait_until(lambda: "wakeup_listening" in worker.log(), timeout=20, what="the listener")
    return worker, beat


@pytest.mark.parametrize("fault", ["blackhole", "cut"])
@pytest.mark.parametrize("path", PATHS, ids=path_id)
def test_after_thirty_seconds_of_partition_everything_committed_arrives_soon_and_once(
    path: Route,
    fault: str,
    settings: Settings,
    engine: Engine,
    tmp_path: Path,
    tcp_proxy: Any,
    request: pytest.FixtureRequest,
) -> None:
    if path.amqp:
        amqp_url: str = request.getfixturevalue("amqp_url")
        settings = settings.with_changes(publish_url=amqp_url)
    # Events go straight to their broker unless that is the path under test.
    settings = settings.with_changes(
        partitions=4, batch_size=100, publish_url=settings.effective_publish_url
    )
    proxy: TcpProxy = tcp_proxy("127.0.0.1", path.port)
    host, port = proxy.address
    direct = {
        "database_url": settings.database_url,
        "broker_url": settings.broker_url,
        "publish_url": settings.effective_publish_url,
        "wakeup_database_url": settings.database_url,
    }[path.setting]
    relay = settings.with_changes(**{path.setting: via(direct, host, port)})
    install_audit(engine)

    with consumer_for(settings) as consumer, cluster(relay, tmp_path) as c:
        worker, beat = start(c, relay)
        pool = worker.pool_children()
        with producing(engine, aggregates=100, per_transaction=2, interval=0.1) as producer:
            wait_until(lambda: consumer.count() >= 40, timeout=30, what="events flowing")
            wakeups_before = count_action([worker], "wakeup_listening")

            if fault == "blackhole":
                proxy.blackhole()
            else:
                proxy.cut()
            began = time.monotonic()
            received_at_fault = consumer.count()
            time.sleep(max(0.0, OUTAGE - (time.monotonic() - began)))
            received_during = consumer.count() - received_at_fault
            # After a blackhole the connections it held stay silent: only new ones work.
            proxy.restore(revive_held=fault != "blackhole")
            restored = time.monotonic()
            ids = producer.stop()
        total = len(ids)
        pending_at_restore = pending_count(engine)

        wait_until(
            lambda: drained(engine, consumer, total),
            timeout=path.bound + 20,
            interval=0.2,
            what=f"all {total} events published",
        )
        recovery = time.monotonic() - restored
        if path is WAKEUP:
            wait_until(
                lambda: count_action([worker], "wakeup_listening") > wakeups_before,
                timeout=15,
                what="the wake-up listener back",
            )
        listener_back = time.monotonic() - restored
        # A pool process caught in the partition is freed by its own deadline (statement
        # timeout + grace, 35 s by default, counted from the partition), which may come a few
        # seconds after the restore: "left blocked" means still running once that has passed.
        blocked: list[str] = []

        def none_blocked() -> bool:
            blocked[:] = blocked_tasks(relay, tmp_path)
            return not blocked

        with contextlib.suppress(AssertionError):
            wait_until(none_blocked, timeout=BLOCKED_AFTER, interval=1.0, what="no blocked task")

        print(
            f"\n{path.name}, {fault} for {OUTAGE:.0f} s: {total} events written, "
            f"{received_during} arrived during the fault, {pending_at_restore} pending at the "
            f"restore; all arrived {recovery:.1f} s after the restore (bound {path.bound:.0f} s); "
            f"duplicates {consumer.duplicates()}; "
            f"database_deadline {count_action([worker, beat], 'database_deadline')}, "
            f"database_unavailable {count_action([worker], 'database_unavailable')}, "
            f"circuit_open {count_action([worker], 'circuit_open')}, "
            f"wakeup_listener_error {count_action([worker], 'wakeup_listener_error')}; "
            f"pool {pool} -> {worker.pool_children()}"
            + (f"; listener back after {listener_back:.1f} s" if path is WAKEUP else "")
        )
        assert recovery <= path.bound, f"recovery took {recovery:.1f} s > {path.bound} s"
        assert worker.alive() and beat.alive()
        assert blocked == [], blocked
        assert retry_increments(engine) == []
        totals = outbox_totals(engine)
        assert totals["pending"] == 0 and totals["retried"] == 0, totals
        assert totals["dead_lettered"] == 0, totals
        missing = all_ids(engine) - consumer.unique_ids()
        assert not missing, f"{len(missing)} committed events never arrived"
        assert consumer.order_violations() == []
        assert unmarked_duplicates(consumer) == []
        assert double_marks(engine) == []
        unexpected = [a for a in actions(worker) if a.get("level") == "error"]
        assert unexpected == [], unexpected[:3]
        if path is WAKEUP:
            assert count_action([worker], "wakeup_listener_error") >= 1
            assert listener_back <= 15.0
