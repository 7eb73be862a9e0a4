"""Metrics tell the truth from the first scrape to the last: every known counter label starts at
0 (issue 11, item 6) and a pool process that died leaves no gauge behind (item 3)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from outbox_tasks.metrics import (
    PUBLISH_ERROR_TYPES,
    PoolCollector,
    RelayMetrics,
    pid_alive,
    pool_gauge,
    prune_dead_processes,
)

pytestmark = pytest.mark.timeout(60)


def _scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_every_publish_error_type_is_exported_at_zero_before_any_error() -> None:
    registry = CollectorRegistry()
    RelayMetrics(registry)

    text = _scrape(registry)

    for error_type in PUBLISH_ERROR_TYPES:
        assert f'outbox_publish_errors_total{{error_type="{error_type}"}} 0.0' in text
    assert "outbox_lease_lost_total 0.0" in text


def test_an_error_counts_from_zero_and_the_other_types_stay_at_zero() -> None:
    registry = CollectorRegistry()
    metrics = RelayMetrics(registry)

    metrics.message_failed("message_rejected")

    text = _scrape(registry)
    assert 'outbox_publish_errors_total{error_type="message_rejected"} 1.0' in text
    assert 'outbox_publish_errors_total{error_type="broker_unavailable"} 0.0' in text


# A pool process: records its metrics in the shared directory as a worker's child does, opens
# its circuit, says so, and waits to be killed.
POOL_PROCESS = textwrap.dedent(
    """
    import sys, time
    from prometheus_client import CollectorRegistry
    from outbox_tasks.metrics import RelayMetrics, enable_multiprocess

    enable_multiprocess(sys.argv[1])
    metrics = RelayMetrics(CollectorRegistry())
    metrics.circuit_changed(True)
    metrics.message_failed("message_rejected")
    print("open", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def pool_process(directory: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", POOL_PROCESS, str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "open"
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_a_killed_pool_process_leaves_no_open_circuit_in_the_status_reading(
    directory: Path, pool_process: subprocess.Popen[str]
) -> None:
    assert pool_gauge(str(directory), "outbox_circuit_open") == 1.0

    os.kill(pool_process.pid, signal.SIGKILL)
    pool_process.wait()

    assert pool_gauge(str(directory), "outbox_circuit_open") is None


def test_a_killed_pool_process_is_dropped_even_before_it_is_reaped(
    directory: Path, pool_process: subprocess.Popen[str]
) -> None:
    os.kill(pool_process.pid, signal.SIGKILL)
    # Not waited for: the process is a zombie until its parent reaps it, as in a busy worker.
    while pid_alive(pool_process.pid):
        pass

    assert prune_dead_processes(str(directory)) == [pool_process.pid]
    assert pool_gauge(str(directory), "outbox_circuit_open") is None


def test_every_scrape_drops_the_gauges_of_processes_gone_since_the_last_one(
    directory: Path, pool_process: subprocess.Popen[str]
) -> None:
    registry = CollectorRegistry()
    registry.register(PoolCollector(str(directory)))
    assert "outbox_circuit_open 1.0" in _scrape(registry)

    pool_process.kill()
    pool_process.wait()

    text = _scrape(registry)
    assert "outbox_circuit_open 1.0" not in text
    # Its counters still count: what it did happened.
    assert 'outbox_publish_errors_total{error_type="message_rejected"} 1.0' in text


def test_a_process_the_pool_no_longer_lists_is_dropped_though_its_pid_still_runs(
    directory: Path, pool_process: subprocess.Popen[str]
) -> None:
    pool: set[int] = set()  # the worker's pool after it replaced that process

    assert pool_gauge(str(directory), "outbox_circuit_open", alive=pool.__contains__) is None
    assert pool_process.poll() is None  # still running: only the pool's word counted


def test_a_live_pool_process_keeps_its_gauge(
    directory: Path, pool_process: subprocess.Popen[str]
) -> None:
    assert prune_dead_processes(str(directory)) == []
    assert pool_gauge(str(directory), "outbox_circuit_open") == 1.0


def test_pruning_a_directory_that_is_gone_does_nothing(tmp_path: Path) -> None:
    assert prune_dead_processes(str(tmp_path / "missing")) == []


def test_pid_alive_tells_a_running_process_from_a_finished_one() -> None:
    assert pid_alive(os.getpid())
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    assert not pid_alive(finished.pid)


def test_a_consumer_groups_outcomes_are_exported_at_zero_once_it_processes() -> None:
    from types import SimpleNamespace
    from typing import Any

    from outbox_tasks.consumer.metrics import ConsumerMetrics
    from outbox_tasks.consumer.processing import OUTCOMES, GroupProcessor

    registry = CollectorRegistry()
    metrics = ConsumerMetrics(registry)
    group: Any = SimpleNamespace(name="billing")
    engine: Any = None
    sink: Any = None

    GroupProcessor(group, engine, sink, metrics=metrics)

    text = _scrape(registry)
    for outcome in OUTCOMES:
        assert f'outbox_consumer_messages_total{{group="billing",outcome="{outcome}"}} 0.0' in text
