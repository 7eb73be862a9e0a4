"""The limit: the tightest relay this machine can run, written here with no Celery and no kombu
on the Redis side (issue 6). It ignores ordering and everything else; it is the ceiling
outbox_tasks is measured against.

Each baseline process loops::

    UPDATE outbox SET published_at = now() WHERE id IN (
        SELECT id FROM outbox WHERE published_at IS NULL ORDER BY seq LIMIT 1000
        FOR UPDATE SKIP LOCKED) RETURNING ...
    -> Redis: LPUSH every JSON envelope to one list, all in one pipeline (redis-py)
    -> RabbitMQ: basic_publish every envelope on a confirm channel (py-amqp), wait once
    -> COMMIT (only after the broker accepted the batch)

The body is the envelope of ``outbox_tasks.envelope`` (same fields, payload spliced in as
stored). The ceiling's database gets a partial index on ``seq`` (pending rows) so its query is an
index walk: without it every batch sorts the whole backlog (about 50 ms per batch with 100 000
rows here) and the ceiling would be far lower than the machine's limit.

``python -m bench baseline`` runs it alone; ``python -m bench throughput`` runs it against
outbox_tasks in the same process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from bench import common
from bench.common import BenchEnv, log

CLAIM_SQL = """
UPDATE outbox SET published_at = now()
WHERE id IN (
    SELECT id FROM outbox WHERE published_at IS NULL
    ORDER BY seq LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING id, aggregate_type, aggregate_id, event_type, created_at, schema_version, seq,
          payload::text
"""

INDEX_SQL = (
    "CREATE INDEX IF NOT EXISTS bench_pending_seq ON outbox (seq) WHERE published_at IS NULL"
)


def envelope(row: Sequence[Any]) -> bytes:
    """The body outbox_tasks sends (outbox_tasks.envelope.build_message), built the same way."""
    event_id, aggregate_type, aggregate_id, event_type, created_at, schema_version, seq, payload = (
        row
    )
    head = json.dumps(
        {
            "id": str(event_id),
            "aggregate_type": aggregate_type,
            "aggregate_id": aggregate_id,
            "event_type": event_type,
            "occurred_at": created_at.isoformat(),
            "schema_version": schema_version,
            "sequence": seq,
        },
        separators=(",", ":"),
    )
    return f'{head[:-1]},"payload":{payload}}}'.encode()


def prepare_database(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(INDEX_SQL)
        conn.execute("ANALYZE outbox")


def _redis_process(job: dict[str, Any], ready: Any, go: Any, out: Any) -> None:
    import redis

    db_url, redis_url, queue, batch = job["db"], job["broker"], job["target"], job["batch"]
    client = redis.Redis.from_url(redis_url)
    client.ping()
    batches = 0
    with psycopg.connect(db_url) as conn:
        backend = conn.info.backend_pid
        ready.put(os.getpid())
        go.wait()
        cpu0, db0 = time.process_time(), common.proc_cpu_seconds(backend)
        while True:
            rows = conn.execute(CLAIM_SQL, {"limit": batch}).fetchall()
            if not rows:
                conn.rollback()
                break
            pipe = client.pipeline(transaction=False)
            for row in rows:
                pipe.lpush(queue, envelope(row))
            pipe.execute()
            conn.commit()
            batches += 1
        cpu, db = time.process_time() - cpu0, common.proc_cpu_seconds(backend) - db0
    client.close()
    out.put(
        {
            "pid": os.getpid(),
            "batches": batches,
            "cpu": cpu,
            "db_cpu": db,
            "memory": common.proc_memory_kib(os.getpid()),
        }
    )


def _amqp_process(job: dict[str, Any], ready: Any, go: Any, out: Any) -> None:
    from amqp.basic_message import Message
    from kombu import Connection

    db_url, amqp_url, exchange, batch = job["db"], job["broker"], job["target"], job["batch"]
    conn_k = Connection(amqp_url)
    conn_k.connect()
    raw = conn_k.connection
    channel = raw.channel()
    channel.confirm_select()
    unconfirmed: dict[int, None] = {}
    nacks = [0]

    def settle(tag: int, multiple: bool, nack: bool) -> None:
        if multiple:
            # Tags go in in increasing order: the settled ones are a prefix.
            settled = []
            for t in unconfirmed:
                if t > tag:
                    break
                settled.append(t)
            for t in settled:
                del unconfirmed[t]
                nacks[0] += nack
        elif tag in unconfirmed:
            del unconfirmed[tag]
            nacks[0] += nack

    channel.events["basic_ack"].add(lambda tag, multiple: settle(tag, multiple, False))
    channel.events["basic_nack"].add(lambda tag, multiple: settle(tag, multiple, True))
    next_tag = 1
    batches = 0
    with psycopg.connect(db_url) as conn:
        backend = conn.info.backend_pid
        ready.put(os.getpid())
        go.wait()
        cpu0, db0 = time.process_time(), common.proc_cpu_seconds(backend)
        while True:
            rows = conn.execute(CLAIM_SQL, {"limit": batch}).fetchall()
            if not rows:
                conn.rollback()
                break
            for row in rows:
                message = Message(
                    envelope(row),
                    content_type="application/json",
                    content_encoding="utf-8",
                    delivery_mode=2,
                    message_id=str(row[0]),
                )
                unconfirmed[next_tag] = None
                next_tag += 1
                channel.basic_publish(message, exchange=exchange, routing_key=f"{row[1]}.{row[3]}")
            while unconfirmed:  # one wait per batch
                raw.drain_events(timeout=30)
            if nacks[0]:
                raise RuntimeError(f"{nacks[0]} messages nacked")
            conn.commit()
            batches += 1
        cpu, db = time.process_time() - cpu0, common.proc_cpu_seconds(backend) - db0
    memory = common.proc_memory_kib(os.getpid())
    conn_k.release()
    out.put({"pid": os.getpid(), "batches": batches, "cpu": cpu, "db_cpu": db, "memory": memory})


def run(
    env: BenchEnv,
    *,
    broker: str,
    procs: int,
    events: int,
    aggregates: int,
    batch: int = 1000,
    payload_bytes: int = 300,
    timeout: float | None = None,
) -> dict[str, Any]:
    """One ceiling run in a fresh database: load, start ``procs`` processes at once, time until
    every event is counted at the broker."""
    with env.database() as url:
        load_seconds = common.copy_events(url, events, aggregates, payload_bytes=payload_bytes)
        prepare_database(url)
        exchange = common.unique_name("bench.events")
        sink = common.make_sink(broker, env, exchange)
        ctx = mp.get_context("spawn")
        ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
        if broker == "redis":
            job = {"db": url, "broker": env.redis_url, "target": sink.queue, "batch": batch}
            target: Any = _redis_process
        else:
            job = {"db": url, "broker": common.AMQP_URL, "target": exchange, "batch": batch}
            target = _amqp_process
        workers = [
            ctx.Process(target=target, args=(job, ready, go, out), daemon=True)
            for _ in range(procs)
        ]
        try:
            for w in workers:
                w.start()
            for _ in workers:
                ready.get(timeout=60)
            t0 = time.monotonic()
            go.set()
            t1 = common.wait_count(
                sink,
                events,
                timeout=timeout or max(120.0, events / 200),
                alive=lambda: any(w.is_alive() for w in workers),
            )
            for w in workers:
                w.join(60)
            stats = [out.get(timeout=5) for w in workers if w.exitcode == 0]
            counted = sink.count()
            left = common.pending(url)
        finally:
            for w in workers:
                if w.is_alive():
                    w.kill()
            sink.close()
            env.flush_redis()
    seconds = (t1 - t0) if t1 is not None else None
    return {
        "system": "baseline",
        "broker": broker,
        "procs": procs,
        "events": events,
        "aggregates": aggregates,
        "load_seconds": round(load_seconds, 3),
        "seconds": seconds,
        "rate": events / seconds if seconds else None,
        "counted": counted,
        "pending_after": left,
        "batches": sum(s["batches"] for s in stats),
        "cpu_us_per_msg": sum(s["cpu"] for s in stats) / events * 1e6 if stats else None,
        "db_cpu_us_per_msg": sum(s["db_cpu"] for s in stats) / events * 1e6 if stats else None,
        "memory_mib": _memory_total([s["memory"] for s in stats]),
        "ok": t1 is not None and counted == events and left == 0,
    }


def _memory_total(each: list[dict[str, int]]) -> dict[str, Any]:
    return {
        **{key: round(sum(m.get(key, 0) for m in each) / 1024, 1) for key in ("rss", "pss", "uss")},
        "processes": len(each),
    }


# --- the limit for latency: LISTEN, then drain at once -----------------------------------------

LATENCY_APPLICATION = "bench_limit"


def _latency_process(job: dict[str, Any], ready: Any, stop: Any) -> None:
    """Wait for the outbox trigger's NOTIFY (or ``poll`` seconds), then drain: CLAIM_SQL,
    LPUSH every envelope in one pipeline, commit, until nothing is pending."""
    import redis

    client = redis.Redis.from_url(job["broker"])
    client.ping()
    queue, batch, poll = job["target"], job["batch"], job["poll"]
    with (
        psycopg.connect(job["db"], autocommit=True, application_name=LATENCY_APPLICATION) as lsn,
        psycopg.connect(job["db"], application_name=LATENCY_APPLICATION) as conn,
    ):
        lsn.execute("LISTEN outbox_wakeup")
        ready.put(os.getpid())
        while not stop.is_set():
            while True:
                rows = conn.execute(CLAIM_SQL, {"limit": batch}).fetchall()
                if not rows:
                    conn.rollback()
                    break
                pipe = client.pipeline(transaction=False)
                for row in rows:
                    pipe.lpush(queue, envelope(row))
                pipe.execute()
                conn.commit()
            for _ in lsn.notifies(timeout=poll, stop_after=1):
                pass
    client.close()


@contextmanager
def latency_relay(
    url: str, redis_url: str, queue: str, *, batch: int = 500, poll: float = 1.0
) -> Iterator[tuple[int, str]]:
    """The limit's relay for the latency bench, LPUSHing envelopes to ``queue``; yields its
    pid and the application name of its PostgreSQL connections while it runs."""
    prepare_database(url)
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    job = {"db": url, "broker": redis_url, "target": queue, "batch": batch, "poll": poll}
    proc = ctx.Process(target=_latency_process, args=(job, ready, stop), daemon=True)
    proc.start()
    try:
        pid = ready.get(timeout=60)
        yield int(pid), LATENCY_APPLICATION
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench baseline", description="The ceiling: psycopg + redis-py / py-amqp."
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--aggregates", type=int, default=1000)
    parser.add_argument("--payload-bytes", type=int, default=300)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--procs", type=common.csv_ints, default=[1, 2], help="e.g. 1,2")
    parser.add_argument(
        "--brokers", type=common.csv_choices(common.BROKERS), default=list(common.BROKERS)
    )
    parser.add_argument("--repeats", type=int, default=3)
    common.add_output_argument(parser)
    args = parser.parse_args(argv)
    need_amqp = "amqp" in args.brokers
    results = common.Results("baseline", list(argv or []))
    results.settings = {
        "events": args.events,
        "aggregates": args.aggregates,
        "payload_bytes": args.payload_bytes,
        "batch": args.batch,
        "procs": args.procs,
        "brokers": args.brokers,
        "repeats": args.repeats,
        "baseline_index": INDEX_SQL,
    }
    with common.bench_env(need_amqp) as env:
        for repeat in range(args.repeats):
            for broker in args.brokers:
                for procs in args.procs:
                    log(f"repeat {repeat + 1}: baseline {broker} x{procs}")
                    run_ = run(
                        env,
                        broker=broker,
                        procs=procs,
                        events=args.events,
                        aggregates=args.aggregates,
                        batch=args.batch,
                        payload_bytes=args.payload_bytes,
                    )
                    run_["repeat"] = repeat
                    results.runs.append(run_)
                    log(f"  {common.fmt(run_['rate'])} msg/s ok={run_['ok']}")
    rows = []
    for broker in args.brokers:
        for procs in args.procs:
            rates = [
                r["rate"]
                for r in results.runs
                if r["broker"] == broker and r["procs"] == procs and r["rate"]
            ]
            ok = all(r["ok"] for r in results.runs if r["broker"] == broker and r["procs"] == procs)
            entry = {
                "broker": broker,
                "procs": procs,
                "median_rate": common.median(rates),
                "rates": rates,
                "ok": ok,
            }
            results.summary.append(entry)
            rows.append(
                [
                    broker,
                    procs,
                    common.fmt(entry["median_rate"]),
                    ", ".join(common.fmt(r) for r in rates),
                    common.fmt(ok),
                ]
            )
    path = results.write(args.output, common.versions(need_amqp=need_amqp))
    print(f"Baseline (the limit): {args.events:,} events, {args.aggregates:,} aggregates\n")
    print(
        common.md_table(["broker", "processes", "median msg/s", "per repeat", "all counted"], rows)
    )
    print(f"\nJSON: {path}")
    return 0 if all(r["ok"] for r in results.runs) else 1
