"""Cleanup throughput, and what it does to producers: ``python -m bench.cleanup --rows 1000000``.

In a fresh database (created on the server of ``OUTBOX_TEST_PG_URL``, migrated, dropped at the
end unless ``--keep``): load N published rows (``generate_series``, committed in chunks, then
VACUUM ANALYZE), measure single-row producer inserts alone for a few seconds (baseline), then run
``run_cleanup`` in retain mode with the cutoff at "now" while a producer thread keeps inserting
single-row transactions. Reports cleanup rows/s, batch times, and insert latency (p50, p99,
worst) during cleanup next to the baseline. Markdown on stdout, JSON in
``bench/results/cleanup.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks.cleanup import CleanupReport, run_cleanup, table_health
from outbox_tasks.db import make_engine
from outbox_tasks.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "cleanup.json"
ADMIN_URL = os.environ.get("OUTBOX_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ROWS_PER_PUBLISH_BATCH = 500  # rows the relay marks in one statement share one published_at

_LOAD = text(
    """
    INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers, created_at,
                        published_at)
    SELECT 'Order', (g % 100000)::text, 'OrderCreated',
           jsonb_build_object('order_id', g, 'customer', 'c' || (g % 977), 'total', g % 10000),
           '{}'::jsonb,
           :t0 + make_interval(secs => g / 1000.0),
           :t0 + make_interval(secs => (g / :per_batch) * (:per_batch / 1000.0) + 0.05)
    FROM generate_series(:lo, :hi) AS g
    """
)

_INSERT_ONE = (
    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
    "VALUES ('Order', %s, 'OrderCreated', '{\"n\": 1}'::jsonb)"
)


@dataclass
class Producer:
    """Single-row insert transactions in a loop, one latency sample each."""

    url: str
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                i = 0
                while not self.stop.is_set():
                    i += 1
                    began = time.perf_counter()
                    conn.execute(_INSERT_ONE, (f"bench-{i % 1000}",))
                    self.latencies.append(time.perf_counter() - began)
        except Exception as error:  # reported, not raised: the run goes on
            self.errors.append(repr(error))


class _BatchTimes(logging.Handler):
    """Collects the seconds of every ``cleanup_batch`` log event."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "action", None) == "cleanup_batch":
            self.seconds.append(float(getattr(record, "seconds", 0.0)))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


def latency_summary(samples: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in samples]
    return {
        "inserts": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3) if ms else None,
        "mean_ms": round(statistics.fmean(ms), 3) if ms else None,
    }


def create_database() -> tuple[str, str]:
    name = f"outbox_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = ADMIN_URL.rpartition("/")
    url = f"{base}/{name}"
    from outbox_tasks.cli import main as cli_main

    if cli_main(["migrate", "--database-url", url]) != 0:
        raise SystemExit("migration failed")
    return name, url


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def load(engine: Engine, url: str, rows: int, chunk: int) -> float:
    """N published rows, oldest first, committed per chunk (no long writer); VACUUM ANALYZE."""
    began = time.perf_counter()
    t0 = datetime.now(UTC) - timedelta(days=30)
    for lo in range(1, rows + 1, chunk):
        with engine.begin() as conn:
            conn.execute(
                _LOAD,
                {
                    "t0": t0,
                    "lo": lo,
                    "hi": min(rows, lo + chunk - 1),
                    "per_batch": ROWS_PER_PUBLISH_BATCH,
                },
            )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE outbox")
    return time.perf_counter() - began


