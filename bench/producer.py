"""What the per-aggregate counter (migration 0004) costs producers: ``python -m bench producer``.

Two fresh databases on the same server: ``before`` migrated to 0003 (no counter), ``after`` to
head. The workloads run in rounds, alternating before/after, and each ratio is the median of the
per-round ratios (after / before), so the machine's load moves both sides alike:

- **distinct aggregates**: one connection, one event per transaction (``INSERT`` +
  ``COMMIT``), a new aggregate each time (the counter row is inserted, never updated); plain
  psycopg, so the database's cost is not diluted by an ORM's.
- **one aggregate, one writer**: one connection, one event per transaction, one aggregate (the
  counter row is updated every time).
- **one aggregate, N writers**: ``--writers`` connections write one aggregate at once, one event
  per transaction, holding each transaction ``--hold-ms`` after the insert (the application's
  own work). After: each writer waits for the one before it to commit. Throughput, and per
  transaction the time spent in the INSERT (the wait) and in the whole transaction, p50 / p99.

Each workload runs with ``synchronous_commit`` on (the default: every commit waits for its WAL
flush) and off (what is left is the statements' own cost, where the trigger shows most).

Besides events/s, every run reads the CPU its PostgreSQL backends used (``/proc``; the server
runs on this machine) per event: it hardly moves with the machine's load, so its ratio is the
steadier measure of what the trigger costs.

Then the storage: ``--size-aggregates`` distinct aggregates written once each, the counter table
(heap + primary key) per aggregate, and what the new column and unique index add to the outbox.
Markdown on stdout, JSON in ``bench/results/producer.json``.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench import common
from tests.support import services

BEFORE = "0003"
AFTER = "head"
INSERT = (
    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
    "VALUES ('Order', %s, 'OrderCreated', %s)"
)
PAYLOAD = '{"order_id": "ord-1", "currency": "EUR", "total_cents": 1250, "lines": 3}'


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench producer", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per side per round (3)")
    parser.add_argument("--writers", type=int, default=4, help="hot-aggregate sessions (4)")
    parser.add_argument(
        "--hold-ms",
        type=common.csv_ints,
        default=[0, 2],
        help="hot aggregate: ms each transaction stays open after its insert (0,2)",
    )
    parser.add_argument(
        "--synchronous-commit",
        type=common.csv_choices(("on", "off")),
        default=["on", "off"],
        help="run every workload with each (on,off): off leaves out the wait for the WAL flush, "
        "which on a shared machine is most of a commit and most of its noise",
    )
    parser.add_argument(
        "--size-aggregates", type=int, default=100_000, help="for the storage numbers (100000)"
    )
    common.add_output_argument(parser)
    return parser.parse_args(argv)


@contextmanager
def migrated_database(revision: str) -> Iterator[str]:
    """A fresh database migrated to ``revision``; dropped afterwards."""
    from alembic import command
    from alembic.config import Config

    name = services.unique("outbox_bench_producer")
    services.admin_execute(f'CREATE DATABASE "{name}"')
    try:
        url = services.db_url(name)
        config = Config(str(services.ROOT / "alembic.ini"))
        config.set_main_option(
            "sqlalchemy.url", url.replace("postgresql://", "postgresql+psycopg://")
        )
        command.upgrade(config, revision)
        yield url
    finally:
        services.drop_database(name)


def with_synchronous_commit(url: str, value: str) -> str:
    """The URL with ``synchronous_commit`` set for every connection made from it."""
    return f"{url}?options=-csynchronous_commit%3D{value}"


def reset(url: str) -> None:
    """Empty the outbox (and the counters, where they exist) between runs."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE outbox")
        conn.execute(
            "DO $$ BEGIN IF to_regclass('outbox_aggregate') IS NOT NULL THEN "
            "TRUNCATE outbox_aggregate; END IF; END $$"
        )
        conn.execute("VACUUM ANALYZE outbox")


# --- workloads: each returns (events, seconds, extra stats) -------------------------------------


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def cpu_per_event(cpu_seconds: float, events: int) -> dict[str, Any]:
    """The PostgreSQL backends' CPU per event, in microseconds: unlike events/s it hardly moves
    with what else the machine runs."""
    return {"backend_cpu_us_per_event": round(cpu_seconds / max(events, 1) * 1e6, 1)}


def one_writer(
    url: str, seconds: float, aggregate: Callable[[int], str]
) -> tuple[int, float, dict[str, Any]]:
    with psycopg.connect(url) as conn:
        pid = backend_pid(conn)
        conn.commit()
        cpu = common.proc_cpu_seconds(pid)
        n = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            conn.execute(INSERT, (aggregate(n), PAYLOAD))
            conn.commit()
            n += 1
        elapsed = time.perf_counter() - started
        return n, elapsed, cpu_per_event(common.proc_cpu_seconds(pid) - cpu, n)


def distinct_sql(url: str, seconds: float) -> tuple[int, float, dict[str, Any]]:
    prefix = uuid.uuid4().hex[:8]
    return one_writer(url, seconds, lambda n: f"{prefix}-{n}")


