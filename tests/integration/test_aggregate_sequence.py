"""The per-aggregate counter in PostgreSQL itself (migration 0004): what any writer, in any
language, gets from the ``outbox_assign_sequence`` and ``outbox_record_skip`` triggers.

- ``aggregate_sequence`` is 1, 2, 3 ... per aggregate, with no hole from a rollback;
- a second writer of the same aggregate waits until the first commits or rolls back, so per
  aggregate commit order, ``aggregate_sequence`` order and ``seq`` order agree;
- writers of different aggregates never wait for each other;
- removing a dead-lettered row that was never published records an intentional gap.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, pool
from sqlalchemy.orm import Session

from outbox_tasks import OutboxMessage
from tests.support import pgcluster

pytestmark = pytest.mark.timeout(120)

INSERT = (
    "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
    "VALUES (%s, %s, %s, %s, '{}') RETURNING aggregate_sequence, seq"
)


def _insert(
    conn: psycopg.Connection[tuple[object, ...]], aggregate_id: str, event_type: str
) -> tuple[int, int]:
    row = conn.execute(INSERT, (uuid.uuid4(), "Order", aggregate_id, event_type)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])  # type: ignore[call-overload]


def _rows(url: str) -> list[tuple[str, str, int, int]]:
    with psycopg.connect(url) as conn:
        return [
            (str(r[0]), str(r[1]), int(r[2]), int(r[3]))
            for r in conn.execute(
                "SELECT aggregate_id, event_type, aggregate_sequence, seq FROM outbox ORDER BY seq"
            )
        ]


def _counters(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return {
            str(r[0]): int(r[1])
            for r in conn.execute("SELECT aggregate_id, last_sequence FROM outbox_aggregate")
        }


def _wait_until_blocked(url: str, application_name: str, timeout: float = 10.0) -> None:
    """Until the session named ``application_name`` waits on a lock."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as probe:
        while time.monotonic() < deadline:
            row = probe.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE application_name = %s",
                (application_name,),
            ).fetchone()
            if row is not None and row[0] == "Lock":
                return
            time.sleep(0.02)
    raise AssertionError(f"{application_name} never waited on a lock")


class Writer(threading.Thread):
    """Runs one insert (and commits) on its own connection in a thread, so the test can watch
    it wait."""

    def __init__(self, url: str, aggregate_id: str, event_type: str, *, lock_timeout: str = "0"):
        super().__init__(daemon=True)
        self.name = f"writer_{uuid.uuid4().hex[:8]}"
        self.url = url
        self.aggregate_id = aggregate_id
        self.event_type = event_type
        self.lock_timeout = lock_timeout
        self.result: tuple[int, int] | None = None
        self.error: BaseException | None = None
        self.before_insert: threading.Event = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.url, application_name=self.name) as conn:
                conn.execute(f"SET lock_timeout = '{self.lock_timeout}'")
                self.before_insert.set()
                self.result = _insert(conn, self.aggregate_id, self.event_type)
        except BaseException as error:  # reported to the test thread
            self.error = error


@pytest.fixture
def url(database_url: str) -> str:
    return database_url


def test_a_plain_sql_insert_of_the_seed_columns_numbers_each_aggregate_from_one(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) VALUES "
            "(gen_random_uuid(), 'Order', '1', 'OrderCreated', '{}'), "
            "(gen_random_uuid(), 'Order', '2', 'OrderCreated', '{}'), "
            "(gen_random_uuid(), 'Order', '1', 'OrderPaid', '{}')"
        )
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
            "VALUES (gen_random_uuid(), 'Order', '1', 'OrderShipped', '{}')"
        )

    rows = _rows(url)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("1", "OrderCreated", 1),
        ("2", "OrderCreated", 1),
        ("1", "OrderPaid", 2),
        ("1", "OrderShipped", 3),
    ]
    assert _counters(url) == {"1": 3, "2": 1}


