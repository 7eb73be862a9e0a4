"""The demo's latency figure, the measure of ``python -m bench latency``: commit -> arrival at
the consumer, per event id, first arrival only.

The producer records the wall time just after its transaction commits, the consumer the wall
time an event reaches its handler. Either may come first (a fast relay delivers before the
producer thread stores its commit time), so each is matched when its partner is recorded.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (q in 0..100); None when empty.

    The benchmark's rule (bench/common.py), copied rather than imported (the package does not
    depend on bench), rounding included: ``round`` halves to even, so at an exact integer rank
    it can take the next sample (p99 of 100 samples is the 100th), as the benchmark does.
    """
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


class CommitToArrival:
    """Commit and arrival times per event id, matched into a window of the latest latencies.

    Not thread-safe: the demo calls it under its tally's lock. Bounded: a matched pair is
    dropped from the maps, and each map keeps at most ``cap`` unmatched ids (the oldest go; an
    event lost or redelivered after its match would otherwise stay forever).
    """

    def __init__(self, window: int = 2000, cap: int = 50_000) -> None:
        self.cap = cap
        self.commits: dict[uuid.UUID, float] = {}
        self.arrivals: dict[uuid.UUID, float] = {}
        self.latencies: collections.deque[float] = collections.deque(maxlen=window)
        """Seconds, arrival - commit, in the order matched."""

    def committed(self, event_id: uuid.UUID, at: float) -> None:
        arrived = self.arrivals.pop(event_id, None)
        if arrived is not None:
            self.latencies.append(arrived - at)
        else:
            _put_capped(self.commits, event_id, at, self.cap)

    def arrived(self, event_id: uuid.UUID, at: float) -> None:
        if event_id in self.arrivals:
            return  # first arrival only
        commit = self.commits.pop(event_id, None)
        if commit is not None:
            self.latencies.append(at - commit)
        else:
            _put_capped(self.arrivals, event_id, at, self.cap)

    def percentiles_ms(self, *qs: float) -> list[float | None]:
        """The window's percentiles ``qs`` (0..100) in milliseconds; None each when empty."""
        ordered = sorted(self.latencies)
        return [None if (v := percentile(ordered, q)) is None else v * 1000.0 for q in qs]


def _put_capped(times: dict[uuid.UUID, float], key: uuid.UUID, at: float, cap: int) -> None:
    times[key] = at
    while len(times) > cap:
        del times[next(iter(times))]  # dicts keep insertion order: the oldest goes


def format_ms(value: float | None) -> str:
    """``1.9ms`` below 10 ms (the wake-up path's figures), ``73ms`` above, ``-`` for none."""
    if value is None:
        return "-"
    return f"{value:.1f}ms" if abs(value) < 10 else f"{value:.0f}ms"
