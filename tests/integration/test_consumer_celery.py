"""The Celery form of a consumer group: a real ``celery worker`` whose consumer bootstep reads
the group's queue and runs each event through the ``outbox.consume`` task.

Run by the worker (``celery -A tests.integration.test_consumer_celery``), this module installs
the group named by ``OUTBOX_TEST_CONSUMER_GROUP`` on the outbox_tasks Celery app, through the
``outbox_consumer_groups`` setting.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy.engine import Engine

from outbox_tasks.consumer import dead_letter_count, declare_topology, lag
from outbox_tasks.errors import ConfigurationError
from outbox_tasks.settings import Settings
from tests.integration.test_consumer_kit import (
    cleaned_up,
    create_effects,
    effect_count,
    effects,
    group_name,
    message,
    publish,
    receipts,
)
from tests.support.cluster import Proc, settings_env
from tests.support.kit import wait_until
from tests.support.services import ROOT

if os.environ.get("OUTBOX_TEST_CONSUMER_GROUP"):
    from outbox_tasks.celery import app, settings
    from outbox_tasks.consumer_celery import install_configured

    # As an OUTBOX_CELERY_CONFIG module would set it.
    app.conf.outbox_consumer_groups = [
        {
            "name": os.environ["OUTBOX_TEST_CONSUMER_GROUP"],
            "bind": ["Order.*"],
            "handler": "tests.integration.test_consumer_kit:on_event",
            "max_attempts": 2,
            "backoff_base_seconds": 0.01,
            "backoff_max_seconds": 0.02,
        }
    ]
    install_configured(app, settings)

pytestmark = pytest.mark.timeout(120)


@contextmanager
def celery_worker(settings: Settings, group: str, tmp_path: Path) -> Iterator[Proc]:
    log_path = tmp_path / "worker.log"
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tests.integration.test_consumer_celery",
        "worker",
        "-n",
        f"consumer-{uuid.uuid4().hex[:6]}@%h",
        "-c",
        "2",
        "-Q",
        "outbox.consume",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    env = settings_env(settings, OUTBOX_TEST_CONSUMER_GROUP=group)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc = Proc("worker", popen, log_path)
    try:
        wait_until(
            lambda: "ready." in proc.log() or not proc.alive(), timeout=60, what="worker ready"
        )
        assert proc.alive(), proc.log()[-3000:]
        yield proc
    finally:
        proc.stop()


def test_the_celery_form_runs_each_event_through_the_outbox_consume_task_once(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    create_effects(engine)
    name = group_name()
    declare_topology(name, settings=settings)
    duplicate = uuid.uuid4()
    with cleaned_up(settings, [(name, 0)]), celery_worker(settings, name, tmp_path) as worker:
        publish(
            settings,
            [
                message("o-1", 1, event_id=duplicate),
                message("o-1", 1, event_id=duplicate),
                message("o-2", 2),
                message("o-3", 3, payload={"poison": True}),
            ],
        )
        wait_until(
            lambda: dead_letter_count(name, settings=settings) == 1 and effect_count(engine) == 2,
            timeout=60,
            what="two effects and one dead letter",
        )
        wait_until(
            lambda: worker.log().count("Task outbox.consume[") >= 8,  # received + finished
            timeout=30,
            what="four outbox.consume tasks finished",
        )
        log = worker.log()
        assert lag(name, settings=settings).messages == 0

    assert {row.aggregate_id for row in effects(engine)} == {"o-1", "o-2"}
    assert effect_count(engine) == 2
    assert receipts(engine, name) == 2
    assert log.count("Task outbox.consume[") == 8, log[-4000:]
    assert "'duplicate'" in log and "'handled'" in log  # results, as Flower shows them
    assert "EventDeadLettered" in log  # the poison event's task failed, visibly


def test_the_celery_form_refuses_ordered_groups_and_events_on_another_broker(
    settings: Settings, amqp_url: str
) -> None:
    celery_app = Celery("consumer-test", broker=settings.broker_url)
    group = {"name": group_name(), "bind": "Order.*", "handler": lambda event, session: None}

    from outbox_tasks.consumer_celery import install

    with pytest.raises(ConfigurationError, match="outbox-tasks consume --partitions 2"):
        install(celery_app, {**group, "partitions": 2}, settings=settings)
    with pytest.raises(ConfigurationError, match="broker other than Celery's"):
        install(celery_app, group, settings=settings.with_changes(publish_url=amqp_url))
