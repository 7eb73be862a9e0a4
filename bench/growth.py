"""Growth: the cost of one claim+publish batch as published rows pile up (retain mode).

Two databases side by side, both with ~100 000 pending events (1 000 aggregates, ~300-byte
payloads, COPY): the *empty* one has no published rows, the *big* one has 1 M, then 10 M
already-published rows (INSERT ... SELECT generate_series in chunks, then VACUUM ANALYZE).
An in-process ``Relay`` with a real ``BrokerPublisher`` (Redis, a bound queue) runs one batch
per call (``publish_task_seconds`` tiny: claim, one batch of 1 000, release), cycling over the
partitions. Rounds alternate between the two databases; each round's ratio is the median batch
time on the big table over the median on the empty one, and the result is the median of the
per-round ratios. Pending rows are topped up to 100 000 between rounds.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from contextlib import ExitStack
from typing import Any

import psycopg

from bench import common
from bench.common import BenchEnv, log

LEVELS = (1_000_000, 10_000_000)
PENDING = 100_000
AGGREGATES = 1000

PUBLISHED_SQL = """
INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at, published_at)
SELECT 'Order', 'P' || (i %% 100000), 'OrderCreated',
       jsonb_build_object('order_id', 'ord-' || i, 'customer_id', 'cus-' || (i %% 7919),
                          'currency', 'EUR', 'total_cents', (i * 37) %% 100000,
                          'note', repeat('x', 200)),
       now() - make_interval(secs => ((%(total)s - i) * 0.05)::float8) - interval '1 second',
       now() - make_interval(secs => ((%(total)s - i) * 0.05)::float8)