def same_aggregate_sql(url: str, seconds: float) -> tuple[int, float, dict[str, Any]]:
    aggregate = f"one-{uuid.uuid4().hex[:8]}"
    return one_writer(url, seconds, lambda n: aggregate)


@dataclass
class _WriterStats:
    inserts: list[float] = field(default_factory=list)
    transactions: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    error: BaseException | None = None


def hot_aggregate(
    url: str, seconds: float, *, writers: int, hold_ms: int
) -> tuple[int, float, dict[str, Any]]:
    aggregate = f"hot-{uuid.uuid4().hex[:8]}"
    stats = [_WriterStats() for _ in range(writers)]
    start = threading.Barrier(writers + 1)
    deadline_box: list[float] = []

    def write(mine: _WriterStats) -> None:
        try:
            with psycopg.connect(url) as conn:
                pid = backend_pid(conn)
                conn.commit()
                cpu = common.proc_cpu_seconds(pid)
                start.wait()
                deadline = deadline_box[0]
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    conn.execute(INSERT, (aggregate, PAYLOAD))
                    t1 = time.perf_counter()
                    if hold_ms:
                        time.sleep(hold_ms / 1000)
                    conn.commit()
                    mine.inserts.append(t1 - t0)
                    mine.transactions.append(time.perf_counter() - t0)
                mine.cpu_seconds = common.proc_cpu_seconds(pid) - cpu
        except BaseException as error:  # reported below
            mine.error = error

    threads = [threading.Thread(target=write, args=(s,), daemon=True) for s in stats]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    deadline_box.append(started + seconds)
    start.wait()
    for thread in threads:
        thread.join(seconds + 60)
    elapsed = time.perf_counter() - started
    errors = [s.error for s in stats if s.error is not None]
    if errors:
        raise RuntimeError(f"hot aggregate writer failed: {errors[0]!r}")
    inserts = sorted(x for s in stats for x in s.inserts)
    transactions = sorted(x for s in stats for x in s.transactions)
    extra = {
        "insert_ms_p50": _ms(common.percentile(inserts, 50)),
        "insert_ms_p99": _ms(common.percentile(inserts, 99)),
        "transaction_ms_p50": _ms(common.percentile(transactions, 50)),
        "transaction_ms_p99": _ms(common.percentile(transactions, 99)),
        **cpu_per_event(sum(s.cpu_seconds for s in stats), len(inserts)),
    }
    return len(inserts), elapsed, extra


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


# --- storage ----------------------------------------------------------------------------------


def storage(url: str, aggregates: int) -> dict[str, Any]:
    """Load ``aggregates`` events, one per aggregate, and measure table and index sizes."""
    reset(url)
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
            "SELECT 'Order', 'customer-' || lpad(g::text, 9, '0'), 'OrderCreated', %s::jsonb "
            "FROM generate_series(1, %s) AS g ORDER BY g",
            (PAYLOAD, aggregates),
        )
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE outbox")
        has_counter = conn.execute("SELECT to_regclass('outbox_aggregate') IS NOT NULL").fetchone()
        assert has_counter is not None
        if has_counter[0]:
            conn.execute("VACUUM ANALYZE outbox_aggregate")

        def size(expression: str) -> int:
            row = conn.execute(f"SELECT {expression}").fetchone()
            assert row is not None
            return int(row[0] or 0)

        out = {
            "outbox_heap_bytes": size("pg_relation_size('outbox')"),
            "outbox_indexes_bytes": size("pg_indexes_size('outbox')"),
        }
        if has_counter[0]:
            out["counter_heap_bytes"] = size("pg_relation_size('outbox_aggregate')")
            out["counter_total_bytes"] = size("pg_total_relation_size('outbox_aggregate')")
    return out


# --- the run ----------------------------------------------------------------------------------

Workload = Callable[[str, float], tuple[int, float, dict[str, Any]]]


