"""Real Celery processes for acceptance tests: workers and beat started as subprocesses with
``OUTBOX_*`` env built from a Settings object, logs captured to files, stopped (or killed) on
demand and always cleaned up."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from outbox_tasks.settings import Settings

CELERY = [sys.executable, "-m", "celery", "-A", "outbox_tasks"]


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(settings.to_env())
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclasses.dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and its pool children)."""
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown: SIGTERM, wait, then SIGKILL if it did not finish."""
        if not self.alive():
            return
        try:
            os.kill(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        except ProcessLookupError:
            pass
        # Pool children left behind by a main process that died first.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def pool_children(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.popen.pid)], capture_output=True, text=True, check=False
        )
        return [int(p) for p in out.stdout.split()]


class Cluster:
    def __init__(self, settings: Settings, workdir: Path, **extra_env: str) -> None:
        self.settings = settings
        self.workdir = workdir
        self.extra_env = extra_env
        self.procs: list[Proc] = []

    def _spawn(
        self, name: str, args: list[str], settings: Settings | None = None, **extra: str
    ) -> Proc:
        log_path = self.workdir / f"{name}.log"
        env = settings_env(settings or self.settings, **{**self.extra_env, **extra})
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def worker(
        self,
        name: str,
        *,
        concurrency: int = 1,
        queues: str | None = None,
        settings: Settings | None = None,
        **extra: str,
    ) -> Proc:
        args = [
            *CELERY,
            "worker",
            "-n",
            f"{name}@%h",
            "-c",
            str(concurrency),
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ]
        if queues:
            args += ["-Q", queues]
        return self._spawn(name, args, settings, **extra)

    def beat(self, name: str = "beat", *, settings: Settings | None = None, **extra: str) -> Proc:
        schedule = self.workdir / f"{name}-schedule"
        args = [*CELERY, "beat", "--loglevel", "INFO", "-s", str(schedule)]
        return self._spawn(name, args, settings, **extra)

    def wait_ready(self, proc: Proc, timeout: float = 30.0) -> None:
        """Until a worker logs 'ready' (or beat starts its scheduler)."""
        deadline = time.monotonic() + timeout
        markers = ("ready.", "beat: Starting...")
        while time.monotonic() < deadline:
            text = proc.log()
            if any(m in text for m in markers):
                return
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited early:\n{text[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{proc.name} not ready after {timeout} s:\n{proc.log()[-3000:]}")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=15)

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.log()[-4000:]}" for p in self.procs)


@contextmanager
def cluster(settings: Settings, workdir: Path, **extra_env: str) -> Iterator[Cluster]:
    c = Cluster(settings, workdir, **extra_env)
    try:
        yield c
    except BaseException:
        sys.stderr.write(c.logs())
        raise
    finally:
        c.stop_all()
