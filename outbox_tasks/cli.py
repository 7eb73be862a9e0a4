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
    from outbox_tasks.db import make_engine, translate_errors
    from outbox_tasks.status import collect_status, render_status

    settings = _settings(args)
    engine = make_engine(settings, application_name="outbox_tasks.cli", pool_size=1)
    try:
        with translate_errors("status"):
            status = collect_status(engine, settings)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(status.as_dict(), indent=2, default=str))
    else:
        print(render_status(status))
    return 0 if status.healthy else 1


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
    status.set_defaults(func=cmd_status)

    config = sub.add_parser("config", help="validate OUTBOX_* variables and print the settings")
    config.add_argument("--markdown", action="store_true", help="print the reference table")
    config.set_defaults(func=cmd_config)

    from outbox_tasks.demo import add_demo_parser

    add_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
