"""Cleanup against real PostgreSQL: each mode removes exactly the rows it should, archive files
hold exactly what was deleted (and survive a crash before the delete), batches are bounded and
walk the published index, receipts and resolved dead letters are purged."""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from outbox_tasks import archive, cleanup
from outbox_tasks.cleanup import CleanupReport, run_cleanup, table_health
from outbox_tasks.cli import main
from outbox_tasks.errors import ConfigurationError
from outbox_tasks.settings import Settings
from outbox_tasks.store import cleanup as store_cleanup

pytestmark = pytest.mark.timeout(120)

DAY = timedelta(days=1)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "cleanup.md"


def no_sleep(seconds: float) -> None:
    """Tests never wait between batches."""


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


def run(engine: Engine, settings: Settings, now: datetime, **kwargs: Any) -> CleanupReport:
    kwargs.setdefault("sleep", no_sleep)
    return run_cleanup(engine, settings, now_clock=lambda: now, **kwargs)


def add_rows(
    engine: Engine,
    published_at: Sequence[datetime | None],
    *,
    payload: Any = None,
    created_at: datetime | None = None,
) -> list[uuid.UUID]:
    """One outbox row per entry (None: still pending), in one short transaction. Rows are
    written pending and then marked, as the relay would: so they are numbered like any event
    (an INSERT of an already published row is history and keeps the number it comes with)."""
    ids = [uuid.uuid4() for _ in published_at]
    params = [
        {
            "id": row_id,
            "aggregate_id": f"agg-{i % 7}",
            "payload": json.dumps(payload if payload is not None else {"n": i, "s": 'ü\n"x"'}),
            "headers": json.dumps({"trace": f"t{i}"}),
            "created_at": created_at or (at - timedelta(seconds=1) if at else datetime.now(UTC)),
            "published_at": at,
        }
        for i, (row_id, at) in enumerate(zip(ids, published_at, strict=True))
    ]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, "
                "headers, created_at) VALUES (:id, 'Order', :aggregate_id, "
                "'OrderCreated', CAST(:payload AS jsonb), CAST(:headers AS jsonb), :created_at)"
            ),
            params,
        )
        published = [p for p in params if p["published_at"] is not None]
        if published:
            conn.execute(
                text("UPDATE outbox SET published_at = :published_at WHERE id = :id"), published
            )
    return ids


def outbox_ids(engine: Engine) -> set[uuid.UUID]:
    with engine.connect() as conn:
        return set(conn.execute(text("SELECT id FROM outbox")).scalars())


