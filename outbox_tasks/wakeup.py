"""The wake-up path (DESIGN 4.5): LISTEN for the outbox trigger's NOTIFY and claim at once.

The trigger sends the distinct slots of each INSERT statement after commit (NOTIFY is
transactional). A listener thread gathers notifications for ``debounce`` seconds, maps slots to
partitions, and calls back once per burst. Polling stays the fallback: a lost notification
(listener restarting, connection dropped) only costs one beat tick.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

import psycopg

from outbox_tasks.logs import event, get_logger
from outbox_tasks.partitioning import partition_of

CHANNEL = "outbox_wakeup"
log = get_logger("wakeup")


def partitions_for(payloads: Iterable[str], partitions: int) -> set[int]:
    """Map NOTIFY payloads (comma-separated slots) to partitions; ignore garbage."""
    result: set[int] = set()
    for payload in payloads:
        for raw in payload.split(","):
            item = raw.strip()
            if item.isdigit() and int(item) < 1024:
                result.add(partition_of(int(item), partitions))
    return result


class WakeupListener:
    """A daemon thread holding one LISTEN connection; reconnects with backoff after errors."""

    def __init__(
        self,
        conninfo: str,
        partitions: int,
        on_partitions: Callable[[set[int]], None],
        *,
        debounce_seconds: float = 0.005,
        application_name: str = "outbox_tasks.wakeup",
    ) -> None:
        self.conninfo = conninfo
        self.partitions = partitions
        self.on_partitions = on_partitions
        self.debounce_seconds = debounce_seconds
        self.application_name = application_name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-wakeup", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._listen()
                delay = 0.5
            except Exception as error:
                self.listening.clear()
                event(
                    log,
                    logging.WARNING,
                    "wakeup_listener_error",
                    "wake-up listener lost its connection; polling covers until it is back",
                    error=str(error).strip()[:300],
                    retry_in_seconds=delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)

    def _listen(self) -> None:
        with psycopg.connect(
            self.conninfo,
            autocommit=True,
            application_name=self.application_name,
            connect_timeout=10,
        ) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self.listening.set()
            event(log, logging.INFO, "wakeup_listening", "listening for outbox inserts")
            while not self._stop.is_set():
                payloads = [n.payload for n in conn.notifies(timeout=1.0, stop_after=1)]
                if not payloads:
                    continue
                if self.debounce_seconds > 0:
                    payloads += [n.payload for n in conn.notifies(timeout=self.debounce_seconds)]
                wanted = partitions_for(payloads, self.partitions)
                if wanted:
                    try:
                        self.on_partitions(wanted)
                    except Exception as error:
                        event(
                            log,
                            logging.WARNING,
                            "wakeup_dispatch_failed",
                            "could not dispatch claims; the next tick will",
                            error=str(error)[:300],
                        )