FROM generate_series(%(lo)s, %(hi)s - 1) AS i
"""


def load_published(url: str, start: int, stop: int, total: int, chunk: int = 500_000) -> float:
    """Published rows ``start..stop`` (of ``total``, for the timestamps) in chunked
    transactions, then VACUUM ANALYZE. Returns the seconds it took."""
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        # Bulk loading only: the wake-up trigger would NOTIFY every chunk's slots for nothing.
        conn.execute("ALTER TABLE outbox DISABLE TRIGGER outbox_wakeup")
        for lo in range(start, stop, chunk):
            hi = min(stop, lo + chunk)
            conn.execute(PUBLISHED_SQL, {"lo": lo, "hi": hi, "total": total})
            log(f"  published rows: {hi:,}")
        conn.execute("ALTER TABLE outbox ENABLE TRIGGER outbox_wakeup")
        conn.execute("VACUUM ANALYZE outbox")
    return time.perf_counter() - started


def table_info(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE published_at IS NOT NULL), "
            "count(*) FILTER (WHERE published_at IS NULL), "
            "pg_total_relation_size('outbox') FROM outbox"
        ).fetchone()
    assert row is not None
    return {"published": row[0], "pending": row[1], "total_bytes": row[2]}


class Side:
    """One database with its relay, publisher and bound queue."""

    def __init__(self, env: BenchEnv, url: str, name: str, batch_size: int) -> None:
        from outbox_tasks.db import make_engine
        from outbox_tasks.publisher import BrokerPublisher
        from outbox_tasks.relay import Relay
        from outbox_tasks.store.relay import PostgresRelayStore

        self.name = name
        self.url = url
        exchange = common.unique_name("bench.events")
        self.sink = common.RedisSink(env.redis_url, exchange)
        self.settings = common.relay_settings(
            database_url=url,
            broker_url=env.redis_url,
            publish_url=None,
            exchange=exchange,
            batch_size=batch_size,
            publish_task_seconds=0.001,  # exactly one batch per publish call
        )
        self.engine = make_engine(self.settings, pool_size=2)
        self.publisher = BrokerPublisher(self.settings.effective_publish_url, exchange)
        self.relay = Relay(
            self.settings, PostgresRelayStore(self.engine), self.publisher, owner=f"growth-{name}"
        )
        self.partitions = itertools.cycle(range(self.settings.partitions))
        self.loaded = 0
        self.top_up()

    def top_up(self) -> None:
        missing = PENDING - common.pending(self.url)
        if missing > 0:
            common.copy_events(self.url, missing, AGGREGATES, start=self.loaded)
            self.loaded += missing
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("ANALYZE outbox")

    def batches(self, count: int) -> list[float]:
        """``count`` claim+publish calls of one full batch each; milliseconds each."""
        times: list[float] = []
        while len(times) < count:
            partition = next(self.partitions)
            started = time.perf_counter()
            lease = self.relay.claim(partition)
            if lease is None:
                continue
            report = self.relay.publish(partition, lease.epoch)
            elapsed = (time.perf_counter() - started) * 1000
            if report.published != self.settings.batch_size:
                raise RuntimeError(f"{self.name}: batch of {report.published} rows, not full")
            times.append(elapsed)
        self.sink.clear()
        return times

    def close(self) -> None:
        self.publisher.close()
        self.engine.dispose()
        self.sink.close()


def measure(empty: Side, big: Side, rounds: int, per_round: int, warmup: int) -> dict[str, Any]:
    empty.batches(warmup)
    big.batches(warmup)
    ratios = []
    all_empty: list[float] = []
    all_big: list[float] = []
    for r in range(rounds):
        order = (empty, big) if r % 2 == 0 else (big, empty)
        got = {side.name: side.batches(per_round) for side in order}
        all_empty += got["empty"]
        all_big += got["big"]
        ratios.append(statistics.median(got["big"]) / statistics.median(got["empty"]))
        empty.top_up()
        big.top_up()
    return {
        "empty_ms": statistics.median(all_empty),
        "big_ms": statistics.median(all_big),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "empty_p90_ms": sorted(all_empty)[int(len(all_empty) * 0.9)],
        "big_p90_ms": sorted(all_big)[int(len(all_big) * 0.9)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench growth",
        description="claim+publish batch cost with 0 / 1 M / 10 M published rows (retain mode)",
    )
    parser.add_argument(
        "--max-rows",
        type=int,
        default=LEVELS[-1],
        help="largest published-row level to measure (levels: 1M, 10M)",
    )
    parser.add_argument("--levels", type=common.csv_ints, default=list(LEVELS))
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per level")
    parser.add_argument("--batches", type=int, default=8, help="batches per side per round")
    parser.add_argument("--warmup", type=int, default=4, help="batches per side before timing")
    parser.add_argument("--batch-size", type=int, default=1000)
    common.add_output_argument(parser)
    args = parser.parse_args(argv)
    levels = [n for n in args.levels if n <= args.max_rows]

    results = common.Results("growth", list(argv or []))
    results.settings = {
        "levels": levels,
        "pending": PENDING,
        "aggregates": AGGREGATES,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "batches_per_round": args.batches,
        "warmup": args.warmup,
        "relay": {**common.RELAY_DEFAULTS, "batch_size": args.batch_size},
        "broker": "redis (real BrokerPublisher, a bound queue)",
        "published_rows": "INSERT ... SELECT generate_series, 500k per transaction, "
        "100k aggregates, then VACUUM ANALYZE",
    }
    with common.bench_env() as env, ExitStack() as stack:
        empty_url = stack.enter_context(env.database())
        big_url = stack.enter_context(env.database())
        log("loading 100k pending rows into both databases")
        empty = Side(env, empty_url, "empty", args.batch_size)
        stack.callback(empty.close)
        big = Side(env, big_url, "big", args.batch_size)
        stack.callback(big.close)
        have = 0
        for level in levels:
            log(f"loading published rows up to {level:,}")
            load_seconds = load_published(big_url, have, level, levels[-1])
            have = level
            big.top_up()
            empty.top_up()
            log(f"measuring at {level:,} published rows")
            m = measure(empty, big, args.rounds, args.batches, args.warmup)
            entry = {
                "published_rows": level,
                "load_seconds": round(load_seconds, 1),
                "big_table": table_info(big_url),
                "empty_table": table_info(empty_url),
                **m,
            }
            results.runs.append(entry)
            results.summary.append(
                {k: entry[k] for k in ("published_rows", "empty_ms", "big_ms", "ratio")}
            )
            log(f"  empty {m['empty_ms']:.1f} ms, big {m['big_ms']:.1f} ms, ratio {m['ratio']:.2f}")
    rows = [["0 (empty)", "-", "-", "-", "1.00", "-"]]
    for r in results.runs:
        rows.append(
            [
                f"{r['published_rows']:,}",
                f"{r['big_table']['total_bytes'] / 2**30:.2f} GiB",
                common.fmt(r["empty_ms"], 1),
                common.fmt(r["big_ms"], 1),
                common.fmt(r["ratio"], 2),
                ", ".join(common.fmt(x, 2) for x in r["ratios"]),
            ]
        )
    path = results.write(args.output, common.versions())
    print(
        f"Growth: one claim+publish batch of {args.batch_size} (in-process Relay, real Redis "
        f"publisher), ~{PENDING:,} pending, retain mode; rounds alternate with an empty table\n"
    )
    print(
        common.md_table(
            [
                "published rows",
                "table size",
                "empty ms/batch",
                "this ms/batch",
                "ratio (median)",
                "ratio per round",
            ],
            rows,
        )
    )
    print(f"\nJSON: {path}")
    return 0
