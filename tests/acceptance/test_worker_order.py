"""Order through real Celery worker processes and beat (DESIGN 2.3, issue test 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from outbox_tasks.settings import Settings
from tests.support.cluster import cluster
from tests.support.kit import bulk_insert, collecting, pending_count, wait_until

pytestmark = pytest.mark.slow


def test_events_of_every_aggregate_arrive_in_sequence_order_through_three_workers(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    settings = settings.with_changes(partitions=6, batch_size=50, poll_interval_seconds=0.5)
    with (
        collecting(settings.broker_url, settings.exchange) as consumer,
        cluster(settings, tmp_path) as c,
    ):
        workers = [c.worker(f"w{i}") for i in range(3)]
        beat = c.beat()
        for proc in [*workers, beat]:
            c.wait_ready(proc)
        bulk_insert(engine, 2000, 50)
        wait_until(lambda: consumer.count() >= 2000, timeout=60, what="2000 events at the queue")
        wait_until(lambda: pending_count(engine) == 0, timeout=10, what="all rows marked")
        assert consumer.order_violations() == []
        assert len(consumer.unique_ids()) == 2000
        assert consumer.duplicates() == 0
        # Every worker process took part: partitions really spread over the pool.
        assert all("outbox.publish" in w.log() for w in workers), c.logs()
