"""Shared bench plumbing: isolated databases and Redis dbs, bulk loading, counting at the broker,
real Celery clusters, statistics, markdown tables and the JSON results file.

Every bench runs against the shared services with names of its own (a fresh database cloned from
a migrated template per run, a locked Redis database number, unique RabbitMQ exchange and queue
names), so it can run next to other people's test runs. Results are ratios against a baseline
measured in the same process, alternating, because these machines are small and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from outbox_tasks.settings import Settings
from tests.support import services
from tests.support.cluster import Cluster

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
AMQP_URL = services.AMQP_URL
BROKERS = ("redis", "amqp")

# The relay settings every bench uses unless told otherwise (printed with the results): the
# defaults a new user gets (OUTBOX_* unset), so the figures are what an installation sees.
_DEFAULT = Settings()
RELAY_DEFAULTS: dict[str, Any] = {
    "batch_size": _DEFAULT.batch_size,
    "partitions": _DEFAULT.partitions,
    "poll_interval_seconds": _DEFAULT.poll_interval_seconds,
    "publish_task_seconds": _DEFAULT.publish_task_seconds,
    "lease_seconds": _DEFAULT.lease_seconds,
    "cleanup_mode": _DEFAULT.cleanup_mode,
    "wakeup_enabled": _DEFAULT.wakeup_enabled,
    "wakeup_debounce_seconds": _DEFAULT.wakeup_debounce_seconds,
}


# --- environment: databases, Redis, versions ----------------------------------------------------


@dataclass
class BenchEnv:
    """A migrated template database and a Redis database number owned by this bench process."""

    template: str
    redis_db: int

    @property
    def redis_url(self) -> str:
        return f"redis://{services.REDIS_HOST}:{services.REDIS_PORT}/{self.redis_db}"

    def redis(self) -> redis.Redis[bytes]:
        return redis.Redis(host=services.REDIS_HOST, port=services.REDIS_PORT, db=self.redis_db)

    def flush_redis(self) -> None:
        client = self.redis()
        try:
            client.flushdb()
        finally:
            client.close()

    @contextmanager
    def database(self) -> Iterator[str]:
        """A fresh database (a file copy of the template), dropped afterwards."""
        with services.fresh_database(self.template) as url:
            yield url


@contextmanager
def bench_env(need_amqp: bool = False) -> Iterator[BenchEnv]:
    missing = [
        name
        for name, host, port, needed in (
            ("PostgreSQL", "127.0.0.1", 5432, True),
            ("Redis", services.REDIS_HOST, services.REDIS_PORT, True),
            ("RabbitMQ", "127.0.0.1", 5672, need_amqp),
        )
        if needed and not services.reachable(host, port)
    ]
    if missing:
        raise SystemExit(f"bench: not reachable: {', '.join(missing)} (see README)")
    with services.template_database() as template, services.redis_database() as number:
        yield BenchEnv(template=template, redis_db=number)


def versions(database_url: str | None = None, need_amqp: bool = False) -> dict[str, Any]:
    """Library and server versions, the commit, and the machine: stored with every result."""
    libs: dict[str, str | None] = {}
    for dist in (
        "outbox_tasks",
        "celery",
        "kombu",
        "amqp",
        "redis",
        "psycopg",
        "psycopg-binary",
        "SQLAlchemy",
    ):
        try:
            libs[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            libs[dist] = None
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "libraries": libs,
        "git": _git(),
    }
    with (
        contextlib.suppress(Exception),
        psycopg.connect(database_url or services.PG_ADMIN_URL, connect_timeout=5) as conn,
    ):
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('shared_buffers'), "
            "current_setting('synchronous_commit')"
        ).fetchone()
        assert row is not None
        out["postgresql"] = {
            "version": row[0],
            "shared_buffers": row[1],
            "synchronous_commit": row[2],
        }
    with contextlib.suppress(Exception):
        client = redis.Redis(host=services.REDIS_HOST, port=services.REDIS_PORT, socket_timeout=5)
        out["redis"] = client.info("server").get("redis_version")
        client.close()
    if need_amqp:
        with contextlib.suppress(Exception):
            from kombu import Connection

            with Connection(AMQP_URL, connect_timeout=5) as conn:
                conn.connect()
                props = conn.connection.server_properties
                version = props.get("version")
                out["rabbitmq"] = version.decode() if isinstance(version, bytes) else version
    return out


def _git() -> dict[str, Any]:
    def run(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "commit": run("rev-parse", "HEAD") or None,
        "dirty": bool(run("status", "--porcelain", "--", "outbox_tasks", "bench", "migrations")),
    }


def machine_load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --- relay settings and real Celery clusters -------------------------------------------------


def relay_settings(
    *,
    database_url: str,
    broker_url: str,
    publish_url: str | None,
    exchange: str,
    **overrides: Any,
) -> Settings:
    values = {**RELAY_DEFAULTS, **overrides}
    return Settings.from_env(
        {},
        database_url=database_url,
        broker_url=broker_url,
        publish_url=publish_url,
        exchange=exchange,
        dead_letter_exchange=exchange + ".dead",
        metrics_port=0,
        **values,
    )


def add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--partitions``, ``--poll`` (defaults: a new installation's)."""
    parser.add_argument("--batch-size", type=int, default=RELAY_DEFAULTS["batch_size"])
    parser.add_argument("--partitions", type=int, default=RELAY_DEFAULTS["partitions"])
    parser.add_argument(
        "--poll",
        type=float,
        default=RELAY_DEFAULTS["poll_interval_seconds"],
        help="OUTBOX_POLL_INTERVAL_SECONDS (the beat tick)",
    )


