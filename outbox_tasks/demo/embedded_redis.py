"""The demo's embedded Redis: fakeredis's ``TcpFakeServer`` (with lupa for Lua) in a child
process on 127.0.0.1 and a kernel-chosen port. A child, not a thread: the demo's producer and
consumer threads would share its GIL."""

from __future__ import annotations

import importlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from outbox_tasks.demo.guard import Guard
from outbox_tasks.demo.processes import (
    Say,
    child_argv,
    parent_gone,
    quiet,
    require,
    stop_child,
)
from outbox_tasks.errors import EmbeddedServiceError


class EmbeddedRedis:
    """fakeredis's TcpFakeServer in a child process on 127.0.0.1 and a kernel-chosen port."""

    def __init__(
        self, say: Say = quiet, *, guard: Guard | None = None, start_timeout: float = 60.0
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
        require("fakeredis", "fakeredis[lua]")
        require("lupa", "fakeredis[lua]")
        fd, log = tempfile.mkstemp(prefix="outbox-demo-redis-", suffix=".log")
        self.log_file = Path(log)
        with os.fdopen(fd, "wb") as log_out:
            self._proc = subprocess.Popen(
                child_argv("redis", "--parent", str(os.getpid())),
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
            stop_child(self._proc, 10)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self.log_file is not None and not keep_log:
            self.log_file.unlink(missing_ok=True)
            self.log_file = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid


def serve_redis(parent: int) -> int:
    """The Redis child process: print ``READY <port>``, serve until SIGTERM or ``parent`` is
    gone, exit."""
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
        if parent_gone(parent):
            break
    # Handlers stop at their next poll; do not wait long for clients that hang on.
    closer = threading.Thread(target=lambda: (server.shutdown(), server.server_close()))
    closer.daemon = True
    closer.start()
    closer.join(5)
    os._exit(0)
