"""Latency: commit-to-arrival of single events at a steady producer rate, through real
``celery worker`` processes + beat, with the wake-up path on and off (issue 6).

- Producer: ``--producers`` threads in this process, each with its own connection, commit one
  event per transaction (autocommit INSERT) on a fixed schedule (event i is due at
  start + i / rate). The commit time is taken when the INSERT returns.
- Consumer: an independent process reading the queue bound to the exchange (Redis: raw BRPOP on
  the queue's list; RabbitMQ: a kombu consumer, no ack), stamping arrivals with ``time.time()``.
- Latency = arrival - commit, first arrival per event; p50/p95/p99/max in ms, over the steady
  state: the first ``WARMUP_SECONDS`` of producing (both systems) are reported on their own
  (``warmup_max_ms``: the first event also pays the pool processes' first connections).
- Backlog: pending rows are sampled every 0.5 s; "grew" means more than one second of events
  was still pending when the producer stopped (the relay did not keep up).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from bench import baseline, common
from bench.common import BenchEnv, log

WARMUP_SECONDS = 1.0

INSERT_SQL = (
    "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
    "VALUES (%s, 'Order', %s, 'OrderCreated', %s)"
)


def _redis_consumer(url: str, queue: str, ready: Any, stop: Any, out: Any) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.ping()
    got: list[tuple[bytes, float]] = []
    ready.put(True)
    while not stop.is_set():
        item = client.brpop([queue], timeout=0.2)
        if item is None:
            continue
        got.append((item[1], time.time()))
        while True:  # whatever else is already there, without blocking
            more = client.rpop(queue, 500)
            if not more:
                break
            at = time.time()
            got.extend((raw, at) for raw in more)
    client.close()
    out.put([(_event_id(raw), at) for raw, at in got])


def _event_id(raw: bytes) -> str:
    """The event id of a kombu message (outbox_tasks) or of a bare envelope (the limit)."""
    doc = json.loads(raw)
    headers = doc.get("headers")
    return str(headers["outbox-event-id"] if headers else doc["id"])


def _amqp_consumer(url: str, queue: str, ready: Any, stop: Any, out: Any) -> None:
    from kombu import Connection, Queue

    got: list[tuple[str, float]] = []

    def on_message(message: Any) -> None:
        got.append((message.headers["outbox-event-id"], time.time()))

    with (
        Connection(url) as conn,
        conn.Consumer(
            [Queue(queue, no_declare=True)], on_message=on_message, no_ack=True, prefetch_count=0
        ),
    ):
        ready.put(True)
        while not stop.is_set():
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                continue
    out.put(got)


class Producer:
    """Commits single events on a fixed schedule from a few threads."""

    def __init__(self, url: str, rate: float, duration: float, threads: int) -> None:
        self.url = url
        self.rate = rate
        self.count = int(rate * duration)
        self.threads = threads
        self.committed: dict[str, float] = {}
        self.lag_max = 0.0
        self.errors: list[str] = []
        self._next = itertools.count()
        self._lock = threading.Lock()
        self.started = 0.0
        self.finished = 0.0

    def run(self) -> None:
        conns = [psycopg.connect(self.url, autocommit=True) for _ in range(self.threads)]
        self.started = time.time() + 0.05
        workers = [threading.Thread(target=self._loop, args=(c,)) for c in conns]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        self.finished = time.time()
        for c in conns:
            c.close()

    def _loop(self, conn: psycopg.Connection[Any]) -> None:
        lag_max = 0.0
        try:
            while True:
                with self._lock:
                    i = next(self._next)
                if i >= self.count:
                    break
                due = self.started + i / self.rate
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                event_id = str(uuid.uuid4())
                conn.execute(INSERT_SQL, (event_id, f"L{i % 1000}", common.payload_json(i)))
                done = time.time()
                self.committed[event_id] = done
                lag_max = max(lag_max, done - due)
        except Exception as error:  # reported, the run is then marked not ok
            self.errors.append(repr(error))
        with self._lock:
            self.lag_max = max(self.lag_max, lag_max)


def _sample_pending(url: str, stop: threading.Event, samples: list[tuple[float, int]]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            row = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
            assert row is not None
            samples.append((time.time(), int(row[0])))
            stop.wait(0.5)


@contextmanager
def _outbox_tasks_relay(
    settings: Any, procs: int, keep_logs: Path | None, pythonpath: str | None = None
) -> Iterator[tuple[int, str]]:
    """``celery worker -c procs`` + beat; yields the worker's pid and its application name."""
    with common.celery_cluster(settings, keep_logs=keep_logs, pythonpath=pythonpath) as cluster:
        worker = cluster.worker("bench", concurrency=procs)
        beat = cluster.beat()
        cluster.wait_ready(worker, timeout=60)
        cluster.wait_ready(beat, timeout=60)
        time.sleep(1.0)  # the wake-up listener connects after "ready"
        yield worker.pid, settings.application_name