def relay_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "batch_size": args.batch_size,
        "partitions": args.partitions,
        "poll_interval_seconds": args.poll,
    }


def settings_summary(settings: Settings) -> dict[str, Any]:
    """The relay settings worth printing (no URLs)."""
    keys = (
        "batch_size",
        "partitions",
        "poll_interval_seconds",
        "publish_task_seconds",
        "lease_seconds",
        "cleanup_mode",
        "wakeup_enabled",
        "wakeup_debounce_seconds",
    )
    return {k: getattr(settings, k) for k in keys}


@contextmanager
def celery_cluster(
    settings: Settings, *, keep_logs: Path | None = None, pythonpath: str | None = None
) -> Iterator[Cluster]:
    """Real ``celery worker``/``beat`` subprocesses (tests.support.cluster), always stopped.

    ``pythonpath`` is put first on the workers' PYTHONPATH: a directory holding another
    ``outbox_tasks`` package (a candidate change) runs instead of the installed one."""
    with tempfile.TemporaryDirectory(prefix="outbox-bench-") as tmp:
        workdir = Path(tmp)
        extra = {}
        if pythonpath:
            extra["PYTHONPATH"] = os.pathsep.join(
                p for p in (pythonpath, os.environ.get("PYTHONPATH", "")) if p
            )
        c = Cluster(settings, workdir, **extra)
        try:
            yield c
        except BaseException:
            sys.stderr.write(c.logs())
            raise
        finally:
            c.stop_all()
            if keep_logs is not None:
                keep_logs.mkdir(parents=True, exist_ok=True)
                for log in workdir.glob("*.log"):
                    (keep_logs / log.name).write_bytes(log.read_bytes())


def send_claim(settings: Settings) -> None:
    """Exactly what a beat tick sends: ``outbox.claim`` for every partition."""
    from outbox_tasks.celery import create_app

    app = create_app(settings)
    try:
        app.send_task("outbox.claim", queue="outbox.claim")
    finally:
        app.close()


def start_py_spy(pid: int, output: Path) -> Any:
    """Sample a process and its children (wall clock, idle included) into ``output``."""
    import shutil

    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    output.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(output),
            "--nonblocking",
            "--idle",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_py_spy(proc: Any) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


# --- CPU accounting: a load-independent efficiency measure --------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads) so far; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its direct children (a celery worker and its pool)."""
    return proc_cpu_seconds(pid) + sum(proc_cpu_seconds(c) for c in children(pid))