def test_the_producer_api_numbers_events_in_the_order_they_were_added(url: str) -> None:
    engine = create_engine(
        url.replace("postgresql://", "postgresql+psycopg://"), poolclass=pool.NullPool
    )
    try:
        with Session(engine) as session, session.begin():
            messages = [
                OutboxMessage(
                    aggregate_type="Order", aggregate_id=i % 2, event_type=f"E{i}", payload={}
                )
                for i in range(6)
            ]
            session.add_all(messages)
            session.flush()
            numbers = [(m.aggregate_id, m.event_type, m.aggregate_sequence) for m in messages]
    finally:
        engine.dispose()

    assert numbers == [
        ("0", "E0", 1),
        ("1", "E1", 1),
        ("0", "E2", 2),
        ("1", "E3", 2),
        ("0", "E4", 3),
        ("1", "E5", 3),
    ]
    rows = _rows(url)
    for aggregate in ("0", "1"):
        mine = [r for r in rows if r[0] == aggregate]
        assert [r[2] for r in mine] == [1, 2, 3]  # seq order is aggregate_sequence order


def test_a_rolled_back_insert_leaves_no_hole(url: str) -> None:
    with psycopg.connect(url) as conn:
        _insert(conn, "7", "OrderCreated")
    with psycopg.connect(url) as conn:
        assert _insert(conn, "7", "OrderPaid")[0] == 2
        conn.rollback()
    with psycopg.connect(url) as conn:
        number, _ = _insert(conn, "7", "OrderCancelled")

    assert number == 2
    assert [(r[1], r[2]) for r in _rows(url)] == [("OrderCreated", 1), ("OrderCancelled", 2)]


def test_a_rolled_back_savepoint_gives_its_numbers_back(url: str) -> None:
    with psycopg.connect(url) as conn:
        _insert(conn, "1", "Kept")
        with contextlib.suppress(RuntimeError), conn.transaction():  # a savepoint
            _insert(conn, "1", "Undone")
            _insert(conn, "1", "UndoneToo")
            raise RuntimeError("roll the savepoint back")
        _insert(conn, "1", "AfterSavepoint")
        conn.commit()
    with psycopg.connect(url) as conn:
        _insert(conn, "1", "NextTransaction")

    assert [(r[1], r[2]) for r in _rows(url)] == [
        ("Kept", 1),
        ("AfterSavepoint", 2),
        ("NextTransaction", 3),
    ]
    assert _counters(url) == {"1": 3}


def test_a_bulk_insert_of_one_aggregate_costs_time_in_proportion_to_its_rows(url: str) -> None:
    """The trigger updates the counter row's newest version by ctid: without that, each row
    would walk every version the statement made before it (20 000 rows took minutes)."""
    with psycopg.connect(url) as conn:
        started = time.monotonic()
        conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
            "SELECT 'Order', 'bulk', 'E', jsonb_build_object('n', g) "
            "FROM generate_series(1, 20000) AS g ORDER BY g"
        )
        conn.commit()
        elapsed = time.monotonic() - started
        row = conn.execute(
            "SELECT count(*), count(DISTINCT aggregate_sequence), min(aggregate_sequence), "
            "max(aggregate_sequence), bool_and(aggregate_sequence = (payload->>'n')::int) "
            "FROM outbox"
        ).fetchone()

    assert row == (20000, 20000, 1, 20000, True)
    assert _counters(url) == {"bulk": 20000}
    assert elapsed < 30, elapsed


def test_a_second_writer_of_the_same_aggregate_waits_for_the_first_to_commit(url: str) -> None:
    with psycopg.connect(url) as first:
        first_number, first_seq = _insert(first, "1", "First")
        second = Writer(url, "1", "Second")
        second.start()
        _wait_until_blocked(url, second.name)
        assert second.result is None
        time.sleep(0.3)
        assert second.is_alive()  # still waiting: the first transaction is open
        first.commit()
        second.join(10)

    assert second.error is None
    assert second.result is not None
    assert first_number == 1
    assert second.result[0] == 2
    assert second.result[1] > first_seq  # seq was drawn again after the wait


