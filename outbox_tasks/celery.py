"""The Celery app: queues, routes, beat schedule, worker policy. ``celery -A outbox_tasks ...``.

Policy, and why:
- Relay tasks ack early (``acks_late`` off) and never use ETA/countdown. A lost claim or publish
  task costs nothing: the lease in PostgreSQL is the truth, it expires, and the next beat tick
  claims again. Late acks would only add Redis visibility-timeout redeliveries of stale tasks
  (which the epoch fence would then ignore).
- ``worker_prefetch_multiplier=1``: a worker process holds one task at a time, so a long publish
  task never sits on claims another process could run.
- Claim and publish tasks expire: a claim older than a few ticks, or a publish task older than
  its lease, is dropped by the worker instead of doing stale work.
- The broker's visibility timeout (Redis) stays long (1 h); it only matters for late-ack tasks,
  i.e. the user's own.
- Every wait on Celery's own broker has a deadline (``broker_connection``): connect, each
  command, taking a pooled connection, a consumer connection that stopped answering (Redis
  health checks, AMQP heartbeats), and a send retried once at most. Without them a silent
  network path (a load balancer or NAT answering for Redis) freezes the worker's event loop,
  beat and the wake-up dispatch for ever.
- Every relay and maintenance task has a hard time limit (``task_time_limits``): a pool
  process stuck past it is killed and replaced; by then its lease has expired.

Users extend or override any of this with ``OUTBOX_CELERY_CONFIG=module.path``: that module's
lower-case Celery settings are applied on top, and its ``beat_schedule`` entries are merged by
name (same name replaces ours, new names are added).
"""

from __future__ import annotations

import importlib
import sys
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.signals import before_task_publish, celeryd_after_setup
from kombu.entity import Exchange, Queue

from outbox_tasks.broker import is_amqp, tcp_keepalive_options
from outbox_tasks.consumer_celery import install_configured
from outbox_tasks.db import statement_deadline
from outbox_tasks.deployment import NAMESPACE_HEADER
from outbox_tasks.errors import ConfigurationError
from outbox_tasks.settings import Settings

# The relay's queues, as operators name them (``-Q outbox.claim,outbox.publish``). On the broker
# each carries the deployment's namespace (``outbox.claim.<OUTBOX_NAMESPACE>``), so deployments
# sharing a broker never take each other's tasks; a worker's -Q may use either form
# (``_map_worker_queues``).
CLAIM_QUEUE = "outbox.claim"
PUBLISH_QUEUE = "outbox.publish"
MAINTENANCE_QUEUE = "outbox.maintenance"
QUEUES = (CLAIM_QUEUE, PUBLISH_QUEUE, MAINTENANCE_QUEUE)


def queue_name(base: str, settings: Settings) -> str:
    """``outbox.claim`` -> ``outbox.claim.<namespace>``: the queue's name on the broker."""
    return f"{base}.{settings.namespace}"


# Task names (contract: DESIGN 7). The tasks themselves are in outbox_tasks.tasks.
CLAIM_TASK = "outbox.claim"
PUBLISH_TASK = "outbox.publish"
DEAD_LETTER_TASK = "outbox.dead_letter"
CLEANUP_TASK = "outbox.cleanup"
EXPORT_METRICS_TASK = "outbox.export_metrics"
# What a worker imports on start: the tasks, and the runtime with its signals, bootstep and
# control commands. Processes that only send tasks or read state (beat, Flower, the CLI) don't.
WORKER_MODULES = ("outbox_tasks.tasks", "outbox_tasks.worker")
# The longest a cleanup run goes on before it stops by itself (the next run resumes).
CLEANUP_MAX_SECONDS = 900.0


def load_settings() -> Settings:
    """Settings for a Celery process; a bad value stops it with one line naming the variable."""
    try:
        return Settings.from_env()
    except ConfigurationError as error:
        sys.stderr.write(f"outbox_tasks: configuration error: {error}\n")
        raise SystemExit(2) from None


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    return {
        CLAIM_TASK: {
            "task": CLAIM_TASK,
            "schedule": timedelta(seconds=settings.poll_interval_seconds),
            "options": {"expires": max(settings.poll_interval_seconds * 3, 1.0)},
        },
        EXPORT_METRICS_TASK: {
            "task": EXPORT_METRICS_TASK,
            "schedule": timedelta(seconds=settings.metrics_interval_seconds),
            "options": {"expires": settings.metrics_interval_seconds * 2},
        },
        CLEANUP_TASK: {
            "task": CLEANUP_TASK,
            "schedule": timedelta(seconds=settings.cleanup_interval_seconds),
            "options": {"expires": settings.cleanup_interval_seconds},
        },
        DEAD_LETTER_TASK: {
            "task": DEAD_LETTER_TASK,
            "schedule": timedelta(seconds=settings.dead_letter_interval_seconds),
            "options": {"expires": settings.dead_letter_interval_seconds * 3},
        },
    }


def cleanup_budget(settings: Settings) -> float:
    """Seconds one ``outbox.cleanup`` run may work: its interval, at most CLEANUP_MAX_SECONDS."""
    return min(settings.cleanup_interval_seconds, CLEANUP_MAX_SECONDS)


