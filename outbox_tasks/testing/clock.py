"""A clock for tests, moved by hand."""

from __future__ import annotations


class ManualClock:
    """A clock that moves only when told: call it for the time (seconds), ``advance`` it.

    Starts at a realistic Unix time, so the timestamps the store derives from it read as dates.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move forward by ``seconds`` (>= 0; raises ValueError otherwise)."""
        if seconds < 0:
            raise ValueError(f"a clock only moves forward, got {seconds!r} seconds")
        self.now += seconds
