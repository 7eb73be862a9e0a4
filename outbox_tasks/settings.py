"""One typed, frozen settings object, loaded from ``OUTBOX_*`` environment variables.

Every field maps to ``OUTBOX_<FIELD NAME IN UPPER CASE>``. Values are checked when they are
loaded, so a bad value stops a process at start with one line that names the variable, the
value and what is expected, instead of failing later inside a task.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from outbox_tasks.errors import ConfigurationError
from outbox_tasks.limits import DEFAULT_MAX_MESSAGE_BYTES
from outbox_tasks.parsers import Invalid as _Invalid
from outbox_tasks.parsers import boolean as _bool
from outbox_tasks.parsers import choice as _choice
from outbox_tasks.parsers import event_type_policies as _event_type_policies
from outbox_tasks.parsers import integer as _int
from outbox_tasks.parsers import name as _name
from outbox_tasks.parsers import optional_url as _optional_url
from outbox_tasks.parsers import seconds as _seconds
from outbox_tasks.parsers import string as _string
from outbox_tasks.parsers import url as _url
from outbox_tasks.redaction import redact_url

ENV_PREFIX = "OUTBOX_"
SLOT_COUNT = 1024  # fixed slot range (DESIGN 4.2); partitions are contiguous slot ranges

CLEANUP_MODES = ("delete", "retain", "archive")
DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp")


def _setting(default: Any, parse: Callable[[str], Any], doc: str, *, url: bool = False) -> Any:
    """A field with its parser and doc; ``url``: shown with the password hidden
    (``redact_url``). A default of None on a non-optional field means "derived from other
    settings" (see ``DERIVED``)."""
    metadata = {"parse": parse, "doc": doc, "url": url}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything an outbox_tasks process can be told. Build it with :meth:`from_env`."""

    database_url: str = _setting(
        "postgresql://postgres@127.0.0.1:5432/outbox",
        _url(*DATABASE_SCHEMES),
        "PostgreSQL holding the outbox table (the source of truth for every lease and state).",
        url=True,
    )
    broker_url: str = _setting(
        "redis://127.0.0.1:6379/0",
        _url(*BROKER_SCHEMES),
        "Celery's broker: where claim, publish and maintenance tasks are queued.",
        url=True,
    )
    publish_url: str | None = _setting(
        None,
        _optional_url(*BROKER_SCHEMES),
        "Where events are published (Redis or RabbitMQ). Empty: the broker URL.",
        url=True,
    )
    exchange: str = _setting(
        "outbox.events",
        _name,
        "Topic exchange events are published to; routing key `<aggregate_type>.<event_type>`.",
    )
    dead_letter_exchange: str = _setting(
        "outbox.dead", _name, "Topic exchange dead-lettered copies are published to."
    )
    partitions: int = _setting(
        8,
        _int(1, SLOT_COUNT),
        "Number of partitions (one live lease each). More partitions, more parallel publishers.",
    )
    batch_size: int = _setting(500, _int(1, 10_000), "Rows per publish batch.")
    poll_interval_seconds: float = _setting(
        1.0, _seconds(), "Beat tick for claims: the latency bound when the wake-up path is off."
    )
    lease_seconds: float = _setting(
        30.0,
        _seconds(),
        "How long a partition lease lives without renewal; a killed worker's rows are re-sent "
        "after it.",
    )
    publish_task_seconds: float = _setting(
        None,
        _seconds(),
        "How long one publish task drains (wake-up off) or serves (wake-up on) before handing "
        "over; with wake-up on its busy partitions pass on to a continuation task, leases kept, "
        "and a chain of six ends with every lease handed back (fairness). "
        "Default: 5, or half of OUTBOX_LEASE_SECONDS when that is under 10.",
    )
    max_retries: int = _setting(
        5, _int(0, 1000), "Message-specific failures before a message is dead-lettered."
    )
    backoff_base_seconds: float = _setting(
        1.0, _seconds(), "First retry delay; doubles on every failure (with jitter)."
    )
    backoff_max_seconds: float = _setting(
        None,
        _seconds(),
        "Cap on the retry delay. Default: 300, or OUTBOX_BACKOFF_BASE_SECONDS when that is more.",
    )
    max_message_bytes: int = _setting(
        DEFAULT_MAX_MESSAGE_BYTES,
        _int(1024, 512 * 1024 * 1024),
        "Largest message body the broker takes (RabbitMQ's max_message_size, 128 MiB by "
        "default); a bigger row is dead-lettered instead of sent. Bounds Redis too.",
    )
    backpressure_max_seconds: float = _setting(
        300.0,
        _seconds(allow_zero=True),
        "How long a message the broker nacks (a bound queue is full) keeps being retried, "
        "without spending its retries, before it is dead-lettered (reason broker_nack).",
    )
    broker_timeout_seconds: float = _setting(
        5.0,
        _seconds(),
        "Connect, call and confirm timeout when publishing events to the broker (a silent "
        "connection is given up after it, then the circuit retries).",
    )
    celery_broker_timeout_seconds: float = _setting(
        5.0,
        _seconds(),
        "Celery's own broker connections (workers, beat, the CLI): connect, each command, taking "
        "a pooled connection; also the Redis health-check interval (a consumer without its reply "
        "for 1 s + this is reconnected) and half the AMQP heartbeat.",
    )
    circuit_max_seconds: float = _setting(
        5.0, _seconds(), "Longest pause between attempts while the broker is down."
    )
    stall_seconds: float = _setting(
        None,
        _seconds(),
        "How long due rows may wait while nothing is published before `outbox-tasks status` "
        "calls the relay stalled (keep the OutboxRelayStalled alert in step). Default: 120, or "
        "4 x OUTBOX_LEASE_SECONDS when that is longer.",
    )
    wakeup_enabled: bool = _setting(
        True, _bool, "Listen for NOTIFY from the outbox trigger and claim at once (low latency)."
    )
    wakeup_debounce_seconds: float = _setting(
        0.005, _seconds(allow_zero=True), "Gather NOTIFYs this long before enqueueing claims."
    )
    cleanup_mode: str = _setting(
        "retain",
        _choice(*CLEANUP_MODES),
        "What happens to published rows: delete (at once), retain (for the retention), archive.",
    )
    retention_seconds: float = _setting(
        7 * 24 * 3600.0, _seconds(), "How long published rows are kept in retain/archive mode."
    )
    receipt_retention_seconds: float = _setting(
        30 * 24 * 3600.0,
        _seconds(),
        "How long consumer receipts are kept (a redelivery older than this is handled again).",
    )
    archive_url: str = _setting(
        "",
        _string,
        "Where archive mode writes compressed JSON-lines files (a directory).",
        url=True,
    )
    cleanup_interval_seconds: float = _setting(
        86400.0, _seconds(), "Beat interval of outbox.cleanup."
    )
    dead_letter_interval_seconds: float = _setting(
        10.0, _seconds(), "Beat interval of outbox.dead_letter."
    )
    metrics_interval_seconds: float = _setting(
        15.0, _seconds(), "Beat interval of outbox.export_metrics."
    )
    event_type_policies: dict[str, str] = _setting(
        {},
        _event_type_policies,
        "Per event type dead-letter policy, `Type=skip` does not park the aggregate.",
    )
    metrics_port: int = _setting(
        9808, _int(0, 65535), "Port of the Prometheus endpoint served by workers (0: off)."
    )
    namespace: str = _setting(
        None,
        _name,
        "This deployment's name on a shared broker: its relay queues are outbox.claim.<name>, "
        "... Default: the database name. Deployments sharing a broker need different ones.",
    )
    celery_config: str = _setting(
        "",
        _string,
        "Python module with Celery settings applied over ours (beat entries merge by name).",
    )
    application_name: str = _setting(
        "outbox_tasks", _name, "PostgreSQL application_name of every connection."
    )
    statement_timeout_seconds: float = _setting(
        30.0, _seconds(), "PostgreSQL statement_timeout for relay connections."
    )
    lock_timeout_seconds: float = _setting(
        5.0, _seconds(), "PostgreSQL lock_timeout for relay connections."
    )
    idle_in_transaction_timeout_seconds: float = _setting(
        60.0, _seconds(), "PostgreSQL idle_in_transaction_session_timeout."
    )
    database_connect_timeout_seconds: float = _setting(
        5.0,
        _seconds(),
        "Deadline for connecting to PostgreSQL (2 at least, libpq's minimum), and for the "
        "liveness ping before a pooled connection is reused.",
    )
    database_deadline_grace_seconds: float = _setting(
        5.0,
        _seconds(),
        "How long past OUTBOX_STATEMENT_TIMEOUT_SECONDS a database call may stay unanswered "
        "before its connection is closed (the server's own timeout error never came back).",
    )
    tcp_user_timeout_seconds: float = _setting(
        30.0,
        _seconds(allow_zero=True),
        "Kernel-level bound on a silent peer (PostgreSQL, Celery's Redis broker): "
        "unacknowledged data gives up after it (tcp_user_timeout) and keepalive probes start "
        "after a third of it (0: the kernel's defaults).",
    )
    wakeup_database_url: str | None = _setting(
        None,
        _optional_url(*DATABASE_SCHEMES),
        "Where the wake-up listener connects (LISTEN needs a session of its own: point it past "
        "a transaction-pooling PgBouncer). Empty: the database URL.",
        url=True,
    )
    wakeup_probe_interval_seconds: float = _setting(
        5.0,
        _seconds(),
        "How often an idle wake-up listener proves its connection alive (a ping with the "
        "connect deadline); a failed probe reconnects at once.",
    )

    def __post_init__(self) -> None:
        for name, rule in DERIVED.items():
            if getattr(self, name) is None:
                # Frozen: this is the one place a value is filled in after construction.
                object.__setattr__(self, name, rule(self))

    def __repr__(self) -> str:
        # Settings end up in logs and tracebacks: never with a password.
        fields = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["url"] and value:
                value = redact_url(value)
            fields.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(fields)})"

    def printable(self) -> dict[str, str]:
        """Field name -> value as written in its variable, URL passwords hidden: what may be
        printed or logged (``outbox-tasks config``)."""
        result = {}
        for f in dataclasses.fields(self):
            shown = _show(getattr(self, f.name))
            result[f.name] = redact_url(shown) if f.metadata["url"] and shown else shown
        return result

    @property
    def effective_publish_url(self) -> str:
        """Where events go: ``publish_url`` or, when unset, the broker URL."""
        return self.publish_url or self.broker_url

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL with the psycopg 3 driver, whatever scheme the user wrote."""
        scheme, rest = self.database_url.split("://", 1)
        return (
            f"postgresql+psycopg://{rest}" if scheme != "postgresql+psycopg" else self.database_url
        )

    @property
    def libpq_url(self) -> str:
        """The database URL as libpq (psycopg) reads it."""
        return "postgresql://" + self.database_url.split("://", 1)[1]

    @property
    def wakeup_libpq_url(self) -> str:
        """Where the wake-up listener connects, as libpq reads it."""
        url = self.wakeup_database_url or self.database_url
        return "postgresql://" + url.split("://", 1)[1]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Load from ``OUTBOX_*`` variables (``os.environ`` by default); ``overrides`` win.

        Raises ConfigurationError naming the first bad variable.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in overrides:
                continue
            var = env_var(f.name)
            raw = env.get(var)
            if raw is None:
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except _Invalid as exc:
                shown = redact_url(raw) if f.metadata["url"] else raw
                raise ConfigurationError(f"{var}={shown!r} is not valid: expected {exc}") from None
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Every value against its own rule (so values given in code are checked like env
        values), then the checks that span several settings."""
        for f in dataclasses.fields(self):
            shown = _show(getattr(self, f.name))
            try:
                f.metadata["parse"](shown)
            except _Invalid as exc:
                printed = redact_url(shown) if f.metadata["url"] else shown
                raise ConfigurationError(
                    f"{env_var(f.name)}={printed!r} is not valid: expected {exc}"
                ) from None
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ConfigurationError(
                f"{env_var('backoff_max_seconds')}={self.backoff_max_seconds} is not valid: "
                f"expected a value >= {env_var('backoff_base_seconds')} "
                f"({self.backoff_base_seconds})"
            )
        if self.publish_task_seconds >= self.lease_seconds:
            raise ConfigurationError(
                f"{env_var('publish_task_seconds')}={self.publish_task_seconds} is not valid: "
                f"expected less than {env_var('lease_seconds')} ({self.lease_seconds}), so a "
                "publish task hands over before its lease can expire"
            )
        for name in ("exchange", "dead_letter_exchange"):
            size = len(getattr(self, name).encode())
            if size > 255:
                raise ConfigurationError(
                    f"{env_var(name)} is {size} bytes long: expected at most 255 (an AMQP "
                    "short string)"
                )
        if self.stall_seconds <= self.lease_seconds:
            raise ConfigurationError(
                f"{env_var('stall_seconds')}={_show(self.stall_seconds)!r} is not valid: "
                f"expected more than {env_var('lease_seconds')} ({_show(self.lease_seconds)}), "
                "so an expiring lease does not look like a stall"
            )
        if self.database_connect_timeout_seconds < 2:
            raise ConfigurationError(
                f"{env_var('database_connect_timeout_seconds')}="
                f"{_show(self.database_connect_timeout_seconds)!r} is not valid: expected 2 or "
                "more (libpq counts anything shorter as 2 seconds)"
            )
        scheme = urlsplit(self.archive_url).scheme
        if self.archive_url and scheme not in ("", "file"):
            raise ConfigurationError(
                f"{env_var('archive_url')}={redact_url(self.archive_url)!r} is not valid: "
                f"{scheme}:// is not "
                "supported; expected a directory path or a file:// URL"
            )
        if self.cleanup_mode == "archive" and not self.archive_url:
            raise ConfigurationError(
                f"{env_var('archive_url')} is empty: expected a directory when "
                f"{env_var('cleanup_mode')}=archive"
            )

    def to_env(self) -> dict[str, str]:
        """The ``OUTBOX_*`` variables that reproduce these settings in another process."""
        env = {}
        for f in dataclasses.fields(self):
            shown = _show(getattr(self, f.name))
            if shown:
                env[env_var(f.name)] = shown
        return env

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with some values changed (validated again). A derived setting that still has
        its derived value follows the settings it depends on again (e.g. a shorter lease also
        shortens the default publish task)."""
        follow = {
            name: None
            for name, rule in DERIVED.items()
            if name not in changes and getattr(self, name) == rule(self)
        }
        settings = dataclasses.replace(self, **{**follow, **changes})
        settings.validate()
        return settings