def _sample_memory(
    pid: int, stop: threading.Event, samples: list[tuple[float, dict[str, Any]]], every: float
) -> None:
    while not stop.is_set():
        samples.append((time.time(), common.tree_memory_mib(pid)))
        stop.wait(every)


def run(
    env: BenchEnv,
    *,
    broker: str,
    rate: float,
    duration: float,
    wakeup: bool,
    procs: int,
    producers: int,
    relay: dict[str, Any],
    system: str = "outbox_tasks",
    drain_timeout: float = 60.0,
    keep_logs: Path | None = None,
    profile: Path | None = None,
    memory_every: float = 5.0,
    pythonpath: str | None = None,
    warmup: float = WARMUP_SECONDS,
) -> dict[str, Any]:
    """One latency run of ``system``: ``outbox_tasks`` (real celery worker + beat; its workers
    import ``outbox_tasks`` from ``pythonpath`` first when given) or ``baseline`` (the limit:
    LISTEN, then UPDATE ... RETURNING + LPUSH at once; Redis only). The producer runs
    ``warmup`` + ``duration`` seconds; percentiles are over the events of the last
    ``duration`` seconds (steady state), the warm-up's worst is reported on its own."""
    if system == "baseline" and broker != "redis":
        raise ValueError("the limit's latency relay publishes to Redis only")
    with env.database() as url:
        exchange = common.unique_name("bench.events")
        sink = common.make_sink(broker, env, exchange)
        settings = common.relay_settings(
            database_url=url,
            broker_url=env.redis_url,
            publish_url=common.publish_url(broker, env),
            exchange=exchange,
            **{**relay, "wakeup_enabled": wakeup},
        )
        ctx = mp.get_context("spawn")
        ready, stop, out = ctx.Queue(), ctx.Event(), ctx.Queue()
        target = _redis_consumer if broker == "redis" else _amqp_consumer
        consumer = ctx.Process(
            target=target, args=(sink.url, sink.queue, ready, stop, out), daemon=True
        )
        arrivals: list[tuple[str, float]] = []
        samples: list[tuple[float, int]] = []
        memory: list[tuple[float, dict[str, Any]]] = []
        producer = Producer(url, rate, duration + warmup, producers)
        relay_cm: Any
        if system == "baseline":
            relay_cm = baseline.latency_relay(
                url,
                env.redis_url,
                sink.queue,
                batch=settings.batch_size,
                poll=settings.poll_interval_seconds,
            )
        else:
            relay_cm = _outbox_tasks_relay(settings, procs, keep_logs, pythonpath)
        try:
            with relay_cm as (pid, application):
                consumer.start()
                ready.get(timeout=60)
                stops = threading.Event()
                threads = [
                    threading.Thread(
                        target=_sample_pending, args=(url, stops, samples), daemon=True
                    ),
                    threading.Thread(
                        target=_sample_memory, args=(pid, stops, memory, memory_every), daemon=True
                    ),
                ]
                for thread in threads:
                    thread.start()
                spy = common.start_py_spy(pid, profile) if profile else None
                cpu0 = common.tree_cpu_seconds(pid)
                db0 = common.backend_cpu_seconds(url, application)
                try:
                    producer.run()
                finally:
                    if spy is not None:
                        common.stop_py_spy(spy)
                pending_end = common.pending(url)
                deadline = time.monotonic() + drain_timeout
                while time.monotonic() < deadline and common.pending(url) > 0:
                    time.sleep(0.1)
                drained_at = time.time()
                cpu = common.tree_cpu_seconds(pid) - cpu0
                db_cpu = common.backend_cpu_seconds(url, application) - db0
                time.sleep(1.0)  # last pushes reach the consumer
                stops.set()
                for thread in threads:
                    thread.join(5)
                stop.set()
                arrivals = out.get(timeout=60)
                consumer.join(10)
        finally:
            stop.set()
            if consumer.is_alive():
                consumer.kill()
            sink.close()
            env.flush_redis()

    first: dict[str, float] = {}
    for event_id, at in arrivals:
        first.setdefault(event_id, at)
    steady_from = producer.started + warmup
    latencies = sorted(
        (first[e] - t) * 1000.0
        for e, t in producer.committed.items()
        if e in first and t >= steady_from
    )
    warming = [
        (first[e] - t) * 1000.0
        for e, t in producer.committed.items()
        if e in first and t < steady_from
    ]
    # The slowest events with when they were committed (seconds into the run, wall clock too):
    # a tail lines up with the worker log's task ends and lease hand-backs.
    slowest = sorted(
        ((first[e] - t) * 1000.0, t - producer.started, t)
        for e, t in producer.committed.items()
        if e in first
    )[-30:]
    missing = sum(1 for e in producer.committed if e not in first)
    achieved = len(producer.committed) / max(1e-9, producer.finished - producer.started)
    during = [p for t, p in samples if producer.started <= t <= producer.finished]
    produced = len(producer.committed)
    in_run = [m for t, m in memory if producer.started <= t <= producer.finished] or [
        m for _, m in memory
    ]
    return {
        "system": system,
        "broker": broker,
        "rate": rate,
        "duration": duration,
        "wakeup": wakeup,
        "procs": procs if system == "outbox_tasks" else 1,
        "producers": producers,
        "produced": produced,
        "achieved_rate": achieved,
        "producer_lag_max_ms": producer.lag_max * 1000,
        "producer_errors": producer.errors[:5],
        "received": len(first),
        "duplicates": len(arrivals) - len(first),
        "missing": missing,
        "p50_ms": common.percentile(latencies, 50),
        "p95_ms": common.percentile(latencies, 95),
        "p99_ms": common.percentile(latencies, 99),
        "max_ms": latencies[-1] if latencies else None,
        "warmup_seconds": warmup,
        "warmup_max_ms": max(warming, default=None),
        "slowest": [
            {"latency_ms": round(ms, 1), "at_s": round(at, 3), "at_wall": at_wall}
            for ms, at, at_wall in reversed(slowest)
        ],
        "pending_median": common.median(during),
        "pending_max": max(during) if during else None,
        "pending_end": pending_end,
        "drain_seconds": drained_at - producer.finished,
        "backlog_grew": pending_end > rate * 1.0,
        "cpu_ms_per_1000": cpu / produced * 1e6 if produced else None,
        "db_cpu_ms_per_1000": db_cpu / produced * 1e6 if produced else None,
        "memory_start_mib": in_run[0] if in_run else None,
        "memory_end_mib": in_run[-1] if in_run else None,
        "memory_samples": [(round(t - producer.started, 1), m["rss"], m["pss"]) for t, m in memory],
        "ok": missing == 0 and not producer.errors and produced > 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench latency",
        description="commit-to-arrival at fixed producer rates, wake-up on and off, and the limit",
    )
    parser.add_argument("--rates", type=common.csv_ints, default=[200, 2000], help="events/s")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of producing")
    parser.add_argument(
        "--wakeup",
        type=common.csv_choices(("on", "off")),
        default=["on", "off"],
        help="on,off (OUTBOX_WAKEUP_ENABLED)",
    )
    parser.add_argument(
        "--no-limit",
        action="store_true",
        help="skip the limit (LISTEN + UPDATE ... RETURNING + LPUSH) in the same alternation",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (-c)")
    parser.add_argument(
        "--producers", type=int, default=0, help="producer threads (default: rate/100, >= 2)"
    )
    parser.add_argument("--broker", choices=common.BROKERS, default="redis")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--logs", type=Path, default=None, help="keep worker/beat logs of each run here"
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="py-spy the worker of each run into this dir"
    )
    common.add_relay_arguments(parser)
    common.add_output_argument(parser)
    args = parser.parse_args(argv)

    relay = common.relay_overrides(args)
    results = common.Results("latency", list(argv or []))
    results.settings = {
        "rates": args.rates,
        "duration": args.duration,
        "wakeup": args.wakeup,
        "workers": args.workers,
        "broker": args.broker,
        "repeats": args.repeats,
        "relay": {**common.RELAY_DEFAULTS, **relay},
        "consumer": "raw BRPOP on the bound queue's list"
        if args.broker == "redis"
        else "kombu consumer, no_ack",
        "backlog_grew": "pending when the producer stopped > 1 s of events",
    }
    log(f"relay settings: {results.settings['relay']}")
    cases = [("outbox_tasks", mode) for mode in args.wakeup]
    if not args.no_limit and args.broker == "redis":
        cases.append(("baseline", "on"))
    with common.bench_env(args.broker == "amqp") as env:
        for repeat in range(args.repeats):
            for rate in args.rates:
                shift = repeat % len(cases)
                for system, mode in cases[shift:] + cases[:shift]:
                    r = run_case(env, args, relay, system=system, mode=mode, rate=rate)
                    r["repeat"] = repeat
                    results.runs.append(r)
    results.summary = [summary_of(r) for r in results.runs]
    path = results.write(args.output, common.versions(need_amqp=args.broker == "amqp"))
    print(
        f"Latency (commit -> arrival at an independent consumer), {args.broker}, "
        f"{args.workers} worker processes, {args.duration:g} s per run\n"
    )
    print("Relay: " + ", ".join(f"{k}={v}" for k, v in results.settings["relay"].items()) + "\n")
    print(table(results.runs))
    print(f"\nJSON: {path}")
    return 0 if all(r["ok"] for r in results.runs) else 1


