"""The retry decision, as a pure function: what to do after a message-specific failure.

Broker outages never come here (they open the circuit instead and spend no retry budget).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Try again after ``delay_seconds``; the aggregate waits behind this message."""

    retry_count: int
    delay_seconds: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Retries exhausted: hand the message to dead-lettering; its aggregate is parked."""

    retry_count: int


Decision = RetryLater | GiveUp


def backoff_delay(
    failures: int, *, base_seconds: float, max_seconds: float, jitter: float
) -> float:
    """Capped exponential backoff with "equal jitter": half fixed, half random.

    ``failures`` counts the failures so far (1 for the first). ``jitter`` is a number in [0, 1)
    supplied by the caller, so the function stays pure and testable.
    """
    ceiling = min(max_seconds, base_seconds * (2.0 ** min(failures - 1, 62)))
    return ceiling / 2 + (ceiling / 2) * jitter


def decide(
    retry_count: int,
    *,
    max_retries: int,
    base_seconds: float,
    max_seconds: float,
    jitter: float,
) -> Decision:
    """After a failure of a message that had failed ``retry_count`` times before."""
    failures = retry_count + 1
    if failures > max_retries:
        return GiveUp(retry_count=failures)
    return RetryLater(
        retry_count=failures,
        delay_seconds=backoff_delay(
            failures, base_seconds=base_seconds, max_seconds=max_seconds, jitter=jitter
        ),
    )


def system_jitter() -> float:
    return random.random()
