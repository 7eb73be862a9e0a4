"""``outbox-tasks``: the operator's command line. Thin: every command calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from outbox_tasks.errors import ConfigurationError, OutboxError
from outbox_tasks.settings import Settings, describe, env_var

ROOT = Path(__file__).resolve().parent.parent


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "database_url", None):
        overrides["database_url"] = args.database_url
    return Settings.from_env(**overrides)


def _alembic_config(settings: Settings) -> Any:
    from alembic.config import Config

    ini = ROOT / "alembic.ini"
    if not ini.exists() or not (ROOT / "migrations").is_dir():
        raise ConfigurationError(
            f"migrations not found next to the package ({ROOT}/migrations); install outbox_tasks "
            "from its source tree (pip install -e .) to run migrations"
        )
    config = Config(str(ini))
    config.set_main_option("sqlalchemy.url", settings.sqlalchemy_url)
    return config


def cmd_migrate(args: argparse.Namespace) -> int:
    from alembic import command

    settings = _settings(args)
    config = _alembic_config(settings)
    if args.sql:
        command.upgrade(config, args.revision, sql=True)
        return 0
    from outbox_tasks.db import translate_errors

    with translate_errors("migrate"):
        command.upgrade(config, args.revision)
    print(f"outbox-tasks: database migrated to {args.revision}", file=sys.stderr)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.markdown:
        print(config_table())
        return 0
    for var, _default, _doc in describe():
        name = var.removeprefix("OUTBOX_").lower()
        print(f"{var}={getattr(settings, name)!r}")
    return 0


def config_table() -> str:
    """The configuration reference as a markdown table (README and docs are generated from it)."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for var, default, doc in describe():
        shown = f"`{default}`" if default else "(empty)"
        lines.append(f"| `{var}` | {shown} | {doc.replace('|', '/')} |")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from outbox_tasks.db import make_engine, translate_errors
    from outbox_tasks.status import add_circuits, collect_status, render_status
    from outbox_tasks.worker import worker_circuits

    settings = _settings(args)
    engine = make_engine(settings, application_name="outbox_tasks.cli", pool_size=1)
    try:
        while True:
            with translate_errors("status"):
                status = collect_status(engine, settings)
            if not args.no_workers:
                add_circuits(status, worker_circuits())
            if args.json:
                print(json.dumps(status.as_dict(), indent=2, default=str), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\033[2J\033[H", end="")
                print(render_status(status), flush=True)
            if not args.watch:
                break
            time.sleep(args.watch)
    finally:
        engine.dispose()
    return 0 if status.healthy else 1


def cmd_events(args: argparse.Namespace) -> int:
    from sqlalchemy import text

    from outbox_tasks.db import translate_errors

    engine = _engine(args)
    try:
        with translate_errors("events"), engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT aggregate_type, event_type, count(*) AS total, "
                    "count(*) FILTER (WHERE published_at IS NULL) AS pending, "
                    "max(schema_version) AS schema_version, max(created_at) AS last_seen "
                    "FROM outbox WHERE created_at > clock_timestamp() - make_interval(secs => :s) "
                    "GROUP BY 1, 2 ORDER BY 3 DESC"
                ),
                {"s": args.since_seconds},
            ).all()
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps([dict(r._mapping) for r in rows], indent=2, default=str))
        return 0
    print(
        f"{'aggregate type':20} {'event type':28} {'total':>9} {'pending':>8} {'ver':>4}  last seen"
    )
    for r in rows:
        print(
            f"{r.aggregate_type[:20]:20} {r.event_type[:28]:28} {r.total:>9} {r.pending:>8} "
            f"{r.schema_version:>4}  {r.last_seen:%Y-%m-%d %H:%M:%S}"
        )
    return 0


def _engine(args: argparse.Namespace) -> Any:
    from outbox_tasks.db import make_engine

    return make_engine(_settings(args), application_name="outbox_tasks.cli", pool_size=1)


