"""Issue 11, item 4: two deployments (each its own outbox database, each configured only with
its URLs) on ONE Redis database drain as fast as alone, never acting on each other's tasks; two
databases given the same OUTBOX_NAMESPACE on one broker stop the second worker at start."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy.engine import Engine

from outbox_tasks.db import make_engine
from outbox_tasks.settings import Settings
from tests.support import services
from tests.support.cluster import CELERY, Cluster, cluster, settings_env
from tests.support.kit import bulk_insert, pending_count, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EVENTS = 300


@pytest.fixture
def second_database(template_db: str) -> Iterator[str]:
    with services.fresh_database(template_db) as url:
        yield url


def _deployment(settings: Settings, database_url: str) -> Settings:
    # Only the URLs differ: the namespace follows the database name by itself.
    return settings.with_changes(database_url=database_url, poll_interval_seconds=0.5)


def _start(c: Cluster, name: str, settings: Settings, queues: str | None = None) -> None:
    worker = c.worker(f"{name}-worker", concurrency=2, settings=settings, queues=queues)
    beat = c.beat(f"{name}-beat", settings=settings)
    c.wait_ready(worker)
    c.wait_ready(beat)


def _drain_seconds(engines: list[Engine]) -> float:
    started = time.monotonic()
    for engine in engines:
        bulk_insert(engine, EVENTS, 20)
    wait_until(
        lambda: all(pending_count(e) == 0 for e in engines),
        timeout=90,
        what=f"{EVENTS} events drained in each database",
    )
    return time.monotonic() - started


def test_two_deployments_on_one_redis_database_drain_as_fast_as_alone(
    settings: Settings, second_database: str, tmp_path: Path
) -> None:
    a = _deployment(settings, settings.database_url)
    b = _deployment(settings, second_database)
    assert a.broker_url == b.broker_url
    assert a.namespace != b.namespace  # each its database's name
    engine_a = make_engine(a, application_name="tests.deployments")
    engine_b = make_engine(b, application_name="tests.deployments")
    (tmp_path / "alone").mkdir()
    (tmp_path / "shared").mkdir()
    try:
        with cluster(a, tmp_path / "alone") as c:
            _start(c, "a", a)
            alone = _drain_seconds([engine_a])
        with cluster(a, tmp_path / "shared") as c:
            _start(c, "a", a)
            # The operators' queue names work as -Q on the shared broker too.
            _start(c, "b", b, queues="outbox.claim,outbox.publish,outbox.maintenance")
            together = _drain_seconds([engine_a, engine_b])
            logs = c.logs()
    finally:
        engine_a.dispose()
        engine_b.dispose()

    assert together <= max(3 * alone, alone + 5), f"alone {alone:.1f} s, together {together:.1f} s"
    assert "lease_stale" not in logs
    assert "foreign_task" not in logs


def test_two_databases_with_one_namespace_on_one_broker_stop_the_second_worker_at_start(
    settings: Settings, second_database: str, tmp_path: Path
) -> None:
    a = settings.with_changes(namespace="shared")
    b = settings.with_changes(database_url=second_database, namespace="shared")
    with cluster(a, tmp_path) as c:
        worker = c.worker("a-worker", settings=a)
        c.wait_ready(worker)
        # A task of another deployment that reached this worker's queue is not acted on.
        intruder = Celery(broker=a.broker_url)
        intruder.send_task(
            "outbox.claim", queue="outbox.claim.shared", headers={"outbox_namespace": "other"}
        )
        wait_until(lambda: "foreign_task" in worker.log(), timeout=20, what="the task refused")
        assert "sent by deployment 'other'; this worker is 'shared'" in worker.log()
        second = subprocess.run(
            [*CELERY, "worker", "-n", "b@%h", "-c", "1", "--without-gossip", "--without-mingle"],
            env=settings_env(b),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )

    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if "configuration error" in line]
    assert len(errors) == 1, second.stderr[-3000:]
    assert (
        "OUTBOX_NAMESPACE='shared' is already used on this broker by another database"
        in (errors[0])
    )
    assert "give each deployment sharing the broker its own OUTBOX_NAMESPACE" in errors[0]
