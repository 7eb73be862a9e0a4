"""Serving publish tasks and a worker's warm shutdown (docs/relay.md, "Serving"): a worker that
serves a steady stream hands every lease back when it is told to stop, instead of serving out
its budget and passing the leases on to a continuation it will never run (those would sit,
live and queued, until a claim finds them late)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks.settings import Settings
from outbox_tasks.store.records import QUEUED_PREFIX
from tests.support.cluster import cluster
from tests.support.kit import collecting, wait_until
from tests.support.producer import producing


def live_leases(engine: Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT partition, owner FROM outbox_partition "
                "WHERE leased_until > clock_timestamp() ORDER BY partition"
            )
        ).all()
    return [(row.partition, row.owner or "") for row in rows]


def test_a_warm_shutdown_of_a_serving_worker_hands_every_lease_back_and_queues_no_continuation(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    # A long budget: without the shutdown flag, the serving task would keep its leases for up
    # to 20 s after SIGTERM and then pass them on, live, to a continuation nobody runs.
    serving = settings.with_changes(
        partitions=2, poll_interval_seconds=1.0, publish_task_seconds=20.0, lease_seconds=60.0
    )
    with (
        collecting(serving.broker_url, serving.exchange) as consumer,
        cluster(serving, tmp_path) as c,
        producing(engine, aggregates=10, per_transaction=1, interval=0.02, prefix="S"),
    ):
        worker = c.worker("w1", concurrency=1, settings=serving)
        c.wait_ready(worker)
        wait_until(
            lambda: consumer.count() >= 50 and len(live_leases(engine)) == 2,
            timeout=30,
            what="the worker serving both partitions of a steady stream",
        )
        served_by = {owner for _, owner in live_leases(engine)}
        assert all(not owner.startswith(QUEUED_PREFIX) for owner in served_by), served_by

        # Billiard may wait up to 30 s at exit for its parent; the leases are what matter.
        worker.stop(timeout=40)

        left = live_leases(engine)
        assert left == [], f"leases still live after the worker stopped: {left}"
