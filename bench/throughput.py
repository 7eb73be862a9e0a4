"""Throughput: outbox_tasks through real ``celery worker`` processes + beat, against the limit
(bench/baseline.py) measured in the same process, alternating, several repeats (issue 6).

One run, for either system:

1. a fresh database cloned from a migrated template; ``--events`` events round-robin over
   ``--aggregates`` aggregates (~300-byte payloads) bulk-loaded with COPY, then ANALYZE;
2. a queue bound to the exchange with ``#`` (Redis: kombu's binding, counted with LLEN on the
   queue's list; RabbitMQ: a durable queue, counted with a passive queue_declare);
3. start the publishers, t0, poll the broker count until every event is there, t1.

For outbox_tasks the workers are started and ready first (the rows were loaded before they
started, so no NOTIFY reaches them), then t0 is the moment the bench sends ``outbox.claim``
exactly as a beat tick does; beat is started right after, for the later ticks. Rate is
events / (t1 - t0). The ratio of a repeat is outbox_tasks / baseline with the same broker and the
same number of processes; the result is the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import psycopg

from bench import baseline, common
from bench.common import BenchEnv, log


def run_outbox_tasks(
    env: BenchEnv,
    *,
    broker: str,
    procs: int,
    events: int,
    aggregates: int,
    payload_bytes: int = 300,
    relay: dict[str, Any] | None = None,
    timeout: float | None = None,
    keep_logs: Path | None = None,
    profile: Path | None = None,
    pythonpath: str | None = None,
    system: str = "outbox_tasks",
) -> dict[str, Any]:
    """One outbox_tasks run: a fresh database, ``celery worker -c procs`` + beat."""
    with env.database() as url:
        load_seconds = common.copy_events(url, events, aggregates, payload_bytes=payload_bytes)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE outbox")
        exchange = common.unique_name("bench.events")
        sink = common.make_sink(broker, env, exchange)
        settings = common.relay_settings(
            database_url=url,
            broker_url=env.redis_url,
            publish_url=common.publish_url(broker, env),
            exchange=exchange,
            **(relay or {}),
        )
        spy = None
        try:
            with common.celery_cluster(
                settings, keep_logs=keep_logs, pythonpath=pythonpath
            ) as cluster:
                worker = cluster.worker("bench", concurrency=procs, queues=None)
                cluster.wait_ready(worker, timeout=60)
                if profile is not None:
                    spy = common.start_py_spy(worker.pid, profile)
                cpu0 = common.tree_cpu_seconds(worker.pid)
                db0 = common.backend_cpu_seconds(url)
                t0 = time.monotonic()
                common.send_claim(settings)
                beat = cluster.beat()
                t1 = common.wait_count(
                    sink,
                    events,
                    timeout=timeout or max(180.0, events / 200),
                    alive=worker.alive,
                )
                cpu = common.tree_cpu_seconds(worker.pid) - cpu0
                db_cpu = common.backend_cpu_seconds(url) - db0
                if spy is not None:
                    common.stop_py_spy(spy)
                    spy = None
                left = common.wait_pending_zero(url, timeout=30)
                memory = common.tree_memory_mib(worker.pid)
                time.sleep(0.3)
                counted = sink.count()
                logs = worker.log()
                beat_alive = beat.alive()
        finally:
            if spy is not None:
                common.stop_py_spy(spy)
            sink.close()
            env.flush_redis()
    seconds = (t1 - t0) if t1 is not None else None
    return {
        "system": system,
        "broker": broker,
        "procs": procs,
        "events": events,
        "aggregates": aggregates,
        "load_seconds": round(load_seconds, 3),
        "seconds": seconds,
        "rate": events / seconds if seconds else None,
        "counted": counted,
        "duplicates": max(0, counted - events),
        "pending_after": left,
        "cpu_us_per_msg": cpu / events * 1e6,
        "memory_mib": memory,
        "db_cpu_us_per_msg": db_cpu / events * 1e6,
        "publish_tasks": sum(
            1 for line in logs.splitlines() if "outbox.publish[" in line and "succeeded" in line
        ),
        "beat_alive": beat_alive,
        "ok": t1 is not None and counted == events and left == 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench throughput",
        description="outbox_tasks (celery worker + beat) vs the limit, same run, alternating.",
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--aggregates", type=int, default=1000)
    parser.add_argument("--payload-bytes", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workers", type=common.csv_ints, default=[1, 2], help="worker processes, e.g. 1,2"
    )
    parser.add_argument(
        "--brokers",
        type=common.csv_choices(common.BROKERS),
        default=list(common.BROKERS),
        help="redis,amqp (where events are published; Celery's broker is Redis)",
    )
    common.add_relay_arguments(parser)
    parser.add_argument("--no-baseline", action="store_true", help="outbox_tasks only (no ratio)")
    parser.add_argument(
        "--candidate",
        default=None,
        help="a directory holding another outbox_tasks package (a proposed change): run as a "
        "third system in the same alternation, its workers with PYTHONPATH=DIR",
    )
    parser.add_argument(
        "--logs", type=Path, default=None, help="keep worker/beat logs of each run here"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy the worker (and pool) of every outbox_tasks run into this directory",
    )
    common.add_output_argument(parser)
    args = parser.parse_args(argv)

    relay = common.relay_overrides(args)
    systems = ["baseline", "outbox_tasks"]
    if args.candidate:
        systems.append("candidate")
    if args.no_baseline:
        systems.remove("baseline")
    need_amqp = "amqp" in args.brokers
    results = common.Results("throughput", list(argv or []))
    results.settings = {
        "events": args.events,
        "aggregates": args.aggregates,
        "payload_bytes": args.payload_bytes,
        "repeats": args.repeats,
        "workers": args.workers,
        "brokers": args.brokers,
        "relay": {**common.RELAY_DEFAULTS, **relay},
        "celery": "one `celery worker -c N` (prefork) + beat; Celery broker: Redis",
        "baseline": {"batch": args.batch_size, "index": baseline.INDEX_SQL},
        "t0": "outbox.claim sent (as a beat tick) after the workers are ready",
        "candidate": args.candidate,
        "order": "systems rotate from one (repeat, broker, processes) group to the next",
    }
    log(f"relay settings: {results.settings['relay']}")

    with common.bench_env(need_amqp) as env:
        results.runs += run_matrix(env, args, relay, systems)

    rows = []
    for broker in args.brokers:
        for procs in args.workers:
            for system in systems:
                if system == "baseline":
                    continue
                entry = summarize(results.runs, broker, procs, system)
                results.summary.append(entry)
                rows.append(
                    [
                        broker,
                        procs,
                        system,
                        common.fmt(entry["baseline_rate"]),
                        common.fmt(entry["rate"]),
                        common.fmt(entry["ratio"], 2),
                        ", ".join(common.fmt(x, 2) for x in entry["ratios"]),
                        _cpu_cell(entry["baseline_cpu_us"], entry["baseline_db_cpu_us"]),
                        _cpu_cell(entry["cpu_us"], entry["db_cpu_us"]),
                        _memory_cell(entry["baseline_memory_mib"]),
                        _memory_cell(entry["memory_mib"]),
                        common.fmt(entry["ok"]),
                    ]
                )
    path = results.write(args.output, common.versions(need_amqp=need_amqp))
    print(
        f"Throughput: {args.events:,} events over {args.aggregates:,} aggregates, "
        f"~{args.payload_bytes} B payloads, {args.repeats} repeat(s), counted at the broker\n"
    )
    print("Relay: " + ", ".join(f"{k}={v}" for k, v in results.settings["relay"].items()) + "\n")
    print(
        common.md_table(
            [
                "publish to",
                "processes",
                "system",
                "limit msg/s",
                "msg/s",
                "ratio (median)",
                "ratio per repeat",
                "limit CPU µs/msg (relay+db)",
                "CPU µs/msg (relay+db)",
                "limit RSS (PSS) MiB",
                "RSS (PSS) MiB, all processes",
                "all counted",
            ],
            rows,
        )
    )
    if args.candidate:
        print(f"\ncandidate: workers run with PYTHONPATH={args.candidate}")
    print(f"\nJSON: {path}")
    return 0 if all(r["ok"] for r in results.runs) else 1


def run_matrix(
    env: BenchEnv, args: argparse.Namespace, relay: dict[str, Any], systems: list[str]
) -> list[dict[str, Any]]:
    """Every (repeat, broker, processes) group, each system once per group, rotating the
    order from one group to the next so no system always runs first."""
    runs = []
    n = 0
    for repeat in range(args.repeats):
        for broker in args.brokers:
            for procs in args.workers:
                shift = n % len(systems)
                n += 1
                for system in systems[shift:] + systems[:shift]:
                    log(f"repeat {repeat + 1}/{args.repeats}: {system} {broker} x{procs}")
                    r = _run_one(
                        env, args, relay, system=system, broker=broker, procs=procs, repeat=repeat
                    )
                    r["repeat"] = repeat
                    runs.append(r)
                    log(
                        f"  {common.fmt(r['rate'])} msg/s, counted {r['counted']:,}, "
                        f"{common.fmt(r['cpu_us_per_msg'])}+{common.fmt(r['db_cpu_us_per_msg'])}"
                        f" µs/msg, RSS {common.fmt(r['memory_mib']['rss'])} MiB, ok={r['ok']}"
                    )
    return runs


def _run_one(
    env: BenchEnv,
    args: argparse.Namespace,
    relay: dict[str, Any],
    *,
    system: str,
    broker: str,
    procs: int,
    repeat: int,
) -> dict[str, Any]:
    if system == "baseline":
        return baseline.run(
            env,
            broker=broker,
            procs=procs,
            events=args.events,
            aggregates=args.aggregates,
            batch=args.batch_size,
            payload_bytes=args.payload_bytes,
        )
    tag = f"{system}-{broker}-w{procs}-r{repeat + 1}"
    return run_outbox_tasks(
        env,
        broker=broker,
        procs=procs,
        events=args.events,
        aggregates=args.aggregates,
        payload_bytes=args.payload_bytes,
        relay=relay,
        keep_logs=args.logs / tag if args.logs else None,
        profile=args.profile / f"{tag}.txt" if args.profile else None,
        pythonpath=args.candidate if system in ("candidate", "outbox_tasks_from") else None,
        system=system,
    )


def summarize(
    runs: list[dict[str, Any]], broker: str, procs: int, system: str = "outbox_tasks"
) -> dict[str, Any]:
    """Medians of each system and the median of the per-repeat ratios to the limit."""
    mine = [r for r in runs if r["broker"] == broker and r["procs"] == procs]
    by_repeat: dict[int, dict[str, float]] = {}
    for r in mine:
        if r["rate"]:
            by_repeat.setdefault(r["repeat"], {})[r["system"]] = r["rate"]
    ratios = [
        v[system] / v["baseline"] for v in by_repeat.values() if system in v and "baseline" in v
    ]
    return {
        "broker": broker,
        "procs": procs,
        "system": system,
        "baseline_rate": common.median(
            [r["rate"] for r in mine if r["system"] == "baseline" and r["rate"]]
        ),
        "rate": common.median([r["rate"] for r in mine if r["system"] == system and r["rate"]]),
        "ratio": common.median(ratios),
        "ratios": ratios,
        # Load-independent: CPU per message of the publishing processes and of their
        # PostgreSQL backends (broker server CPU not included).
        "baseline_cpu_us": _cpu(mine, "baseline", "cpu_us_per_msg"),
        "baseline_db_cpu_us": _cpu(mine, "baseline", "db_cpu_us_per_msg"),
        "cpu_us": _cpu(mine, system, "cpu_us_per_msg"),
        "db_cpu_us": _cpu(mine, system, "db_cpu_us_per_msg"),
        "memory_mib": _memory(mine, system),
        "baseline_memory_mib": _memory(mine, "baseline"),
        "ok": all(r["ok"] for r in mine if r["system"] in ("baseline", system)),
    }


def _cpu_cell(relay: float | None, db: float | None) -> str:
    if relay is None or db is None:
        return "-"
    return f"{relay:.0f}+{db:.0f}"


def _memory_cell(memory: dict[str, float | None]) -> str:
    if not memory.get("rss"):
        return "-"
    return f"{common.fmt(memory['rss'])} ({common.fmt(memory['pss'])})"


def _cpu(runs: list[dict[str, Any]], system: str, key: str) -> float | None:
    return common.median([r[key] for r in runs if r["system"] == system and r.get(key)])


def _memory(runs: list[dict[str, Any]], system: str) -> dict[str, float | None]:
    """Median RSS, PSS and USS (MiB, all processes) at the end of the runs of ``system``."""
    mine = [r["memory_mib"] for r in runs if r["system"] == system and r.get("memory_mib")]
    return {
        key: common.median([m[key] for m in mine if m.get(key)]) for key in ("rss", "pss", "uss")
    }
