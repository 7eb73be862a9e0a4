"""Deployments sharing a broker (issue 11, item 4): queue names, exchanges and the task check."""

from __future__ import annotations

from types import SimpleNamespace

from outbox_tasks.celery import QUEUES, celery_config, queue_name
from outbox_tasks.deployment import foreign_reason
from outbox_tasks.settings import Settings

ORDERS = Settings.from_env({"OUTBOX_DATABASE_URL": "postgresql://app@db/orders"})


def test_every_relay_queue_and_exchange_carries_the_namespace() -> None:
    config = celery_config(ORDERS)

    names = [q.name for q in config["task_queues"]]
    assert names == ["outbox.claim.orders", "outbox.publish.orders", "outbox.maintenance.orders"]
    assert {r["queue"] for r in config["task_routes"].values()} == set(names)
    assert config["task_default_queue"] == "outbox.maintenance.orders"
    assert config["control_exchange"] == "outbox.orders"
    assert config["event_exchange"] == "outbox.orders.events"
    assert [queue_name(q, ORDERS) for q in QUEUES] == names


def test_two_databases_get_queues_that_do_not_meet() -> None:
    billing = ORDERS.with_changes(database_url="postgresql://app@db/billing")

    ours = {q.name for q in celery_config(ORDERS)["task_queues"]}
    theirs = {q.name for q in celery_config(billing)["task_queues"]}
    assert not ours & theirs


def test_a_task_of_another_namespace_or_database_is_foreign() -> None:
    mine = "7713942503894747248/orders"

    assert foreign_reason(SimpleNamespace(), ORDERS, mine) is None  # unstamped: accepted
    assert foreign_reason(SimpleNamespace(outbox_namespace="orders"), ORDERS, mine) is None
    assert (
        foreign_reason(
            SimpleNamespace(outbox_namespace="orders", outbox_database=mine), ORDERS, mine
        )
        is None
    )
    other = foreign_reason(SimpleNamespace(outbox_namespace="billing"), ORDERS, mine)
    assert other == "sent by deployment 'billing'; this worker is 'orders'"
    twin = foreign_reason(
        SimpleNamespace(outbox_namespace="orders", outbox_database="1/orders"), ORDERS, mine
    )
    assert twin is not None and "give each its own" in twin
