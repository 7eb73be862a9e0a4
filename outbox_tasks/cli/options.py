"""What the commands share: the Settings helper, common options, parameter types, the engine."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click

from outbox_tasks.settings import Settings, env_var

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

F = TypeVar("F", bound=Callable[..., Any])

DB_HELP = f"PostgreSQL URL (env {env_var('database_url')})"


def settings_from_options(
    *,
    database_url: str | None = None,
    broker_url: str | None = None,
    exchange: str | None = None,
) -> Settings:
    """Settings from the ``OUTBOX_*`` environment, with the options given on the command line
    on top: ``--database-url``, ``--broker-url`` (where events are published and consumed:
    ``publish_url``) and ``--exchange``. An option left out (None or empty) falls back to its
    variable. Raises ConfigurationError naming the first bad value."""
    overrides: dict[str, Any] = {}
    if database_url:
        overrides["database_url"] = database_url
    if broker_url:
        overrides["publish_url"] = broker_url
    if exchange:
        overrides["exchange"] = exchange
    return Settings.from_env(**overrides)


@contextmanager
def cli_engine(settings: Settings, application_name: str = "outbox_tasks.cli") -> Iterator[Engine]:
    """A one-connection engine for one command, disposed of when the block ends."""
    from outbox_tasks.db import make_engine

    engine = make_engine(settings, application_name=application_name, pool_size=1)
    try:
        yield engine
    finally:
        engine.dispose()


def stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator that applies ``decorators`` as if they were written, in this order, above
    the function (click options then show in this order in ``--help``)."""

    def decorate(command: F) -> F:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


def database_url_option(help: str = DB_HELP) -> Callable[[F], F]:
    """``--database-url`` (falls back to OUTBOX_DATABASE_URL)."""
    return click.option("--database-url", default=None, help=help)


def json_option(help: str | None = None) -> Callable[[F], F]:
    """``--json``, passed to the command as ``as_json``."""
    return click.option("--json", "as_json", is_flag=True, help=help)


class CommandList(click.Group):
    """A group that lists its commands in the order they were added, each with its whole help
    line (click would cut it at ~45 characters)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.short_help or (command.help or "").strip()))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def positive_seconds(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """Option callback: a number of seconds > 0 (and finite), or None when not given."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise click.BadParameter(f"expected a number of seconds, got {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise click.BadParameter(f"expected a number of seconds > 0, got {value!r}")
    return seconds


def confirm(question: str, *, yes: bool, dry_run: bool) -> bool:
    """True with ``--yes`` or ``--dry-run``; otherwise ask on the terminal (no terminal: refuse,
    saying how to confirm)."""
    if yes or dry_run:
        return True
    if not sys.stdin.isatty():
        print(
            f"outbox-tasks: {question} Refusing without a terminal; pass --yes to confirm.",
            file=sys.stderr,
        )
        return False
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")
