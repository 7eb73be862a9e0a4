"""Consumer groups as real processes (``python -m outbox_tasks.consumer consume``, the same
code as ``outbox-tasks consume``): a crash between commit and ack, several processes sharing a
group, and a clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from outbox_tasks.consumer import Lag, declare_topology, lag
from outbox_tasks.settings import Settings
from tests.integration.test_consumer_kit import (
    ConsumerProcess,
    broker_settings,
    cleaned_up,
    create_effects,
    effect_count,
    effects,
    group_name,
    message,
    processes,
    publish,
    receipts,
)
from tests.support.kit import wait_until
from tests.support.services import ROOT

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=["redis", "amqp"])
def any_broker(request: pytest.FixtureRequest, settings: Settings, engine: Engine) -> Settings:
    create_effects(engine)
    return broker_settings(request, settings, request.param)


@pytest.fixture
def rabbitmq(request: pytest.FixtureRequest, settings: Settings, engine: Engine) -> Settings:
    create_effects(engine)
    return broker_settings(request, settings, "amqp")


def test_a_consumer_killed_between_commit_and_ack_causes_one_effect_after_redelivery(
    rabbitmq: Settings, engine: Engine, tmp_path: Path
) -> None:
    settings = rabbitmq
    name = group_name()
    declare_topology(name, settings=settings)
    event_id = uuid.uuid4()
    with cleaned_up(settings, [(name, 0)]):
        with processes(ConsumerProcess(settings, name, log_dir=tmp_path)) as [first]:
            first.wait_for("consumer_ready")
            publish(
                settings,
                [message("o-1", 1, event_id=event_id, payload={"exit_after_commit": True})],
            )
            assert first.wait() == 9  # died after its commit, before its ack

        assert [row.event_id for row in effects(engine)] == [event_id]
        # RabbitMQ requeued the unacknowledged message when the connection dropped.
        wait_until(
            lambda: lag(name, settings=settings, peek=False).messages == 1,
            timeout=10,
            what="the message back in the queue",
        )
        with processes(ConsumerProcess(settings, name, log_dir=tmp_path)) as [second]:
            second.wait_for("event_duplicate")
            wait_until(
                lambda: lag(name, settings=settings) == Lag(0, None),
                timeout=10,
                what="the redelivery acknowledged",
            )
            [duplicate] = second.actions("event_duplicate")
            assert duplicate["event_id"] == str(event_id)

        assert effect_count(engine) == 1
        assert receipts(engine, name) == 1


def test_two_processes_of_one_group_split_the_load(
    any_broker: Settings, engine: Engine, tmp_path: Path
) -> None:
    settings = any_broker
    name = group_name()
    declare_topology(name, settings=settings)
    total = 200
    with cleaned_up(settings, [(name, 0)]):
        with processes(
            ConsumerProcess(settings, name, log_dir=tmp_path, extra=["--prefetch", "5"]),
            ConsumerProcess(settings, name, log_dir=tmp_path, extra=["--prefetch", "5"]),
        ) as procs:
            for proc in procs:
                proc.wait_for("consumer_ready")
            publish(
                settings,
                [message(f"o-{n % 20}", n + 1, payload={"sleep": 0.005}) for n in range(total)],
            )
            wait_until(lambda: effect_count(engine) >= total, timeout=60, what=f"{total} effects")
            pids = {proc.pid for proc in procs}

        rows = effects(engine)
        assert len(rows) == total
        assert len({row.event_id for row in rows}) == total
        by_process = {pid: sum(1 for row in rows if row.pid == pid) for pid in pids}
        assert all(count > 0 for count in by_process.values()), by_process
        assert receipts(engine, name) == total


def test_sigterm_finishes_the_message_in_hand_and_exits(
    any_broker: Settings, engine: Engine, tmp_path: Path
) -> None:
    settings = any_broker
    name = group_name()
    declare_topology(name, settings=settings)
    mark = tmp_path / "handler-started"
    with cleaned_up(settings, [(name, 0)]):
        with processes(ConsumerProcess(settings, name, log_dir=tmp_path)) as [proc]:
            proc.wait_for("consumer_ready")
            publish(
                settings,
                [message("o-1", 1, payload={"sleep": 1.0, "mark": str(mark)})]
                + [message("o-1", n) for n in range(2, 6)],
            )
            wait_until(mark.exists, timeout=20, what="the handler to start")
            proc.signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert proc.actions("consumer_stopped")

        # The message in hand was finished and acknowledged; the rest wait for the next process.
        assert [row.sequence for row in effects(engine)][:1] == [1]
        handled = effect_count(engine)
        assert lag(name, settings=settings, peek=False).messages == 5 - handled
        with processes(ConsumerProcess(settings, name, log_dir=tmp_path)) as [again]:
            again.wait_for("consumer_ready")
            wait_until(lambda: effect_count(engine) == 5, timeout=30, what="all five handled")
        assert len({row.event_id for row in effects(engine)}) == 5


def test_the_consumers_command_lists_unparks_and_reports_lag(
    rabbitmq: Settings, engine: Engine
) -> None:
    settings = rabbitmq
    name = group_name()
    declare_topology(name, settings=settings, partitions=2)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_consumer_position (consumer_group, aggregate_type, "
                "aggregate_id, last_sequence, parked_at, parked_event_id, parked_error, "
                "dead_sequence) VALUES (:g, 'Order', '42', 3, now(), :e, 'Boom: no', 9)"
            ),
            {"g": name, "e": uuid.uuid4()},
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(settings.to_env())

    def run(*args: str) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-m", "outbox_tasks.consumer", "consumers", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        return done.returncode, done.stdout + done.stderr

    with cleaned_up(settings, [(name, 2)]):
        publish(settings, [message("o-1", 1), message("o-2", 2)])
        code, out = run("lag", "--group", name, "--partitions", "2", "--json")
        assert code == 0, out
        report = json.loads(out)
        assert (report["group"], report["messages"], report["dead_letters"]) == (name, 2, 0)
        assert report["oldest_age_seconds"] is not None  # no consumer: the peek is safe
        code, out = run("parked", "--group", name, "--json")
        assert code == 0, out
        [parked] = json.loads(out)
        assert (parked["aggregate_id"], parked["error"], parked["dead_sequence"]) == (
            "42",
            "Boom: no",
            9,
        )
        unpark_args = ["--group", name, "--aggregate-type", "Order", "--aggregate-id", "42"]
        assert run("unpark", *unpark_args)[0] == 0
        assert run("unpark", *unpark_args)[0] == 1  # not parked any more
        assert json.loads(run("parked", "--group", name, "--json")[1]) == []
        with engine.connect() as conn:
            last = conn.execute(
                text(
                    "SELECT last_sequence FROM outbox_consumer_position WHERE consumer_group = :g"
                ),
                {"g": name},
            ).scalar_one()
        assert last == 9  # unpark skips what was dead-lettered
