"""An ordered consumer group fails over when its active member goes silent, is cut off or is
killed, while events flow: another member handles the partition within the documented bound
(docs/consumers.md, "Takeover"), nothing is lost, nothing takes effect twice, per-aggregate order
holds across the handover, and the old owner, once its network is back, commits nothing.

Two consumer processes (``python -m outbox_tasks.consumer consume --partitions 1``): A reaches
PostgreSQL through a TCP proxy, B directly. The fault hits A's database path only:

* ``blackhole``: A's connections stay open and nothing is forwarded (a host that lost its
  network, a middlebox that keeps the connection): PostgreSQL keeps A's session and its locks;
* ``cut``: A's connections are reset (PostgreSQL frees its locks at once);
* ``kill``: ``kill -9`` of A.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks.consumer import declare_topology
from outbox_tasks.settings import Settings
from tests.integration.test_consumer_kit import (
    ConsumerProcess,
    broker_settings,
    cleaned_up,
    create_effects,
    effects,
    group_name,
    message,
    processes,
    publish,
)
from tests.support.kit import wait_until
from tests.support.tcpproxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

AGGREGATES = 10
RATE = 20  # events per second while the fault happens
TAKEOVER_BOUND = {"blackhole": 15.0, "cut": 5.0, "kill": 5.0}


class Producer:
    """Publishes ``RATE`` events per second over ``AGGREGATES`` aggregates, sequences 1, 2, 3...
    per aggregate, until stopped. Each handler sleeps 20 ms inside its transaction, so the
    owner is usually mid-transaction when the fault hits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sent: dict[str, list[int]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._errors: list[BaseException] = []
        self._n = 0

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.send(RATE // 10)
                self._stop.wait(0.1)
        except BaseException as error:
            self._errors.append(error)

    def send(self, count: int) -> None:
        batch = []
        for _ in range(count):
            aggregate = f"o-{self._n % AGGREGATES}"
            self._n += 1
            sequence = len(self.sent[aggregate]) + 1
            self.sent[aggregate].append(sequence)
            batch.append(message(aggregate, sequence, payload={"sleep": 0.02}))
        publish(self.settings, batch)

    @property
    def total(self) -> int:
        return self._n

    @contextmanager
    def running(self) -> Iterator[Producer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(30)
        if self._errors:
            raise self._errors[0]


def proxied(settings: Settings, proxy: TcpProxy) -> Settings:
    host, port = proxy.address
    return settings.with_changes(
        database_url=settings.database_url.replace("127.0.0.1:5432", f"{host}:{port}")
    )


def first_effect_after(engine: Engine, pid: int, moment: float) -> float | None:
    """Seconds from ``moment`` (epoch) to the first effect committed by ``pid`` after it."""
    with engine.connect() as conn:
        value = conn.execute(
            text(
                "SELECT extract(epoch FROM min(at)) FROM consumer_effect "
                "WHERE pid = :pid AND at > to_timestamp(:t)"
            ),
            {"pid": pid, "t": moment},
        ).scalar()
    return None if value is None else float(value) - moment


@pytest.mark.parametrize("kind", ["redis", "amqp"])
@pytest.mark.parametrize("fault", ["blackhole", "cut", "kill"])
def test_another_member_takes_the_partition_over_within_the_bound_and_nothing_is_lost(
    fault: str,
    kind: str,
    request: pytest.FixtureRequest,
    settings: Settings,
    engine: Engine,
    tcp_proxy: Callable[[str, int], TcpProxy],
    tmp_path: Path,
) -> None:
    settings = broker_settings(request, settings, kind)
    create_effects(engine)
    name = group_name()
    declare_topology(name, settings=settings, partitions=1)
    proxy = tcp_proxy("127.0.0.1", 5432)

    def spawn(target: Settings) -> ConsumerProcess:
        return ConsumerProcess(
            target, name, partitions=1, log_dir=tmp_path, extra=["--prefetch", "20"]
        )

    producer = Producer(settings)
    with cleaned_up(settings, [(name, 1)]), processes(spawn(proxied(settings, proxy))) as procs:
        [a] = procs
        a.wait_for("partition_acquired")
        procs.append(spawn(settings))
        b = procs[1]
        b.wait_for("consumer_ready")
        with producer.running():
            wait_until(
                lambda: sum(1 for row in effects(engine) if row.pid == a.pid) >= 20,
                timeout=30,
                what="A handling events",
            )
            fault_at = time.time()
            if fault == "blackhole":
                proxy.blackhole()
            elif fault == "cut":
                proxy.cut()
            else:
                a.signal(signal.SIGKILL)
            fault_done = time.time()
            wait_until(
                lambda: first_effect_after(engine, b.pid, fault_at) is not None,
                timeout=TAKEOVER_BOUND[fault] + 15,
                what="B handling the partition",
            )
            takeover = first_effect_after(engine, b.pid, fault_at)
            time.sleep(2)  # events keep flowing to the new owner
        wait_until(
            lambda: len(effects(engine)) >= producer.total,
            timeout=30,
            what=f"{producer.total} effects",
        )
        if fault != "kill":
            proxy.restore()
        if fault == "blackhole":
            # The old owner's network is back: it reconnects, stands by, and commits nothing.
            a.wait_for("consumer_ready", count=2, timeout=40)
            producer.send(RATE)
            wait_until(
                lambda: len(effects(engine)) >= producer.total,
                timeout=30,
                what="the events sent after the restore",
            )
            time.sleep(1)
            assert a.actions("ownership_lost")
            assert b.actions("member_evicted")

    rows = effects(engine)
    print(f"\n{kind} {fault}: takeover {takeover:.2f} s, {len(rows)} events")
    assert takeover is not None and takeover < TAKEOVER_BOUND[fault]
    # Nothing lost, nothing applied twice (the effects are written in the handler's transaction).
    assert len(rows) == producer.total
    assert len({row.event_id for row in rows}) == producer.total
    # Per-aggregate order across the handover (effects in commit order).
    applied: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        applied[row.aggregate_id].append(row.sequence)
    assert applied == producer.sent
    # The old owner committed nothing after the fault (blackhole: not even once restored).
    late = [row for row in rows if row.pid == a.pid and row.at.timestamp() > fault_done]
    assert late == []
    assert {row.pid for row in rows} == {a.pid, b.pid}


@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_the_old_owner_restored_after_the_takeover_commits_nothing_for_the_partition(
    kind: str,
    request: pytest.FixtureRequest,
    settings: Settings,
    engine: Engine,
    tcp_proxy: Callable[[str, int], TcpProxy],
    tmp_path: Path,
) -> None:
    settings = broker_settings(request, settings, kind)
    create_effects(engine)
    name = group_name()
    declare_topology(name, settings=settings, partitions=1)
    proxy = tcp_proxy("127.0.0.1", 5432)
    mark = tmp_path / "slow-handler-started"

    def spawn(target: Settings) -> ConsumerProcess:
        return ConsumerProcess(target, name, partitions=1, log_dir=tmp_path)

    with cleaned_up(settings, [(name, 1)]), processes(spawn(proxied(settings, proxy))) as procs:
        [a] = procs
        a.wait_for("partition_acquired")
        procs.append(spawn(settings))
        b = procs[1]
        b.wait_for("consumer_ready")
        slow = message("o-1", 2, payload={"sleep": 6, "mark": str(mark)})
        publish(settings, [message("o-1", 1), slow, message("o-1", 3), message("o-2", 1)])
        # A is inside the slow event's transaction: receipt inserted, position row locked,
        # fence passed; its commit can only come after the handler returns.
        wait_until(mark.exists, timeout=20, what="A inside the slow event's transaction")
        proxy.blackhole()
        fault_done = time.time()
        wait_until(lambda: len(effects(engine)) >= 4, timeout=30, what="B handling everything")
        proxy.restore()
        a.wait_for("consumer_ready", count=2, timeout=40)
        publish(settings, [message("o-1", 4)])
        wait_until(lambda: len(effects(engine)) >= 5, timeout=30, what="the event after")
        time.sleep(1)
        [acquired] = b.actions("partition_acquired")

    rows = effects(engine)  # in commit order
    assert len({row.event_id for row in rows}) == len(rows) == 5
    assert [r.sequence for r in rows if r.aggregate_id == "o-1"] == [1, 2, 3, 4]
    assert [r.sequence for r in rows if r.aggregate_id == "o-2"] == [1]
    # The slow event took effect once, by the new owner, which ended A's open transaction.
    [slow_row] = [row for row in rows if str(row.event_id) == slow.event_id]
    assert slow_row.pid == b.pid
    assert acquired["fenced_out"] == 1
    assert [row for row in rows if row.pid == a.pid and row.at.timestamp() > fault_done] == []
    assert a.actions("ownership_lost")
