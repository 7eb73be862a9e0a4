"""``outbox.cleanup``: remove published outbox rows, old consumer receipts and resolved dead
letters in short, bounded batches (DESIGN 5).

Modes (``OUTBOX_CLEANUP_MODE``):

- ``delete``: the relay deletes rows when it publishes them; cleanup removes published leftovers
  (rows published before the mode was switched, or by a relay still running with ``retain``).
- ``retain``: delete rows published more than ``OUTBOX_RETENTION_SECONDS`` ago.
- ``archive``: the same rows, but each batch is first written to a ``.jsonl.gz`` file under
  ``OUTBOX_ARCHIVE_URL`` (``archive.py``: temp name, fsync, rename, fsync of the directory) and
  only then deleted, by the exact ids written. A crash between the two leaves the rows: they are
  archived twice, never lost.

A run is one loop over its steps (published rows, consumer receipts, resolved dead letters; each
a table, a cutoff and, in archive mode, a directory), batch after batch. Every batch is its own
short transaction (one statement in delete/retain mode): the relay's commit-order guard and
vacuum are held back by long transactions, so cleanup never holds one. Rows are locked through
the index of their timestamp, skipping rows someone else holds, and deleted in the same statement
(``store/cleanup.py``); nothing waits for a row lock and no table lock stronger than ROW
EXCLUSIVE is taken, so producers and publishers are never blocked. One run at a time per
database (a session advisory lock, held by an idle connection, not a transaction).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy.engine import Connection, Engine

from outbox_tasks.archive import archive_batch, archive_directory, write_archive_file

# Documented here before archive.py existed: restore scripts import it from this module. The
# redundant alias is the explicit re-export type checkers (mypy strict) accept.
from outbox_tasks.archive import read_archive_file as read_archive_file  # noqa: PLC0414
from outbox_tasks.errors import ConfigurationError
from outbox_tasks.logs import event, get_logger
from outbox_tasks.settings import Settings
from outbox_tasks.store import reports
from outbox_tasks.store.cleanup import (
    PUBLISHED,
    RECEIPTS,
    RESOLVED_DEAD_LETTERS,
    AgedRows,
    Position,
    count_aged,
    delete_aged,
    delete_archived,
    select_published,
    try_lock_cleanup,
    unlock_cleanup,
)

log = get_logger("cleanup")

# Memory bound of one archive batch (serialized lines, before compression).
DEFAULT_ARCHIVE_MAX_BYTES = 64 * 1024 * 1024


def utc_now() -> datetime:
    """The wall clock, timezone-aware (the default ``now_clock``)."""
    return datetime.now(UTC)


def table_health(engine: Engine) -> dict[str, Any]:
    """Live and dead tuples, size and the last (auto)vacuum and analyze of the outbox table, from
    ``pg_stat_user_tables`` (statistics: a few hundred ms behind, approximate counts); ``{}``
    when the statistics have no row for it. Keys: n_live_tup, n_dead_tup, last_vacuum,
    last_autovacuum, last_analyze, last_autoanalyze, total_bytes."""
    with engine.connect() as conn:
        health = reports.table_health(conn)
    return {} if health is None else health.as_dict()


# --- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """What one run removed (or, with ``dry_run``, would remove)."""

    mode: str
    dry_run: bool
    outbox_cutoff: datetime
    receipt_cutoff: datetime
    dead_letter_cutoff: datetime
    outbox_rows: int
    archived_rows: int
    archive_files: tuple[str, ...]
    receipt_rows: int
    dead_letter_rows: int
    batches: int
    seconds: float
    complete: bool  # False: stopped by max_seconds (or skipped); the next run goes on
    skipped: bool  # another cleanup run held the lock; nothing was done

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "dry_run": self.dry_run,
            "outbox_cutoff": self.outbox_cutoff.isoformat(),
            "receipt_cutoff": self.receipt_cutoff.isoformat(),
            "dead_letter_cutoff": self.dead_letter_cutoff.isoformat(),
            "outbox_rows": self.outbox_rows,
            "archived_rows": self.archived_rows,
            "archive_files": list(self.archive_files),
            "receipt_rows": self.receipt_rows,
            "dead_letter_rows": self.dead_letter_rows,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "complete": self.complete,
            "skipped": self.skipped,
        }


@dataclass(frozen=True, slots=True)
class Cutoffs:
    """The age limits of one run."""

    outbox: datetime
    receipts: datetime
    dead_letters: datetime


def cutoffs(
    settings: Settings, now: datetime, *, receipt_retention_seconds: float | None = None
) -> Cutoffs:
    """Age limits of one run, all from the one ``now``: delete mode removes every row published
    before ``now``; retain and archive keep OUTBOX_RETENTION_SECONDS. Resolved dead letters are
    kept OUTBOX_RETENTION_SECONDS after their resolution; receipts their own retention."""
    if receipt_retention_seconds is None:
        receipt_retention_seconds = float(settings.receipt_retention_seconds)
    if receipt_retention_seconds <= 0:
        raise ConfigurationError(
            f"OUTBOX_RECEIPT_RETENTION_SECONDS={receipt_retention_seconds!r} is not valid: "
            "expected a number of seconds > 0"
        )
    retention = timedelta(seconds=settings.retention_seconds)
    return Cutoffs(
        outbox=now if settings.cleanup_mode == "delete" else now - retention,
        receipts=now - timedelta(seconds=receipt_retention_seconds),
        dead_letters=now - retention,
    )


@dataclass(frozen=True, slots=True)
class Step:
    """One kind of rows a run removes: which rows, older than what, and (archive mode, published
    rows only) the directory each batch is written to before it is deleted."""

    category: str  # the step's name in logs: outbox, archive, receipts, dead_letters
    rows: AgedRows
    cutoff: datetime
    archive_to: Path | None = None


def plan(limits: Cutoffs, archive_to: Path | None = None) -> list[Step]:
    """The steps of one run, in order: published rows (archived first when ``archive_to`` is
    given), consumer receipts, resolved dead letters."""
    return [
        Step("outbox" if archive_to is None else "archive", PUBLISHED, limits.outbox, archive_to),
        Step("receipts", RECEIPTS, limits.receipts),
        Step("dead_letters", RESOLVED_DEAD_LETTERS, limits.dead_letters),
    ]


@dataclass
class _Tally:
    removed: Counter[str] = field(default_factory=Counter)  # rows deleted, by table
    archived_rows: int = 0
    archive_files: list[str] = field(default_factory=list)
    batches: int = 0


def run_cleanup(
    engine: Engine,
    settings: Settings,
    *,
    now_clock: Callable[[], datetime] = utc_now,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    dry_run: bool = False,
    batch_size: int = 5000,
    pause_seconds: float = 0.05,
    max_seconds: float | None = None,
    receipt_retention_seconds: float | None = None,
    archive_max_bytes: int = DEFAULT_ARCHIVE_MAX_BYTES,
) -> CleanupReport:
    """One cleanup run: published outbox rows per ``settings.cleanup_mode``, then consumer
    receipts, then resolved dead letters; each in batches of ``batch_size`` rows, one short
    transaction per batch, ``pause_seconds`` between batches. A step ends when a batch comes
    back short; the run ends early (``complete=False``) once ``max_seconds`` are spent.

    ``now_clock`` gives the wall-clock "now" the cutoffs are computed from (read once);
    ``monotonic`` and ``sleep`` pace the run. ``dry_run`` counts per step, changes nothing.
    Raises ConfigurationError for a bad archive directory (before touching anything).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pause_seconds < 0:
        raise ValueError(f"pause_seconds must be >= 0, got {pause_seconds}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    mode = settings.cleanup_mode
    directory = archive_directory(settings.archive_url) if mode == "archive" else None
    limits = cutoffs(settings, now_clock(), receipt_retention_seconds=receipt_retention_seconds)
    steps = plan(limits, directory)
    started = monotonic()
    tally = _Tally()

    def report(*, complete: bool, skipped: bool = False) -> CleanupReport:
        return CleanupReport(
            mode=mode,
            dry_run=dry_run,
            outbox_cutoff=limits.outbox,
            receipt_cutoff=limits.receipts,
            dead_letter_cutoff=limits.dead_letters,
            outbox_rows=tally.removed[PUBLISHED.table],
            archived_rows=tally.archived_rows,
            archive_files=tuple(tally.archive_files),
            receipt_rows=tally.removed[RECEIPTS.table],
            dead_letter_rows=tally.removed[RESOLVED_DEAD_LETTERS.table],
            batches=tally.batches,
            seconds=monotonic() - started,
            complete=complete,
            skipped=skipped,
        )

    if dry_run:
        with engine.connect() as conn:
            for step in steps:
                counted = count_aged(conn, step.rows, cutoff=step.cutoff)
                tally.removed[step.rows.table] = counted
                if step.archive_to is not None:
                    tally.archived_rows = counted
            conn.rollback()
        result = report(complete=True)
        _log_done(result)
        return result

    with engine.connect() as conn:
        locked = try_lock_cleanup(conn)
        conn.commit()
        if not locked:
            event(
                log,
                logging.INFO,
                "cleanup_skipped",
                "another cleanup run holds the lock; skipped",
                mode=mode,
            )
            return report(complete=False, skipped=True)
        try:
            run = _Run(
                conn,
                tally=tally,
                batch_size=batch_size,
                pause_seconds=pause_seconds,
                archive_max_bytes=archive_max_bytes,
                sleep=sleep,
                monotonic=monotonic,
                deadline=None if max_seconds is None else started + max_seconds,
            )
            done = all(run.step(step) for step in steps)  # stops at the first step out of time
        finally:
            _unlock_quietly(conn)
    result = report(complete=done)
    _log_done(result)
    return result


class _Batch(NamedTuple):
    removed: int  # rows deleted
    more: bool  # the batch was full: more rows may follow
    after: Position | None  # where the next batch starts


class _Run:
    """The batch loop of one run, on the connection that holds the cleanup lock."""

    def __init__(
        self,
        conn: Connection,
        *,
        tally: _Tally,
        batch_size: int,
        pause_seconds: float,
        archive_max_bytes: int,
        sleep: Callable[[float], None],
        monotonic: Callable[[], float],
        deadline: float | None,
    ) -> None:
        self.conn = conn
        self.tally = tally
        self.batch_size = batch_size
        self.pause_seconds = pause_seconds
        self.archive_max_bytes = archive_max_bytes
        self.sleep = sleep
        self.monotonic = monotonic
        self.deadline = deadline

    def _out_of_time(self) -> bool:
        return self.deadline is not None and self.monotonic() >= self.deadline

    def step(self, step: Step) -> bool:
        """Batches of one step until one comes back short. False when time ran out first."""
        after: Position | None = None
        while True:
            if self._out_of_time():
                return False
            began = self.monotonic()
            if step.archive_to is None:
                batch = self._delete(step, after)
            else:
                batch = self._archive(step, step.archive_to, after)
            self.tally.batches += 1
            self.tally.removed[step.rows.table] += batch.removed
            event(
                log,
                logging.DEBUG,
                "cleanup_batch",
                "cleanup batch",
                category=step.category,
                rows=batch.removed,
                seconds=round(self.monotonic() - began, 4),
            )
            if not batch.more:
                return True
            after = batch.after
            if self._out_of_time():
                return False
            if self.pause_seconds:
                self.sleep(self.pause_seconds)

    def _delete(self, step: Step, after: Position | None) -> _Batch:
        """One bounded delete (delete and retain modes, receipts, dead letters)."""
        with self.conn.begin():
            deleted = delete_aged(
                self.conn,
                step.rows,
                cutoff=step.cutoff,
                after=after.stamp if after else None,
                limit=self.batch_size,
            )
        resume = Position(deleted.newest) if deleted.newest else after
        return _Batch(deleted.rows, deleted.rows >= self.batch_size, resume)

    def _archive(self, step: Step, directory: Path, after: Position | None) -> _Batch:
        """Read a batch of published rows, write them to a file, then delete exactly those."""
        with (
            self.conn.begin(),
            contextlib.closing(
                select_published(self.conn, cutoff=step.cutoff, after=after, limit=self.batch_size)
            ) as records,
        ):
            rows, capped = archive_batch(
                records, limit=self.batch_size, max_bytes=self.archive_max_bytes
            )
        if not rows:
            return _Batch(0, False, after)
        path = write_archive_file(directory, rows)  # durable before anything is deleted
        self.tally.archived_rows += len(rows)
        self.tally.archive_files.append(str(path))
        with self.conn.begin():
            deleted = delete_archived(self.conn, [r.id for r in rows])
        last = rows[-1]
        return _Batch(
            deleted, capped or len(rows) >= self.batch_size, Position(last.published_at, last.id)
        )


def _unlock_quietly(conn: Connection) -> None:
    """Release the lock; if the connection is broken, drop it (the server releases the lock)."""
    try:
        if conn.in_transaction():
            conn.rollback()
        unlock_cleanup(conn)
        conn.commit()
    except Exception:
        conn.invalidate()


def _log_done(result: CleanupReport) -> None:
    event(
        log,
        logging.INFO,
        "cleanup_done",
        "cleanup dry run done" if result.dry_run else "cleanup done",
        mode=result.mode,
        dry_run=result.dry_run,
        outbox_rows=result.outbox_rows,
        archived_rows=result.archived_rows,
        archive_files=len(result.archive_files),
        receipt_rows=result.receipt_rows,
        dead_letter_rows=result.dead_letter_rows,
        batches=result.batches,
        seconds=round(result.seconds, 3),
        complete=result.complete,
    )