def _filters(args: argparse.Namespace) -> Any:
    from datetime import datetime

    from outbox_tasks.deadletter import Filters, parse_ids

    since = None
    if getattr(args, "since", None):
        try:
            since = datetime.fromisoformat(args.since)
        except ValueError:
            raise ConfigurationError(
                f"--since {args.since!r} is not a date: use ISO 8601, e.g. 2026-11-28T09:00"
            ) from None
    aggregate_type = aggregate_id = None
    if getattr(args, "aggregate", None):
        aggregate_type, sep, aggregate_id = args.aggregate.partition("/")
        if not sep or not aggregate_type or not aggregate_id:
            raise ConfigurationError(
                f"--aggregate {args.aggregate!r}: expected TYPE/ID, e.g. Order/42"
            )
    return Filters(
        ids=parse_ids(getattr(args, "ids", None) or []),
        aggregate_type=aggregate_type or getattr(args, "aggregate_type", None),
        aggregate_id=aggregate_id,
        event_type=getattr(args, "event_type", None),
        since=since,
        everything=bool(getattr(args, "all", False)),
    )


def _confirm(args: argparse.Namespace, question: str) -> bool:
    if args.yes or args.dry_run:
        return True
    if not sys.stdin.isatty():
        print(
            f"outbox-tasks: {question} Refusing without a terminal; pass --yes to confirm.",
            file=sys.stderr,
        )
        return False
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")


def cmd_dlq(args: argparse.Namespace) -> int:
    from outbox_tasks import deadletter

    engine = _engine(args)
    try:
        if args.dlq_command == "list":
            rows = deadletter.list_dead_letters(
                engine,
                _filters(args),
                status=None if args.status == "any" else args.status,
                limit=args.limit,
                offset=args.offset,
            )
            if args.json:
                print(json.dumps([r.as_dict() for r in rows], indent=2, default=str))
            else:
                print(
                    f"{'id':36}  {'aggregate':28}  {'event type':20} {'status':9} "
                    f"{'tries':>5}  last error"
                )
                for r in rows:
                    aggregate = f"{r.aggregate_type}/{r.aggregate_id}"[:28]
                    print(
                        f"{r.id}  {aggregate:28}  {r.event_type[:20]:20} {r.status:9} "
                        f"{r.attempts:>5}  {(r.last_error or '')[:60]}"
                    )
                if len(rows) == args.limit:
                    print(f"(more: --offset {args.offset + args.limit})")
            return 0
        if args.dlq_command == "show":
            view = deadletter.show(engine, deadletter.parse_ids([args.id])[0])
            print(json.dumps(view.as_dict(), indent=2, default=str))
            return 0
        if args.dlq_command == "history":
            print(json.dumps(deadletter.history(engine, limit=args.limit), indent=2, default=str))
            return 0
        filters = _filters(args)
        if args.dlq_command == "replay":
            if filters.everything and not _confirm(args, "Replay every matching dead letter?"):
                return 1
            result = deadletter.replay(
                engine,
                filters,
                actor=args.actor,
                reason=args.reason,
                dry_run=args.dry_run,
                rate_per_second=args.rate,
            )
        else:
            if not _confirm(args, "Discard the matching dead letters (they will not be sent)?"):
                return 1
            result = deadletter.discard(
                engine, filters, actor=args.actor, reason=args.reason, dry_run=args.dry_run
            )
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    finally:
        engine.dispose()


