"""Relay CPU per message, in one process: where the relay's own time goes.

An in-process ``Relay`` (the real ``PostgresRelayStore`` and Redis ``BrokerPublisher``, no
Celery) claims and drains ``--events`` bulk-loaded events over ``--aggregates`` aggregates.
Reports this process's CPU per message (``time.process_time``) and, with ``--profile``, the
functions that take it (cProfile, which roughly doubles the CPU, so compare shares, not totals).
The PostgreSQL side is not in this number (``bench throughput`` has both).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from typing import Any

import psycopg

from bench import common


def run(
    env: common.BenchEnv, events: int, aggregates: int, batch: int, profile: int
) -> dict[str, Any]:
    from outbox_tasks.db import make_engine
    from outbox_tasks.publisher import BrokerPublisher
    from outbox_tasks.relay import Relay
    from outbox_tasks.store.relay import PostgresRelayStore

    with env.database() as url:
        exchange = common.unique_name("bench.events")
        sink = common.RedisSink(env.redis_url, exchange)
        settings = common.relay_settings(
            database_url=url,
            broker_url=env.redis_url,
            publish_url=None,
            exchange=exchange,
            batch_size=batch,
            publish_task_seconds=20.0,
        )
        common.copy_events(url, events, aggregates)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE outbox")
        engine = make_engine(settings, pool_size=2)
        publisher = BrokerPublisher(settings.effective_publish_url, exchange)
        relay = Relay(settings, PostgresRelayStore(engine), publisher, owner="bench-cpu")
        profiler = cProfile.Profile() if profile else None
        published = 0
        try:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if profiler is not None:
                profiler.enable()
            while published < events:
                before = published
                for partition in range(settings.partitions):
                    lease = relay.claim(partition)
                    if lease is not None:
                        published += relay.publish(partition, lease.epoch).published
                if published == before:
                    raise RuntimeError(f"stuck at {published} of {events} events")
            if profiler is not None:
                profiler.disable()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        finally:
            publisher.close()
            engine.dispose()
            sink.close()
    top = ""
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(profile)
        top = out.getvalue()
    return {
        "events": events,
        "cpu_us_per_message": cpu * 1e6 / events,
        "msg_per_s": events / wall,
        "profiled": bool(profile),
        "profile": top,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench cpu",
        description="relay CPU per message in one process (no Celery), optionally profiled",
    )
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--aggregates", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument(
        "--profile", type=int, default=0, help="print the N functions with the most own time"
    )
    common.add_output_argument(parser)
    args = parser.parse_args(argv)
    results = common.Results("cpu", list(argv or []))
    with common.bench_env() as env:
        r = run(env, args.events, args.aggregates, args.batch_size, args.profile)
    results.runs.append(r)
    results.settings = {"batch_size": args.batch_size, "aggregates": args.aggregates}
    results.summary = [{k: v for k, v in r.items() if k != "profile"}]
    print(
        f"relay CPU {r['cpu_us_per_message']:.1f} µs per message, {r['msg_per_s']:,.0f} msg/s "
        f"({args.events:,} events, batch {args.batch_size}"
        f"{', under cProfile' if args.profile else ''}; the PostgreSQL side is not included)"
    )
    if r["profile"]:
        print(r["profile"])
    path = results.write(args.output, common.versions())
    print(f"JSON: {path}")
    return 0
