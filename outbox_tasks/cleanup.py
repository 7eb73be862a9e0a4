"""``outbox.cleanup``: remove published outbox rows, old consumer receipts and resolved dead
letters in short, bounded batches (DESIGN 5).

Modes (``OUTBOX_CLEANUP_MODE``):

- ``delete``: the relay deletes rows when it publishes them; cleanup removes published leftovers
  (rows published before the mode was switched, or by a relay still running with ``retain``).
- ``retain``: delete rows published more than ``OUTBOX_RETENTION_SECONDS`` ago.
- ``archive``: the same rows, but each batch is first written to a ``.jsonl.gz`` file under
  ``OUTBOX_ARCHIVE_URL`` (temp name, fsync, rename, fsync of the directory) and only then deleted,
  by the exact ids written. A crash between the two leaves the rows: they are archived twice,
  never lost.

Every batch is its own short transaction (one statement in delete/retain mode): the relay's
commit-order guard and vacuum are held back by long transactions, so cleanup never holds one.
Rows are picked with ``FOR UPDATE SKIP LOCKED`` through ``ix_outbox_published_at`` and deleted
in the same statement; nothing waits for a row lock and no table lock stronger than ROW
EXCLUSIVE is taken, so producers and publishers are never blocked. One run at a time per
database (a session advisory lock, held by an idle connection, not a transaction).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from outbox_tasks.errors import ConfigurationError
from outbox_tasks.logs import event, get_logger
from outbox_tasks.settings import Settings, env_var

log = get_logger("cleanup")

# Consumer receipts are kept this long when the settings have no receipt retention of their own
# (OUTBOX_RECEIPT_RETENTION_SECONDS): long enough to drop any redelivery a broker can still make.
# Memory bound of one archive batch (serialized lines, before compression).
DEFAULT_ARCHIVE_MAX_BYTES = 64 * 1024 * 1024
# Serializes cleanup runs per database ("cleanup" in ASCII); distinct from the lease lock key.
CLEANUP_LOCK_KEY = 0x636C65616E7570
# Dead-letter statuses that mean "resolved": only these are ever purged.
RESOLVED_DEAD_LETTER_STATUSES = ("replayed", "discarded")

ARCHIVE_SUFFIX = ".jsonl.gz"
# Every column of the outbox table, in table order: one key per column in each archive line.
ARCHIVE_COLUMNS = (
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "created_at",
    "published_at",
    "retry_count",
    "last_error",
    "seq",
    "txid",
    "slot",
    "next_attempt_at",
    "headers",
    "schema_version",
    "first_failed_at",
    "dead_lettered_at",
)
# jsonb columns are read as PostgreSQL's own text and written verbatim (exact numbers).
_RAW_JSON_COLUMNS = frozenset({"payload", "headers"})

_PAST = "'-infinity'::timestamptz"


def utc_now() -> datetime:
    """The wall clock, timezone-aware (the default ``now_clock``)."""
    return datetime.now(UTC)


# --- statements -------------------------------------------------------------------------------

# PostgreSQL has no DELETE ... LIMIT: lock a bounded, index-ordered sub-select (skipping rows
# someone else holds) and delete exactly those row versions by ctid: a TID scan, about twice as
# fast as looking 5000 random uuids up in the primary key (bench/cleanup.py). FOR UPDATE re-checks
# the sub-select's conditions on the row it locks and the lock is held until the delete, so the
# outer statement repeats none of them. Should a row have been updated concurrently (published
# rows never are), its new version is simply not deleted this time: never a wrong row. The lower
# bound (:after, the newest published_at of the previous batch) keeps each batch from re-walking
# the index entries of rows the earlier batches deleted but vacuum has not removed yet.
_DELETE_PUBLISHED = text(
    f"""
    DELETE FROM outbox
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM outbox
        WHERE published_at IS NOT NULL
          AND published_at >= COALESCE(CAST(:after AS timestamptz), {_PAST})
          AND published_at < :cutoff
        ORDER BY published_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING published_at
    """
)


def delete_published(
    conn: Connection, *, cutoff: datetime, after: datetime | None, limit: int
) -> tuple[int, datetime | None]:
    """Delete up to ``limit`` rows published before ``cutoff`` (oldest first, from ``after``).

    Returns (rows deleted, newest published_at among them).
    """
    stamps = [
        r.published_at
        for r in conn.execute(_DELETE_PUBLISHED, {"cutoff": cutoff, "after": after, "limit": limit})
    ]
    return len(stamps), max(stamps, default=None)


_COUNT_PUBLISHED = text(
    "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL AND published_at < :cutoff"
)


def count_published(conn: Connection, *, cutoff: datetime) -> int:
    """How many rows were published before ``cutoff`` (dry run)."""
    return int(conn.execute(_COUNT_PUBLISHED, {"cutoff": cutoff}).scalar_one())


# Archive reads take no locks (published rows are never changed by the relay) and page by
# (published_at, id) so a row that could not be deleted is never read twice in one run.
_SELECT_ARCHIVE = text(
    f"""
    SELECT id, aggregate_type, aggregate_id, event_type, payload::text AS payload, created_at,
           published_at, retry_count, last_error, seq, txid::text AS txid, slot, next_attempt_at,
           headers::text AS headers, schema_version, first_failed_at, dead_lettered_at
    FROM outbox
    WHERE published_at IS NOT NULL
      AND published_at >= COALESCE(CAST(:after_at AS timestamptz), {_PAST})
      AND published_at < :cutoff
      AND (CAST(:after_at AS timestamptz) IS NULL
           OR (published_at, id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS uuid)))
    ORDER BY published_at, id
    LIMIT :limit
    """
)


@dataclass(frozen=True, slots=True)
class ArchivedRow:
    """One outbox row as written to an archive file."""

    id: uuid.UUID
    published_at: datetime
    seq: int
    line: str


def select_archive_batch(
    conn: Connection,
    *,
    cutoff: datetime,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
    max_bytes: int,
) -> tuple[list[ArchivedRow], bool]:
    """Read up to ``limit`` rows published before ``cutoff``, after the (published_at, id) key,
    as archive lines; stop early once ``max_bytes`` of lines are read (streamed, so a batch of
    large payloads never sits in memory whole).

    Returns (rows, True when stopped by the byte bound).
    """
    params = {
        "cutoff": cutoff,
        "after_at": after[0] if after else None,
        "after_id": after[1] if after else None,
        "limit": limit,
    }
    rows: list[ArchivedRow] = []
    size = 0
    result = conn.execute(_SELECT_ARCHIVE, params, execution_options={"yield_per": 500})
    try:
        for r in result:
            line = archive_line(r._asdict())
            rows.append(ArchivedRow(id=r.id, published_at=r.published_at, seq=r.seq, line=line))
            size += len(line) + 1
            if size >= max_bytes and len(rows) < limit:
                return rows, True
    finally:
        result.close()
    return rows, False


_DELETE_ARCHIVED = text(
    """
    DELETE FROM outbox
    WHERE id = ANY(ARRAY(
        SELECT id FROM outbox
        WHERE id = ANY(CAST(:ids AS uuid[])) AND published_at IS NOT NULL
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING id
    """
)


def delete_archived(conn: Connection, ids: Sequence[uuid.UUID]) -> int:
    """Delete exactly these rows, and only those still published (never a pending row)."""
    return len(conn.execute(_DELETE_ARCHIVED, {"ids": list(ids)}).all())


# Receipts: the same shape as _DELETE_PUBLISHED (and a composite key, which ctid sidesteps).
_DELETE_RECEIPTS = text(
    f"""
    DELETE FROM outbox_consumer_receipt
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM outbox_consumer_receipt
        WHERE processed_at >= COALESCE(CAST(:after AS timestamptz), {_PAST})
          AND processed_at < :cutoff
        ORDER BY processed_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING processed_at
    """
)


def delete_receipts(
    conn: Connection, *, cutoff: datetime, after: datetime | None, limit: int
) -> tuple[int, datetime | None]:
    """Delete up to ``limit`` consumer receipts processed before ``cutoff``, oldest first.

    Returns (rows deleted, newest processed_at among them).
    """
    stamps = [
        r.processed_at
        for r in conn.execute(_DELETE_RECEIPTS, {"cutoff": cutoff, "after": after, "limit": limit})
    ]
    return len(stamps), max(stamps, default=None)


_COUNT_RECEIPTS = text("SELECT count(*) FROM outbox_consumer_receipt WHERE processed_at < :cutoff")


def count_receipts(conn: Connection, *, cutoff: datetime) -> int:
    """How many consumer receipts were processed before ``cutoff`` (dry run)."""
    return int(conn.execute(_COUNT_RECEIPTS, {"cutoff": cutoff}).scalar_one())


_RESOLVED = "status IN ('replayed', 'discarded') AND resolved_at < :cutoff"

_DELETE_DEAD_LETTERS = text(
    f"""
    DELETE FROM outbox_dead_letter
    WHERE id = ANY(ARRAY(
        SELECT id FROM outbox_dead_letter WHERE {_RESOLVED}
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING id
    """
)


def delete_dead_letters(conn: Connection, *, cutoff: datetime, limit: int) -> int:
    """Delete up to ``limit`` dead letters replayed or discarded before ``cutoff``. Parked and
    skipped dead letters are never touched; the audit trail (outbox_dead_letter_audit) stays."""
    return len(conn.execute(_DELETE_DEAD_LETTERS, {"cutoff": cutoff, "limit": limit}).all())


_COUNT_DEAD_LETTERS = text(f"SELECT count(*) FROM outbox_dead_letter WHERE {_RESOLVED}")


def count_dead_letters(conn: Connection, *, cutoff: datetime) -> int:
    """How many dead letters were resolved before ``cutoff`` (dry run)."""
    return int(conn.execute(_COUNT_DEAD_LETTERS, {"cutoff": cutoff}).scalar_one())


_TRY_LOCK = text("SELECT pg_try_advisory_lock(:key)")
_UNLOCK = text("SELECT pg_advisory_unlock(:key)")


def try_lock_cleanup(conn: Connection) -> bool:
    """Take the per-database cleanup lock (session level: it outlives the transaction)."""
    return bool(conn.execute(_TRY_LOCK, {"key": CLEANUP_LOCK_KEY}).scalar_one())


def unlock_cleanup(conn: Connection) -> None:
    """Release the cleanup lock."""
    conn.execute(_UNLOCK, {"key": CLEANUP_LOCK_KEY})


_TABLE_HEALTH = text(
    """
    SELECT n_live_tup, n_dead_tup, last_vacuum, last_autovacuum, last_analyze,
           last_autoanalyze, pg_total_relation_size(relid) AS total_bytes
    FROM pg_stat_user_tables
    WHERE relid = to_regclass('outbox')
    """
)


def table_health(engine: Engine) -> dict[str, Any]:
    """Live and dead tuples and the last (auto)vacuum of the outbox table, from
    ``pg_stat_user_tables`` (statistics: a few hundred ms behind, approximate counts)."""
    with engine.connect() as conn:
        row = conn.execute(_TABLE_HEALTH).one_or_none()
    if row is None:
        return {}
    return {
        "n_live_tup": int(row.n_live_tup),
        "n_dead_tup": int(row.n_dead_tup),
        "last_vacuum": row.last_vacuum,
        "last_autovacuum": row.last_autovacuum,
        "last_analyze": row.last_analyze,
        "last_autoanalyze": row.last_autoanalyze,
        "total_bytes": int(row.total_bytes),
    }


# --- archive files ----------------------------------------------------------------------------


def archive_directory(archive_url: str) -> Path:
    """The directory named by ``OUTBOX_ARCHIVE_URL``: a path or a ``file://`` URL of an existing
    directory. Anything else raises ConfigurationError naming the variable."""
    var = env_var("archive_url")
    raw = archive_url.strip()
    if not raw:
        raise ConfigurationError(
            f"{var} is empty: expected a directory (a path or a file:// URL) when "
            f"{env_var('cleanup_mode')}=archive"
        )
    parts = urlsplit(raw)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ConfigurationError(
                f"{var}={archive_url!r} is not valid: expected file:///absolute/path "
                "(a local directory; file:// URLs with a host are not supported)"
            )
        path = Path(unquote(parts.path))
    elif "://" in raw or parts.scheme:
        raise ConfigurationError(
            f"{var}={archive_url!r} is not valid: expected a directory path or a file:// URL; "
            f"{parts.scheme}:// is not supported (mount or sync the storage to a local directory)"
        )
    else:
        path = Path(raw)
    if not path.is_dir():
        raise ConfigurationError(
            f"{var}={archive_url!r} is not valid: {path} is not an existing directory"
        )
    return path


def _json_value(column: str, value: Any) -> str:
    if value is None:
        return "null"
    if column in _RAW_JSON_COLUMNS:
        return str(value)  # PostgreSQL's jsonb text: valid JSON on one line, numbers exact
    if isinstance(value, datetime):
        return json.dumps(value.astimezone(UTC).isoformat())
    if isinstance(value, uuid.UUID):
        return json.dumps(str(value))
    if column == "txid":
        return str(int(value))
    return json.dumps(value, ensure_ascii=False)


def archive_line(row: dict[str, Any]) -> str:
    """One outbox row as one JSON object: every column, in table order; uuids and timestamps
    (UTC, ISO 8601) as strings, txid as an integer, payload and headers as JSON."""
    return "{" + ",".join(f'"{c}":{_json_value(c, row[c])}' for c in ARCHIVE_COLUMNS) + "}"


def archive_file_name(first: ArchivedRow) -> str:
    """``outbox-<published_at UTC>-<seq>-<random>.jsonl.gz``: names sort by the time of their
    first row, and two files never collide (even for the same rows archived twice)."""
    stamp = first.published_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"outbox-{stamp}-{first.seq:019d}-{uuid.uuid4().hex[:8]}{ARCHIVE_SUFFIX}"


def write_archive_file(directory: Path, rows: Sequence[ArchivedRow]) -> Path:
    """Write rows durably: temp name, flush, fsync, rename, fsync of the directory. When this
    returns, the file survives a crash; before, no file with the final name exists."""
    if not rows:
        raise ValueError("an archive file needs at least one row")
    final = directory / archive_file_name(rows[0])
    temp = directory / f".{final.name}.tmp"
    try:
        with open(temp, "xb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                for row in rows:
                    gz.write(row.line.encode())
                    gz.write(b"\n")
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def read_archive_file(path: Path | str) -> Iterator[dict[str, Any]]:
    """The rows of one archive file, as dicts (for restores and checks)."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


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


@dataclass
class _Tally:
    outbox_rows: int = 0
    archived_rows: int = 0
    archive_files: list[str] = field(default_factory=list)
    receipt_rows: int = 0
    dead_letter_rows: int = 0
    batches: int = 0


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
    transaction per batch, ``pause_seconds`` between batches. A category ends when a batch comes
    back short; the run ends early (``complete=False``) once ``max_seconds`` are spent.

    ``now_clock`` gives the wall-clock "now" the cutoffs are computed from (read once);
    ``monotonic`` and ``sleep`` pace the run. ``dry_run`` counts per category, changes nothing.
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
    started = monotonic()
    deadline = None if max_seconds is None else started + max_seconds
    tally = _Tally()

    def report(*, complete: bool, skipped: bool = False) -> CleanupReport:
        return CleanupReport(
            mode=mode,
            dry_run=dry_run,
            outbox_cutoff=limits.outbox,
            receipt_cutoff=limits.receipts,
            dead_letter_cutoff=limits.dead_letters,
            outbox_rows=tally.outbox_rows,
            archived_rows=tally.archived_rows,
            archive_files=tuple(tally.archive_files),
            receipt_rows=tally.receipt_rows,
            dead_letter_rows=tally.dead_letter_rows,
            batches=tally.batches,
            seconds=monotonic() - started,
            complete=complete,
            skipped=skipped,
        )

    if dry_run:
        with engine.connect() as conn:
            tally.outbox_rows = count_published(conn, cutoff=limits.outbox)
            tally.archived_rows = tally.outbox_rows if mode == "archive" else 0
            tally.receipt_rows = count_receipts(conn, cutoff=limits.receipts)
            tally.dead_letter_rows = count_dead_letters(conn, cutoff=limits.dead_letters)
            conn.rollback()
        result = report(complete=True)
        _log_done(result)
        return result

    with engine.connect() as conn:
        locked = try_lock_cleanup(conn)
        conn.commit()
        if not locked:
            result = report(complete=False, skipped=True)
            event(
                log,
                logging.INFO,
                "cleanup_skipped",
                "another cleanup run holds the lock; skipped",
                mode=mode,
            )
            return result
        try:
            run = _Run(
                conn,
                tally=tally,
                batch_size=batch_size,
                pause_seconds=pause_seconds,
                sleep=sleep,
                monotonic=monotonic,
                deadline=deadline,
            )
            if directory is not None:
                done = run.archive(directory, limits.outbox, archive_max_bytes)
            else:
                done = run.published(limits.outbox)
            done = done and run.receipts(limits.receipts)
            done = done and run.dead_letters(limits.dead_letters)
        finally:
            _unlock_quietly(conn)
    result = report(complete=done)
    _log_done(result)
    return result


class _Run:
    """The batch loops of one run, on the connection that holds the cleanup lock."""

    def __init__(
        self,
        conn: Connection,
        *,
        tally: _Tally,
        batch_size: int,
        pause_seconds: float,
        sleep: Callable[[float], None],
        monotonic: Callable[[], float],
        deadline: float | None,
    ) -> None:
        self.conn = conn
        self.tally = tally
        self.batch_size = batch_size
        self.pause_seconds = pause_seconds
        self.sleep = sleep
        self.monotonic = monotonic
        self.deadline = deadline

    def _out_of_time(self) -> bool:
        return self.deadline is not None and self.monotonic() >= self.deadline

    def _loop(self, category: str, step: Callable[[], tuple[int, bool]]) -> bool:
        """Run ``step`` (one batch: rows, and whether more may follow) until it says done.
        Returns False when time ran out first."""
        while True:
            if self._out_of_time():
                return False
            began = self.monotonic()
            rows, more = step()
            self.tally.batches += 1
            event(
                log,
                logging.DEBUG,
                "cleanup_batch",
                "cleanup batch",
                category=category,
                rows=rows,
                seconds=round(self.monotonic() - began, 4),
            )
            if not more:
                return True
            if self._out_of_time():
                return False
            if self.pause_seconds:
                self.sleep(self.pause_seconds)

    def published(self, cutoff: datetime) -> bool:
        after: datetime | None = None

        def step() -> tuple[int, bool]:
            nonlocal after
            with self.conn.begin():
                rows, newest = delete_published(
                    self.conn, cutoff=cutoff, after=after, limit=self.batch_size
                )
            after = newest or after
            self.tally.outbox_rows += rows
            return rows, rows >= self.batch_size

        return self._loop("outbox", step)

    def archive(self, directory: Path, cutoff: datetime, max_bytes: int) -> bool:
        after: tuple[datetime, uuid.UUID] | None = None

        def step() -> tuple[int, bool]:
            nonlocal after
            with self.conn.begin():
                rows, capped = select_archive_batch(
                    self.conn,
                    cutoff=cutoff,
                    after=after,
                    limit=self.batch_size,
                    max_bytes=max_bytes,
                )
            if not rows:
                return 0, False
            path = write_archive_file(directory, rows)  # durable before anything is deleted
            self.tally.archived_rows += len(rows)
            self.tally.archive_files.append(str(path))
            with self.conn.begin():
                deleted = delete_archived(self.conn, [r.id for r in rows])
            self.tally.outbox_rows += deleted
            after = (rows[-1].published_at, rows[-1].id)
            return deleted, capped or len(rows) >= self.batch_size

        return self._loop("archive", step)

    def receipts(self, cutoff: datetime) -> bool:
        after: datetime | None = None

        def step() -> tuple[int, bool]:
            nonlocal after
            with self.conn.begin():
                rows, newest = delete_receipts(
                    self.conn, cutoff=cutoff, after=after, limit=self.batch_size
                )
            after = newest or after
            self.tally.receipt_rows += rows
            return rows, rows >= self.batch_size

        return self._loop("receipts", step)

    def dead_letters(self, cutoff: datetime) -> bool:
        def step() -> tuple[int, bool]:
            with self.conn.begin():
                rows = delete_dead_letters(self.conn, cutoff=cutoff, limit=self.batch_size)
            self.tally.dead_letter_rows += rows
            return rows, rows >= self.batch_size

        return self._loop("dead_letters", step)


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


# --- command line -----------------------------------------------------------------------------


def _positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {raw!r}")
    return value


def add_cleanup_parser(sub: Any) -> None:
    """``outbox-tasks cleanup [--dry-run] [--max-seconds N] [--json]``."""
    cleanup = sub.add_parser(
        "cleanup",
        help="remove published rows (per OUTBOX_CLEANUP_MODE), old consumer receipts and "
        "resolved dead letters, in short batches",
    )
    cleanup.add_argument("--database-url", help=f"PostgreSQL URL (env {env_var('database_url')})")
    cleanup.add_argument(
        "--dry-run", action="store_true", help="count what would be removed; change nothing"
    )
    cleanup.add_argument(
        "--max-seconds",
        type=_positive_seconds,
        default=None,
        help="stop after this many seconds (the next run goes on); default: until done",
    )
    cleanup.add_argument("--json", action="store_true", help="machine-readable output")
    cleanup.set_defaults(func=cmd_cleanup)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from outbox_tasks.db import make_engine, translate_errors

    overrides: dict[str, Any] = {}
    if getattr(args, "database_url", None):
        overrides["database_url"] = args.database_url
    settings = Settings.from_env(**overrides)
    engine = make_engine(settings, application_name="outbox_tasks.cleanup", pool_size=1)
    try:
        with translate_errors("cleanup"):
            result = run_cleanup(
                engine, settings, dry_run=args.dry_run, max_seconds=args.max_seconds
            )
            health = table_health(engine)
    finally:
        engine.dispose()
    if args.json:
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
