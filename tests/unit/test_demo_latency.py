"""The demo's latency figure is the benchmark's: commit -> arrival per event id, first arrival
only, nearest-rank percentiles computed by the same rule (issue 12)."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from bench.common import percentile as bench_percentile
from outbox_tasks.demo.latency import CommitToArrival, format_ms, percentile


@given(
    st.lists(st.floats(min_value=-1.0, max_value=10.0, allow_nan=False), max_size=300),
    st.sampled_from([0, 1, 25, 50, 90, 95, 99, 99.9, 100]),
)
def test_the_demo_percentile_agrees_with_the_benchmarks(values: list[float], q: float) -> None:
    ordered = sorted(values)
    assert percentile(ordered, q) == bench_percentile(ordered, q)


def test_a_percentile_is_one_of_the_samples_at_its_nearest_rank() -> None:
    ordered = [float(v) for v in range(1, 8)]
    assert percentile(ordered, 0) == 1.0
    assert percentile(ordered, 50) == 4.0
    assert percentile(ordered, 99) == 7.0
    assert percentile([], 50) is None


def test_an_arrival_recorded_before_its_commit_time_is_still_matched() -> None:
    latency = CommitToArrival()
    early, normal = uuid.uuid4(), uuid.uuid4()
    latency.arrived(early, 10.002)  # delivered before the producer thread stored its commit
    latency.committed(early, 10.000)
    latency.committed(normal, 11.000)
    latency.arrived(normal, 11.005)
    assert sorted(latency.latencies) == [10.002 - 10.000, 11.005 - 11.000]
    assert not latency.commits
    assert not latency.arrivals


def test_only_the_first_arrival_of_an_event_counts() -> None:
    latency = CommitToArrival()
    assert latency.percentiles_ms(50, 99) == [None, None]
    event = uuid.uuid4()
    latency.arrived(event, 5.0)
    latency.arrived(event, 9.0)  # redelivered before the commit time was stored
    latency.committed(event, 4.0)
    assert list(latency.latencies) == [1.0]


def test_the_window_and_the_unmatched_maps_stay_bounded() -> None:
    latency = CommitToArrival(window=3, cap=5)
    for i in range(10):
        event = uuid.uuid4()
        latency.committed(event, float(i))
        latency.arrived(event, i + 0.5 + i)
    assert list(latency.latencies) == [7.5, 8.5, 9.5]
    assert latency.percentiles_ms(50) == [8500.0]
    for i in range(20):
        latency.committed(uuid.uuid4(), float(i))
        latency.arrived(uuid.uuid4(), float(i))
    assert len(latency.commits) == 5
    assert len(latency.arrivals) == 5
    assert sorted(latency.commits.values()) == [15.0, 16.0, 17.0, 18.0, 19.0]


def test_figures_are_printed_in_milliseconds_with_a_dash_for_none() -> None:
    assert format_ms(1.94) == "1.9ms"
    assert format_ms(73.4) == "73ms"
    assert format_ms(None) == "-"
