"""``migrate``, ``status``, ``events``, ``config`` and ``bench``: the database and the relay
as an operator sees them. Each command returns its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import click

from outbox_tasks.cli.options import (
    cli_engine,
    database_url_option,
    json_option,
    settings_from_options,
)
from outbox_tasks.errors import ConfigurationError
from outbox_tasks.settings import describe, env_var


@click.command("migrate", help="upgrade the database schema (Alembic)")
@database_url_option()
@click.option("--revision", default="head", help="target revision (default: head)")
@click.option("--sql", is_flag=True, help="print the SQL for a DBA instead of running it")
def migrate_command(database_url: str | None, revision: str, sql: bool) -> int:
    from outbox_tasks import migrate
    from outbox_tasks.db import translate_errors

    settings = settings_from_options(database_url=database_url)
    if sql:
        migrate.upgrade(settings, revision, sql=True)
        return 0
    with translate_errors("migrate"):
        migrate.upgrade(settings, revision)
    print(f"outbox-tasks: database migrated to {revision}", file=sys.stderr)
    return 0


@click.command(
    "status", help="backlog, partitions and leases; exit 1 when something needs attention"
)
@database_url_option()
@json_option("machine-readable output")
@click.option("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
@click.option(
    "--no-workers",
    is_flag=True,
    help="do not ask workers for their circuit state (env OUTBOX_BROKER_URL)",
)
def status_command(
    database_url: str | None, as_json: bool, watch: float | None, no_workers: bool
) -> int:
    from outbox_tasks.db import translate_errors
    from outbox_tasks.status import add_circuits, collect_status, render_status

    settings = settings_from_options(database_url=database_url)
    with cli_engine(settings) as engine:
        while True:
            with translate_errors("status"):
                status = collect_status(engine, settings)
            if not no_workers:
                # The Celery app (its broker: OUTBOX_BROKER_URL) only when workers are asked.
                from outbox_tasks.control import worker_circuits

                add_circuits(status, worker_circuits())
            if as_json:
                print(json.dumps(status.as_dict(), indent=2, default=str), flush=True)
            else:
                if watch and sys.stdout.isatty():
                    print("\033[2J\033[H", end="")
                print(render_status(status), flush=True)
            if not watch:
                break
            time.sleep(watch)
    return 0 if status.healthy else 1


@click.command(
    "events", help="event types seen in the outbox, with volumes (the event catalog's data)"
)
@database_url_option()
@click.option(
    "--since-seconds",
    type=float,
    default=7 * 86400.0,
    help="look back this far (default 7 days)",
)
@json_option()
def events_command(database_url: str | None, since_seconds: float, as_json: bool) -> int:
    from outbox_tasks.db import translate_errors
    from outbox_tasks.store.events import event_volumes

    with (
        cli_engine(settings_from_options(database_url=database_url)) as engine,
        translate_errors("events"),
        engine.connect() as conn,
    ):
        rows = event_volumes(conn, since_seconds=since_seconds)
    if as_json:
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


@click.command("config", help="validate OUTBOX_* variables and print the settings")
@click.option("--markdown", is_flag=True, help="print the reference table")
def config_command(markdown: bool) -> int:
    settings = settings_from_options()
    if markdown:
        print(config_table())
        return 0
    # As written in the variables, passwords hidden (the values are valid as they stand).
    for name, shown in settings.printable().items():
        print(f"{env_var(name)}={shown!r}")
    return 0


def config_table() -> str:
    """The configuration reference as a markdown table (README and docs are generated from it)."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for var, default, doc in describe():
        shown = f"`{default}`" if default else "(empty)"
        lines.append(f"| `{var}` | {shown} | {doc.replace('|', '/')} |")
    return "\n".join(lines)


@click.command(
    "bench",
    help="benchmarks (from a source checkout): throughput|latency|growth|baseline|cleanup",
    short_help="benchmarks (from a source checkout): throughput|latency|growth|baseline|cleanup",
    # Every option after `bench` belongs to the benchmark, --help included.
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
)
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def bench_command(bench_args: tuple[str, ...]) -> int:
    """Run ``python -m bench`` from the source tree (benchmarks are not installed)."""
    from outbox_tasks.migrate import ROOT

    if not (ROOT / "bench" / "__main__.py").exists():
        raise ConfigurationError(
            f"benchmarks live in the source tree ({ROOT}/bench); run from a checkout"
        )
    return subprocess.call([sys.executable, "-m", "bench", *bench_args], cwd=ROOT)
