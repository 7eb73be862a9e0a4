"""The wake-up listener proves its connection alive and comes back at once (issue 13).

The listener reaches PostgreSQL through a TCP proxy; the probe runs every 0.5 s with a 2 s
deadline, so a silent connection is given up within about 2.5 s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy.engine import Engine

from outbox_tasks.settings import Settings
from outbox_tasks.wakeup import WakeupListener
from tests.support.faults import via
from tests.support.kit import insert_events, wait_until
from tests.support.tcpproxy import TcpProxy

PROBE_INTERVAL = 0.5
DEADLINE = 2.0


class Recorder:
    """What the listener reported: partitions per burst and its listening state changes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bursts: list[set[int]] = []
        self.states: list[tuple[float, bool]] = []

    def on_partitions(self, partitions: set[int]) -> None:
        with self.lock:
            self.bursts.append(partitions)

    def on_listening(self, listening: bool) -> None:
        with self.lock:
            self.states.append((time.monotonic(), listening))

    def woken(self) -> int:
        with self.lock:
            return len(self.bursts)

    def state(self) -> bool | None:
        with self.lock:
            return self.states[-1][1] if self.states else None


@pytest.fixture
def proxy(tcp_proxy: Callable[[str, int], TcpProxy]) -> TcpProxy:
    return tcp_proxy("127.0.0.1", 5432)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def listener(settings: Settings, proxy: TcpProxy, recorder: Recorder) -> Iterator[WakeupListener]:
    host, port = proxy.address
    quick = settings.with_changes(
        wakeup_database_url=via(settings.database_url, host, port),
        wakeup_probe_interval_seconds=PROBE_INTERVAL,
        database_connect_timeout_seconds=DEADLINE,
        partitions=4,
    )
    made = WakeupListener.from_settings(
        quick, recorder.on_partitions, on_listening=recorder.on_listening
    )
    made.start()
    wait_until(made.listening.is_set, timeout=10, what="the listener to listen")
    yield made
    made.stop()


def woken_by_an_insert(engine: Engine, recorder: Recorder) -> None:
    before = recorder.woken()
    insert_events(engine, [("Order", "wake-me")])
    wait_until(lambda: recorder.woken() > before, timeout=5, what="a wake-up")


def test_a_silent_listener_connection_is_given_up_and_replaced_once_the_path_is_back(
    listener: WakeupListener, proxy: TcpProxy, recorder: Recorder, engine: Engine
) -> None:
    woken_by_an_insert(engine, recorder)

    proxy.blackhole()
    went_silent = time.monotonic()
    wait_until(lambda: recorder.state() is False, timeout=10, what="the listener to give up")
    noticed = time.monotonic() - went_silent
    proxy.restore(revive_held=False)  # the old connection stays silent for ever
    restored = time.monotonic()
    wait_until(listener.listening.is_set, timeout=10, what="the listener to come back")
    back = time.monotonic() - restored

    woken_by_an_insert(engine, recorder)
    print(f"\nnoticed the silence after {noticed:.2f} s; listening {back:.2f} s after restore")
    assert noticed < PROBE_INTERVAL + DEADLINE + 1.5
    assert back < DEADLINE + PROBE_INTERVAL + 1.5
    assert [s for _, s in recorder.states] == [True, False, True]


def test_after_a_cut_the_listener_reconnects_at_once(
    listener: WakeupListener, proxy: TcpProxy, recorder: Recorder, engine: Engine
) -> None:
    proxy.cut()
    wait_until(lambda: recorder.state() is False, timeout=5, what="the listener to notice")
    proxy.restore()
    restored = time.monotonic()

    wait_until(listener.listening.is_set, timeout=5, what="the listener to come back")

    assert time.monotonic() - restored < 1.5
    woken_by_an_insert(engine, recorder)


def test_reconnecting_is_immediate_once_then_backs_off_up_to_the_probe_interval() -> None:
    made = WakeupListener("postgresql://x", 1, lambda p: None, probe_interval_seconds=3.0)
    delays = [made.retry_delay(failures) for failures in range(1, 8)]

    assert delays == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
