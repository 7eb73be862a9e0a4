"""Scaling: what a partition and a worker process cost, and how throughput grows with them.

1. Idle cost: ``celery worker -c N`` + beat with no events for ``--idle-seconds``, for each
   partition count: CPU per second of the worker (main process and pool) and of the PostgreSQL
   backends it uses, and its memory (RSS, PSS). That is what the beat tick's claims, the
   wake-up listener and Celery itself cost when nothing happens.
2. Throughput against partitions and processes: the throughput bench's outbox_tasks run
   (``--events`` over ``--aggregates``, Redis) for each (processes, partitions) pair, with the
   limit of the same number of processes in the same alternation.

``python -m bench scaling`` prints both tables; the numbers and what they mean for sizing are in
docs/performance.md ("Scaling").
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench import baseline, common, throughput
from bench.common import BenchEnv, log


def idle_cost(
    env: BenchEnv, *, procs: int, partitions: int, seconds: float, relay: dict[str, Any]
) -> dict[str, Any]:
    """CPU per second and memory of an idle worker + beat (no events at all)."""
    with env.database() as url:
        settings = common.relay_settings(
            database_url=url,
            broker_url=env.redis_url,
            publish_url=env.redis_url,
            exchange=common.unique_name("bench.events"),
            **{**relay, "partitions": partitions},
        )
        with common.celery_cluster(settings) as cluster:
            worker = cluster.worker("bench", concurrency=procs)
            beat = cluster.beat()
            cluster.wait_ready(worker, timeout=60)
            cluster.wait_ready(beat, timeout=60)
            time.sleep(2.0)  # settle: the first ticks, the listener's connection
            cpu0 = common.tree_cpu_seconds(worker.pid)
            db0 = common.backend_cpu_seconds(url, settings.application_name)
            t0 = time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - t0
            cpu = common.tree_cpu_seconds(worker.pid) - cpu0
            db = common.backend_cpu_seconds(url, settings.application_name) - db0
            memory = common.tree_memory_mib(worker.pid)
        env.flush_redis()
    return {
        "procs": procs,
        "partitions": partitions,
        "seconds": elapsed,
        "cpu_ms_per_s": cpu / elapsed * 1000,
        "db_cpu_ms_per_s": db / elapsed * 1000,
        "memory_mib": memory,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench scaling",
        description="idle cost per partition and process; throughput against both",
    )
    parser.add_argument("--workers", type=common.csv_ints, default=[1, 2])
    parser.add_argument("--partition-counts", type=common.csv_ints, default=[1, 4, 8, 32])
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--aggregates", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    common.add_relay_arguments(parser)
    common.add_output_argument(parser)
    args = parser.parse_args(argv)
    relay = common.relay_overrides(args)
    results = common.Results("scaling", list(argv or []))
    results.settings = {
        "workers": args.workers,
        "partition_counts": args.partition_counts,
        "idle_seconds": args.idle_seconds,
        "events": args.events,
        "aggregates": args.aggregates,
        "relay": {**common.RELAY_DEFAULTS, **relay},
    }
    idle: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    with common.bench_env() as env:
        for procs in args.workers:
            for partitions in args.partition_counts:
                log(f"idle: -c {procs}, {partitions} partitions, {args.idle_seconds:g} s")
                r = idle_cost(
                    env, procs=procs, partitions=partitions, seconds=args.idle_seconds, relay=relay
                )
                log(f"  {r['cpu_ms_per_s']:.0f} + {r['db_cpu_ms_per_s']:.0f} ms CPU per s")
                idle.append(r)
        for repeat in range(args.repeats):
            for procs in args.workers:
                log(f"repeat {repeat + 1}: the limit x{procs}")
                limit = baseline.run(
                    env,
                    broker="redis",
                    procs=procs,
                    events=args.events,
                    aggregates=args.aggregates,
                    batch=args.batch_size,
                )
                for partitions in args.partition_counts:
                    log(f"repeat {repeat + 1}: outbox_tasks x{procs}, {partitions} partitions")
                    r = throughput.run_outbox_tasks(
                        env,
                        broker="redis",
                        procs=procs,
                        events=args.events,
                        aggregates=args.aggregates,
                        relay={**relay, "partitions": partitions},
                    )
                    r.update(partitions=partitions, repeat=repeat, limit_rate=limit["rate"])
                    log(f"  {common.fmt(r['rate'])} msg/s (limit {common.fmt(limit['rate'])})")
                    runs.append(r)
    results.runs = [{"part": "idle", **r} for r in idle] + [
        {"part": "throughput", **r} for r in runs
    ]
    path = results.write(args.output, common.versions())
    print("Idle cost (no events): worker + beat, CPU per second and memory\n")
    print(
        common.md_table(
            ["processes", "partitions", "CPU ms/s (worker+db)", "RSS (PSS) MiB"],
            [
                [
                    r["procs"],
                    r["partitions"],
                    f"{r['cpu_ms_per_s']:.0f} + {r['db_cpu_ms_per_s']:.0f}",
                    f"{common.fmt(r['memory_mib']['rss'])} ({common.fmt(r['memory_mib']['pss'])})",
                ]
                for r in idle
            ],
        )
    )
    print(f"\nThroughput, Redis, {args.events:,} events over {args.aggregates:,} aggregates\n")
    rows = []
    for procs in args.workers:
        for partitions in args.partition_counts:
            mine = [r for r in runs if r["procs"] == procs and r["partitions"] == partitions]
            rate = common.median([r["rate"] for r in mine if r["rate"]])
            limit_rate = common.median([r["limit_rate"] for r in mine if r["limit_rate"]])
            rows.append(
                [
                    procs,
                    partitions,
                    common.fmt(rate),
                    common.fmt(limit_rate),
                    common.fmt(rate / limit_rate if rate and limit_rate else None, 2),
                    f"{common.fmt(common.median([r['cpu_us_per_msg'] for r in mine]))}+"
                    f"{common.fmt(common.median([r['db_cpu_us_per_msg'] for r in mine]))}",
                ]
            )
    print(
        common.md_table(
            ["processes", "partitions", "msg/s", "limit msg/s", "ratio", "CPU µs/msg"], rows
        )
    )
    print(f"\nJSON: {path}")
    return 0 if all(r["ok"] for r in runs) else 1
