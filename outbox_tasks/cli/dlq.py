"""``dlq list|show|history|replay|discard``: the relay's dead letters (outbox_tasks.deadletter).
Each command returns its exit code."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click

from outbox_tasks.cli.options import (
    CommandList,
    cli_engine,
    confirm,
    database_url_option,
    json_option,
    settings_from_options,
    stack,
)
from outbox_tasks.errors import ConfigurationError

if TYPE_CHECKING:
    from outbox_tasks.deadletter import Filters

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class FilterOptions:
    """Which dead letters a command is about, as typed on the command line."""

    aggregate: str | None = None
    aggregate_type: str | None = None
    event_type: str | None = None
    since: str | None = None
    ids: tuple[str, ...] = ()
    everything: bool = False

    def filters(self) -> Filters:
        """The dead-letter filters. Raises ConfigurationError for a malformed ``--since`` or
        ``--aggregate``, InvalidMessage for an id that is not a UUID."""
        from outbox_tasks.deadletter import Filters, parse_ids

        since_at = None
        if self.since:
            try:
                since_at = datetime.fromisoformat(self.since)
            except ValueError:
                raise ConfigurationError(
                    f"--since {self.since!r} is not a date: use ISO 8601, e.g. 2026-11-28T09:00"
                ) from None
        one_type = one_id = None
        if self.aggregate:
            one_type, sep, one_id = self.aggregate.partition("/")
            if not sep or not one_type or not one_id:
                raise ConfigurationError(
                    f"--aggregate {self.aggregate!r}: expected TYPE/ID, e.g. Order/42"
                )
        return Filters(
            ids=parse_ids(list(self.ids)),
            aggregate_type=one_type or self.aggregate_type,
            aggregate_id=one_id,
            event_type=self.event_type,
            since=since_at,
            everything=self.everything,
        )


def _filter_options(*, ids: bool) -> Callable[[F], F]:
    """Add the filter options (and, with ``ids``, the ids and ``--all``); the command receives
    them as one ``chosen: FilterOptions``."""
    options = [
        click.option("--aggregate", help="TYPE/ID, e.g. Order/42"),
        click.option("--aggregate-type", help="e.g. Order"),
        click.option("--event-type", help="e.g. OrderPaid"),
        click.option("--since", help="dead-lettered at or after (ISO 8601)"),
    ]
    if ids:
        options.append(click.argument("ids", nargs=-1))
        options.append(
            click.option(
                "--all", "everything", is_flag=True, help="every dead letter the filters match"
            )
        )
    names = ("aggregate", "aggregate_type", "event_type", "since", "ids", "everything")

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def with_filters(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names if name in kwargs}
            return command(chosen=FilterOptions(**given), **kwargs)

        decorated: Any = stack(*options)(with_filters)
        return decorated  # type: ignore[no-any-return]

    return decorate


@click.group("dlq", cls=CommandList, help="dead letters: list, show, replay, discard, history")
def dlq() -> None:
    """The dead-letter commands."""


@dlq.command("list", help="dead letters, oldest first")
@database_url_option()
@_filter_options(ids=False)
@click.option(
    "--status",
    default="parked",
    type=click.Choice(["parked", "skipped", "replayed", "discarded", "any"]),
)
@click.option("--limit", type=int, default=50)
@click.option("--offset", type=int, default=0)
@json_option()
def list_command(
    *,
    database_url: str | None,
    chosen: FilterOptions,
    status: str,
    limit: int,
    offset: int,
    as_json: bool,
) -> int:
    from outbox_tasks import deadletter

    with cli_engine(settings_from_options(database_url=database_url)) as engine:
        rows = deadletter.list_dead_letters(
            engine,
            chosen.filters(),
            status=None if status == "any" else status,
            limit=limit,
            offset=offset,
        )
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2, default=str))
        return 0
    print(f"{'id':36}  {'aggregate':28}  {'event type':20} {'status':9} {'tries':>5}  last error")
    for r in rows:
        shown = f"{r.aggregate_type}/{r.aggregate_id}"[:28]
        print(
            f"{r.id}  {shown:28}  {r.event_type[:20]:20} {r.status:9} "
            f"{r.attempts:>5}  {(r.last_error or '')[:60]}"
        )
    if len(rows) == limit:
        print(f"(more: --offset {offset + limit})")
    return 0


@dlq.command("show", help="one dead letter: payload, headers, attempts, errors")
@database_url_option()
@click.argument("id")
def show_command(database_url: str | None, id: str) -> int:
    from outbox_tasks import deadletter

    with cli_engine(settings_from_options(database_url=database_url)) as engine:
        view = deadletter.show(engine, deadletter.parse_ids([id])[0])
    print(json.dumps(view.as_dict(), indent=2, default=str))
    return 0


@dlq.command("history", help="the audit trail of replays and discards")
@database_url_option()
@click.option("--limit", type=int, default=50)
def history_command(database_url: str | None, limit: int) -> int:
    from outbox_tasks import deadletter

    with cli_engine(settings_from_options(database_url=database_url)) as engine:
        trail = deadletter.history(engine, limit=limit)
    print(json.dumps(trail, indent=2, default=str))
    return 0


def _default_actor() -> str:
    from outbox_tasks.deadletter import default_actor

    return default_actor()


def _change_options(*, reason_required: bool) -> Callable[[F], F]:
    """What replay and discard share: the filters and ids, the safety, the audit trail."""
    return stack(
        database_url_option(),
        _filter_options(ids=True),
        click.option("--dry-run", is_flag=True, help="show what would change"),
        click.option("--yes", is_flag=True, help="do not ask for confirmation"),
        click.option("--actor", default=_default_actor, help="recorded in the audit trail"),
        click.option("--reason", required=reason_required, help="recorded in the audit trail"),
    )


@dlq.command("replay", help="put back in line, in original order")
@_change_options(reason_required=False)
@click.option("--rate", type=float, default=50.0, help="replays per second")
def replay_command(
    *,
    database_url: str | None,
    chosen: FilterOptions,
    dry_run: bool,
    yes: bool,
    actor: str,
    reason: str | None,
    rate: float,
) -> int:
    from outbox_tasks import deadletter

    with cli_engine(settings_from_options(database_url=database_url)) as engine:
        filters = chosen.filters()
        if filters.everything and not confirm(
            "Replay every matching dead letter?", yes=yes, dry_run=dry_run
        ):
            return 1
        result = deadletter.replay(
            engine, filters, actor=actor, reason=reason, dry_run=dry_run, rate_per_second=rate
        )
    print(json.dumps(result.as_dict(), indent=2))
    return 0


@dlq.command("discard", help="drop for good (the copy stays); unparks the aggregate")
@_change_options(reason_required=True)
def discard_command(
    *,
    database_url: str | None,
    chosen: FilterOptions,
    dry_run: bool,
    yes: bool,
    actor: str,
    reason: str,
) -> int:
    from outbox_tasks import deadletter

    with cli_engine(settings_from_options(database_url=database_url)) as engine:
        filters = chosen.filters()
        if not confirm(
            "Discard the matching dead letters (they will not be sent)?", yes=yes, dry_run=dry_run
        ):
            return 1
        result = deadletter.discard(engine, filters, actor=actor, reason=reason, dry_run=dry_run)
    print(json.dumps(result.as_dict(), indent=2))
    return 0