def _publish_task_default(settings: Settings) -> float:
    # Half the lease leaves the other half for the batch in hand and its marking.
    return min(5.0, settings.lease_seconds / 2)


def _backoff_max_default(settings: Settings) -> float:
    return max(300.0, settings.backoff_base_seconds)


def _stall_default(settings: Settings) -> float:
    # Several leases: a killed worker's partitions coming free do not look like a stall.
    return max(120.0, 4 * settings.lease_seconds)


def database_name(database_url: str) -> str:
    """The database a PostgreSQL URL names (libpq's rules: the path, a ``dbname`` parameter, or
    else the user name)."""
    parts = urlsplit(database_url)
    query = dict(parse_qsl(parts.query))
    return (
        query.get("dbname")
        or unquote(parts.path.lstrip("/"))
        or query.get("user")
        or unquote(parts.username or "")
        or "postgres"
    )


def _namespace_default(settings: Settings) -> str:
    # The database name, not its host: every process of one deployment agrees on it even when
    # they reach the database by different addresses (a pooler, a replica's DNS name). Two
    # databases of the same name on one broker are told apart at start (identity check).
    return (
        re.sub(r"[^A-Za-z0-9_.:-]+", "-", database_name(settings.database_url)).strip("-.")
        or "outbox"
    )


# Settings whose default follows other settings: field -> default given the others. Set alone,
# the settings they depend on never contradict them (issue 11, item 7).
DERIVED: dict[str, Callable[[Settings], Any]] = {
    "publish_task_seconds": _publish_task_default,
    "backoff_max_seconds": _backoff_max_default,
    "stall_seconds": _stall_default,
    "namespace": _namespace_default,
}


def env_var(field_name: str) -> str:
    """``batch_size`` -> ``OUTBOX_BATCH_SIZE``."""
    return ENV_PREFIX + field_name.upper()


def describe() -> list[tuple[str, str, str]]:
    """(env var, default, description) for every setting: the configuration reference."""
    defaults = Settings()
    return [
        (env_var(f.name), _show(getattr(defaults, f.name)), str(f.metadata["doc"]))
        for f in dataclasses.fields(Settings)
    ]


def _show(value: object) -> str:
    """A value as it would be written in its environment variable."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value is None:
        return ""
    return str(value)
