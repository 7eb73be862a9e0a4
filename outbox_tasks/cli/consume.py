"""``consume`` (run a consumer group process) and ``consumers lag|parked|unpark|replay``
(outbox_tasks.consumer). Also ``python -m outbox_tasks.consumer``. Each command returns its
exit code."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

import click

from outbox_tasks.cli.options import CommandList, json_option, settings_from_options, stack
from outbox_tasks.logs import event as log_event
from outbox_tasks.logs import get_logger
from outbox_tasks.settings import env_var

log = get_logger("consumer")
F = TypeVar("F", bound=Callable[..., Any])

DB_HELP = f"database holding the handler's tables and the receipts (env {env_var('database_url')})"
BROKER_HELP = (
    f"broker events arrive on (env {env_var('publish_url')}, else {env_var('broker_url')})"
)
EXCHANGE_HELP = f"topic exchange (env {env_var('exchange')})"


@click.command(
    "consume",
    short_help="run a consumer group process: idempotent (and optionally ordered) event handling",
    help="Consume outbox events with a handler `on_event(event, session)`. Each event "
    "is handled in one database transaction with its receipt, and acknowledged after the "
    "commit. SIGTERM/SIGINT finish the message in hand and exit.",
)
@click.option("--group", required=True, help="consumer group name")
@click.option(
    "--bind",
    multiple=True,
    required=True,
    metavar="PATTERN",
    help="routing-key pattern, `<aggregate_type>.<event_type>` (e.g. 'Order.*'); repeatable",
)
@click.option("--handler", required=True, help="the handler, 'package.module:function'")
@click.option(
    "--partitions",
    type=int,
    default=0,
    help="ordered per aggregate with N partition queues (0: unordered, the default); "
    "every process of the group must use the same N",
)
@click.option(
    "--prefetch", type=int, default=50, help="unacknowledged messages per queue (RabbitMQ)"
)
@click.option("--max-attempts", type=int, default=5, help="attempts before the DLQ")
@click.option("--backoff-base", type=float, default=0.5, help="first retry delay, seconds")
@click.option("--backoff-max", type=float, default=30.0, help="retry delay cap")
@click.option(
    "--gap-wait",
    type=float,
    default=10.0,
    help="ordered groups: seconds an event that follows a missing one waits for it before its "
    "aggregate is parked with reason 'gap'",
)
@click.option("--database-url", help=DB_HELP)
@click.option("--broker-url", help=BROKER_HELP)
@click.option("--exchange", help=EXCHANGE_HELP)
@click.option(
    "--metrics-port",
    type=int,
    default=0,
    help="serve Prometheus metrics (and lag gauges) on this port (0: off)",
)
@click.option("--log-level", default="INFO", help="log level (default INFO)")
def consume_command(
    *,
    group: str,
    bind: tuple[str, ...],
    handler: str,
    partitions: int,
    prefetch: int,
    max_attempts: int,
    backoff_base: float,
    backoff_max: float,
    gap_wait: float,
    database_url: str | None,
    broker_url: str | None,
    exchange: str | None,
    metrics_port: int,
    log_level: str,
) -> int:
    from outbox_tasks.consumer import Consumer, ConsumerGroup, load_handler
    from outbox_tasks.logs import configure

    configure(log_level.upper())
    settings = settings_from_options(
        database_url=database_url, broker_url=broker_url, exchange=exchange
    )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `celery -A`: the handler is found from here
    consumer_group = ConsumerGroup(
        name=group,
        bindings=bind,
        handler=load_handler(handler),
        partitions=partitions,
        max_attempts=max_attempts,
        backoff_base_seconds=backoff_base,
        backoff_max_seconds=backoff_max,
        prefetch=prefetch,
        gap_wait_seconds=gap_wait,
    )
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)
    consumer = Consumer(consumer_group, settings, export_lag=bool(metrics_port))

    def on_signal(signum: int, frame: object) -> None:
        log_event(
            log,
            logging.INFO,
            "consumer_stopping",
            "signal received: finishing the message in hand",
            group=consumer_group.name,
            signal=signal.Signals(signum).name,
        )
        consumer.stop()
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    consumer.run()
    return 0


@click.group("consumers", cls=CommandList, help="consumer groups: lag, parked aggregates, replay")
def consumers() -> None:
    """The consumer-group administration commands."""


def _group_options(*, broker: bool, db: bool) -> Callable[[F], F]:
    """What every ``consumers`` command takes: the group, where it lives, ``--json``."""
    options: list[Callable[[F], F]] = [
        click.option("--group", required=True, help="consumer group name"),
        click.option(
            "--partitions", type=int, default=0, help="the group's partition count (0: unordered)"
        ),
    ]
    if broker:
        options.append(click.option("--broker-url", help=BROKER_HELP))
        options.append(click.option("--exchange", help=EXCHANGE_HELP))
    if db:
        options.append(click.option("--database-url", help=DB_HELP))
    options.append(json_option("machine-readable output"))
    return stack(*options)


@consumers.command("lag", help="ready messages, oldest age, dead letters")
@_group_options(broker=True, db=False)
def lag_command(
    group: str, partitions: int, broker_url: str | None, exchange: str | None, as_json: bool
) -> int:
    from outbox_tasks.consumer import dead_letter_count, lag

    settings = settings_from_options(broker_url=broker_url, exchange=exchange)
    value = lag(group, settings=settings, partitions=partitions)
    dead = dead_letter_count(group, settings=settings)
    if as_json:
        print(
            json.dumps(
                {
                    "group": group,
                    "messages": value.messages,
                    "oldest_age_seconds": value.oldest_age_seconds,
                    "dead_letters": dead,
                }
            )
        )
    else:
        age = "-" if value.oldest_age_seconds is None else f"{value.oldest_age_seconds:.1f}s"
        print(f"{group}: {value.messages} ready, oldest {age}, {dead} dead letters")
    return 0


@consumers.command("parked", help="aggregates an ordered group has parked")
@_group_options(broker=False, db=True)
def parked_command(group: str, partitions: int, database_url: str | None, as_json: bool) -> int:
    from outbox_tasks.consumer import parked_aggregates

    rows = parked_aggregates(group, settings=settings_from_options(database_url=database_url))
    if as_json:
        print(json.dumps([asdict(r) for r in rows], default=str))
        return 0
    if not rows:
        print(f"{group}: no parked aggregates")
    for r in rows:
        print(
            f"{r.aggregate_type}/{r.aggregate_id} parked at {r.parked_at.isoformat()} "
            f"({r.reason or 'dead_lettered'}; event {r.event_id}, dead-lettered up to sequence "
            f"{r.dead_sequence}): {r.error}"
        )
    return 0


@consumers.command("unpark", help="resume a parked aggregate, skipping its dead-lettered events")
@_group_options(broker=False, db=True)
@click.option("--aggregate-type", required=True)
@click.option("--aggregate-id", required=True)
def unpark_command(
    *,
    group: str,
    partitions: int,
    database_url: str | None,
    as_json: bool,
    aggregate_type: str,
    aggregate_id: str,
) -> int:
    from outbox_tasks.consumer import unpark

    done = unpark(
        group,
        aggregate_type,
        aggregate_id,
        settings=settings_from_options(database_url=database_url),
    )
    if as_json:
        print(json.dumps({"unparked": done}))
    else:
        print("unparked" if done else "not parked: nothing to do")
    return 0 if done else 1


@consumers.command("replay", help="move dead letters back to the group's queues, in sequence order")
@_group_options(broker=True, db=False)
@click.option("--limit", type=int, default=10_000, help="at most this many")
def replay_command(
    *,
    group: str,
    partitions: int,
    broker_url: str | None,
    exchange: str | None,
    as_json: bool,
    limit: int,
) -> int:
    from outbox_tasks.consumer import replay_dead_letters

    count = replay_dead_letters(
        group,
        settings=settings_from_options(broker_url=broker_url, exchange=exchange),
        partitions=partitions,
        limit=limit,
    )
    print(json.dumps({"replayed": count}) if as_json else f"replayed {count} dead letters")
    return 0
