"""Faults injected into a running relay of real Celery workers (DESIGN 2.1, 2.4, 2.5, 2.6).

A frozen worker that lost its lease, a worker killed mid-batch, the event broker down for 30 s,
the database down for 15 s. An independent consumer, bound to the exchange on the Redis server
directly and read in bulk so that it keeps up on a busy machine, checks what arrived; a
test-only audit trigger (``tests.support.faults``) records which worker changed which outbox
row, when, and under whose lease.
"""

from __future__ import annotations

import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks.settings import Settings
from tests.support.cluster import Cluster, Proc, cluster
from tests.support.faults import (
    actions,
    another_redis_url,
    as_text,
    audit_count,
    backends,
    bulk_collecting,
    count_action,
    double_marks,
    install_audit,
    lease_history,
    lease_row,
    outbox_totals,
    owner_pid,
    producing,
    retry_increments,
    row_audit,
    since,
    via,
)
from tests.support.kit import (
    Collector,
    Received,
    bulk_insert,
    pending_count,
    wait_until,
)
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.slow

LEASE = 3.0
FAST = {
    "lease_seconds": LEASE,
    "publish_task_seconds": 2.0,
    "poll_interval_seconds": 0.2,
}


# --- helpers -----------------------------------------------------------------------------------


def stopped(proc: Proc) -> bool:
    """Every process of the worker's group is stopped (SIGSTOP has taken effect)."""
    for pid in [proc.pid, *proc.pool_children()]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state not in ("T", "t"):
            return False
    return True


def quiet(engine: Engine) -> bool:
    """No other session of the test database is running a statement."""
    return not any(b["state"] == "active" for b in backends(engine))


def open_transactions(engine: Engine) -> list[dict[str, Any]]:
    """Sessions frozen inside a transaction. Freezing there is a different fault from a lost
    lease: an uncommitted renewal or finish keeps the lease row locked (the lease is stuck, not
    lost, until idle_in_transaction_session_timeout); a select-batch transaction keeps candidate
    rows locked, so the successor has to work around their aggregates; and either holds an xid,
    which holds back the cluster-wide commit-order guard of every relay on this server. The
    fencing test freezes a worker between transactions only; the crash test may hold one in
    its finishing transaction for at most a second, then kills it there."""
    return [b for b in backends(engine) if b["state"] == "idle in transaction"]


def freeze(proc: Proc, engine: Engine) -> None:
    """SIGSTOP a worker's process group; return once its last statements have finished."""
    proc.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: stopped(proc), timeout=5, what=f"{proc.name} stopped")
        wait_until(lambda: quiet(engine), timeout=5, what="the frozen worker's statements to end")
    except BaseException:
        thaw(proc)
        raise


def thaw(proc: Proc) -> None:
    proc.signal(signal.SIGCONT)


def batch_in_flight(lease: dict[str, Any], pids: list[int]) -> bool:
    """The lease is live, held by one of ``pids``, and a batch of it is in flight: marked in
    flight (committed), not yet finished. Frozen there, the holder's next step on resuming is
    the fenced finish of that batch."""
    return bool(
        lease
        and lease["live"]
        and owner_pid(lease["owner"]) in pids
        and lease["inflight_ids"] is not None
    )


def assert_order(consumer: Collector) -> None:
    problems = consumer.order_violations()
    assert problems == [], problems[:20]


def later_copies(consumer: Collector) -> list[Received]:
    """Every copy of an id after its first arrival."""
    seen: set[str] = set()
    later = []
    for m in consumer.snapshot():
        if m.id in seen:
            later.append(m)
        seen.add(m.id)
    return later


def assert_redelivered_duplicates(consumer: Collector) -> int:
    """Every later copy of an id carries ``outbox-redelivered: True``; returns the duplicates."""
    unmarked = [
        (m.id, m.sequence, m.headers)
        for m in later_copies(consumer)
        if m.headers.get("outbox-redelivered") is not True
    ]
    assert unmarked == [], unmarked[:5]
    return consumer.duplicates()


def all_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {str(r[0]) for r in conn.execute(text("SELECT id FROM outbox"))}


def assert_everything_published(engine: Engine, consumer: Collector) -> None:
    totals = outbox_totals(engine)
    assert totals["pending"] == 0, totals
    assert totals["dead_lettered"] == 0, totals
    missing = all_ids(engine) - consumer.unique_ids()
    assert not missing, f"{len(missing)} rows never reached the consumer"