def archived(directory: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.jsonl.gz")):
        rows.extend(archive.read_archive_file(path))
    return rows


def aged(now: datetime, *days: float | None) -> list[datetime | None]:
    return [None if d is None else now - d * DAY for d in days]


# --- the three modes --------------------------------------------------------------------------


def test_retain_mode_deletes_only_rows_published_longer_ago_than_the_retention(
    engine: Engine, settings: Settings, now: datetime, caplog: pytest.LogCaptureFixture
) -> None:
    old = add_rows(engine, aged(now, 30, 8, 7.01))
    young = add_rows(engine, aged(now, 6.99, 1, 0))
    pending = add_rows(engine, [None, None], created_at=now - 30 * DAY)

    with caplog.at_level(logging.INFO, logger="outbox_tasks.cleanup"):
        report = run(engine, settings.with_changes(retention_seconds=7 * 86400.0), now)

    assert outbox_ids(engine) == set(young) | set(pending)
    assert (report.mode, report.outbox_rows, report.archived_rows) == ("retain", len(old), 0)
    assert report.outbox_cutoff == now - 7 * DAY
    assert report.complete and not report.skipped and not report.dry_run
    done = [r for r in caplog.records if getattr(r, "action", None) == "cleanup_done"]
    assert len(done) == 1
    assert done[0].outbox_rows == len(old)  # type: ignore[attr-defined]
    assert done[0].seconds >= 0  # type: ignore[attr-defined]


def test_delete_mode_removes_every_published_leftover_and_no_pending_row(
    engine: Engine, settings: Settings, now: datetime
) -> None:
    add_rows(engine, aged(now, 30, 1, 0.0001))
    pending = add_rows(engine, [None, None, None], created_at=now - 30 * DAY)

    report = run(engine, settings.with_changes(cleanup_mode="delete"), now)

    assert outbox_ids(engine) == set(pending)
    assert report.outbox_rows == 3
    assert report.outbox_cutoff == now


def test_archive_mode_writes_exactly_the_deleted_rows_then_deletes_them(
    engine: Engine, settings: Settings, now: datetime, tmp_path: Path
) -> None:
    old = add_rows(engine, [now - (8 + i / 100) * DAY for i in range(23)])
    young = add_rows(engine, aged(now, 1, 2))
    pending = add_rows(engine, [None], created_at=now - 30 * DAY)
    with engine.connect() as conn:
        before = {
            r["id"]: r
            for r in conn.execute(
                text("SELECT o.*, o.txid::text AS txid_text FROM outbox o WHERE id = ANY(:ids)"),
                {"ids": old},
            ).mappings()
        }
        columns = list(
            conn.execute(
                text(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'outbox' ORDER BY ordinal_position"
                )
            ).scalars()
        )
    archive_settings = settings.with_changes(cleanup_mode="archive", archive_url=str(tmp_path))

    report = run(engine, archive_settings, now, batch_size=10)

    assert outbox_ids(engine) == set(young) | set(pending)
    lines = archived(tmp_path)
    assert sorted(uuid.UUID(r["id"]) for r in lines) == sorted(old)
    assert (report.outbox_rows, report.archived_rows) == (23, 23)
    assert len(report.archive_files) == 3  # 10 + 10 + 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        Path(f).name for f in report.archive_files
    )  # no temp files left behind
    for line in lines:
        row = before[uuid.UUID(line["id"])]
        assert list(line) == columns
        assert line["payload"] == row["payload"]
        assert line["headers"] == row["headers"]
        assert line["txid"] == int(row["txid_text"]) and isinstance(line["txid"], int)
        assert datetime.fromisoformat(line["published_at"]) == row["published_at"]
        assert datetime.fromisoformat(line["created_at"]) == row["created_at"]
        assert line["published_at"].endswith("+00:00")
        assert (line["seq"], line["slot"], line["aggregate_id"]) == (
            row["seq"],
            row["slot"],
            row["aggregate_id"],
        )


def test_archive_file_names_sort_by_the_time_of_their_rows(
    engine: Engine, settings: Settings, now: datetime, tmp_path: Path
) -> None:
    add_rows(engine, [now - (20 - i) * DAY for i in range(12)])
    archive_settings = settings.with_changes(cleanup_mode="archive", archive_url=str(tmp_path))

    run(engine, archive_settings, now, batch_size=4)

    files = sorted(tmp_path.glob("outbox-*.jsonl.gz"))
    assert len(files) == 3
    assert all(
        re.fullmatch(r"outbox-\d{8}T\d{12}Z-\d{19}-[0-9a-f]{8}\.jsonl\.gz", f.name) for f in files
    )
    stamps = [[r["published_at"] for r in archive.read_archive_file(f)] for f in files]
    flat = [datetime.fromisoformat(s) for batch in stamps for s in batch]
    assert flat == sorted(flat)


def test_archive_lines_keep_payload_numbers_digit_for_digit(
    engine: Engine, settings: Settings, now: datetime, tmp_path: Path
) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, "
                "published_at) VALUES ('Order', '1', 'Priced', "
                "'{\"amount\": 12345678901234567890.123456789}', :at)"
            ),
            {"at": now - 30 * DAY},
        )
    archive_settings = settings.with_changes(cleanup_mode="archive", archive_url=str(tmp_path))

    run(engine, archive_settings, now)

    (path,) = tmp_path.glob("*.jsonl.gz")
    raw = gzip.decompress(path.read_bytes()).decode()
    assert '"payload":{"amount": 12345678901234567890.123456789}' in raw
    assert raw.endswith("}\n") and raw.count("\n") == 1


def test_a_file_url_names_the_archive_directory(
    engine: Engine, settings: Settings, now: datetime, tmp_path: Path
) -> None:
    ids = add_rows(engine, aged(now, 10, 11))
    archive_settings = settings.with_changes(cleanup_mode="archive", archive_url=tmp_path.as_uri())

    run(engine, archive_settings, now)

    assert {uuid.UUID(r["id"]) for r in archived(tmp_path)} == set(ids)
    assert outbox_ids(engine) == set()


