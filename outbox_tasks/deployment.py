"""Deployments that share a broker never act on each other's tasks (DESIGN guarantee 8).

A deployment is one outbox database. Its name on the broker is ``OUTBOX_NAMESPACE`` (by default
the database name): its relay queues (``outbox.claim.<namespace>``, ...), its remote-control and
event exchanges carry it, and every relay task it sends is stamped with it (``celery``).

Two guards on top, for a namespace that two deployments were given by mistake (two databases
called ``outbox`` on different servers, say):

* at start, a worker claims the namespace on its Celery broker (Redis: a key holding the
  database's identity, kept alive while the worker runs). Another database already holding it
  stops the worker with one line naming the conflict and the fix (:class:`NamespaceConflict`);
* every task is checked against the worker's namespace and database before anything is done
  (:func:`foreign_reason`): a task of another deployment is dropped and logged, never acted on.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Final

from sqlalchemy.engine import Engine

from outbox_tasks.broker import is_amqp, redis_client
from outbox_tasks.errors import ConfigurationError
from outbox_tasks.logs import event, get_logger
from outbox_tasks.settings import Settings, env_var
from outbox_tasks.store.reports import database_identity

log = get_logger("deployment")

NAMESPACE_HEADER: Final = "outbox_namespace"
"""Stamped on every relay task sent: the sender's ``OUTBOX_NAMESPACE``."""
DATABASE_HEADER: Final = "outbox_database"
"""Stamped by workers on the tasks they send: the sender's database identity."""
REGISTRY_KEY: Final = "outbox:namespace:{namespace}"
REGISTRY_TTL_SECONDS: Final = 60


class NamespaceConflict(ConfigurationError):
    """Another database's deployment uses this namespace on the same broker."""


def identify(engine: Engine) -> str:
    """The identity of the outbox database (``<system identifier>/<database>``)."""
    with engine.connect() as conn:
        return database_identity(conn)


def claim_namespace(settings: Settings, identity: str) -> bool:
    """Hold ``settings.namespace`` on the Celery broker for ``identity`` for a while; call again
    to keep it. Raises :class:`NamespaceConflict` when another database holds it. Returns False
    when the broker cannot hold names (RabbitMQ: there, give each deployment its own vhost or
    namespace; the per-task check still refuses foreign tasks)."""
    if is_amqp(settings.broker_url):
        return False
    key = REGISTRY_KEY.format(namespace=settings.namespace)
    with redis_client(settings.broker_url, socket_timeout=5, socket_connect_timeout=5) as client:
        if client.set(key, identity, nx=True, ex=REGISTRY_TTL_SECONDS):
            return True
        holder = client.get(key)
        holder = holder.decode() if isinstance(holder, bytes) else holder
        if holder not in (None, identity):
            raise NamespaceConflict(
                f"{env_var('namespace')}={settings.namespace!r} is already used on this broker "
                f"by another database ({holder}; this one is {identity}): give each deployment "
                f"sharing the broker its own {env_var('namespace')}"
            )
        client.set(key, identity, ex=REGISTRY_TTL_SECONDS)
        return True


class NamespaceLease:
    """Keeps the namespace claimed while the worker runs (a thread refreshing it)."""

    def __init__(self, settings: Settings, identity: str) -> None:
        self.settings = settings
        self.identity = identity
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-namespace", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(REGISTRY_TTL_SECONDS / 3):
            try:
                claim_namespace(self.settings, self.identity)
            except NamespaceConflict as error:
                event(log, logging.ERROR, "namespace_conflict", str(error))
            except Exception as error:  # the broker is away: the next round tries again
                event(
                    log,
                    logging.WARNING,
                    "namespace_refresh_failed",
                    "could not refresh the namespace claim",
                    error=str(error),
                )


def foreign_reason(request: Any, settings: Settings, identity: str | None) -> str | None:
    """Why a task must not be acted on here (it belongs to another deployment), or None.

    ``request`` is the task's Celery request; tasks without stamps (sent by an older version, or
    by hand) are accepted."""
    namespace = getattr(request, NAMESPACE_HEADER, None)
    if namespace is not None and namespace != settings.namespace:
        return f"sent by deployment {namespace!r}; this worker is {settings.namespace!r}"
    database = getattr(request, DATABASE_HEADER, None)
    if database is not None and identity is not None and database != identity:
        return (
            f"sent by a worker of database {database}; this worker's is {identity} (same "
            f"{env_var('namespace')} {settings.namespace!r} on one broker: give each its own)"
        )
    return None