def test_a_waiting_writer_takes_the_number_a_rolled_back_writer_gave_up(url: str) -> None:
    with psycopg.connect(url) as first:
        _insert(first, "1", "Doomed")
        second = Writer(url, "1", "Survivor")
        second.start()
        _wait_until_blocked(url, second.name)
        first.rollback()
        second.join(10)

    assert second.error is None
    assert [(r[1], r[2]) for r in _rows(url)] == [("Survivor", 1)]


def test_the_issues_interleaving_gives_sequences_in_commit_order(url: str) -> None:
    """Issue 10, case 1: T2 takes a transaction id first, T1 inserts First, T2 inserts Second.
    Now T2 waits for T1, so First commits first and has the lower seq and aggregate_sequence."""
    with psycopg.connect(url, application_name="t2") as t2, psycopg.connect(url) as t1:
        t2.execute("SELECT pg_current_xact_id()")  # T2 holds an xid before T1
        _insert(t1, "1", "First")

        done = threading.Event()
        second: dict[str, tuple[int, int]] = {}

        def t2_inserts() -> None:
            second["row"] = _insert(t2, "1", "Second")
            t2.commit()
            done.set()

        thread = threading.Thread(target=t2_inserts, daemon=True)
        thread.start()
        _wait_until_blocked(url, "t2")
        assert not done.is_set()
        t1.commit()
        thread.join(10)

    assert done.is_set()
    rows = _rows(url)
    assert [(r[1], r[2]) for r in rows] == [("First", 1), ("Second", 2)]
    assert rows[0][3] < rows[1][3]


def test_writers_of_different_aggregates_never_wait_for_each_other(url: str) -> None:
    with psycopg.connect(url) as first:
        _insert(first, "1", "Open")  # left open for the whole test
        others = [Writer(url, str(i), "Other", lock_timeout="500ms") for i in range(2, 7)]
        for writer in others:
            writer.start()
        for writer in others:
            writer.join(10)
        first.rollback()

    assert [w.error for w in others] == [None] * 5
    assert [w.result[0] for w in others if w.result] == [1] * 5


def test_lock_timeout_cancels_a_waiting_writer_and_leaves_no_hole(url: str) -> None:
    with psycopg.connect(url) as first:
        _insert(first, "1", "First")
        waiting = Writer(url, "1", "Impatient", lock_timeout="300ms")
        started = time.monotonic()
        waiting.start()
        waiting.join(10)
        waited = time.monotonic() - started
        first.commit()
    with psycopg.connect(url) as conn:
        number, _ = _insert(conn, "1", "Later")

    assert isinstance(waiting.error, psycopg.errors.LockNotAvailable)
    assert 0.25 <= waited < 5
    assert number == 2
    assert [(r[1], r[2]) for r in _rows(url)] == [("First", 1), ("Later", 2)]


def test_a_number_given_to_a_pending_row_is_replaced_by_the_counters(url: str) -> None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, "
            "aggregate_sequence) VALUES ('Order', '1', 'E', '{}', 42) RETURNING aggregate_sequence"
        ).fetchone()

    assert row == (1,)


def test_published_history_put_back_keeps_its_numbers_and_the_counter_covers_them(
    url: str,
) -> None:
    """An archive restore (docs/cleanup.md) inserts rows that are already published, with their
    original seq and aggregate_sequence: they are history, never sent again."""
    with psycopg.connect(url) as conn:
        _insert(conn, "1", "Live")  # aggregate 1 is at 1
        conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, "
            "published_at, seq, aggregate_sequence) OVERRIDING SYSTEM VALUE VALUES "
            "('Order', '1', 'Old', '{}', now(), 900001, 7), "
            "('Order', '2', 'Old', '{}', now(), 900002, 3), "
            "('Order', '3', 'Unnumbered', '{}', now(), 900003, NULL)"
        )
        conn.commit()
        history = conn.execute(
            "SELECT aggregate_id, seq, aggregate_sequence FROM outbox "
            "WHERE published_at IS NOT NULL ORDER BY seq"
        ).fetchall()
        assert _counters(url) == {"1": 7, "2": 3}
        number, _ = _insert(conn, "1", "Next")
        conn.commit()

    assert history == [("1", 900001, 7), ("2", 900002, 3), ("3", 900003, None)]
    assert number == 8