def test_an_archive_batch_is_cut_short_by_its_byte_bound_and_the_rest_follows(
    engine: Engine, settings: Settings, now: datetime, tmp_path: Path
) -> None:
    ids = add_rows(engine, [now - (9 + i / 100) * DAY for i in range(6)], payload={"x": "y" * 1000})
    archive_settings = settings.with_changes(cleanup_mode="archive", archive_url=str(tmp_path))

    report = run(engine, archive_settings, now, archive_max_bytes=2500)

    assert len(report.archive_files) == 3  # two ~1.2 kB lines per file
    assert sorted(uuid.UUID(r["id"]) for r in archived(tmp_path)) == sorted(ids)
    assert outbox_ids(engine) == set()


def test_a_crash_between_writing_a_file_and_deleting_leaves_the_rows_for_the_next_run(
    engine: Engine,
    settings: Settings,
    now: datetime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = add_rows(engine, aged(now, 9, 10, 11))
    young = add_rows(engine, aged(now, 1))
    archive_settings = settings.with_changes(cleanup_mode="archive", archive_url=str(tmp_path))

    def crash(conn: Connection, ids: Sequence[uuid.UUID]) -> int:
        raise RuntimeError("killed between the archive file and the delete")

    with monkeypatch.context() as patch:
        patch.setattr(cleanup, "delete_archived", crash)
        with pytest.raises(RuntimeError, match="killed between"):
            run(engine, archive_settings, now)

    (first,) = tmp_path.glob("*.jsonl.gz")
    assert {uuid.UUID(r["id"]) for r in archive.read_archive_file(first)} == set(ids)
    assert outbox_ids(engine) == set(ids) | set(young)

    report = run(engine, archive_settings, now)

    assert not report.skipped  # the crashed run released its lock
    (second,) = (Path(f) for f in report.archive_files)
    assert second != first
    assert {uuid.UUID(r["id"]) for r in archive.read_archive_file(second)} == set(ids)
    assert outbox_ids(engine) == set(young)
    assert report.outbox_rows == 3


def test_rows_that_became_pending_again_are_archived_but_never_deleted(
    engine: Engine,
    settings: Settings,
    now: datetime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = add_rows(engine, aged(now, 9, 10))
    archive_settings = settings.with_changes(cleanup_mode="archive", archive_url=str(tmp_path))
    real_delete = cleanup.delete_archived

    def unpublish_first(conn: Connection, written: Sequence[uuid.UUID]) -> int:
        conn.execute(text("UPDATE outbox SET published_at = NULL WHERE id = :id"), {"id": ids[0]})
        return real_delete(conn, written)

    monkeypatch.setattr(cleanup, "delete_archived", unpublish_first)

    report = run(engine, archive_settings, now)

    assert outbox_ids(engine) == {ids[0]}
    assert (report.archived_rows, report.outbox_rows) == (2, 1)


# --- batches, time, locks ---------------------------------------------------------------------


def test_cleanup_goes_in_bounded_batches_with_a_pause_between_them(
    engine: Engine, settings: Settings, now: datetime
) -> None:
    add_rows(engine, [now - (8 + i / 1000) * DAY for i in range(25)])
    pauses: list[float] = []

    report = run_cleanup(
        engine, settings, now_clock=lambda: now, sleep=pauses.append, batch_size=10
    )

    assert report.outbox_rows == 25
    # outbox 10, 10, 5; receipts 0; dead letters 0: a pause only between full batches
    assert report.batches == 5
    assert pauses == [0.05, 0.05]
    assert outbox_ids(engine) == set()


def test_cleanup_stops_when_max_seconds_are_spent_and_the_next_run_goes_on(
    engine: Engine, settings: Settings, now: datetime
) -> None:
    add_rows(engine, [now - (8 + i / 1000) * DAY for i in range(30)])
    ticks = iter(range(1000))

    report = run(
        engine,
        settings,
        now,
        batch_size=10,
        max_seconds=3,
        monotonic=lambda: float(next(ticks)),  # every reading is one second later
    )

    assert not report.complete
    assert 0 < report.outbox_rows < 30
    assert len(outbox_ids(engine)) == 30 - report.outbox_rows

    rest = run(engine, settings, now, batch_size=10)

    assert rest.complete and rest.outbox_rows == 30 - report.outbox_rows
    assert outbox_ids(engine) == set()


def test_a_row_locked_by_another_transaction_is_skipped_not_waited_for(
    engine: Engine, settings: Settings, now: datetime
) -> None:
    locked, *_ = add_rows(engine, aged(now, 9, 10, 11))

    # The lock is held only for this one run. Had cleanup waited for it, the run would fail
    # with a lock timeout (OUTBOX_LOCK_TIMEOUT_SECONDS) instead of returning.
    with engine.connect() as holder, holder.begin():
        holder.execute(text("SELECT 1 FROM outbox WHERE id = :id FOR UPDATE"), {"id": locked})
        report = run(engine, settings, now)

    assert report.outbox_rows == 2
    assert outbox_ids(engine) == {locked}


def test_a_second_run_is_skipped_while_another_holds_the_cleanup_lock(
    engine: Engine, settings: Settings, now: datetime
) -> None:
    ids = add_rows(engine, aged(now, 9))

    with engine.connect() as other:
        assert cleanup.try_lock_cleanup(other)
        other.commit()  # a session lock: no transaction stays open
        try:
            report = run(engine, settings, now)
        finally:
            cleanup.unlock_cleanup(other)
            other.commit()

    assert report.skipped and not report.complete
    assert outbox_ids(engine) == set(ids)
    assert run(engine, settings, now).outbox_rows == 1


# --- dry run ----------------------------------------------------------------------------------


def test_a_dry_run_counts_each_category_and_changes_nothing(
    engine: Engine, settings: Settings, now: datetime, tmp_path: Path
) -> None:
    add_rows(engine, aged(now, 9, 10, 11, 1, None))
    add_receipts(engine, now, ages_days=[40, 31, 29])
    add_dead_letters(engine, now, [("replayed", 8), ("discarded", 9), ("parked", None)])
    archive_settings = settings.with_changes(cleanup_mode="archive", archive_url=str(tmp_path))
    before = snapshot(engine)

    report = run(engine, archive_settings, now, dry_run=True)

    assert report.dry_run and report.complete
    assert (report.outbox_rows, report.archived_rows) == (3, 3)
    assert (report.receipt_rows, report.dead_letter_rows) == (2, 2)
    assert report.archive_files == () and list(tmp_path.iterdir()) == []
    assert snapshot(engine) == before


def snapshot(engine: Engine) -> tuple[int, ...]:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM outbox), "
                "(SELECT count(*) FROM outbox_consumer_receipt), "
                "(SELECT count(*) FROM outbox_dead_letter)"
            )
        ).one()
    return tuple(int(n) for n in row)


