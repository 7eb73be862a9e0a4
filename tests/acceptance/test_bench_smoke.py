"""CI's small version of the benchmarks (issues 6 and 12): they run end to end and count right.

No timing assertions (timing lives in docs/performance.md): the throughput bench with ~3 000
events, one repeat, Redis only, both systems (the limit and outbox_tasks through real celery
worker + beat); the latency bench for a few seconds at a low rate (the limit's latency relay
too); and ``python -m bench all`` with tiny sizes (every part of the table). Every event must be
counted at the broker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import cpu, latency, suite, throughput
from outbox_tasks.settings import Settings
from tests.support import services

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _services() -> None:
    for name, host, port in (
        ("PostgreSQL", "127.0.0.1", 5432),
        ("Redis", services.REDIS_HOST, services.REDIS_PORT),
    ):
        if not services.reachable(host, port):
            pytest.skip(f"{name} is not reachable at {host}:{port}")


def test_throughput_bench_counts_every_event_at_the_broker_for_both_systems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "throughput.json"
    code = throughput.main(
        [
            "--events",
            "3000",
            "--aggregates",
            "100",
            "--repeats",
            "1",
            "--brokers",
            "redis",
            "--workers",
            "1",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    data = json.loads(output.read_text())
    runs = data["runs"]
    assert {r["system"] for r in runs} == {"baseline", "outbox_tasks"}
    for run in runs:
        assert run["ok"], run
        assert run["counted"] == 3000, run
        assert run["pending_after"] == 0, run
        assert run["rate"] > 0
    mine = next(r for r in runs if r["system"] == "outbox_tasks")
    assert mine["duplicates"] == 0
    (summary,) = data["summary"]
    assert summary["system"] == "outbox_tasks" and summary["ratio"] is not None
    assert data["versions"]["libraries"]["celery"]
    # A new installation's settings unless told otherwise.
    assert data["settings"]["relay"]["batch_size"] == Settings().batch_size
    table = capsys.readouterr().out
    assert "| redis" in table and "ratio" in table


def test_latency_bench_delivers_every_committed_event_with_and_without_wakeup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "latency.json"
    code = latency.main(
        ["--rates", "50", "--duration", "3", "--workers", "1", "--output", str(output)]
    )
    assert code == 0
    data = json.loads(output.read_text())
    assert {r["wakeup"] for r in data["runs"]} == {True, False}
    for run in data["runs"]:
        assert run["produced"] == 50 * (3 + latency.WARMUP_SECONDS), run  # warm-up + steady
        assert run["received"] == run["produced"], run
        assert run["missing"] == 0
        assert run["p50_ms"] is not None and run["max_ms"] >= run["p50_ms"]
    assert "p99 ms" in capsys.readouterr().out


def test_the_whole_bench_in_one_command_counts_every_event_of_every_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "all.json"
    code = suite.main(
        [
            "--quick",
            "--events",
            "2000",
            "--aggregates",
            "100",
            "--brokers",
            "redis",
            "--workers",
            "1",
            "--rates",
            "50",
            "--duration",
            "2",
            "--latency-workers",
            "1",
            "--soak",
            "3",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    data = json.loads(output.read_text())
    parts = {(r["bench"], r["system"], r.get("wakeup")) for r in data["runs"]}
    assert parts == {
        ("throughput", "baseline", None),
        ("throughput", "outbox_tasks", None),
        ("latency", "outbox_tasks", True),
        ("latency", "outbox_tasks", False),
        ("latency", "baseline", True),
        ("soak", "outbox_tasks", True),
    }
    for run in data["runs"]:
        assert run["ok"], run
        if run["bench"] == "throughput":
            assert run["counted"] == 2000 and run["pending_after"] == 0, run
            assert run["memory_mib"]["rss"] > 0, run
        else:
            assert run["received"] == run["produced"] > 0 and run["duplicates"] == 0, run
    figures = [e["figure"] for e in data["summary"]]
    assert figures == ["throughput", "latency", "latency", "soak"]
    table = capsys.readouterr().out
    for measure in ("latency at 50/s", "throughput, Redis", "relay CPU", "resident memory"):
        assert measure in table


def test_the_cpu_bench_drains_every_event_in_process_and_reports_its_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "cpu.json"
    assert cpu.main(["--events", "600", "--profile", "5", "--output", str(output)]) == 0
    (run,) = json.loads(output.read_text())["runs"]
    assert run["events"] == 600 and run["cpu_us_per_message"] > 0
    assert "tottime" in capsys.readouterr().out
