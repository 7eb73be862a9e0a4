"""Every wait has a deadline (issue 13): Celery's broker options and task time limits derived from
the settings, a lease handed back when its publish task cannot be enqueued, and how the relay's
progress is judged for `outbox-tasks status`."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from outbox_tasks import worker
from outbox_tasks.broker import tcp_keepalive_options
from outbox_tasks.celery import (
    CLAIM_TASK,
    CLEANUP_TASK,
    DEAD_LETTER_TASK,
    EXPORT_METRICS_TASK,
    PUBLISH_TASK,
    broker_connection,
    celery_config,
    task_time_limits,
)
from outbox_tasks.db import keepalive_args, relay_idle_in_transaction, statement_deadline
from outbox_tasks.relay import Relay
from outbox_tasks.schema import OutboxMessage
from outbox_tasks.settings import Settings
from outbox_tasks.status import QUIET_SECONDS, stalled_seconds
from outbox_tasks.testing import InMemoryRelayStore, ManualClock, RecordingPublisher

REDIS = Settings.from_env({})
AMQP = Settings.from_env({"OUTBOX_BROKER_URL": "amqp://guest:guest@rabbit:5672//"})


# --- Celery's broker --------------------------------------------------------------------------


def test_celery_on_redis_gets_socket_connect_and_health_check_deadlines() -> None:
    options = broker_connection(REDIS)
    transport = options["broker_transport_options"]

    assert transport["socket_timeout"] == 5
    assert transport["socket_connect_timeout"] == 5
    assert transport["socket_keepalive"] is True
    assert transport["health_check_interval"] == 5
    assert transport["visibility_timeout"] == 3600
    assert options["broker_connection_timeout"] == 5
    assert options["broker_pool_acquire_timeout"] == 5
    assert options["task_publish_retry_policy"]["max_retries"] == 1


def test_celery_on_rabbitmq_gets_heartbeats_and_a_write_deadline() -> None:
    options = broker_connection(AMQP)

    assert options["broker_heartbeat"] == 10
    assert options["broker_transport_options"]["write_timeout"] == 5
    assert "socket_timeout" not in options["broker_transport_options"]


def test_the_celery_broker_timeout_setting_drives_every_celery_deadline() -> None:
    options = broker_connection(REDIS.with_changes(celery_broker_timeout_seconds=2.0))

    assert options["broker_transport_options"]["socket_timeout"] == 2.0
    assert options["broker_connection_timeout"] == 2.0
    assert options["broker_heartbeat"] == 4


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux TCP options")
def test_keepalive_options_follow_the_tcp_user_timeout_and_zero_leaves_the_kernel_alone() -> None:
    options = tcp_keepalive_options(30.0)

    assert options[socket.TCP_KEEPIDLE] == 10
    assert options[socket.TCP_KEEPINTVL] == 5
    assert options[socket.TCP_KEEPCNT] == 3
    assert options[socket.TCP_USER_TIMEOUT] == 30_000
    assert tcp_keepalive_options(0) == {}
    assert keepalive_args(REDIS.with_changes(tcp_user_timeout_seconds=0)) == {}
    assert keepalive_args(REDIS)["tcp_user_timeout"] == 30_000


def test_every_relay_and_maintenance_task_has_a_hard_time_limit_past_its_lease() -> None:
    limits = task_time_limits(REDIS)
    deadline = statement_deadline(REDIS)

    assert set(limits) == {
        CLAIM_TASK,
        PUBLISH_TASK,
        DEAD_LETTER_TASK,
        EXPORT_METRICS_TASK,
        CLEANUP_TASK,
    }
    for name in (CLAIM_TASK, PUBLISH_TASK):
        assert limits[name]["time_limit"] == 30 + 5 + deadline == 70
    for name in (DEAD_LETTER_TASK, EXPORT_METRICS_TASK):
        assert limits[name]["time_limit"] == 30 + deadline
    assert limits[CLEANUP_TASK]["time_limit"] == 900 + deadline + 60
    assert all("soft_time_limit" not in limit for limit in limits.values())
    assert celery_config(REDIS)["task_annotations"] == limits


def test_relay_sessions_idle_in_a_transaction_end_after_one_statement_deadline() -> None:
    assert relay_idle_in_transaction(REDIS) == 35
    assert (
        relay_idle_in_transaction(REDIS.with_changes(idle_in_transaction_timeout_seconds=20)) == 20
    )


# --- a lease whose publish task could not be enqueued --------------------------------------------


class Refused(Exception):
    pass


@pytest.fixture
def relay_with_rows() -> tuple[Relay, InMemoryRelayStore, ManualClock]:
    clock = ManualClock()
    store = InMemoryRelayStore(clock=clock)
    settings = Settings.from_env({}, partitions=1)
    relay = Relay(settings, store, RecordingPublisher(), owner="host:1", clock=clock)
    store.add(
        *(
            OutboxMessage(
                aggregate_type="Order", aggregate_id=str(i), event_type="OrderCreated", payload={}
            )
            for i in range(3)
        )
    )
    return relay, store, clock


@pytest.mark.parametrize(
    "error",
    [
        Refused("Timeout reading from socket"),
        # What kombu raised in pool processes right after a reconnect (issue 13).
        AttributeError("'NoneType' object has no attribute 'client'"),
    ],
    ids=["broker-timeout", "attribute-error-after-reconnect"],
)
def test_a_lease_whose_publish_task_cannot_be_enqueued_is_handed_back_at_once(
    relay_with_rows: tuple[Relay, InMemoryRelayStore, ManualClock],
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
) -> None:
    relay, store, clock = relay_with_rows
    sent: list[tuple[Any, ...]] = []

    def refuse(name: str, **options: Any) -> None:
        sent.append(options["args"])
        raise error

    monkeypatch.setattr(worker.app, "send_task", refuse)

    dispatched = worker.claim_and_dispatch(relay, [0], 1)

    assert dispatched.granted == []
    assert dispatched.error is not None and type(error).__name__ in dispatched.error
    assert len(sent) == 1
    lease = store.lease(0, 1)
    assert lease is not None and not lease.live(clock())
    # Free at once, not after OUTBOX_LEASE_SECONDS: the next claim is granted the next epoch.
    again = relay.claim(0, 1)
    assert again is not None and again.epoch == sent[0][1] + 1


def test_claims_stop_at_the_first_refused_task_and_queued_ones_keep_their_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = ManualClock()
    store = InMemoryRelayStore(clock=clock)
    relay = Relay(Settings.from_env({}, partitions=4), store, RecordingPublisher(), owner="h:1")
    store.add(
        *(
            OutboxMessage(
                aggregate_type="Order", aggregate_id=str(i), event_type="OrderCreated", payload={}
            )
            for i in range(64)
        )
    )
    calls: list[int] = []

    def second_fails(name: str, **options: Any) -> None:
        calls.append(options["args"][0])
        if len(calls) == 2:
            raise Refused("broker gone")

    monkeypatch.setattr(worker.app, "send_task", second_fails)

    dispatched = worker.claim_and_dispatch(relay, range(4), 4)

    assert dispatched.granted == calls[:1]
    assert len(calls) == 2
    first, refused = calls
    kept, handed_back = store.lease(first, 4), store.lease(refused, 4)
    assert kept is not None and kept.live(clock())
    assert handed_back is not None and not handed_back.live(clock())
    assert all(store.lease(p, 4) is None for p in range(4) if p not in calls)


def test_a_lease_handed_back_after_it_was_taken_over_is_left_alone(
    relay_with_rows: tuple[Relay, InMemoryRelayStore, ManualClock],
) -> None:
    relay, store, clock = relay_with_rows
    lease = relay.claim(0, 1)
    assert lease is not None
    clock.advance(31)
    newer = relay.claim(0, 1)
    assert newer is not None

    assert relay.hand_back(lease) is False
    current = store.lease(0, 1)
    assert current is not None and current.live(clock()) and current.epoch == newer.epoch


# --- is the relay stalled? -----------------------------------------------------------------------


def never() -> float | None:
    raise AssertionError("the scan must not run while the relay is moving")


@pytest.mark.parametrize(
    ("since_last_publish", "oldest_wait", "expected"),
    [
        (0.5, never, 0.0),  # moving: no scan
        (QUIET_SECONDS - 0.1, never, 0.0),
        (300.0, lambda: None, 0.0),  # quiet, but nothing it could publish waits
        (300.0, lambda: 40.0, 40.0),  # rows came in 40 s ago after a quiet spell
        (90.0, lambda: 600.0, 90.0),  # nothing published for 90 s while rows wait
        (None, lambda: 15.0, 15.0),  # never published anything
    ],
)
def test_the_relay_is_stalled_for_the_shorter_of_its_silence_and_the_oldest_wait(
    since_last_publish: float | None, oldest_wait: Any, expected: float
) -> None:
    assert stalled_seconds(since_last_publish, oldest_wait) == expected