# --- receipts and dead letters ----------------------------------------------------------------


def add_receipts(engine: Engine, now: datetime, *, ages_days: Sequence[float]) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in ages_days]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_consumer_receipt (consumer_group, event_id, processed_at) "
                "VALUES ('billing', :id, :at)"
            ),
            [{"id": i, "at": now - d * DAY} for i, d in zip(ids, ages_days, strict=True)],
        )
    return ids


def add_dead_letters(
    engine: Engine, now: datetime, entries: Sequence[tuple[str, float | None]]
) -> list[uuid.UUID]:
    """(status, days since resolution or None for unresolved) per dead letter."""
    ids = [uuid.uuid4() for _ in entries]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_dead_letter (id, aggregate_type, aggregate_id, event_type, "
                "payload, seq, created_at, attempts, dead_lettered_at, status, resolved_at) "
                "VALUES (:id, 'Order', '1', 'OrderCreated', '{}', 1, :old, 6, :old, :status, "
                ":resolved_at)"
            ),
            [
                {
                    "id": i,
                    "old": now - 60 * DAY,
                    "status": status,
                    "resolved_at": None if days is None else now - days * DAY,
                }
                for i, (status, days) in zip(ids, entries, strict=True)
            ],
        )
    return ids


def test_receipts_older_than_their_retention_are_purged(
    engine: Engine, settings: Settings, now: datetime
) -> None:
    old = add_receipts(engine, now, ages_days=[400, 31, 30.01])
    young = add_receipts(engine, now, ages_days=[29.9, 1, 0])

    report = run(engine, settings, now, batch_size=2)

    assert report.receipt_rows == len(old)
    assert settings.receipt_retention_seconds == 30 * 24 * 3600
    assert report.receipt_cutoff == now - timedelta(seconds=settings.receipt_retention_seconds)
    with engine.connect() as conn:
        left = set(conn.execute(text("SELECT event_id FROM outbox_consumer_receipt")).scalars())
    assert left == set(young)


