"""A second, throwaway PostgreSQL cluster for tests that need one (dump/restore across clusters).

It uses the server binaries of the same major version as the shared server
(``/usr/lib/postgresql/<major>/bin``), a fresh data directory under the temp directory, a free
port on 127.0.0.1 and trust authentication. PostgreSQL refuses to run as root, so as root the
cluster runs as the ``postgres`` system user that the server's package created. A new cluster's
transaction id counter starts near 730, far behind any shared server that ran a test suite.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from tests.support import services


class ClusterUnavailable(RuntimeError):
    """No server binaries of the right version, or no user to run them as."""


def server_major() -> int:
    with psycopg.connect(services.PG_ADMIN_URL, autocommit=True) as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
    assert row is not None
    return int(row[0]) // 10000


def bin_dir(major: int) -> Path:
    path = Path(f"/usr/lib/postgresql/{major}/bin")
    if not (path / "initdb").exists() or not (path / "pg_ctl").exists():
        raise ClusterUnavailable(f"no PostgreSQL {major} server binaries in {path}")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise ClusterUnavailable("running as root and there is no 'postgres' user") from None
    return {"user": user.pw_uid, "group": user.pw_gid}


@contextmanager
def throwaway_cluster() -> Iterator[str]:
    """Start a new cluster; yield the admin URL of its ``postgres`` database; stop and delete it."""
    binaries = bin_dir(server_major())
    run_as = _run_as()
    root = Path(tempfile.mkdtemp(prefix="outbox-cluster-"))
    data = root / "data"
    data.mkdir()
    if run_as:
        os.chown(root, run_as["user"], run_as["group"])
        os.chown(data, run_as["user"], run_as["group"])
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    options = {"env": env, "cwd": root, "capture_output": True, **run_as}
    started = False
    try:
        subprocess.run(
            [
                str(binaries / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            timeout=120,
            check=True,
            **options,
        )
        server_options = (
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
            "-c fsync=off -c shared_buffers=32MB -c max_connections=40"
        )
        subprocess.run(
            [
                str(binaries / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                server_options,
                "-l",
                str(root / "server.log"),
                "-w",
                "-t",
                "120",
                "start",
            ],
            timeout=150,
            check=True,
            **options,
        )
        started = True
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            with contextlib.suppress(subprocess.SubprocessError):
                subprocess.run(
                    [str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                    timeout=60,
                    check=False,
                    **options,
                )
        shutil.rmtree(root, ignore_errors=True)


def dump_and_restore(source_url: str, admin_url: str, workdir: Path, name: str = "restored") -> str:
    """``pg_dump -Fc`` a database and ``pg_restore`` it into a new database ``name`` of the
    cluster of ``admin_url``; returns the new database's URL."""
    binaries = bin_dir(server_major())
    dump = workdir / f"{name}.dump"
    subprocess.run(
        [str(binaries / "pg_dump"), "-Fc", "-f", str(dump), source_url],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    target = admin_url.rsplit("/", 1)[0] + f"/{name}"
    subprocess.run(
        [str(binaries / "pg_restore"), "--no-owner", "-d", target, str(dump)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return target
