"""An ordered consumer group with a trivial handler: events handled per second with 1 and with 2
consumer processes, and the broker messages each event costs (issue 14).

Per broker, in one fresh database: two groups of ``--partitions`` (default 2) partitions, each
on an exchange of its own: "one" with one consumer process (it holds every partition), "two"
with two (one partition each); ``python -m outbox_tasks.consumer consume``, handler
:func:`handle`, which does nothing, so an event costs its receipt, its position row and the
commit. The three processes start first and settle on their partitions. Then, ``--repeats``
times, a window per group in turn (order flipped every repeat): ``--events`` events over
``--aggregates`` aggregates published in one batch by the relay's publisher (``BrokerPublisher``)
to that group's exchange, timed from the publish to the group's last receipt. The idle group
waits on its broker meanwhile, so both share the machine's load of the same minute: the
2-process / 1-process ratio is taken per repeat, and the median is reported.

Commit ceiling: after each pair, 1 and then 2 connections do ``--events`` single-row autocommit
INSERTs (in all) into a scratch table of the same database: the durable commits per second the
machine allows, and their 2 / 1 ratio, measured in the same minute. A consumer commits once per
event, so its ratio cannot beat that one for long.

Messages per event: what a third group with the same layout, bound to the same exchange and
never consumed, received per event published. CPU per event: user + system CPU of the consumer
processes and of the database's PostgreSQL backends during the window, per event.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.orm import Session

from bench import common
from bench.common import BenchEnv, log
from outbox_tasks.consumer import Event, declare_topology, delete_topology, lag
from outbox_tasks.envelope import OutboundMessage, build_message
from outbox_tasks.publisher import BrokerPublisher
from outbox_tasks.settings import Settings


def handle(event: Event, session: Session) -> None:
    """The trivial handler: the work is the receipt, the position and the commit."""


class _Process:
    def __init__(self, settings: Settings, group: str, partitions: int, logs: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        env.update(settings.to_env())
        self.log_path = logs / f"consumer-{uuid.uuid4().hex[:8]}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "outbox_tasks.consumer",
                "consume",
                "--group",
                group,
                "--bind",
                "Order.*",
                "--handler",
                "bench.consumer:handle",
                "--partitions",
                str(partitions),
                "--log-level",
                "INFO",
            ],
            cwd=common.ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def held(self) -> set[int]:
        held: set[int] = set()
        for raw in self.log_path.read_text(errors="replace").splitlines():
            with suppress(ValueError):
                line = json.loads(raw)
                if line.get("action") == "partition_acquired":
                    held.add(line["partition"])
                elif line.get("action") in ("partition_released", "partition_lost"):
                    held.discard(line["partition"])
        return held

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class _Group:
    """A group, its exchange, its processes, and the sequences it has been sent so far."""

    def __init__(
        self, env: BenchEnv, broker: str, url: str, processes: int, partitions: int
    ) -> None:
        self.processes = processes
        self.partitions = partitions
        self.settings = common.relay_settings(
            database_url=url,
            broker_url=env.redis_url,
            publish_url=common.publish_url(broker, env),
            exchange=common.unique_name("bench.consumer"),
        )
        self.name = common.unique_name(f"bench-{processes}").replace(".", "-")
        self.counted = self.name + "-count"  # same layout, never consumed: counts deliveries
        self.sequences: dict[str, int] = {}
        self.sent = 0
        self.procs: list[_Process] = []

    def declare(self) -> None:
        for name in (self.name, self.counted):
            declare_topology(name, settings=self.settings, partitions=self.partitions)

    def delete(self) -> None:
        for name in (self.name, self.counted):
            with suppress(Exception):
                delete_topology(name, settings=self.settings, partitions=self.partitions)

    def start(self, logs: Path) -> None:
        self.procs = [
            _Process(self.settings, self.name, self.partitions, logs) for _ in range(self.processes)
        ]

    def settled(self) -> bool:
        if any(p.proc.poll() is not None for p in self.procs):
            raise RuntimeError(f"a consumer of {self.name} exited")
        share = -(-self.partitions // self.processes)
        held = [len(p.held()) for p in self.procs]
        return sum(held) == self.partitions and all(h <= share for h in held)

    def batch(self, count: int, aggregates: int) -> list[OutboundMessage]:
        now = datetime.now(UTC)
        out = []
        for i in range(count):
            aggregate = f"A{i % aggregates}"
            sequence = self.sequences[aggregate] = self.sequences.get(aggregate, 0) + 1
            out.append(
                build_message(
                    event_id=uuid.uuid4(),
                    aggregate_type="Order",
                    aggregate_id=aggregate,
                    event_type="OrderPlaced",
                    occurred_at=now,
                    schema_version=1,
                    sequence=sequence,
                    payload_json=common.payload_json(i),
                    user_headers=None,
                    partition=0,
                    epoch=1,
                    attempt=1,
                    redelivered=False,
                )
            )
        return out


def _receipts(conn: psycopg.Connection[Any], group: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM outbox_consumer_receipt WHERE consumer_group = %s", (group,)
    ).fetchone()
    return int(row[0]) if row else 0


def window(
    group: _Group, url: str, conn: psycopg.Connection[Any], events: int, aggregates: int
) -> dict[str, Any]:
    """Publish ``events`` to the group's exchange; time until the group's last receipt."""
    batch = group.batch(events, aggregates)
    target = group.sent + events

    def cpu() -> float:
        own = sum(common.proc_cpu_seconds(p.proc.pid) for p in group.procs)
        return own + common.backend_cpu_seconds(url, "outbox_tasks.consumer")

    cpu_before = cpu()
    publisher = BrokerPublisher(group.settings.effective_publish_url, group.settings.exchange)
    started = time.monotonic()
    try:
        result = publisher.publish_batch(batch)
    finally:
        publisher.close()
    published = time.monotonic()
    if result.failed:
        raise RuntimeError(f"publish failed: {result.failed}")
    while (done := _receipts(conn, group.name)) < target:
        if time.monotonic() - started > 600:
            raise RuntimeError(f"{group.name}: only {done}/{target} handled")
        time.sleep(0.02)
    finished = time.monotonic()
    cpu_used = cpu() - cpu_before
    group.sent = target
    elapsed = finished - started
    return {
        "processes": group.processes,
        "events": events,
        "publish_seconds": published - started,
        "seconds": elapsed,
        "events_per_second": events / elapsed,
        "cpu_ms_per_event": cpu_used * 1000 / events,
        "load_average": common.machine_load(),
    }


COMMIT_SQL = "INSERT INTO bench_commit (v) VALUES (1)"


def commit_ceiling(url: str, connections: int, commits: int) -> float:
    """Single-row autocommit INSERTs per second on ``connections`` connections at once (each
    does ``commits``): how many durable commits per second this machine's PostgreSQL does, the
    ceiling of a consumer that commits once per event."""
    import threading

    def work() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            for _ in range(commits):
                conn.execute(COMMIT_SQL)

    threads = [threading.Thread(target=work) for _ in range(connections)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return connections * commits / (time.monotonic() - started)


def run(
    env: BenchEnv,
    *,
    broker: str,
    partitions: int,
    events: int,
    aggregates: int,
    repeats: int,
    logs: Path,
) -> dict[str, Any]:
    """Both groups, ``repeats`` pairs of windows; the windows, per-pair ratios, messages/event."""
    with env.database() as url, ExitStack() as stack:
        groups = {n: _Group(env, broker, url, n, partitions) for n in (1, 2)}
        for group in groups.values():
            group.declare()
            stack.callback(group.delete)
            group.start(logs)
            for proc in group.procs:
                stack.callback(proc.stop)
        deadline = time.monotonic() + 60
        while not all(g.settled() for g in groups.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("consumers did not settle on their partitions")
            time.sleep(0.1)
        conn = stack.enter_context(psycopg.connect(url, autocommit=True))
        conn.execute("CREATE TABLE bench_commit (id bigserial PRIMARY KEY, v int)")
        windows: list[dict[str, Any]] = []
        pairs: list[dict[str, Any]] = []
        for repeat in range(repeats):
            order = (1, 2) if repeat % 2 == 0 else (2, 1)
            pair = {}
            for n in order:
                w = window(groups[n], url, conn, events, aggregates)
                w["repeat"] = repeat
                windows.append(w)
                pair[n] = w
                log(
                    f"{broker} repeat {repeat + 1}, {n} process(es): "
                    f"{w['events_per_second']:,.0f} events/s, "
                    f"{w['cpu_ms_per_event']:.2f} ms CPU per event, load {w['load_average']}"
                )
            ceiling = {n: commit_ceiling(url, n, events // n) for n in order}
            pairs.append(
                {
                    "repeat": repeat,
                    "one": pair[1]["events_per_second"],
                    "two": pair[2]["events_per_second"],
                    "ratio": pair[2]["events_per_second"] / pair[1]["events_per_second"],
                    "commits_one": ceiling[1],
                    "commits_two": ceiling[2],
                    "commit_ratio": ceiling[2] / ceiling[1],
                }
            )
        per_event = {
            n: lag(g.counted, settings=g.settings, partitions=partitions, peek=False).messages
            / g.sent
            for n, g in groups.items()
        }
    return {"broker": broker, "windows": windows, "pairs": pairs, "messages_per_event": per_event}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench consumer",
        description="ordered consumer group, trivial handler: 1 vs 2 processes, messages/event",
    )
    parser.add_argument("--events", type=int, default=1000, help="events per window")
    parser.add_argument("--aggregates", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument(
        "--brokers", type=common.csv_choices(common.BROKERS), default=list(common.BROKERS)
    )
    parser.add_argument("--repeats", type=int, default=10, help="pairs of windows")
    parser.add_argument("--logs", type=Path, default=None, help="keep consumer logs here")
    common.add_output_argument(parser)
    args = parser.parse_args(argv)

    results = common.Results("consumer", list(argv or []))
    results.settings = {
        "events": args.events,
        "aggregates": args.aggregates,
        "partitions": args.partitions,
        "brokers": args.brokers,
        "repeats": args.repeats,
        "handler": "does nothing (receipt + position + commit per event)",
    }
    need_amqp = "amqp" in args.brokers
    with common.bench_env(need_amqp) as env, ExitStack() as stack:
        logs = args.logs or Path(stack.enter_context(_tempdir()))
        logs.mkdir(parents=True, exist_ok=True)
        for broker in args.brokers:
            r = run(
                env,
                broker=broker,
                partitions=args.partitions,
                events=args.events,
                aggregates=args.aggregates,
                repeats=args.repeats,
                logs=logs,
            )
            results.runs.append(r)
            per_event = max(r["messages_per_event"].values())
            results.summary.append(
                {
                    "broker": broker,
                    "one": common.median([p["one"] for p in r["pairs"]]),
                    "two": common.median([p["two"] for p in r["pairs"]]),
                    "ratio": common.median([p["ratio"] for p in r["pairs"]]),
                    "ratios": [round(p["ratio"], 2) for p in r["pairs"]],
                    "commits_one": common.median([p["commits_one"] for p in r["pairs"]]),
                    "commits_two": common.median([p["commits_two"] for p in r["pairs"]]),
                    "commit_ratio": common.median([p["commit_ratio"] for p in r["pairs"]]),
                    "broker_messages_per_event": per_event,
                }
            )
    rows = [
        [
            s["broker"],
            common.fmt(s["one"]),
            common.fmt(s["two"]),
            common.fmt(s["ratio"], 2),
            ", ".join(f"{x:.2f}" for x in s["ratios"]),
            common.fmt(s["broker_messages_per_event"], 2),
            f"{common.fmt(s['commits_one'])} / {common.fmt(s['commits_two'])} "
            f"({common.fmt(s['commit_ratio'], 2)})",
        ]
        for s in results.summary
    ]
    path = results.write(args.output, common.versions(need_amqp=need_amqp))
    print(
        f"Ordered consumer group, {args.partitions} partitions, trivial handler, "
        f"{args.events:,} events per window over {args.aggregates} aggregates "
        f"(median of {args.repeats} pairs of windows)\n"
    )
    print(
        common.md_table(
            [
                "broker",
                "1 process events/s",
                "2 processes events/s",
                "ratio 2/1",
                "ratios per repeat",
                "broker messages/event",
                "commit ceiling 1 / 2 conns (ratio)",
            ],
            rows,
        )
    )
    print(f"\nJSON: {path}")
    return 0


def _tempdir() -> Any:
    import tempfile

    return tempfile.TemporaryDirectory(prefix="outbox-bench-consumer-")