def test_the_receipt_retention_can_be_given_per_run(
    engine: Engine, settings: Settings, now: datetime
) -> None:
    add_receipts(engine, now, ages_days=[3, 1])

    report = run(engine, settings, now, receipt_retention_seconds=2 * 86400.0)

    assert report.receipt_rows == 1


def test_resolved_dead_letters_are_purged_after_the_retention_and_unresolved_ones_never(
    engine: Engine, settings: Settings, now: datetime
) -> None:
    gone = add_dead_letters(engine, now, [("replayed", 8), ("discarded", 30)])
    kept = add_dead_letters(
        engine,
        now,
        [("replayed", 6), ("discarded", 1), ("parked", None), ("skipped", None)],
    )
    # An unresolved status with a resolution time is still not resolved.
    kept += add_dead_letters(engine, now, [("parked", 90), ("skipped", 90)])

    report = run(engine, settings.with_changes(retention_seconds=7 * 86400.0), now)

    assert report.dead_letter_rows == len(gone)
    with engine.connect() as conn:
        left = set(conn.execute(text("SELECT id FROM outbox_dead_letter")).scalars())
    assert left == set(kept)


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("s3://bucket/outbox", "s3:// is not supported"),
        ("https://example.com/archive", "https:// is not supported"),
        ("file://otherhost/var/archive", "file:///absolute/path"),
        ("/nonexistent/outbox-archive", "not an existing directory"),
    ],
)
def test_a_bad_archive_url_is_a_configuration_error_naming_the_variable(
    engine: Engine, settings: Settings, now: datetime, url: str, says: str
) -> None:
    ids = add_rows(engine, aged(now, 9))

    # A scheme that is not a directory is refused when the settings load, the rest at run time.
    with pytest.raises(ConfigurationError, match="OUTBOX_ARCHIVE_URL") as error:
        run(engine, settings.with_changes(cleanup_mode="archive", archive_url=url), now)

    assert says in str(error.value)
    assert outbox_ids(engine) == set(ids)


def test_an_empty_archive_url_is_refused_even_when_settings_were_not_validated() -> None:
    with pytest.raises(ConfigurationError, match="OUTBOX_ARCHIVE_URL is empty"):
        cleanup.archive_directory("  ")


# --- the plan on a realistic table ------------------------------------------------------------


def nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


OUTBOX_INDEXES = frozenset(
    {"pk_outbox", "ix_outbox_published_at", "ix_outbox_pending", "ix_outbox_created_at"}
)


def outbox_scans(conn: Connection, statement: Any, params: dict[str, Any]) -> list[tuple[str, Any]]:
    """(node type, index name) of every node that reads the outbox table or one of its indexes
    (a Bitmap Index Scan names only its index)."""
    plan = conn.execute(text("EXPLAIN (FORMAT JSON) " + str(statement)), params).scalar_one()
    return [
        (n["Node Type"], n.get("Index Name"))
        for n in nodes(plan[0]["Plan"])
        if n.get("Relation Name") == "outbox" or n.get("Index Name") in OUTBOX_INDEXES
    ]


def test_the_delete_batches_walk_their_indexes_on_large_tables(
    engine: Engine, now: datetime
) -> None:
    for start in range(0, 200_000, 50_000):  # short transactions, not one long writer
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, "
                    "created_at, published_at) "
                    "SELECT 'Order', (g % 5000)::text, 'OrderCreated', '{\"n\": 1}', "
                    ":now - interval '10 days', :now - make_interval(secs => 200000 - g) "
                    "FROM generate_series(:lo, :hi) AS g"
                ),
                {"now": now, "lo": start + 1, "hi": start + 50_000},
            )
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                "SELECT 'Order', 'p' || g, 'OrderCreated', '{}' FROM generate_series(1, 1000) g"
            )
        )
        conn.execute(
            text(
                "INSERT INTO outbox_consumer_receipt (consumer_group, event_id, processed_at) "
                "SELECT 'billing', gen_random_uuid(), :old - make_interval(secs => g) "
                "FROM generate_series(1, 100000) AS g"
            ),
            {"old": now - 40 * DAY},
        )
    with engine.connect() as conn:
        conn.execute(text("ANALYZE outbox, outbox_consumer_receipt"))
        conn.commit()
        cutoff = now - timedelta(hours=12)
        delete_scans = outbox_scans(
            conn,
            store_cleanup.PUBLISHED.delete_sql,
            {"cutoff": cutoff, "after": None, "limit": 5000},
        )
        later_scans = outbox_scans(
            conn,
            store_cleanup.PUBLISHED.delete_sql,
            {"cutoff": cutoff, "after": now - 2 * DAY, "limit": 5000},
        )
        archive_scans = outbox_scans(
            conn,
            store_cleanup._SELECT_ARCHIVE,
            {"cutoff": cutoff, "after_at": now - 2 * DAY, "after_id": uuid.uuid4(), "limit": 5000},
        )
        receipt_plan = conn.execute(
            text("EXPLAIN (FORMAT JSON) " + str(store_cleanup.RECEIPTS.delete_sql)),
            {"cutoff": now - 30 * DAY, "after": None, "limit": 5000},
        ).scalar_one()
        conn.rollback()

    receipt_nodes = [(n["Node Type"], n.get("Index Name")) for n in nodes(receipt_plan[0]["Plan"])]
    assert ("Index Scan", "ix_outbox_consumer_receipt_processed_at") in receipt_nodes
    assert ("Tid Scan", None) in receipt_nodes, receipt_nodes
    for scans in (delete_scans, later_scans, archive_scans):
        assert any(index == "ix_outbox_published_at" for _, index in scans), scans
        assert not any(node_type == "Seq Scan" for node_type, _ in scans), scans
    # The outer delete goes straight to the locked row versions, not through the table.
    assert ("Tid Scan", None) in delete_scans, delete_scans


