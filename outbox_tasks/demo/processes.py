"""What the demo's embedded services share: child processes (start, stop,
liveness), who a server runs as, free ports, and holding off Ctrl-C while starting or cleaning
up."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from outbox_tasks.errors import EmbeddedServiceError

DEMO_EXTRA_HINT = (
    "install the demo extra (pip install 'outbox_tasks[demo]', or scripts/demo.sh does it), "
    "or set OUTBOX_DATABASE_URL and OUTBOX_BROKER_URL to running services"
)

Say = Callable[[str], None]


def quiet(_message: str) -> None:
    """A ``Say`` that says nothing."""
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require(module: str, package: str) -> Any:
    """Import ``module``; EmbeddedServiceError naming ``package`` (the demo extra) if missing."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise EmbeddedServiceError(
            f"the embedded services need the package {package!r} ({error}): {DEMO_EXTRA_HINT}"
        ) from None


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


def alive(pid: int) -> bool:
    """Is process ``pid`` running (a zombie child of ours is reaped and counts as gone)?"""
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


def kill_and_wait(pid: int, seconds: float) -> None:
    """SIGQUIT (PostgreSQL's immediate shutdown), then SIGKILL after ``seconds``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGQUIT)  # PostgreSQL's immediate shutdown
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """Is any process of process group ``pgid`` running?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_child(proc: subprocess.Popen[bytes], seconds: float) -> None:
    """SIGTERM, then SIGKILL after ``seconds``; reaps the child."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def child_argv(*args: str) -> list[str]:
    """The command line of one of the demo's child processes (outbox_tasks.demo.embedded)."""
    return [sys.executable, "-m", "outbox_tasks.demo.embedded", *args]


def parent_gone(parent: int) -> bool:
    """Has the process that started us (pid ``parent``) exited?"""
    return os.getppid() != parent


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
def deferred_interrupts(say: Say = quiet) -> Iterator[None]:
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