def _add_dlq_parser(sub: Any, db_help: str) -> None:
    from outbox_tasks.deadletter import default_actor

    dlq = sub.add_parser("dlq", help="dead letters: list, show, replay, discard, history")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)

    def common(p: argparse.ArgumentParser, filters: bool = True) -> None:
        p.add_argument("--database-url", help=db_help)
        if filters:
            p.add_argument("--aggregate", help="TYPE/ID, e.g. Order/42")
            p.add_argument("--aggregate-type", help="e.g. Order")
            p.add_argument("--event-type", help="e.g. OrderPaid")
            p.add_argument("--since", help="dead-lettered at or after (ISO 8601)")

    p = dlq_sub.add_parser("list", help="dead letters, oldest first")
    common(p)
    p.add_argument(
        "--status", default="parked", choices=["parked", "skipped", "replayed", "discarded", "any"]
    )
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p = dlq_sub.add_parser("show", help="one dead letter: payload, headers, attempts, errors")
    common(p, filters=False)
    p.add_argument("id")
    p = dlq_sub.add_parser("history", help="the audit trail of replays and discards")
    common(p, filters=False)
    p.add_argument("--limit", type=int, default=50)
    for name, what in (
        ("replay", "put back in line, in original order"),
        ("discard", "drop for good (the copy stays); unparks the aggregate"),
    ):
        p = dlq_sub.add_parser(name, help=what)
        common(p)
        p.add_argument("ids", nargs="*", help="event ids")
        p.add_argument("--all", action="store_true", help="every dead letter the filters match")
        p.add_argument("--dry-run", action="store_true", help="show what would change")
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        p.add_argument("--actor", default=default_actor(), help="recorded in the audit trail")
        p.add_argument("--reason", required=name == "discard", help="recorded in the audit trail")
        if name == "replay":
            p.add_argument("--rate", type=float, default=50.0, help="replays per second")
    dlq.set_defaults(func=cmd_dlq)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``python -m bench`` from the source tree (benchmarks are not installed)."""
    import subprocess

    if not (ROOT / "bench" / "__main__.py").exists():
        raise ConfigurationError(
            f"benchmarks live in the source tree ({ROOT}/bench); run from a checkout"
        )
    return subprocess.call([sys.executable, "-m", "bench", *args.bench_args], cwd=ROOT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox-tasks",
        description="Transactional outbox publisher: operator commands. Every option falls back "
        "to its OUTBOX_* environment variable.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    db_help = f"PostgreSQL URL (env {env_var('database_url')})"

    migrate = sub.add_parser("migrate", help="upgrade the database schema (Alembic)")
    migrate.add_argument("--database-url", help=db_help)
    migrate.add_argument("--revision", default="head", help="target revision (default: head)")
    migrate.add_argument(
        "--sql", action="store_true", help="print the SQL for a DBA instead of running it"
    )
    migrate.set_defaults(func=cmd_migrate)

    status = sub.add_parser(
        "status", help="backlog, partitions and leases; exit 1 when something needs attention"
    )
    status.add_argument("--database-url", help=db_help)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    status.add_argument(
        "--no-workers",
        action="store_true",
        help="do not ask workers for their circuit state (env OUTBOX_BROKER_URL)",
    )
    status.set_defaults(func=cmd_status)

    events = sub.add_parser(
        "events", help="event types seen in the outbox, with volumes (the event catalog's data)"
    )
    events.add_argument("--database-url", help=db_help)
    events.add_argument(
        "--since-seconds",
        type=float,
        default=7 * 86400.0,
        help="look back this far (default 7 days)",
    )
    events.add_argument("--json", action="store_true")
    events.set_defaults(func=cmd_events)

    config = sub.add_parser("config", help="validate OUTBOX_* variables and print the settings")
    config.add_argument("--markdown", action="store_true", help="print the reference table")
    config.set_defaults(func=cmd_config)

    _add_dlq_parser(sub, db_help)

    bench = sub.add_parser(
        "bench",
        help="benchmarks (from a source checkout): throughput|latency|growth|baseline|cleanup",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    from outbox_tasks.cleanup import add_cleanup_parser
    from outbox_tasks.consumer import add_consume_parser
    from outbox_tasks.demo import add_demo_parser

    add_cleanup_parser(sub)
    add_consume_parser(sub)

    add_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Every option after `bench` belongs to the benchmark, --help included.
        args = argparse.Namespace(func=cmd_bench, bench_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigurationError as error:
        print(f"outbox-tasks: configuration error: {error}", file=sys.stderr)
        return 2
    except OutboxError as error:
        print(f"outbox-tasks: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
