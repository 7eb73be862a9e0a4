"""What ``outbox-tasks status`` reports: read from PostgreSQL, the source of truth.

A read model: it reads the database (``store.reports``) and renders; asking the workers for
their circuits is the caller's business (``add_circuits`` takes their answers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine

from outbox_tasks.partitioning import slot_range
from outbox_tasks.settings import Settings
from outbox_tasks.store import reports

OLDEST_PENDING_ATTENTION_SECONDS = 300.0
# Below this many seconds since the last publish the relay is moving: no stall query is run.
QUIET_SECONDS = 5.0
_NO_BACKLOG = reports.PartitionBacklog(rows=0, due=0)


@dataclass
class PartitionStatus:
    partition: int
    slot_lo: int
    slot_hi: int
    owner: str | None
    epoch: int
    leased_until: datetime | None
    live: bool
    backlog: int
    due: int
    last_published_at: datetime | None


@dataclass
class Status:
    partitions: int
    pending: int
    oldest_pending_age_seconds: float | None
    parked_messages: int
    parked_aggregates: int
    retrying_messages: int
    last_published_at: datetime | None
    published_last_minute: int
    # How long rows the relay could publish have waited while nothing was published (0: moving).
    stalled_seconds: float = 0.0
    # Worker name -> circuit open (None: that worker could not tell); None: no worker answered.
    circuits: dict[str, bool | None] | None = None
    dead_tuples: int = 0
    live_tuples: int = 0
    last_autovacuum: datetime | None = None
    partition_rows: list[PartitionStatus] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def partitions_unowned(self) -> int:
        """Partitions with due rows and nobody holding their lease."""
        return sum(1 for p in self.partition_rows if p.due and not p.live)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["healthy"] = self.healthy
        return data


def collect_status(engine: Engine, settings: Settings) -> Status:
    """One reading of the database (one connection, six or seven statements): totals, the
    backlog and lease of each of ``settings.partitions`` partitions, the outbox table's
    statistics, and whether the relay is stalled (see :func:`stalled_seconds`)."""
    with engine.connect() as conn:
        totals = reports.outbox_totals(conn)
        recent = reports.count_published_last_minute(conn)
        backlog = reports.backlog_by_partition(conn, settings.partitions)
        health = reports.table_health(conn)
        leases = reports.lease_states(conn, settings.partitions)
        stalled = stalled_seconds(
            reports.seconds_since_last_publish(conn),
            lambda: reports.oldest_movable_wait_seconds(conn),
        )

    by_partition = {r.partition: r for r in leases}
    rows = []
    for p in range(settings.partitions):
        lo, hi = slot_range(p, settings.partitions)
        lease = by_partition.get(p)
        waiting = backlog.get(p, _NO_BACKLOG)
        rows.append(
            PartitionStatus(
                partition=p,
                slot_lo=lo,
                slot_hi=hi,
                owner=lease.owner if lease and lease.live else None,
                epoch=lease.epoch if lease else 0,
                leased_until=lease.leased_until if lease else None,
                live=bool(lease and lease.live),
                backlog=waiting.rows,
                due=waiting.due,
                last_published_at=lease.last_published_at if lease else None,
            )
        )
    last = max((r.last_published_at for r in rows if r.last_published_at), default=None)
    status = Status(
        partitions=settings.partitions,
        pending=totals.pending,
        oldest_pending_age_seconds=totals.oldest_pending_age_seconds,
        parked_messages=totals.parked_messages,
        parked_aggregates=totals.parked_aggregates,
        retrying_messages=totals.retrying_messages,
        last_published_at=last,
        published_last_minute=recent,
        stalled_seconds=stalled,
        dead_tuples=health.n_dead_tup if health else 0,
        live_tuples=health.n_live_tup if health else 0,
        last_autovacuum=health.last_autovacuum if health else None,
        partition_rows=rows,
    )
    if status.parked_messages:
        status.problems.append(
            f"{status.parked_messages} dead-lettered message(s) park "
            f"{status.parked_aggregates} aggregate(s)"
        )
    if stalled > settings.stall_seconds:
        status.problems.append(
            f"relay stalled: messages it could publish have waited {stalled:.0f} s with nothing "
            "published (check the workers' connections to PostgreSQL and the Celery broker; "
            "runbook: OutboxRelayStalled)"
        )
    age = status.oldest_pending_age_seconds
    if age is not None and age > OLDEST_PENDING_ATTENTION_SECONDS:
        status.problems.append(f"oldest pending message is {age:.0f} s old")
    return status


def stalled_seconds(
    since_last_publish: float | None, oldest_movable_wait: Callable[[], float | None]
) -> float:
    """How long the relay has made no progress while rows wait: the shorter of the time since
    the last publish (None: never) and the wait of the longest-waiting row it could publish
    now (asked only when the relay looks quiet); 0 when it is moving or nothing waits."""
    if since_last_publish is not None and since_last_publish < QUIET_SECONDS:
        return 0.0
    waiting = oldest_movable_wait()
    if waiting is None:
        return 0.0
    return max(0.0, waiting if since_last_publish is None else min(since_last_publish, waiting))


def add_circuits(status: Status, circuits: dict[str, bool | None] | None) -> None:
    status.circuits = circuits
    open_on = sorted(name for name, is_open in (circuits or {}).items() if is_open)
    if open_on:
        status.problems.append(
            f"broker circuit open on {len(open_on)} worker(s): {', '.join(open_on)}"
        )


def render_status(status: Status) -> str:
    age = status.oldest_pending_age_seconds
    lines = [
        f"pending messages      {status.pending}",
        f"oldest pending age    {'-' if age is None else f'{age:.1f} s'}",
        f"retrying              {status.retrying_messages}",
        f"dead letters / parked {status.parked_messages} / {status.parked_aggregates} aggregates",
        f"published last minute {status.published_last_minute}",
        f"last publish          {status.last_published_at or '-'}",
        f"relay progress        {_progress_line(status.stalled_seconds)}",
        f"broker circuit        {_circuits_line(status.circuits)}",
        "",
        "partition  slots       owner                          epoch  backlog  lease until",
    ]
    for p in status.partition_rows:
        lines.append(
            f"{p.partition:>9}  {p.slot_lo:>4}-{p.slot_hi - 1:<5}  {(p.owner or '-')[:30]:<30} "
            f"{p.epoch:>6} {p.backlog:>8}  {p.leased_until if p.live else '-'}"
        )
    lines.append("")
    lines.append("healthy" if status.healthy else "attention: " + "; ".join(status.problems))
    return "\n".join(lines)


def db_snapshot(status: Status) -> dict[str, float]:
    """The database-derived gauges (metrics.DB_GAUGES) from one status reading."""
    return {
        "outbox_pending_messages": status.pending,
        "outbox_oldest_pending_age_seconds": status.oldest_pending_age_seconds or 0.0,
        "outbox_dead_letter_messages": status.parked_messages,
        "outbox_parked_aggregates": status.parked_aggregates,
        "outbox_partitions_unowned": status.partitions_unowned,
        "outbox_table_dead_tuples": status.dead_tuples,
        "outbox_table_last_autovacuum_timestamp_seconds": (
            status.last_autovacuum.timestamp() if status.last_autovacuum else 0.0
        ),
        "outbox_relay_stalled_seconds": status.stalled_seconds,
    }


def _progress_line(stalled: float) -> str:
    return "moving" if stalled <= 0 else f"no publish for {stalled:.0f} s while messages wait"


def _circuits_line(circuits: dict[str, bool | None] | None) -> str:
    if not circuits:
        return "unknown (no worker answered)"
    opened = sum(1 for v in circuits.values() if v)
    return (
        f"open on {opened} of {len(circuits)} worker(s)"
        if opened
        else (f"closed on all {len(circuits)} worker(s)")
    )
