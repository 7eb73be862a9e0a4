"""Command line: ``outbox-tasks consume`` and ``outbox-tasks consumers ...`` (also
``python -m outbox_tasks.consumer``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from outbox_tasks.consumer.admin import dead_letter_count, lag, parked_aggregates, unpark
from outbox_tasks.consumer.group import ConsumerGroup, admin_group, load_handler
from outbox_tasks.consumer.replay import replay_dead_letters
from outbox_tasks.consumer.runner import Consumer
from outbox_tasks.errors import ConfigurationError, OutboxError
from outbox_tasks.logs import event as log_event
from outbox_tasks.logs import get_logger
from outbox_tasks.settings import Settings, env_var

log = get_logger("consumer")


def add_consume_parser(sub: Any) -> None:
    """Register ``consume`` (run a consumer process) and ``consumers`` (lag, parked, unpark,
    replay) on the ``outbox-tasks`` sub-parsers."""
    db_help = (
        f"database holding the handler's tables and the receipts (env {env_var('database_url')})"
    )
    broker_help = (
        f"broker events arrive on (env {env_var('publish_url')}, else {env_var('broker_url')})"
    )
    consume = sub.add_parser(
        "consume",
        help="run a consumer group process: idempotent (and optionally ordered) event handling",
        description="Consume outbox events with a handler `on_event(event, session)`. Each event "
        "is handled in one database transaction with its receipt, and acknowledged after the "
        "commit. SIGTERM/SIGINT finish the message in hand and exit.",
    )
    consume.add_argument("--group", required=True, help="consumer group name")
    consume.add_argument(
        "--bind",
        action="append",
        required=True,
        metavar="PATTERN",
        help="routing-key pattern, `<aggregate_type>.<event_type>` (e.g. 'Order.*'); repeatable",
    )
    consume.add_argument("--handler", required=True, help="the handler, 'package.module:function'")
    consume.add_argument(
        "--partitions",
        type=int,
        default=0,
        help="ordered per aggregate with N partition queues (0: unordered, the default); "
        "every process of the group must use the same N",
    )
    consume.add_argument(
        "--prefetch", type=int, default=50, help="unacknowledged messages per queue (RabbitMQ)"
    )
    consume.add_argument("--max-attempts", type=int, default=5, help="attempts before the DLQ")
    consume.add_argument(
        "--backoff-base", type=float, default=0.5, help="first retry delay, seconds"
    )
    consume.add_argument("--backoff-max", type=float, default=30.0, help="retry delay cap")
    consume.add_argument("--database-url", help=db_help)
    consume.add_argument("--broker-url", help=broker_help)
    consume.add_argument("--exchange", help=f"topic exchange (env {env_var('exchange')})")
    consume.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics (and lag gauges) on this port (0: off)",
    )
    consume.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    consume.set_defaults(func=run_consume)

    admin = sub.add_parser("consumers", help="consumer groups: lag, parked aggregates, replay")
    actions = admin.add_subparsers(dest="consumers_command", required=True)

    def common(parser: argparse.ArgumentParser, *, broker: bool, db: bool) -> None:
        parser.add_argument("--group", required=True, help="consumer group name")
        parser.add_argument(
            "--partitions", type=int, default=0, help="the group's partition count (0: unordered)"
        )
        if broker:
            parser.add_argument("--broker-url", help=broker_help)
            parser.add_argument("--exchange", help=f"topic exchange (env {env_var('exchange')})")
        if db:
            parser.add_argument("--database-url", help=db_help)
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    lag_cmd = actions.add_parser("lag", help="ready messages, oldest age, dead letters")
    common(lag_cmd, broker=True, db=False)
    lag_cmd.set_defaults(func=_cmd_lag)
    parked_cmd = actions.add_parser("parked", help="aggregates an ordered group has parked")
    common(parked_cmd, broker=False, db=True)
    parked_cmd.set_defaults(func=_cmd_parked)
    unpark_cmd = actions.add_parser(
        "unpark", help="resume a parked aggregate, skipping its dead-lettered events"
    )
    common(unpark_cmd, broker=False, db=True)
    unpark_cmd.add_argument("--aggregate-type", required=True)
    unpark_cmd.add_argument("--aggregate-id", required=True)
    unpark_cmd.set_defaults(func=_cmd_unpark)
    replay_cmd = actions.add_parser(
        "replay", help="move dead letters back to the group's queues, in sequence order"
    )
    common(replay_cmd, broker=True, db=False)
    replay_cmd.add_argument("--limit", type=int, default=10_000, help="at most this many")
    replay_cmd.set_defaults(func=_cmd_replay)


def _cli_settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "database_url", None):
        overrides["database_url"] = args.database_url
    if getattr(args, "broker_url", None):
        overrides["publish_url"] = args.broker_url
    if getattr(args, "exchange", None):
        overrides["exchange"] = args.exchange
    return Settings.from_env(**overrides)


def run_consume(args: argparse.Namespace) -> int:
    from outbox_tasks.logs import configure

    configure(args.log_level.upper())
    settings = _cli_settings(args)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `celery -A`: the handler is found from here
    group = ConsumerGroup(
        name=args.group,
        bindings=tuple(args.bind),
        handler=load_handler(args.handler),
        partitions=args.partitions,
        max_attempts=args.max_attempts,
        backoff_base_seconds=args.backoff_base,
        backoff_max_seconds=args.backoff_max,
        prefetch=args.prefetch,
    )
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    consumer = Consumer(group, settings, export_lag=bool(args.metrics_port))

    def on_signal(signum: int, frame: object) -> None:
        log_event(
            log,
            logging.INFO,
            "consumer_stopping",
            "signal received: finishing the message in hand",
            group=group.name,
            signal=signal.Signals(signum).name,
        )
        consumer.stop()
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    consumer.run()
    return 0


def _cmd_lag(args: argparse.Namespace) -> int:
    settings = _cli_settings(args)
    group = admin_group(args.group, args.partitions)
    value = lag(group, settings=settings)
    dead = dead_letter_count(group, settings=settings)
    if args.json:
        print(
            json.dumps(
                {
                    "group": group.name,
                    "messages": value.messages,
                    "oldest_age_seconds": value.oldest_age_seconds,
                    "dead_letters": dead,
                }
            )
        )
    else:
        age = "-" if value.oldest_age_seconds is None else f"{value.oldest_age_seconds:.1f}s"
        print(f"{group.name}: {value.messages} ready, oldest {age}, {dead} dead letters")
    return 0


def _cmd_parked(args: argparse.Namespace) -> int:
    rows = parked_aggregates(args.group, settings=_cli_settings(args))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], default=str))
        return 0
    if not rows:
        print(f"{args.group}: no parked aggregates")
    for r in rows:
        print(
            f"{r.aggregate_type}/{r.aggregate_id} parked at {r.parked_at.isoformat()} "
            f"(event {r.event_id}, dead-lettered up to sequence {r.dead_sequence}): {r.error}"
        )
    return 0


def _cmd_unpark(args: argparse.Namespace) -> int:
    done = unpark(args.group, args.aggregate_type, args.aggregate_id, settings=_cli_settings(args))
    if args.json:
        print(json.dumps({"unparked": done}))
    else:
        print("unparked" if done else "not parked: nothing to do")
    return 0 if done else 1


def _cmd_replay(args: argparse.Namespace) -> int:
    count = replay_dead_letters(
        args.group, settings=_cli_settings(args), partitions=args.partitions, limit=args.limit
    )
    print(json.dumps({"replayed": count}) if args.json else f"replayed {count} dead letters")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m outbox_tasks.consumer consume ...`` (the same as ``outbox-tasks consume``)."""
    parser = argparse.ArgumentParser(prog="python -m outbox_tasks.consumer")
    add_consume_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigurationError as error:
        print(f"outbox-tasks: configuration error: {error}", file=sys.stderr)
        return 2
    except OutboxError as error:
        print(f"outbox-tasks: {error}", file=sys.stderr)
        return 1
