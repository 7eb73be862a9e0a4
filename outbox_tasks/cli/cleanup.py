"""``cleanup [--dry-run] [--max-seconds N] [--json]``: one cleanup run from the command line
(outbox_tasks.cleanup), with a short report."""

from __future__ import annotations

import json
from datetime import UTC
from typing import TYPE_CHECKING, Any

import click

from outbox_tasks.cli.options import (
    cli_engine,
    database_url_option,
    json_option,
    positive_seconds,
    settings_from_options,
)

if TYPE_CHECKING:
    from outbox_tasks.cleanup import CleanupReport


@click.command(
    "cleanup",
    help="remove published rows (per OUTBOX_CLEANUP_MODE), old consumer receipts and "
    "resolved dead letters, in short batches",
)
@database_url_option()
@click.option("--dry-run", is_flag=True, help="count what would be removed; change nothing")
@click.option(
    "--max-seconds",
    metavar="SECONDS",
    callback=positive_seconds,
    default=None,
    help="stop after this many seconds (the next run goes on); default: until done",
)
@json_option("machine-readable output")
def cleanup_command(
    database_url: str | None, dry_run: bool, max_seconds: float | None, as_json: bool
) -> int:
    from outbox_tasks.cleanup import run_cleanup, table_health
    from outbox_tasks.db import translate_errors

    settings = settings_from_options(database_url=database_url)
    with (
        cli_engine(settings, application_name="outbox_tasks.cleanup") as engine,
        translate_errors("cleanup"),
    ):
        result = run_cleanup(engine, settings, dry_run=dry_run, max_seconds=max_seconds)
        health = table_health(engine)
    if as_json:
        print(json.dumps({**result.as_dict(), "table": health}, indent=2, default=str))
    else:
        print(render_report(result, health))
    return 0


def render_report(result: CleanupReport, health: dict[str, Any]) -> str:
    """The short human report of ``outbox-tasks cleanup``."""
    if result.skipped:
        return "cleanup: skipped, another cleanup run is in progress on this database"
    verb = "would remove" if result.dry_run else "removed"
    kind = f"{result.mode}, dry run" if result.dry_run else result.mode
    cutoff = result.outbox_cutoff.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        f"cleanup ({kind}): {verb} {result.outbox_rows} outbox rows published before {cutoff}, "
        f"{result.receipt_rows} consumer receipts, {result.dead_letter_rows} resolved dead letters"
    ]
    if result.mode == "archive" and not result.dry_run:
        lines.append(
            f"archive: {result.archived_rows} rows in {len(result.archive_files)} files"
            + (f", last {result.archive_files[-1]}" if result.archive_files else "")
        )
    if not result.dry_run:
        state = "done" if result.complete else "stopped at --max-seconds; the next run goes on"
        lines.append(f"{result.batches} batches in {result.seconds:.1f} s, {state}")
    if health:
        lines.append(
            f"outbox table: ~{health['n_live_tup']} live, ~{health['n_dead_tup']} dead tuples, "
            f"{health['total_bytes'] / 1048576:.1f} MiB, "
            f"last autovacuum {health['last_autovacuum'] or 'never'}, "
            f"last vacuum {health['last_vacuum'] or 'never'}"
        )
    return "\n".join(lines)
