"""An ordered consumer group with a trivial handler: events handled per second with 1 and with 2
consumer processes, and the broker messages each event costs (issue 14).

Each run: a fresh database (the group's receipts and positions), a fresh exchange and group
(``--partitions``, default 2). The consumer processes (``python -m outbox_tasks.consumer
consume``, handler :func:`handle`: does nothing) start first and share the partitions; then
``--events`` events over ``--aggregates`` aggregates are published through the relay's own
publisher (``BrokerPublisher``, one batch), and the run times from the publish to the last
receipt. CPU per event: user + system CPU of the consumer processes and their PostgreSQL
backends during the run, per event (it moves less with the machine's load than events/s).
Messages per event: the messages the group's queues received (counted before the
consumers start, in a second group declared alongside and never consumed) per event published.

1 and 2 processes alternate within each repeat (``--repeats``, order flipped every repeat); the
2-process / 1-process ratio is computed per repeat and the median is reported.
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


def _messages(count: int, aggregates: int) -> list[OutboundMessage]:
    sequences: dict[str, int] = {}
    out = []
    now = datetime.now(UTC)
    for i in range(count):
        aggregate = f"A{i % aggregates}"
        sequences[aggregate] = sequences.get(aggregate, 0) + 1
        out.append(
            build_message(
                event_id=uuid.uuid4(),
                aggregate_type="Order",
                aggregate_id=aggregate,
                event_type="OrderPlaced",
                occurred_at=now,
                schema_version=1,
                sequence=sequences[aggregate],
                payload_json=common.payload_json(i),
                user_headers=None,
                partition=0,
                epoch=1,
                attempt=1,
                redelivered=False,
            )
        )
    return out


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


def _receipts(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM outbox_consumer_receipt").fetchone()
    return int(row[0]) if row else 0


def run(
    env: BenchEnv,
    *,
    broker: str,
    processes: int,
    partitions: int,
    events: int,
    aggregates: int,
    logs: Path,
) -> dict[str, Any]:
    with env.database() as url, ExitStack() as stack:
        exchange = common.unique_name("bench.consumer")
        settings = common.relay_settings(
            database_url=url,
            broker_url=env.redis_url,
            publish_url=common.publish_url(broker, env),
            exchange=exchange,
        )
        group = common.unique_name("bench").replace(".", "-")
        counted = group + "-count"  # same layout, never consumed: counts the deliveries
        for name in (group, counted):
            declare_topology(name, settings=settings, partitions=partitions)
            stack.callback(
                lambda n=name: delete_topology(n, settings=settings, partitions=partitions)
            )
        procs = [_Process(settings, group, partitions, logs) for _ in range(processes)]
        for proc in procs:
            stack.callback(proc.stop)
        share = -(-partitions // processes)
        deadline = time.monotonic() + 60
        while (
            not all(len(p.held()) == min(share, partitions) for p in procs)
            or sum(len(p.held()) for p in procs) != partitions
        ):
            if time.monotonic() > deadline or any(p.proc.poll() is not None for p in procs):
                raise RuntimeError("consumers did not settle on their partitions")
            time.sleep(0.1)
        batch = _messages(events, aggregates)
        publisher = BrokerPublisher(settings.effective_publish_url, settings.exchange)

        def cpu() -> float:
            own = sum(common.proc_cpu_seconds(p.proc.pid) for p in procs)
            return own + common.backend_cpu_seconds(url, "outbox_tasks.consumer")

        cpu_before = cpu()
        started = time.monotonic()
        try:
            result = publisher.publish_batch(batch)
        finally:
            publisher.close()
        published = time.monotonic()
        if result.failed:
            raise RuntimeError(f"publish failed: {result.failed}")
        while (done := _receipts(url)) < events:
            if time.monotonic() - started > 600:
                raise RuntimeError(f"only {done}/{events} handled")
            time.sleep(0.02)
        finished = time.monotonic()
        cpu_used = cpu() - cpu_before
        messages = lag(counted, settings=settings, partitions=partitions, peek=False).messages
    elapsed = finished - started
    return {
        "broker": broker,
        "processes": processes,
        "partitions": partitions,
        "events": events,
        "publish_seconds": published - started,
        "seconds": elapsed,
        "events_per_second": events / elapsed,
        "broker_messages_per_event": messages / events,
        "cpu_ms_per_event": cpu_used * 1000 / events,
        "load_average": common.machine_load(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench consumer",
        description="ordered consumer group, trivial handler: 1 vs 2 processes, messages/event",
    )
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--aggregates", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument(
        "--brokers", type=common.csv_choices(common.BROKERS), default=list(common.BROKERS)
    )
    parser.add_argument("--repeats", type=int, default=3)
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
            for repeat in range(args.repeats):
                order = (1, 2) if repeat % 2 == 0 else (2, 1)
                by_count: dict[int, dict[str, Any]] = {}
                for processes in order:
                    log(f"{broker} repeat {repeat + 1}: {processes} process(es)")
                    r = run(
                        env,
                        broker=broker,
                        processes=processes,
                        partitions=args.partitions,
                        events=args.events,
                        aggregates=args.aggregates,
                        logs=logs,
                    )
                    r["repeat"] = repeat
                    results.runs.append(r)
                    by_count[processes] = r
                    log(
                        f"  {r['events_per_second']:,.0f} events/s, "
                        f"{r['broker_messages_per_event']:.2f} broker messages per event, "
                        f"{r['cpu_ms_per_event']:.2f} ms CPU per event (consumers + backends), "
                        f"load {r['load_average']}"
                    )
                results.summary.append(
                    {
                        "broker": broker,
                        "repeat": repeat,
                        "one": by_count[1]["events_per_second"],
                        "two": by_count[2]["events_per_second"],
                        "ratio": by_count[2]["events_per_second"]
                        / by_count[1]["events_per_second"],
                        "broker_messages_per_event": by_count[2]["broker_messages_per_event"],
                    }
                )
    rows = []
    for broker in args.brokers:
        mine = [s for s in results.summary if s["broker"] == broker]
        rows.append(
            [
                broker,
                common.fmt(common.median([s["one"] for s in mine])),
                common.fmt(common.median([s["two"] for s in mine])),
                common.fmt(common.median([s["ratio"] for s in mine]), 2),
                ", ".join(f"{s['ratio']:.2f}" for s in mine),
                common.fmt(common.median([s["broker_messages_per_event"] for s in mine]), 2),
            ]
        )
    path = results.write(args.output, common.versions(need_amqp=need_amqp))
    print(
        f"Ordered consumer group, {args.partitions} partitions, trivial handler, "
        f"{args.events:,} events over {args.aggregates} aggregates (median of {args.repeats})\n"
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
            ],
            rows,
        )
    )
    print(f"\nJSON: {path}")
    return 0


def _tempdir() -> Any:
    import tempfile

    return tempfile.TemporaryDirectory(prefix="outbox-bench-consumer-")
