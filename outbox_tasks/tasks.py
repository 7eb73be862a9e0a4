"""The Celery tasks (names: DESIGN 7). Each is a few lines: take this process's runtime
(outbox_tasks.worker), call the relay, dead-letter, cleanup or status code, and turn an outage
into a logged skip (the next run goes on; PostgreSQL stays the truth). A task another
deployment sent (``deployment``) is dropped before anything is done."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from outbox_tasks import deadletter
from outbox_tasks.celery import (
    CLAIM_TASK,
    CLEANUP_TASK,
    DEAD_LETTER_TASK,
    EXPORT_METRICS_TASK,
    PUBLISH_TASK,
    app,
    cleanup_budget,
)
from outbox_tasks.cleanup import run_cleanup
from outbox_tasks.control import broadcast_snapshot
from outbox_tasks.db import translate_errors
from outbox_tasks.errors import BrokerUnavailable, DatabaseUnavailable, describe_error
from outbox_tasks.logs import event, get_logger
from outbox_tasks.serving import CARRY_ROUNDS, QUEUED_LATE_SECONDS, serve
from outbox_tasks.status import collect_status, db_snapshot
from outbox_tasks.store.records import Lease
from outbox_tasks.wakeup import NotificationWaiter
from outbox_tasks.worker import claim_and_dispatch, refuse_foreign, runtime, shutting_down

log = get_logger("tasks")


@app.task(name=CLAIM_TASK)
def claim(partition: int | None = None, partition_count: int | None = None) -> dict[str, Any]:
    """Lease partitions that have due rows (all of them when ``partition`` is None) and hand
    each lease to a publish task; with the wake-up path on, serve this process's share of them
    in place (``outbox_tasks.serving``). Idempotent: live leases are left alone.

    ``partition_count`` is the count ``partition`` belongs to (drain chaining passes it): while
    OUTBOX_PARTITIONS is being changed, the claim may run on a worker configured with the other
    count. Granting is safe across counts (overlapping live leases are refused)."""
    if (foreign := refuse_foreign(claim.request)) is not None:
        return foreign
    relay = runtime.relay()
    n = partition_count or runtime.settings.partitions
    wanted = list(range(n)) if partition is None else [partition]
    waiter = runtime.waiter()
    if waiter is not None:
        return _claim_and_serve(wanted, n, waiter)
    try:
        with relay.store.session():
            dispatched = claim_and_dispatch(relay, wanted, n)
    except DatabaseUnavailable as error:
        event(log, logging.WARNING, "database_unavailable", "claim skipped", error=str(error))
        return {"granted": [], "error": "database_unavailable"}
    if dispatched.error is not None:
        return {"granted": dispatched.granted, "error": "celery_broker_unavailable"}
    return {"granted": dispatched.granted}


@app.task(name=PUBLISH_TASK)
def publish(
    partition: int,
    epoch: int,
    partition_count: int,
    also: list[list[int]] | None = None,
    rounds: int = 0,
) -> dict[str, Any]:
    """Publish a leased partition's due rows in order; with the wake-up path on, keep serving
    it (and claim more, up to this process's share) while new rows keep coming
    (``outbox_tasks.serving``), at most ``publish_task_seconds``; then pass the busy partitions
    on to a continuation of this task. ``also``: more ``[partition, epoch]`` leases to adopt
    (a continuation's); ``rounds``: how many continuations came before this one."""
    if (foreign := refuse_foreign(publish.request)) is not None:
        return foreign
    waiter = runtime.waiter()
    if waiter is not None:
        more = [(int(p), int(e)) for p, e in also or ()]
        return {"partition": partition, "epoch": epoch} | _serve(
            partition_count, waiter, partition, epoch, also=more, rounds=rounds
        )
    try:
        report = runtime.relay().publish(partition, epoch, partition_count)
    except DatabaseUnavailable as error:
        _publish_stopped(error, partition)
        return {"partition": partition, "epoch": epoch, "error": "database_unavailable"}
    if report.more and not report.circuit_open and not report.lease_lost:
        _chain_claim(partition, partition_count)
    return report.as_dict()


def _claim_and_serve(
    wanted: list[int], partition_count: int, waiter: NotificationWaiter
) -> dict[str, Any]:
    """With the wake-up path on, a claim serves the partitions it is granted itself, up to
    this process's share (no Celery hop, no lease waiting in the queue), and queues publish
    tasks for the rest."""
    relay = runtime.relay()
    share = runtime.share()
    mine: list[Lease] = []
    try:
        with relay.store.session():
            # While every partition is served (the common case with the wake-up path on), a
            # tick costs one statement instead of a claim transaction per partition.
            held = relay.held_partitions(partition_count)
            rest = [p for p in wanted if p not in held]
            while rest and len(mine) < share:
                lease = relay.claim(
                    rest.pop(0), partition_count, take_queued_after=QUEUED_LATE_SECONDS
                )
                if lease is not None:
                    mine.append(lease)
            queued = claim_and_dispatch(relay, rest, partition_count)
    except DatabaseUnavailable as error:
        event(log, logging.WARNING, "database_unavailable", "claim skipped", error=str(error))
        return {"granted": [lease.partition for lease in mine], "error": "database_unavailable"}
    granted = [lease.partition for lease in mine] + queued.granted
    answer: dict[str, Any] = {"granted": granted}
    if queued.error is not None:
        answer["error"] = "celery_broker_unavailable"
    if not mine:
        return answer
    return answer | _serve(partition_count, waiter, granted=mine)


def _serve(
    partition_count: int,
    waiter: NotificationWaiter,
    partition: int | None = None,
    epoch: int | None = None,
    *,
    granted: Sequence[Lease] = (),
    also: Sequence[tuple[int, int]] = (),
    rounds: int = 0,
) -> dict[str, Any]:
    carry = rounds + 1 < CARRY_ROUNDS
    try:
        served = serve(
            runtime.relay(),
            waiter,
            partition,
            epoch,
            partition_count,
            granted=granted,
            also=also,
            share=runtime.share(),
            carry=carry,
            continuing=rounds > 0,
            stopping=shutting_down,
        )
    except DatabaseUnavailable as error:
        _publish_stopped(error, partition)
        return {"error": "database_unavailable"}
    for busy in served.more:
        _chain_claim(busy, partition_count)
    if served.carried:
        _continue(served.carried, partition_count, rounds + 1)
    return served.as_dict()


def _publish_stopped(error: DatabaseUnavailable, partition: int | None) -> None:
    # Nothing is lost: unmarked rows stay pending; the leases expire; a later claim resends.
    event(
        log,
        logging.WARNING,
        "database_unavailable",
        "publish stopped",
        error=str(error),
        partition=partition,
    )


def _continue(leases: Sequence[Lease], partition_count: int, rounds: int) -> None:
    """Queue the serving task's continuation with the leases it passed on (they stay queued
    for it); if it cannot be queued, hand them back so a claim can take them at once."""
    first, *rest = leases
    try:
        publish.apply_async(
            args=(first.partition, first.epoch, partition_count),
            kwargs={"also": [[lease.partition, lease.epoch] for lease in rest], "rounds": rounds},
            expires=runtime.settings.lease_seconds,
        )
    except Exception as error:
        event(
            log,
            logging.WARNING,
            "publish_enqueue_failed",
            "could not queue the serving task's continuation; its leases are handed back",
            partitions=[lease.partition for lease in leases],
            error=describe_error(error),
        )
        relay = runtime.relay()
        for lease in leases:
            # If not: the lease stays queued, and a claim takes it once the task is late.
            with contextlib.suppress(DatabaseUnavailable):
                relay.hand_back(lease)


def _chain_claim(partition: int, partition_count: int) -> None:
    """Drain chaining: a partition with work left does not wait for the next beat tick."""
    try:
        claim.apply_async(
            args=(partition, partition_count),
            expires=max(runtime.settings.poll_interval_seconds * 3, 1.0),
        )
    except Exception as error:
        # The lease is already released: the next beat tick claims the partition.
        event(
            log,
            logging.WARNING,
            "claim_enqueue_failed",
            "could not chain a claim; the next tick will claim",
            partition=partition,
            error=describe_error(error),
        )


@app.task(name=DEAD_LETTER_TASK)
def dead_letter() -> dict[str, Any]:
    """Record exhausted messages, publish their copies to the dead-letter exchange, drop the
    rows of skip-policy event types (their aggregates flow on)."""
    if (foreign := refuse_foreign(dead_letter.request)) is not None:
        return foreign
    try:
        with translate_errors("dead_letter"):
            return deadletter.collect(runtime.engine(), runtime.settings, runtime.dead_publisher())
    except (DatabaseUnavailable, BrokerUnavailable) as error:
        event(
            log, logging.WARNING, "dead_letter_skipped", "dead-letter run skipped", error=str(error)
        )
        return {"error": type(error).__name__}


@app.task(name=CLEANUP_TASK)
def cleanup() -> dict[str, Any]:
    """Remove published rows (OUTBOX_CLEANUP_MODE), old consumer receipts and resolved dead
    letters in short batches; one run at a time per database."""
    if (foreign := refuse_foreign(cleanup.request)) is not None:
        return foreign
    settings = runtime.settings
    try:
        with translate_errors("cleanup"):
            report = run_cleanup(
                runtime.engine(),
                settings,
                max_seconds=cleanup_budget(settings),
            )
    except DatabaseUnavailable as error:
        event(log, logging.WARNING, "database_unavailable", "cleanup stopped", error=str(error))
        return {"error": "database_unavailable"}
    return report.as_dict()


@app.task(name=EXPORT_METRICS_TASK)
def export_metrics() -> dict[str, float]:
    """Refresh the database-derived gauges: one reading, broadcast to every worker, whose main
    process serves it on its metrics endpoint."""
    if refuse_foreign(export_metrics.request) is not None:
        return {}
    try:
        with translate_errors("export_metrics"):
            snapshot = db_snapshot(collect_status(runtime.engine(), runtime.settings))
    except DatabaseUnavailable as error:
        event(
            log, logging.WARNING, "database_unavailable", "metrics export skipped", error=str(error)
        )
        return {}
    broadcast_snapshot(snapshot)
    return snapshot