def run_case(
    env: BenchEnv,
    args: argparse.Namespace,
    relay: dict[str, Any],
    *,
    system: str,
    mode: str,
    rate: int,
    repeat: int = 0,
) -> dict[str, Any]:
    """One run with the options of ``args`` (rate, duration, workers, producers, logs)."""
    producers = args.producers or max(2, rate // 100)
    label = "the limit" if system == "baseline" else f"outbox_tasks, wake-up {mode}"
    log(f"repeat {repeat + 1}: {rate}/s for {args.duration:g} s, {label}")
    tag = f"{system}-{rate}-{mode}-r{repeat + 1}"
    r = run(
        env,
        broker=args.broker,
        rate=rate,
        duration=args.duration,
        wakeup=mode == "on",
        procs=args.workers,
        producers=producers,
        relay=relay,
        system=system,
        profile=args.profile / f"{tag}.txt" if args.profile and system != "baseline" else None,
        keep_logs=args.logs / tag if args.logs else None,
        pythonpath=getattr(args, "candidate", None),
    )
    log(
        f"  p50 {common.fmt(r['p50_ms'], 1)} p99 {common.fmt(r['p99_ms'], 1)} ms at "
        f"{common.fmt(r['achieved_rate'])}/s, received {r['received']:,}/{r['produced']:,}, "
        f"pending at end {r['pending_end']}, CPU {common.fmt(r['cpu_ms_per_1000'])} ms/1000"
    )
    return r


SUMMARY_KEYS = (
    "system",
    "rate",
    "achieved_rate",
    "wakeup",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "pending_end",
    "backlog_grew",
    "cpu_ms_per_1000",
    "db_cpu_ms_per_1000",
    "repeat",
)


def summary_of(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in SUMMARY_KEYS}


def table(runs: list[dict[str, Any]]) -> str:
    rows = [
        [
            "limit" if r["system"] == "baseline" else "outbox_tasks",
            common.fmt(r["rate"]),
            common.fmt(r["achieved_rate"]),
            "on" if r["wakeup"] else "off",
            common.fmt(r["p50_ms"], 1),
            common.fmt(r["p95_ms"], 1),
            common.fmt(r["p99_ms"], 1),
            common.fmt(r["max_ms"], 1),
            f"{r['received']:,}/{r['produced']:,}",
            common.fmt(r["pending_end"]),
            common.fmt(r["backlog_grew"]),
            f"{common.fmt(r['cpu_ms_per_1000'])}+{common.fmt(r['db_cpu_ms_per_1000'])}",
        ]
        for r in runs
    ]
    return common.md_table(
        [
            "system",
            "rate/s",
            "achieved/s",
            "wake-up",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "received",
            "pending at end",
            "backlog grew",
            "CPU ms/1000 msg (relay+db)",
        ],
        rows,
    )