def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    settings = Settings.from_env(
        {},
        database_url=url,
        cleanup_mode="retain",
        retention_seconds=3600.0,
        statement_timeout_seconds=120.0,
    )
    engine = make_engine(settings, application_name="outbox_tasks.bench.cleanup", pool_size=2)
    try:
        load_seconds = load(engine, url, args.rows, args.chunk)
        health_before = table_health(engine)

        baseline = Producer(url)
        thread = threading.Thread(target=baseline.run, daemon=True)
        thread.start()
        time.sleep(args.baseline_seconds)
        baseline.stop.set()
        thread.join()

        batches = _BatchTimes()
        logger = logging.getLogger("outbox_tasks.cleanup")
        logger.addHandler(batches)
        logger.setLevel(logging.DEBUG)
        producer = Producer(url)
        thread = threading.Thread(target=producer.run, daemon=True)
        thread.start()
        try:
            report: CleanupReport = run_cleanup(
                engine,
                settings,
                # cutoff = now: the retention is added back to the clock
                now_clock=lambda: datetime.now(UTC) + timedelta(seconds=settings.retention_seconds),
                batch_size=args.batch_size,
                pause_seconds=args.pause,
            )
        finally:
            producer.stop.set()
            thread.join()
            logger.removeHandler(batches)
        with engine.connect() as conn:
            left_published = conn.execute(
                text("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
            ).scalar_one()
            pending = conn.execute(
                text("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            ).scalar_one()
        health_after = table_health(engine)
    finally:
        engine.dispose()

    busy = sum(batches.seconds)
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.cleanup " + " ".join(sys.argv[1:]),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "postgres": _server_version(url),
            # Others share these machines: a high load average means noisy numbers.
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "rows_loaded": args.rows,
        "load_seconds": round(load_seconds, 2),
        "batch_size": args.batch_size,
        "pause_seconds": args.pause,
        "cleanup": {
            "rows_deleted": report.outbox_rows,
            "published_rows_left": left_published,
            "batches": report.batches,
            "seconds": round(report.seconds, 2),
            "rows_per_second": round(report.outbox_rows / report.seconds)
            if report.seconds
            else None,
            "rows_per_second_excluding_pauses": round(report.outbox_rows / busy) if busy else None,
            "batch_p50_ms": round(percentile(batches.seconds, 50) * 1000, 1),
            "batch_max_ms": round(max(batches.seconds, default=0.0) * 1000, 1),
        },
        "inserts_baseline": latency_summary(baseline.latencies),
        "inserts_during_cleanup": latency_summary(producer.latencies),
        "producer_errors": baseline.errors + producer.errors,
        "producer_rows_pending_after": pending,
        "table_before": _plain(health_before),
        "table_after": _plain(health_after),
    }


def _server_version(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def _plain(health: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in health.items()}


def markdown(result: dict[str, Any]) -> str:
    c = result["cleanup"]
    base = result["inserts_baseline"]
    during = result["inserts_during_cleanup"]
    lines = [
        f"Cleanup benchmark: {result['rows_loaded']:,} published rows, batch "
        f"{result['batch_size']}, pause {result['pause_seconds']} s "
        f"(PostgreSQL {result['machine']['postgres']}, {result['machine']['cpus']} CPUs)",
        "",
        "| Measure | Value |",
        "|---|---|",
        f"| rows deleted | {c['rows_deleted']:,} (left: {c['published_rows_left']}) |",
        f"| cleanup time | {c['seconds']} s in {c['batches']} batches |",
        f"| cleanup rows/s | {c['rows_per_second']:,} |",
        f"| cleanup rows/s, excluding pauses | {c['rows_per_second_excluding_pauses']:,} |",
        f"| batch time p50 / max | {c['batch_p50_ms']} ms / {c['batch_max_ms']} ms |",
        f"| inserts during cleanup | {during['inserts']:,} |",
        f"| insert latency p50 / p99 / worst, during cleanup | {during['p50_ms']} / "
        f"{during['p99_ms']} / {during['max_ms']} ms |",
        f"| insert latency p50 / p99 / worst, baseline | {base['p50_ms']} / {base['p99_ms']} / "
        f"{base['max_ms']} ms |",
        f"| dead tuples after (stats) | {result['table_after'].get('n_dead_tup')} |",
        f"| load time | {result['load_seconds']} s |",
        f"| load average (1 min) at end | {result['machine']['load_average_1m_at_end']} |",
    ]
    if result["producer_errors"]:
        lines.append(f"| producer errors | {len(result['producer_errors'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cleanup", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="published rows to load")
    parser.add_argument("--chunk", type=int, default=100_000, help="rows per load transaction")
    parser.add_argument("--batch-size", type=int, default=5000, help="cleanup batch size")
    parser.add_argument("--pause", type=float, default=0.05, help="pause between batches (s)")
    parser.add_argument(
        "--baseline-seconds", type=float, default=3.0, help="inserts measured without cleanup"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON result file")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    args = parser.parse_args(argv)

    name, url = create_database()
    try:
        result = measure(args, url)
    finally:
        if args.keep:
            print(f"kept database {name}", file=sys.stderr)
        else:
            with suppress(Exception):
                drop_database(name)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 1 if result["producer_errors"] or result["cleanup"]["published_rows_left"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