def proc_memory_kib(pid: int) -> dict[str, int]:
    """Resident memory of one process in KiB: ``rss`` (every resident page, shared ones
    included), ``pss`` (shared pages divided among the processes sharing them: what the process
    really costs) and ``uss`` (its private pages). Empty when the process is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "Rss":
                    out["rss"] = int(rest.split()[0])
                elif key == "Pss":
                    out["pss"] = int(rest.split()[0])
                elif key in ("Private_Clean", "Private_Dirty"):
                    out["uss"] = out.get("uss", 0) + int(rest.split()[0])
    except OSError:
        return {}
    return out


def tree_memory_mib(pid: int) -> dict[str, Any]:
    """Memory of a process and its direct children (a celery worker and its pool), in MiB:
    the sums of ``rss``, ``pss`` and ``uss`` and each process's own figures."""
    procs = {p: proc_memory_kib(p) for p in [pid, *children(pid)]}
    procs = {p: m for p, m in procs.items() if m}
    total = {
        key: round(sum(m.get(key, 0) for m in procs.values()) / 1024, 1)
        for key in ("rss", "pss", "uss")
    }
    return {
        **total,
        "processes": len(procs),
        "each": {str(p): {k: round(v / 1024, 1) for k, v in m.items()} for p, m in procs.items()},
    }


def backend_cpu_seconds(database_url: str, application_prefix: str = "outbox_tasks") -> float:
    """CPU of the PostgreSQL backends serving ``application_prefix*`` connections to the
    database of ``database_url`` (the server runs on this machine)."""
    dbname = database_url.rsplit("/", 1)[1]
    with psycopg.connect(database_url, autocommit=True) as conn:
        pids = [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name LIKE %s",
                (dbname, application_prefix + "%"),
            )
        ]
    return sum(proc_cpu_seconds(p) for p in pids)


# --- events: payloads and bulk load ----------------------------------------------------------

_PAD = "x" * 400


def payload_json(i: int, size: int = 300) -> str:
    """A JSON payload of ``size`` bytes (about), deterministic in ``i``."""
    head = (
        f'{{"order_id":"ord-{i:09d}","customer_id":"cus-{i % 7919:06d}",'
        f'"currency":"EUR","total_cents":{(i * 37) % 100000},"lines":{i % 9 + 1},"note":"'
    )
    pad = max(0, size - len(head) - 2)
    return head + _PAD[:pad] + '"}'


def copy_events(
    database_url: str,
    count: int,
    aggregates: int,
    *,
    prefix: str = "A",
    aggregate_type: str = "Order",
    event_type: str = "OrderCreated",
    payload_bytes: int = 300,
    start: int = 0,
) -> float:
    """Bulk-load ``count`` pending events round-robin over ``aggregates`` aggregates with COPY,
    in one transaction. Returns the seconds it took."""
    started = time.perf_counter()
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY outbox (aggregate_type, aggregate_id, event_type, payload) FROM STDIN"
        ) as copy:
            for i in range(start, start + count):
                copy.write_row(
                    (
                        aggregate_type,
                        f"{prefix}{i % aggregates}",
                        event_type,
                        payload_json(i, payload_bytes),
                    )
                )
        conn.commit()
    return time.perf_counter() - started