def test_table_health_reports_live_and_dead_tuples_of_the_outbox(
    engine: Engine, settings: Settings, now: datetime
) -> None:
    add_rows(engine, aged(now, 9, 9, 9, None))
    run(engine, settings, now)

    health = table_health(engine)

    # Counts are statistics, flushed by each backend a moment later: check the shape only.
    assert set(health) >= {"n_live_tup", "n_dead_tup", "last_autovacuum", "last_vacuum"}
    assert isinstance(health["n_live_tup"], int) and isinstance(health["n_dead_tup"], int)
    assert health["last_vacuum"] is None or isinstance(health["last_vacuum"], datetime)
    assert health["total_bytes"] > 0


# --- command line and docs --------------------------------------------------------------------


def test_the_cleanup_command_prints_a_report(
    engine: Engine,
    settings: Settings,
    now: datetime,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    add_rows(engine, aged(now, 9, 10, None))
    monkeypatch.setenv("OUTBOX_DATABASE_URL", settings.database_url)

    assert main(["cleanup", "--dry-run", "--json"]) == 0
    counted = json.loads(capsys.readouterr().out)
    assert (counted["dry_run"], counted["outbox_rows"]) == (True, 2)
    assert {"n_dead_tup", "n_live_tup"} <= set(counted["table"])

    assert main(["cleanup", "--max-seconds", "60"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 outbox rows" in out and "outbox table:" in out
    assert len(outbox_ids(engine)) == 1

    with pytest.raises(SystemExit):
        main(["cleanup", "--max-seconds", "0"])


def test_the_documented_psql_restore_puts_archived_rows_back(
    engine: Engine, settings: Settings, now: datetime, tmp_path: Path
) -> None:
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed")
    ids = add_rows(engine, aged(now, 9, 10, 11))
    with engine.connect() as conn:
        before = conn.execute(text("SELECT to_jsonb(o) FROM outbox o ORDER BY seq")).scalars().all()
    archive_settings = settings.with_changes(cleanup_mode="archive", archive_url=str(tmp_path))
    run(engine, archive_settings, now, batch_size=2)
    # The same rows archived twice (as after a crash) must restore once.
    duplicate = tmp_path / "outbox-99990101T000000000000Z-0000000000000000000-00000000.jsonl.gz"
    shutil.copy(sorted(tmp_path.glob("*.jsonl.gz"))[0], duplicate)
    assert outbox_ids(engine) == set()

    docs = DOCS.read_text()
    block = next(
        b for b in re.findall(r"```sql\n(.*?)```", docs, re.S) if "\\copy outbox_archive" in b
    )
    script = block.replace("/var/lib/outbox-archive", str(tmp_path))
    restored = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", settings.libpq_url],
        input=script,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    assert restored.returncode == 0, restored.stderr
    with engine.connect() as conn:
        after = conn.execute(text("SELECT to_jsonb(o) FROM outbox o ORDER BY seq")).scalars().all()
    assert after == before
    assert {uuid.UUID(r["id"]) for r in after} == set(ids)
