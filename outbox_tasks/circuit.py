"""The broker outage circuit (DESIGN 2.6): pure state over a clock the caller passes in.

Closed: publishing runs. Each broker connection error opens it for a capped, doubling delay
(``base_seconds``, 2x, 4x ... up to ``max_seconds``); while open, claims and publishes pause. The
first success closes it. Opening and closing are logged once each, never per message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from outbox_tasks.logs import event, get_logger

log = get_logger("relay")


@dataclass
class Circuit:
    """Broker outage circuit, one per process.

    ``clock`` returns seconds (any monotonic origin); ``on_change`` is called with True when the
    circuit opens and False when it closes.
    """

    clock: Callable[[], float]
    base_seconds: float = 1.0
    max_seconds: float = 30.0
    failures: int = 0
    open_until: float = 0.0
    on_change: Callable[[bool], None] | None = None

    @property
    def is_open(self) -> bool:
        return self.failures > 0 and self.clock() < self.open_until

    def record_failure(self, error: BaseException) -> None:
        self.failures += 1
        delay = min(self.max_seconds, self.base_seconds * 2 ** min(self.failures - 1, 20))
        self.open_until = self.clock() + delay
        if self.failures == 1:
            event(
                log,
                logging.WARNING,
                "circuit_open",
                "broker unavailable; pausing publishing",
                error=str(error),
                retry_in_seconds=delay,
            )
            if self.on_change:
                self.on_change(True)

    def record_success(self) -> None:
        if self.failures:
            event(
                log,
                logging.INFO,
                "circuit_closed",
                "broker is back; publishing resumed",
                failed_attempts=self.failures,
            )
            self.failures = 0
            self.open_until = 0.0
            if self.on_change:
                self.on_change(False)