def pending(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
        assert row is not None
        return int(row[0])


def wait_pending_zero(database_url: str, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        left = pending(database_url)
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# --- counting at the broker: a queue bound to the exchange ----------------------------------


class Sink:
    """A queue bound to the exchange with ``#``; counts what actually arrived."""

    broker: str
    url: str
    exchange: str
    queue: str

    def count(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class RedisSink(Sink):
    """kombu's Redis virtual topic exchange: the binding lives in ``_kombu.binding.<exchange>``
    and a message routed to the queue is an LPUSH on the list named after it. Counted with LLEN."""

    broker = "redis"

    def __init__(self, url: str, exchange: str, queue: str | None = None) -> None:
        from kombu import Connection, Exchange, Queue

        self.url = url
        self.exchange = exchange
        self.queue = queue or f"bench.q.{uuid.uuid4().hex[:8]}"
        self._conn = Connection(url)
        ex = Exchange(exchange, type="topic", durable=True)
        self._kqueue = Queue(self.queue, ex, routing_key="#", durable=True)
        self._kqueue(self._conn.default_channel).declare()
        self._client = redis.Redis.from_url(url)

    def count(self) -> int:
        return int(self._client.llen(self.queue))

    def clear(self) -> None:
        self._client.delete(self.queue)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._kqueue(self._conn.default_channel).delete()
            self._client.delete(self.queue)
        self._conn.release()
        self._client.close()


class AmqpSink(Sink):
    """A durable RabbitMQ queue bound to the (durable topic) exchange; counted with a passive
    ``queue_declare`` (message_count). Queue and exchange are deleted on close."""

    broker = "amqp"

    def __init__(self, url: str, exchange: str, queue: str | None = None) -> None:
        from kombu import Connection, Exchange, Queue

        self.url = url
        self.exchange = exchange
        self.queue = queue or f"bench.q.{uuid.uuid4().hex[:8]}"
        self._conn = Connection(url)
        self._channel = self._conn.channel()
        self._kexchange = Exchange(exchange, type="topic", durable=True)
        self._kqueue = Queue(self.queue, self._kexchange, routing_key="#", durable=True)
        self._kqueue(self._channel).declare()

    def count(self) -> int:
        result = self._channel.queue_declare(queue=self.queue, passive=True)
        return int(result.message_count)

    def clear(self) -> None:
        self._channel.queue_purge(self.queue)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._kqueue(self._channel).delete()
            self._kexchange(self._channel).delete()
        with contextlib.suppress(Exception):
            self._channel.close()
        self._conn.release()


def make_sink(broker: str, env: BenchEnv, exchange: str) -> Sink:
    if broker == "redis":
        return RedisSink(env.redis_url, exchange)
    if broker == "amqp":
        return AmqpSink(AMQP_URL, exchange)
    raise ValueError(broker)


def publish_url(broker: str, env: BenchEnv) -> str:
    return env.redis_url if broker == "redis" else AMQP_URL


def wait_count(
    sink: Sink,
    target: int,
    *,
    timeout: float,
    interval: float = 0.01,
    alive: Callable[[], bool] | None = None,
) -> float | None:
    """Poll the broker until ``target`` messages are there; the monotonic time it happened,
    or None after ``timeout`` (or when ``alive()`` says the publishers are gone)."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        if sink.count() >= target:
            return now
        if alive is not None and not alive():
            # The publishers are gone: what they sent is all there is (count once more).
            return time.monotonic() if sink.count() >= target else None
        if now > deadline:
            return None
        time.sleep(interval)


def unique_name(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


# --- statistics and output -------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    widths = [len(h) for h in headers]
    cells = [[str(c) for c in row] for row in rows]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    return "\n".join([line, sep, *body])


@dataclass
class Results:
    """What a bench writes: settings, versions, raw runs, summary."""

    name: str
    argv: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    summary: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    load_start: list[float] = field(default_factory=machine_load)

    def write(self, output: Path | None, versions_info: dict[str, Any]) -> Path:
        path = output or RESULTS_DIR / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "bench": self.name,
            "command": "python -m bench " + " ".join([self.name, *self.argv]),
            "started": self.started,
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "load_average": {"start": self.load_start, "end": machine_load()},
            "versions": versions_info,
            "settings": self.settings,
            "summary": self.summary,
            "runs": self.runs,
            "notes": self.notes,
        }
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        return path


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON results file (default: bench/results/<name>.json)",
    )


def log(message: str) -> None:
    """Progress to stderr (stdout is the markdown table)."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def csv_ints(raw: str) -> list[int]:
    return [int(x) for x in raw.split(",") if x.strip()]


def csv_choices(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(raw: str) -> list[str]:
        values = [x.strip() for x in raw.split(",") if x.strip()]
        bad = [v for v in values if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"expected a subset of {','.join(choices)}")
        return values

    return parse
