"""The demo's guard: a child process that cleans up after the demo if it dies without doing it
(SIGKILL, a crash)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from outbox_tasks.demo.processes import RunAs, child_argv, group_alive, parent_gone, stop_child


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
            child_argv("guard", "--parent", str(os.getpid()), "--file", path),
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
            stop_child(self._proc, 5)
            self._proc = None
        self.path.unlink(missing_ok=True)


def watch(parent: int, file: Path) -> int:
    """The guard process: wait until ``parent`` is gone, then clean up what ``file`` lists
    (kill process groups, stop PostgreSQL, delete paths). SIGTERM: the parent cleaned up; do
    nothing."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while not stop.wait(0.5):
        if parent_gone(parent):
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
    while time.monotonic() < deadline and any(group_alive(g) for g in groups):
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
