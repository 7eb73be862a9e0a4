"""Issue 11, items 3 and 6, on a real worker: every publish error type is served at 0 from the
first scrape, and a pool process killed while its broker circuit was open leaves no open circuit
behind on the endpoint or in `outbox-tasks status` once the broker is back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from outbox_tasks.metrics import PUBLISH_ERROR_TYPES
from outbox_tasks.settings import Settings
from tests.acceptance.test_metrics_endpoint import free_port
from tests.support.cluster import cluster, settings_env
from tests.support.kit import bulk_insert, pending_count, wait_until
from tests.support.tcpproxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def circuit(port: int) -> float | None:
    return samples(port).get(("outbox_circuit_open", ()))


def test_a_pool_process_killed_with_its_circuit_open_leaves_no_open_circuit_behind(
    settings: Settings,
    engine: Engine,
    tmp_path: Path,
    tcp_proxy: Callable[[str, int], TcpProxy],
) -> None:
    port = free_port()
    proxy = tcp_proxy("127.0.0.1", 6379)
    host, proxy_port = proxy.address
    settings = settings.with_changes(
        partitions=2,
        metrics_port=port,
        poll_interval_seconds=0.5,
        lease_seconds=3,
        publish_url=f"redis://{host}:{proxy_port}/{settings.broker_url.rsplit('/', 1)[1]}",
    )
    with cluster(settings, tmp_path) as c:
        worker = c.worker("w", concurrency=2)
        beat = c.beat()
        c.wait_ready(worker)
        c.wait_ready(beat)

        # Item 6: every known error type is there, at 0, before anything happened.
        first = samples(port)
        for error_type in PUBLISH_ERROR_TYPES:
            assert first[("outbox_publish_errors_total", (("error_type", error_type),))] == 0

        proxy.cut()
        bulk_insert(engine, 50, 5)
        wait_until(lambda: circuit(port) == 1, timeout=30, what="a circuit open in the pool")

        # Every pool process dies with its circuit open; the pool replaces them.
        children = worker.pool_children()
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: len(set(worker.pool_children()) - set(children)) == 2,
            timeout=30,
            what="the pool replaced its processes",
        )
        proxy.restore()
        wait_until(lambda: pending_count(engine) == 0, timeout=60, what="the backlog published")

        assert circuit(port) in (None, 0.0)
        done = subprocess.run(
            [sys.executable, "-m", "outbox_tasks.cli", "status", "--json"],
            env=settings_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        report = json.loads(done.stdout)
        assert done.returncode == 0, done.stdout + done.stderr
        assert not any((report["circuits"] or {}).values())
