# kombu is only partly annotated.
# mypy: disable-error-code="no-untyped-call"
"""Helpers shared by the consumer tests (no tests here): an effects table, a handler driven by
the event payload (importable by consumer subprocesses), envelope publishing, in-process and
subprocess consumers, and per-test cleanup of queues and exchanges.

The handler :func:`on_event` records one row per effect in ``consumer_effect``; the payload
tells it what else to do:

- ``fail_attempts: n``   raise on attempts 1..n (after writing the effect: it must roll back)
- ``poison: true``       always raise
- ``sleep: s``           sleep before writing the effect
- ``mark: path``         create this file when the handler starts
- ``exit_after_commit``  kill this process (``os._exit(9)``) right after the commit, before ack
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from outbox_tasks.consumer import Consumer, Event, delete_topology
from outbox_tasks.envelope import OutboundMessage, build_message
from outbox_tasks.publisher import BrokerPublisher
from outbox_tasks.settings import Settings
from tests.support.kit import wait_until
from tests.support.services import ROOT, unique

EFFECTS_DDL = """
CREATE TABLE consumer_effect (
    id bigserial PRIMARY KEY,
    event_id uuid NOT NULL,
    aggregate_id text NOT NULL,
    sequence bigint NOT NULL,
    attempt int NOT NULL,
    pid int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


class Boom(Exception):
    """A handler failure made on purpose."""


def on_event(event: Event, session: Session) -> None:
    """The test handler (see the module docstring)."""
    payload = event.payload if isinstance(event.payload, dict) else {}
    if payload.get("mark"):
        Path(payload["mark"]).touch()
    if payload.get("sleep"):
        time.sleep(float(payload["sleep"]))
    session.execute(
        text(
            "INSERT INTO consumer_effect (event_id, aggregate_id, sequence, attempt, pid) "
            "VALUES (:id, :aggregate_id, :sequence, :attempt, :pid)"
        ),
        {
            "id": event.id,
            "aggregate_id": event.aggregate_id,
            "sequence": event.sequence,
            "attempt": event.attempt,
            "pid": os.getpid(),
        },
    )
    if payload.get("poison"):
        raise Boom(f"poison event {event.aggregate_id}/{event.sequence}")
    if event.attempt <= int(payload.get("fail_attempts", 0)):
        raise Boom(f"failing attempt {event.attempt}")
    if payload.get("exit_after_commit"):
        sa_event.listen(session, "after_commit", lambda _session: os._exit(9), once=True)


def create_effects(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(EFFECTS_DDL))


def effects(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT * FROM consumer_effect ORDER BY id")).all())


def effect_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM consumer_effect")).scalar_one())


def receipts(engine: Engine, group: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM outbox_consumer_receipt WHERE consumer_group = :g"),
                {"g": group},
            ).scalar_one()
        )


# --- events -----------------------------------------------------------------------------------


def message(
    aggregate_id: str,
    sequence: int,
    *,
    payload: dict[str, Any] | None = None,
    event_id: uuid.UUID | None = None,
    aggregate_type: str = "Order",
    event_type: str = "OrderPlaced",
    redelivered: bool = False,
    occurred_at: datetime | None = None,
    aggregate_sequence: int | None = None,
    previous_aggregate_sequence: int | None = None,
) -> OutboundMessage:
    """The wire form of one event, exactly as the relay builds it (``aggregate_sequence`` None:
    as a relay from before migration 0004 built it)."""
    return build_message(
        event_id=event_id or uuid.uuid4(),
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        event_type=event_type,
        occurred_at=occurred_at or datetime.now(UTC),
        schema_version=1,
        sequence=sequence,
        payload_json=json.dumps(payload or {}),
        user_headers={"traceparent": "00-test-01"},
        partition=0,
        epoch=1,
        attempt=1,
        redelivered=redelivered,
        aggregate_sequence=aggregate_sequence,
        previous_aggregate_sequence=previous_aggregate_sequence,
    )


def publish(settings: Settings, messages: Sequence[OutboundMessage]) -> None:
    publisher = BrokerPublisher(settings.effective_publish_url, settings.exchange)
    try:
        result = publisher.publish_batch(list(messages))
    finally:
        publisher.close()
    assert not result.failed, result.failed
    assert result.unroutable == 0, "no queue was bound: declare the group's topology first"


# --- fixtures ---------------------------------------------------------------------------------


def broker_settings(request: pytest.FixtureRequest, settings: Settings, kind: str) -> Settings:
    if kind == "redis":
        return settings
    amqp_url: str = request.getfixturevalue("amqp_url")
    return settings.with_changes(publish_url=amqp_url)


@contextmanager
def cleaned_up(settings: Settings, groups: list[tuple[str, int]]) -> Iterator[None]:
    """Delete the groups' queues (and, on RabbitMQ, the test's exchange) afterwards."""
    try:
        yield
    finally:
        for name, partitions in groups:
            with suppress(Exception):
                delete_topology(name, settings=settings, partitions=partitions)
        if settings.effective_publish_url.startswith("amqp"):
            from kombu.connection import Connection
            from kombu.entity import Exchange

            with suppress(Exception), Connection(settings.effective_publish_url) as conn:
                Exchange(settings.exchange)(conn.default_channel).delete()


def group_name() -> str:
    return unique("g")


# --- consumers --------------------------------------------------------------------------------


@contextmanager
def running(consumer: Consumer, timeout: float = 20.0) -> Iterator[Consumer]:
    """Run a consumer on a thread; stop it (and re-raise its error, if any) afterwards."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            consumer.run(stop)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=target, daemon=True, name=f"consumer-{consumer.group.name}")
    thread.start()
    wait_until(
        lambda: consumer.ready.is_set() or bool(errors), timeout=timeout, what="consumer ready"
    )
    try:
        yield consumer
    finally:
        stop.set()
        thread.join(timeout)
        assert not thread.is_alive(), "the consumer did not stop"
    if errors:
        raise errors[0]


class ConsumerProcess:
    """``python -m outbox_tasks.consumer consume ...`` in a subprocess, its log in a file."""

    def __init__(
        self,
        settings: Settings,
        group: str,
        *,
        bind: Sequence[str] = ("Order.*",),
        handler: str = "tests.integration.test_consumer_kit:on_event",
        partitions: int = 0,
        extra: Sequence[str] = (),
        log_dir: Path,
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        env.update(settings.to_env())
        env["PYTHONUNBUFFERED"] = "1"
        argv = [
            sys.executable,
            "-m",
            "outbox_tasks.consumer",
            "consume",
            "--group",
            group,
            "--handler",
            handler,
            "--partitions",
            str(partitions),
            "--backoff-base",
            "0.01",
            "--backoff-max",
            "0.05",
            "--log-level",
            "DEBUG",
            *[arg for pattern in bind for arg in ("--bind", pattern)],
            *extra,
        ]
        self.log_path = log_dir / f"consumer-{uuid.uuid4().hex[:8]}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            with suppress(ValueError):
                out.append(json.loads(raw))
        return out

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("action") == action]

    def wait_for(self, action: str, count: int = 1, timeout: float = 30.0) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and len(self.actions(action)) < count:
                raise AssertionError(f"consumer exited ({self.proc.returncode}):\n{self.tail()}")
            return len(self.actions(action)) >= count

        wait_until(seen, timeout=timeout, interval=0.05, what=f"{count} x {action}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, signum: int) -> None:
        with suppress(ProcessLookupError):
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@contextmanager
def processes(*procs: ConsumerProcess) -> Iterator[list[ConsumerProcess]]:
    started = list(procs)
    try:
        yield started
    finally:
        for proc in started:
            proc.stop()