def drained(engine: Engine, consumer: Collector, total: int) -> bool:
    return (
        consumer.count() >= total
        and pending_count(engine) == 0
        and (len(consumer.unique_ids()) >= total)
    )


def named(settings: Settings, application_name: str) -> Settings:
    """A worker's settings with its own PostgreSQL application_name (what the audit records)."""
    return settings.with_changes(application_name=application_name)


def progress(engine: Engine, app: str) -> None:
    """Wait until the worker ``app`` has marked at least one more row."""
    marked = audit_count(engine, app)
    wait_until(
        lambda: audit_count(engine, app) > marked, timeout=10, what=f"{app} to make progress"
    )


def start(c: Cluster, *procs: Proc) -> None:
    for proc in procs:
        c.wait_ready(proc)


# --- 1. fencing --------------------------------------------------------------------------------


def test_a_frozen_worker_whose_lease_was_taken_over_changes_no_row_after_the_takeover(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    """SIGSTOP the only publisher mid-drain; its lease expires; a second worker is granted the
    partition (epoch + 1) and publishes; SIGCONT the frozen one. Its pending writes (mark the
    batch in flight, record it published) must all be fenced off: the audit shows no row it
    changed after the takeover, and it logs that it lost the lease.

    The frozen worker has its own Celery broker and beat, and its beat is stopped while it is
    frozen: once it resumes it can finish only the work it had in hand, never be handed a new
    lease, so ANY row change of it after the takeover would be a fencing failure.
    """
    settings = settings.with_changes(partitions=1, batch_size=200, **FAST)
    total = 20_000
    install_audit(engine)
    began = time.monotonic()
    with (
        another_redis_url() as own_broker,
        bulk_collecting(settings.broker_url, settings.exchange) as consumer,
        cluster(settings, tmp_path) as c,
    ):
        frozen_settings = settings.with_changes(
            broker_url=own_broker,
            publish_url=settings.broker_url,
            application_name="fault.frozen",
        )
        frozen = c.worker("frozen", settings=frozen_settings)
        frozen_beat = c.beat("beat-frozen", settings=frozen_settings)
        start(c, frozen, frozen_beat)
        frozen_pids = frozen.pool_children()
        for _ in range(4):  # short transactions: the commit-order guard is cluster-wide
            bulk_insert(engine, total // 4, 50)
        wait_until(
            lambda: audit_count(engine, "fault.frozen") > 0,
            timeout=20,
            what="the first worker marking rows",
        )

        # Freeze it with a batch in flight (sent or being sent, not yet marked), between two
        # transactions (see open_transactions for why not inside one). Frozen between two
        # batches instead, it would resume past its task's deadline and only hand the lease
        # back (a fenced no-op) and chain a claim, never trying a stale write.
        lease: dict[str, Any] = {}
        for _attempt in range(30):
            freeze(frozen, engine)
            lease = lease_row(engine)
            if batch_in_flight(lease, frozen_pids) and not open_transactions(engine):
                break
            thaw(frozen)
            progress(engine, "fault.frozen")
        else:
            pytest.fail(f"could not freeze the worker with a batch in flight: {lease}")
        try:
            frozen_epoch = lease["epoch"]
            print(
                f"\nfrozen at {since(began)} s: epoch {frozen_epoch}, lease until "
                f"{as_text(lease['leased_until'])}, in-flight max seq "
                f"{len(lease['inflight_ids'] or [])} in flight"
            )
            frozen_beat.stop()

            successor = c.worker("successor", settings=named(settings, "fault.successor"))
            successor_beat = c.beat("beat-successor")
            start(c, successor, successor_beat)
            successor_pids = successor.pool_children()

            def taken_over() -> dict[str, Any] | None:
                for h in lease_history(engine):
                    if h["epoch"] > frozen_epoch and owner_pid(h["owner"]) in successor_pids:
                        return h
                return None

            wait_until(
                lambda: taken_over() is not None and audit_count(engine, "fault.successor") > 0,
                timeout=20,
                what="the second worker taking the partition over and marking rows",
            )
            takeover = taken_over()
            assert takeover is not None
            grants = [h for h in lease_history(engine) if h["epoch"] > frozen_epoch]
            takeover_at = min(h["granted_at"] for h in grants)
            assert takeover_at >= lease["leased_until"], (takeover_at, lease)
            print(
                f"taken over at {since(began)} s (epoch {takeover['epoch']}, "
                f"{as_text(takeover_at)}); frozen for "
                f"{(takeover_at - lease['now']).total_seconds():.2f} s before it; "
                f"pending then {pending_count(engine)}"
            )
        finally:
            thaw(frozen)

        wait_until(
            lambda: (
                count_action([frozen], "lease_lost") + count_action([frozen], "lease_stale") > 0
            ),
            timeout=15,
            what="the resumed worker to notice it lost its lease",
        )
        wait_until(
            lambda: drained(engine, consumer, total),
            timeout=45,
            what=f"all {total} events published",
        )

        audit = row_audit(engine)
        late = [r for r in audit if r["app"] == "fault.frozen" and r["at"] > takeover_at]
        assert late == [], late[:5]
        # Every change was made by the process holding the partition's live lease at that
        # moment, under the epoch it was granted.
        foreign = [
            r
            for r in audit
            if (
                r["app"] == "fault.frozen"
                and (
                    owner_pid(r["lease_owner"]) not in frozen_pids
                    or r["lease_epoch"] > frozen_epoch
                )
            )
            or (r["app"] == "fault.successor" and owner_pid(r["lease_owner"]) not in successor_pids)
        ]
        assert foreign == [], foreign[:5]
        assert double_marks(engine) == []
        assert frozen.alive() and successor.alive()
        assert_everything_published(engine, consumer)
        assert_order(consumer)
        # A later copy is either a re-send (flagged) or the frozen worker's own late send of the
        # batch it had in hand, which carries its old epoch (consumers can tell it is stale).
        zombie = [
            m
            for m in later_copies(consumer)
            if m.headers.get("outbox-redelivered") is not True
            and m.headers.get("outbox-epoch", 0) > frozen_epoch
        ]
        assert zombie == [], zombie[:5]
        duplicates = consumer.duplicates()
        # Was the fence what stopped the stale batch? Its rows (sent with the frozen epoch, not
        # marked by the frozen worker) count as "decisive" when the successor marked them only
        # after the frozen worker had tried and logged that it lost the lease: until then they
        # were unpublished, so only the epoch check kept the stale write from marking them.
        lost_at = min(
            datetime.fromisoformat(a["ts"])
            for a in actions(frozen)
            if a["action"] in ("lease_lost", "lease_stale")
        )
        frozen_marked = {str(r["event_id"]) for r in audit if r["app"] == "fault.frozen"}
        stale = {
            m.id for m in consumer.snapshot() if m.headers.get("outbox-epoch") == frozen_epoch
        } - frozen_marked
        marked_at = {
            str(r["event_id"]): r["at"]
            for r in audit
            if r["old_published_at"] is None and r["new_published_at"] is not None
        }
        decisive = sum(1 for i in stale if marked_at[i] > lost_at)
        print(
            f"stale batch: {len(stale)} rows sent under epoch {frozen_epoch} without being "
            f"marked by it, {decisive} of them still unpublished when it tried to mark them"
        )
        lost = [
            a["action"] for a in actions(frozen) if a["action"] in ("lease_lost", "lease_stale")
        ]
        print(
            f"frozen worker logged {lost}; rows it marked: "
            f"{sum(1 for r in audit if r['app'] == 'fault.frozen')}, successor: "
            f"{sum(1 for r in audit if r['app'] == 'fault.successor')}; "
            f"duplicates at the consumer: {duplicates}; done in {since(began)} s"
        )


# --- 2. crash ----------------------------------------------------------------------------------


def test_a_worker_killed_mid_batch_loses_nothing_and_its_resent_messages_say_redelivered(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    """kill -9 a worker (its whole process group) while a batch is in flight: marked in flight,
    ideally already sent to the broker, not yet marked published. After the lease expires a
    second worker finishes; every row arrives, in order, and every second copy says
    ``outbox-redelivered: True``."""
    settings = settings.with_changes(partitions=1, batch_size=200, **FAST)
    total = 16_000
    install_audit(engine)
    began = time.monotonic()
    with (
        bulk_collecting(settings.broker_url, settings.exchange) as consumer,
        cluster(settings, tmp_path) as c,
    ):
        victim = c.worker("victim", settings=named(settings, "fault.victim"))
        beat = c.beat()
        start(c, victim, beat)
        victim_pids = victim.pool_children()
        for _ in range(4):
            bulk_insert(engine, total // 4, 40)
        wait_until(
            lambda: audit_count(engine, "fault.victim") > 0,
            timeout=20,
            what="the worker marking rows",
        )

        def sent_not_marked() -> bool:
            with engine.connect() as conn:
                unmarked = {
                    str(r[0])
                    for r in conn.execute(text("SELECT id FROM outbox WHERE published_at IS NULL"))
                }
            return bool(unmarked & consumer.unique_ids())

        attempts = 30
        state = ""
        for attempt in range(attempts):
            freeze(victim, engine)
            lease = lease_row(engine)
            # Frozen with a batch in flight: sent (or being sent) and not marked, maybe in the
            # middle of the finishing transaction (the kill aborts it). Wait at most a second
            # for the batch to reach the consumer: that is the state that makes duplicates.
            if batch_in_flight(lease, victim_pids):
                try:
                    wait_until(sent_not_marked, timeout=1.0, what="the batch at the consumer")
                    state = "sent, not marked"
                except AssertionError:
                    state = "marked in flight, not sent" if attempt >= attempts - 5 else ""
            if state:
                break
            thaw(victim)
            progress(engine, "fault.victim")
        else:
            pytest.fail("could not catch the worker with a batch in flight")
        pending_at_kill = pending_count(engine)
        victim.kill()
        killed_at = time.monotonic()
        print(
            f"\nkilled at {since(began)} s, batch {state}, in-flight max seq "
            f"{len(lease['inflight_ids'] or [])} in flight, {pending_at_kill} rows pending"
        )

        successor = c.worker("successor", settings=named(settings, "fault.successor"))
        c.wait_ready(successor)
        wait_until(
            lambda: drained(engine, consumer, total),
            timeout=45,
            what=f"all {total} events published",
        )
        print(f"drained {since(killed_at)} s after the kill")

        assert not victim.alive()
        assert successor.alive()
        assert_everything_published(engine, consumer)
        assert_order(consumer)
        assert double_marks(engine) == []
        duplicates = assert_redelivered_duplicates(consumer)
        if state == "sent, not marked":
            assert duplicates > 0
        redelivered = sum(
            1 for m in consumer.snapshot() if m.headers.get("outbox-redelivered") is True
        )
        attempts_seen = sorted(
            {str(m.headers.get("outbox-attempt")) for m in later_copies(consumer)}
        )
        print(
            f"duplicates: {duplicates} (outbox-attempt on them: {attempts_seen}); messages "
            f"flagged redelivered: {redelivered}; done in {since(began)} s"
        )


# --- 3. broker down ----------------------------------------------------------------------------


def test_thirty_seconds_without_the_event_broker_spends_no_retry_and_drains_soon_after(
    settings: Settings, engine: Engine, tmp_path: Path, tcp_proxy: Any
) -> None:
    """Events go to Redis through a proxy that is cut for 30 s (the Celery broker stays up)
    while a producer keeps writing. The outage opens each worker's circuit once; no message
    spends a retry or is dead-lettered; the backlog drains within seconds of the restore."""
    proxy: TcpProxy = tcp_proxy("127.0.0.1", 6379)
    host, port = proxy.address
    settings = settings.with_changes(partitions=4, batch_size=100, **FAST)
    worker_settings = settings.with_changes(publish_url=via(settings.broker_url, host, port))
    install_audit(engine)
    outage = 30.0
    with (
        bulk_collecting(settings.broker_url, settings.exchange) as consumer,
        cluster(worker_settings, tmp_path) as c,
        producing(engine) as producer,
    ):
        workers = [
            c.worker(f"w{i}", settings=named(worker_settings, f"fault.w{i}")) for i in range(2)
        ]
        beat = c.beat()
        start(c, *workers, beat)
        pool = {w.name: w.pool_children() for w in workers}
        processes = sum(len(p) for p in pool.values())
        wait_until(lambda: consumer.count() >= 50, timeout=20, what="events flowing")

        proxy.cut()
        cut_at = time.monotonic()
        written_at_cut = producer.count()
        wait_until(
            lambda: count_action(workers, "circuit_open") > 0, timeout=15, what="a circuit to open"
        )
        received_at_cut = consumer.count()
        time.sleep(max(0.0, outage - (time.monotonic() - cut_at)))  # the outage itself
        received_during = consumer.count()
        proxy.restore()
        restored_at = time.monotonic()
        ids = producer.stop()
        total = len(ids)
        print(
            f"\nwritten during the outage: {total - written_at_cut}; pending at restore: "
            f"{pending_count(engine)}; total {total}"
        )

        wait_until(
            lambda: drained(engine, consumer, total),
            timeout=15,
            what=f"all {total} events published within 15 s of the restore",
        )
        print(f"drained {since(restored_at)} s after the restore")

        assert all(w.alive() for w in workers)
        assert {w.name: w.pool_children() for w in workers} == pool, "a pool process restarted"
        assert retry_increments(engine) == []
        totals = outbox_totals(engine)
        assert totals["retried"] == 0 and totals["dead_lettered"] == 0, totals
        assert_everything_published(engine, consumer)
        assert {str(i) for i in ids} <= consumer.unique_ids()
        assert_order(consumer)
        assert double_marks(engine) == []
        opened = count_action(workers, "circuit_open")
        closed = count_action(workers, "circuit_closed")
        failed = count_action(workers, "publish_failed")
        duplicates = assert_redelivered_duplicates(consumer)
        print(
            f"circuit_open: {opened}, circuit_closed: {closed}, publish_failed: {failed}, "
            f"received while cut (after the first circuit_open): "
            f"{received_during - received_at_cut}, "
            f"duplicates: {duplicates}, pool processes: {processes}"
        )
        assert 1 <= opened <= processes * 3
        assert closed >= 1
        assert failed == 0


# --- 4. database down --------------------------------------------------------------------------


def test_fifteen_seconds_without_the_database_leaves_workers_alive_and_loses_nothing(
    settings: Settings, engine: Engine, tmp_path: Path, tcp_proxy: Any
) -> None:
    """The workers reach PostgreSQL through a proxy cut for 15 s in the middle of a drain while
    events keep being written (the test writes directly). Workers log the outage and live on;
    afterwards everything is published once: nothing marked twice, no retry spent."""
    proxy: TcpProxy = tcp_proxy("127.0.0.1", 5432)
    host, port = proxy.address
    settings = settings.with_changes(partitions=4, batch_size=100, **FAST)
    worker_settings = settings.with_changes(database_url=via(settings.database_url, host, port))
    install_audit(engine)
    outage = 15.0
    backlog = 8000
    with (
        bulk_collecting(settings.broker_url, settings.exchange) as consumer,
        cluster(worker_settings, tmp_path) as c,
    ):
        workers = [
            c.worker(f"w{i}", settings=named(worker_settings, f"fault.w{i}")) for i in range(2)
        ]
        beat = c.beat()
        start(c, *workers, beat)
        pool = {w.name: w.pool_children() for w in workers}
        for _ in range(4):
            bulk_insert(engine, backlog // 4, 40)
        wait_until(
            lambda: sum(audit_count(engine, f"fault.w{i}") for i in range(2)) > 0,
            timeout=20,
            what="the drain to start",
        )

        with producing(engine, prefix="Q") as producer:
            proxy.cut()
            cut_at = time.monotonic()
            pending_at_cut = pending_count(engine)
            wait_until(
                lambda: count_action(workers, "database_unavailable") > 0,
                timeout=10,
                what="a worker to report the database unavailable",
            )
            time.sleep(max(0.0, outage - (time.monotonic() - cut_at)))  # the outage itself
            proxy.restore()
            restored_at = time.monotonic()
            ids = producer.stop()
        total = backlog + len(ids)
        print(
            f"\npending at the cut: {pending_at_cut}; written during the outage: {len(ids)}; "
            f"pending at restore: {pending_count(engine)}"
        )

        wait_until(
            lambda: drained(engine, consumer, total),
            timeout=30,
            what=f"all {total} events published after the restore",
        )
        print(f"drained {since(restored_at)} s after the restore")

        assert all(w.alive() for w in workers)
        assert {w.name: w.pool_children() for w in workers} == pool, "a pool process restarted"
        assert double_marks(engine) == []
        assert retry_increments(engine) == []
        totals = outbox_totals(engine)
        assert totals["retried"] == 0 and totals["dead_lettered"] == 0, totals
        assert_everything_published(engine, consumer)
        assert_order(consumer)
        duplicates = assert_redelivered_duplicates(consumer)
        unavailable = count_action(workers, "database_unavailable")
        unexpected = [w.name for w in workers if "raised unexpected" in w.log()]
        print(
            f"database_unavailable lines: {unavailable}; duplicates: {duplicates}; "
            f"tasks that raised unexpectedly: {unexpected}"
        )
        assert unexpected == [], c.logs()