def task_time_limits(settings: Settings) -> dict[str, dict[str, float]]:
    """Hard time limits (``task_annotations``), derived from the lease, the publish budget and
    the database statement deadline. A relay task past lease + budget + one statement deadline
    has lost its lease (it was renewed at the latest when its last batch began), so killing
    its process loses nothing: another worker resends, marked redelivered. Hard limits only:
    a soft limit's exception could surface inside the publisher as a message's own error."""
    deadline = statement_deadline(settings)
    relay = settings.lease_seconds + settings.publish_task_seconds + deadline
    maintenance = settings.lease_seconds + deadline
    return {
        CLAIM_TASK: {"time_limit": relay},
        PUBLISH_TASK: {"time_limit": relay},
        DEAD_LETTER_TASK: {"time_limit": maintenance},
        EXPORT_METRICS_TASK: {"time_limit": maintenance},
        CLEANUP_TASK: {"time_limit": cleanup_budget(settings) + deadline + 60.0},
    }


def broker_connection(settings: Settings) -> dict[str, Any]:
    """Celery settings that put a deadline on every wait on its broker
    (``OUTBOX_CELERY_BROKER_TIMEOUT_SECONDS``, keepalives from
    ``OUTBOX_TCP_USER_TIMEOUT_SECONDS``)."""
    timeout = settings.celery_broker_timeout_seconds
    transport: dict[str, Any] = {"visibility_timeout": 3600}
    if is_amqp(settings.broker_url):
        # py-amqp sets keepalives and TCP_USER_TIMEOUT itself; heartbeats find a silent peer.
        transport["write_timeout"] = timeout
    else:
        transport.update(
            {
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                "socket_keepalive": True,
                "socket_keepalive_options": tcp_keepalive_options(
                    settings.tcp_user_timeout_seconds
                ),
                # kombu drops a BRPOP connection whose reply is this much overdue.
                "health_check_interval": max(1, round(timeout)),
            }
        )
    return {
        "broker_transport_options": transport,
        "broker_connection_timeout": timeout,
        "broker_pool_acquire_timeout": timeout,
        "broker_heartbeat": max(2, round(2 * timeout)),
        # One retry covers a pooled connection gone stale; more would only hold a claim's
        # lease (and beat) longer while the broker is away.
        "task_publish_retry_policy": {
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    names = {base: queue_name(base, settings) for base in QUEUES}
    queues = [
        Queue(name, Exchange(name, type="direct"), routing_key=name) for name in names.values()
    ]
    return {
        "broker_url": settings.broker_url,
        "include": list(WORKER_MODULES),
        "broker_connection_retry_on_startup": True,
        **broker_connection(settings),
        "task_annotations": task_time_limits(settings),
        "task_queues": queues,
        "task_default_queue": names[MAINTENANCE_QUEUE],
        "task_routes": {
            CLAIM_TASK: {"queue": names[CLAIM_QUEUE]},
            PUBLISH_TASK: {"queue": names[PUBLISH_QUEUE]},
            "outbox.*": {"queue": names[MAINTENANCE_QUEUE]},
        },
        # Remote control (status, the metrics snapshot) and task events (Flower) per deployment
        # too: a broadcast of one deployment never reaches another's workers.
        "control_exchange": f"outbox.{settings.namespace}",
        "event_exchange": f"outbox.{settings.namespace}.events",
        "task_acks_late": False,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "beat_schedule": beat_schedule(settings),
        "timezone": "UTC",
        "enable_utc": True,
    }


def apply_user_config(config: dict[str, Any], module_path: str) -> dict[str, Any]:
    """Overlay a user's Celery config module; beat entries merge by name, ``include`` adds the
    user's modules to ours (the relay's tasks stay registered)."""
    try:
        module = importlib.import_module(module_path)
    except ImportError as error:
        raise ConfigurationError(
            f"OUTBOX_CELERY_CONFIG={module_path!r} is not valid: cannot import it ({error})"
        ) from None
    merged = dict(config)
    for key, value in vars(module).items():
        if key.startswith("_") or not key.islower():
            continue
        if key == "beat_schedule":
            merged["beat_schedule"] = {**config["beat_schedule"], **value}
        elif key == "include":
            merged["include"] = list(dict.fromkeys([*config["include"], *value]))
        else:
            merged[key] = value
    return merged


def create_app(settings: Settings) -> Celery:
    """The Celery app configured from ``settings`` (and OUTBOX_CELERY_CONFIG); a worker imports
    WORKER_MODULES when it starts."""
    celery_app = Celery("outbox_tasks")
    config = celery_config(settings)
    if settings.celery_config:
        config = apply_user_config(config, settings.celery_config)
    celery_app.conf.update(config)
    return celery_app


@celeryd_after_setup.connect
def _map_worker_queues(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """``-Q outbox.claim,...`` means this deployment's queues (``outbox.claim.<namespace>``):
    the names operators know keep working on a shared broker (Celery's documented hook for
    changing queues after -Q was applied)."""
    queues = instance.app.amqp.queues
    selected = queues.consume_from or {}
    for base in QUEUES:
        if base in selected and base != queue_name(base, settings):
            queues.deselect(base)
            queues.select_add(queues[queue_name(base, settings)])


@before_task_publish.connect
def _stamp_namespace(
    sender: str | None = None, headers: dict[str, Any] | None = None, **kwargs: Any
) -> None:
    """Every relay task says which deployment sent it (checked by the worker). A stamp the
    sender set itself is kept: Celery signals are process-wide, so another app in this process
    (a test's, a user's) must not have its tasks re-stamped with this process's namespace."""
    if headers is not None and isinstance(sender, str) and sender.startswith("outbox."):
        headers.setdefault(NAMESPACE_HEADER, settings.namespace)


# Built once per process; the worker runtime (outbox_tasks.worker) takes them from here.
settings = load_settings()
try:
    app = create_app(settings)
    install_configured(app, settings)
except ConfigurationError as _error:
    sys.stderr.write(f"outbox_tasks: configuration error: {_error}\n")
    raise SystemExit(2) from None
