"""The client side of the workers' remote control commands (served in ``outbox_tasks.worker``):
what the export task and ``outbox-tasks status`` send, without loading the worker runtime."""

from __future__ import annotations

from outbox_tasks.celery import app

SNAPSHOT_COMMAND = "outbox_metrics_snapshot"
CIRCUIT_COMMAND = "outbox_circuit"


def broadcast_snapshot(snapshot: dict[str, float]) -> None:
    """Send a database snapshot to every worker, whose main process serves it."""
    app.control.broadcast(SNAPSHOT_COMMAND, arguments={"snapshot": snapshot})


def worker_circuits(timeout: float = 1.0) -> dict[str, bool | None] | None:
    """Ask every running worker whether its broker circuit is open: ``{worker name: open}``
    (None for a worker that cannot tell), or None when no worker answered or the Celery
    broker is unreachable (status must work without it)."""
    try:
        replies = app.control.broadcast(CIRCUIT_COMMAND, reply=True, timeout=timeout) or []
    except Exception:
        return None
    circuits: dict[str, bool | None] = {}
    for reply in replies:
        for name, answer in reply.items():
            circuits[name] = answer.get("open") if isinstance(answer, dict) else None
    return circuits or None
