"""The ``outbox-tasks`` group: every command, one parser, one :func:`main`.

Commands return their exit code; the group turns the package's errors into the documented
codes: 2 for a configuration error, 1 for any other OutboxError, 130 for Ctrl-C. A usage error
exits 2 (SystemExit), as before. The same group is ``celery -A outbox_tasks outbox ...``
(entry point ``celery.commands``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from outbox_tasks.cli.cleanup import cleanup_command
from outbox_tasks.cli.commands import (
    bench_command,
    config_command,
    events_command,
    migrate_command,
    status_command,
)
from outbox_tasks.cli.consume import consume_command, consumers
from outbox_tasks.cli.demo import demo_command
from outbox_tasks.cli.dlq import dlq
from outbox_tasks.cli.options import CommandList
from outbox_tasks.errors import ConfigurationError, OutboxError


class OutboxGroup(CommandList):
    """The root group: maps the package's errors to exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            code = super().invoke(ctx)
        except ConfigurationError as error:
            print(f"outbox-tasks: configuration error: {error}", file=sys.stderr)
            code = 2
        except OutboxError as error:
            print(f"outbox-tasks: {error}", file=sys.stderr)
            code = 1
        except KeyboardInterrupt:
            code = 130
        # An exit, not a return value: `celery ... outbox` (standalone) keeps the code too.
        ctx.exit(int(code or 0))


@click.group(
    "outbox",
    cls=OutboxGroup,
    help="Transactional outbox publisher: operator commands. Settings come from the OUTBOX_* "
    "environment variables (`outbox-tasks config` lists them); an option that overrides one "
    "names it in its help.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
def outbox() -> None:
    """The operator's commands."""


for _command in (
    migrate_command,
    status_command,
    events_command,
    config_command,
    dlq,
    bench_command,
    cleanup_command,
    consume_command,
    consumers,
    demo_command,
):
    outbox.add_command(_command)


def main(argv: Sequence[str] | None = None, *, prog_name: str = "outbox-tasks") -> int:
    """Run one command (``argv`` defaults to ``sys.argv[1:]``); returns its exit code. A usage
    error prints why and raises SystemExit(2)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(outbox.main(args=args, prog_name=prog_name, standalone_mode=False) or 0)
    except click.ClickException as error:
        error.show()
        raise SystemExit(error.exit_code) from None
    except click.Abort:
        return 130
