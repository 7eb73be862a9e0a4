"""The worker's Prometheus endpoint, scraped for real while it publishes (issue 5)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from outbox_tasks.settings import Settings
from tests.support.cluster import cluster, settings_env
from tests.support.kit import bulk_insert, collecting, pending_count, wait_until

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """Every sample of the endpoint, summed over label sets, keyed by sample name."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def test_published_total_rises_by_exactly_the_number_published_and_pending_falls_to_zero(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    port = free_port()
    settings = settings.with_changes(
        partitions=4, metrics_port=port, metrics_interval_seconds=0.5, poll_interval_seconds=0.5
    )
    with (
        collecting(settings.broker_url, settings.exchange) as consumer,
        cluster(settings, tmp_path) as c,
    ):
        worker = c.worker("w", concurrency=2)
        beat = c.beat()
        c.wait_ready(worker)
        c.wait_ready(beat)
        wait_until(
            lambda: "outbox_pending_messages" in scrape(port),
            timeout=20,
            what="first database snapshot",
        )
        before = scrape(port).get("outbox_messages_published_total", 0.0)
        bulk_insert(engine, 1234, 30)
        wait_until(
            lambda: (
                scrape(port).get("outbox_pending_messages") == 1234 or pending_count(engine) == 0
            ),
            timeout=20,
            what="backlog seen or drained",
        )
        wait_until(lambda: consumer.count() >= 1234, timeout=30, what="all published")
        wait_until(
            lambda: scrape(port).get("outbox_messages_published_total", 0) - before >= 1234,
            timeout=10,
            what="counter caught up",
        )
        metrics = scrape(port)
        assert metrics["outbox_messages_published_total"] - before == 1234
        wait_until(
            lambda: scrape(port).get("outbox_pending_messages") == 0,
            timeout=10,
            what="pending gauge at zero",
        )
        metrics = scrape(port)
        assert metrics["outbox_publish_latency_seconds_count"] >= 1234
        assert metrics["outbox_relay_last_success_timestamp_seconds"] > 0
        assert metrics.get("outbox_circuit_open", 0) == 0
        assert "outbox_partitions_unowned" in metrics
        # The wake-up listener is up, the snapshot is fresh and the relay is not stalled.
        assert metrics["outbox_wakeup_listening"] == 1
        assert time.time() - metrics["outbox_metrics_snapshot_timestamp_seconds"] < 30
        assert metrics["outbox_relay_stalled_seconds"] == 0
        # `outbox-tasks status` asks the running worker for its circuit (closed) and is healthy.
        done = subprocess.run(
            [sys.executable, "-m", "outbox_tasks.cli", "status", "--json"],
            env=settings_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        report = json.loads(done.stdout)
        assert done.returncode == 0, done.stderr
        assert report["circuits"] and not any(report["circuits"].values())