def alternate(
    name: str, workload: Workload, urls: dict[str, str], rounds: int, seconds: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    runs: list[dict[str, Any]] = []
    ratios: list[float] = []
    for r in range(rounds):
        rates: dict[str, float] = {}
        # Alternate who goes first, so a trend in the machine's load favours neither side.
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for side in order:
            reset(urls[side])
            events, elapsed, extra = workload(urls[side], seconds)
            rates[side] = events / elapsed
            runs.append(
                {
                    "workload": name,
                    "round": r,
                    "side": side,
                    "events": events,
                    "seconds": round(elapsed, 3),
                    "events_per_second": round(rates[side], 1),
                    **extra,
                }
            )
        ratios.append(rates["after"] / rates["before"])
        common.log(
            f"{name} round {r + 1}/{rounds}: before {rates['before']:,.0f}/s, "
            f"after {rates['after']:,.0f}/s, ratio {ratios[-1]:.3f}"
        )
    mine = [run for run in runs if run["workload"] == name]

    def median_of(side: str, key: str) -> float | None:
        values = [run[key] for run in mine if run["side"] == side and run.get(key) is not None]
        return common.median(values)

    cpu_ratios = []
    for r in range(rounds):
        pair = {
            run["side"]: run.get("backend_cpu_us_per_event") for run in mine if run["round"] == r
        }
        if pair.get("before") and pair.get("after"):
            cpu_ratios.append(pair["after"] / pair["before"])
    summary: dict[str, Any] = {
        "workload": name,
        "before_per_second": median_of("before", "events_per_second"),
        "after_per_second": median_of("after", "events_per_second"),
        "ratio_median": common.median(ratios),
        "ratios": [round(x, 3) for x in ratios],
        "before_backend_cpu_us": median_of("before", "backend_cpu_us_per_event"),
        "after_backend_cpu_us": median_of("after", "backend_cpu_us_per_event"),
        "backend_cpu_ratio_median": common.median(cpu_ratios),
    }
    for key in ("insert_ms_p50", "insert_ms_p99", "transaction_ms_p50", "transaction_ms_p99"):
        if any(key in run for run in mine):
            summary[f"before_{key}"] = median_of("before", key)
            summary[f"after_{key}"] = median_of("after", key)
    return summary, runs


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    results = common.Results(name="producer", argv=argv)
    results.settings = {
        "rounds": args.rounds,
        "seconds": args.seconds,
        "writers": args.writers,
        "hold_ms": args.hold_ms,
        "size_aggregates": args.size_aggregates,
        "synchronous_commit": args.synchronous_commit,
        "before": f"migrations up to {BEFORE}",
        "after": "migrations up to head (0004: outbox_aggregate counter trigger)",
    }
    workloads: list[tuple[str, Workload]] = [
        ("distinct aggregates", distinct_sql),
        ("one aggregate, 1 writer", same_aggregate_sql),
    ]
    for hold in args.hold_ms:

        def hot(url: str, seconds: float, hold: int = hold) -> tuple[int, float, dict[str, Any]]:
            return hot_aggregate(url, seconds, writers=args.writers, hold_ms=hold)

        workloads.append((f"one aggregate, {args.writers} writers, hold {hold} ms", hot))

    with migrated_database(BEFORE) as before, migrated_database(AFTER) as after:
        urls = {"before": before, "after": after}
        for sync in args.synchronous_commit:
            sync_urls = {side: with_synchronous_commit(url, sync) for side, url in urls.items()}
            for name, workload in workloads:
                label = f"{name}, synchronous_commit {sync}"
                summary, runs = alternate(label, workload, sync_urls, args.rounds, args.seconds)
                results.summary.append(summary)
                results.runs.extend(runs)
        common.log(f"storage: {args.size_aggregates:,} aggregates, one event each")
        sizes = {side: storage(url, args.size_aggregates) for side, url in urls.items()}
        versions_info = common.versions(after)

    n = args.size_aggregates
    size_summary = {
        "workload": "storage",
        "aggregates": n,
        "counter_bytes_per_aggregate": round(sizes["after"]["counter_total_bytes"] / n, 1),
        "counter_heap_bytes_per_aggregate": round(sizes["after"]["counter_heap_bytes"] / n, 1),
        "outbox_heap_bytes_per_row_before": round(sizes["before"]["outbox_heap_bytes"] / n, 1),
        "outbox_heap_bytes_per_row_after": round(sizes["after"]["outbox_heap_bytes"] / n, 1),
        "outbox_index_bytes_per_row_before": round(sizes["before"]["outbox_indexes_bytes"] / n, 1),
        "outbox_index_bytes_per_row_after": round(sizes["after"]["outbox_indexes_bytes"] / n, 1),
    }
    results.summary.append(size_summary)
    path = results.write(args.output, versions_info)

    rows = []
    for s in results.summary[:-1]:
        waits = ""
        if "after_insert_ms_p99" in s:
            waits = (
                f"insert p50/p99 {common.fmt(s['before_insert_ms_p50'], 2)}/"
                f"{common.fmt(s['before_insert_ms_p99'], 2)} -> "
                f"{common.fmt(s['after_insert_ms_p50'], 2)}/"
                f"{common.fmt(s['after_insert_ms_p99'], 2)} ms; transaction p99 "
                f"{common.fmt(s['before_transaction_ms_p99'], 2)} -> "
                f"{common.fmt(s['after_transaction_ms_p99'], 2)} ms"
            )
        rows.append(
            [
                s["workload"],
                common.fmt(s["before_per_second"]),
                common.fmt(s["after_per_second"]),
                common.fmt(s["ratio_median"], 3),
                f"{common.fmt(s['before_backend_cpu_us'])} -> "
                f"{common.fmt(s['after_backend_cpu_us'])}",
                common.fmt(s["backend_cpu_ratio_median"], 3),
                waits,
            ]
        )
    print(
        common.md_table(
            [
                "workload",
                "before /s",
                "after /s",
                "after/before",
                "backend CPU us/event",
                "CPU after/before",
                "waits",
            ],
            rows,
        )
    )
    print()
    print(
        common.md_table(
            ["storage (per aggregate / row)", "bytes"],
            [[k, common.fmt(v, 1)] for k, v in size_summary.items() if k != "workload"],
        )
    )
    common.log(f"results: {path}")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