def test_removing_a_dead_lettered_row_that_was_never_published_records_a_skip(url: str) -> None:
    with psycopg.connect(url) as conn:
        dead = uuid.uuid4()
        conn.execute(INSERT, (uuid.uuid4(), "Order", "1", "Published"))
        conn.execute(INSERT, (dead, "Order", "1", "Poison"))
        conn.execute(INSERT, (uuid.uuid4(), "Order", "1", "Pending"))
        conn.execute(
            "UPDATE outbox SET published_at = now() WHERE event_type = 'Published'; "
            "UPDATE outbox SET dead_lettered_at = now() WHERE event_type = 'Poison'"
        )
        conn.commit()
        # A cleanup of published rows and the relay's delete mode remove rows that are not
        # dead letters: no skip. Removing the dead letter (discard, skip policy) records one.
        conn.execute("DELETE FROM outbox WHERE event_type IN ('Published', 'Poison')")
        conn.commit()
        skips = conn.execute(
            "SELECT aggregate_type, aggregate_id, aggregate_sequence, event_id "
            "FROM outbox_aggregate_skip"
        ).fetchall()

    assert skips == [("Order", "1", 2, dead)]


def test_removing_a_pending_row_that_is_not_a_dead_letter_records_no_skip(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(INSERT, (uuid.uuid4(), "Order", "1", "Pending"))
        conn.execute("DELETE FROM outbox")
        conn.commit()
        assert conn.execute("SELECT count(*) FROM outbox_aggregate_skip").fetchone() == (0,)


# --- another cluster ---------------------------------------------------------------------------


def test_a_database_restored_into_another_cluster_keeps_its_numbers_and_counts_on(
    url: str, second_cluster: str, tmp_path: Path
) -> None:
    with psycopg.connect(url) as conn:
        for aggregate, event in (("1", "A"), ("2", "B"), ("1", "C"), ("1", "D")):
            _insert(conn, aggregate, event)
    before = _rows(url)

    restored = pgcluster.dump_and_restore(url, second_cluster, tmp_path)
    with psycopg.connect(restored) as conn:
        row = conn.execute(
            "SELECT max(txid)::text, pg_current_xact_id()::text FROM outbox"
        ).fetchone()
        assert row is not None
        # The restored rows carry transaction ids from the old cluster, "in the future" here:
        # anything that ordered by them would wait for ever (issue 10, case 3).
        assert int(str(row[0])) > int(str(row[1]))
        conn.rollback()
        number, seq = _insert(conn, "1", "E")
        conn.commit()

    assert _rows(restored)[: len(before)] == before
    assert number == 4
    assert seq > max(r[3] for r in before)
    assert _counters(restored) == {"1": 4, "2": 1}


def test_the_previous_number_skips_a_whole_run_of_removed_dead_letters(url: str) -> None:
    """Numbers 2, 3 and 6 removed as dead letters: 4 follows 1, 5 follows 4, 7 follows 5."""
    from outbox_tasks.store.relay import PREVIOUS_AGGREGATE_SEQUENCE

    with psycopg.connect(url) as conn:
        for n in range(1, 8):
            _insert(conn, "1", f"E{n}")
        conn.execute(
            "UPDATE outbox SET dead_lettered_at = now() WHERE aggregate_sequence IN (2, 3, 6)"
        )
        conn.execute("DELETE FROM outbox WHERE dead_lettered_at IS NOT NULL")
        conn.commit()
        rows = conn.execute(
            f"SELECT o.aggregate_sequence, {PREVIOUS_AGGREGATE_SEQUENCE} FROM outbox o "
            "ORDER BY o.aggregate_sequence"
        ).fetchall()

    assert rows == [(1, 0), (4, 1), (5, 4), (7, 5)]
