"""The retry decision: capped exponential backoff with equal jitter, give up after max_retries."""

from __future__ import annotations

import itertools
import math

import pytest

from outbox_tasks.retry import GiveUp, RetryLater, backoff_delay, decide, system_jitter

ALMOST_ONE = 1 - 1e-12


def _delay(failures: int, jitter: float, *, base: float = 1.0, cap: float = 300.0) -> float:
    return backoff_delay(failures, base_seconds=base, max_seconds=cap, jitter=jitter)


def test_the_backoff_ceiling_doubles_with_every_failure() -> None:
    ceilings = [_delay(failures, ALMOST_ONE, base=0.5, cap=1e9) for failures in range(1, 9)]

    for previous, current in itertools.pairwise(ceilings):
        assert current == pytest.approx(2 * previous)
    assert ceilings[0] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("failures", "ceiling"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (9, 256.0), (10, 300.0), (11, 300.0), (50, 300.0)],
    ids=["1st", "2nd", "3rd", "9th", "10th-capped", "11th-capped", "50th-capped"],
)
def test_the_backoff_is_capped_at_max_seconds(failures: int, ceiling: float) -> None:
    assert _delay(failures, 0.0) == pytest.approx(ceiling / 2)
    assert _delay(failures, ALMOST_ONE) == pytest.approx(ceiling)


def test_no_jitter_gives_half_the_ceiling() -> None:
    assert _delay(4, 0.0, base=2.0) == 8.0


def test_jitter_close_to_one_gives_the_ceiling_and_never_more() -> None:
    delay = _delay(4, ALMOST_ONE, base=2.0)

    assert delay == pytest.approx(16.0)
    assert delay < 16.0


@pytest.mark.parametrize("jitter", [0.0, 0.1, 0.25, 0.5, 0.75, 0.999])
@pytest.mark.parametrize("failures", [1, 3, 12])
def test_a_jittered_delay_stays_between_half_the_ceiling_and_the_ceiling(
    failures: int, jitter: float
) -> None:
    ceiling = min(300.0, 1.0 * 2 ** (failures - 1))

    assert ceiling / 2 <= _delay(failures, jitter) < ceiling


def test_more_jitter_never_means_a_shorter_delay() -> None:
    delays = [_delay(5, jitter / 10) for jitter in range(10)]

    assert delays == sorted(delays)


def test_system_jitter_is_in_the_half_open_unit_interval() -> None:
    samples = [system_jitter() for _ in range(1000)]

    assert all(0.0 <= sample < 1.0 for sample in samples)
    assert len(set(samples)) > 1


def _decide(retry_count: int, max_retries: int = 5, jitter: float = 0.0) -> RetryLater | GiveUp:
    return decide(
        retry_count, max_retries=max_retries, base_seconds=1.0, max_seconds=300.0, jitter=jitter
    )


def test_the_first_failure_is_retried_after_the_base_delay_range() -> None:
    decision = _decide(0)

    assert isinstance(decision, RetryLater)
    assert decision.retry_count == 1
    assert 0.5 <= decision.delay_seconds <= 1.0


def test_failures_up_to_max_retries_are_retried_and_the_next_one_gives_up() -> None:
    decisions = [_decide(retry_count, max_retries=5) for retry_count in range(6)]

    assert [type(d) for d in decisions] == [RetryLater] * 5 + [GiveUp]
    assert [d.retry_count for d in decisions] == [1, 2, 3, 4, 5, 6]
    assert decisions[-1] == GiveUp(retry_count=6)


def test_with_max_retries_zero_the_first_failure_gives_up() -> None:
    assert _decide(0, max_retries=0) == GiveUp(retry_count=1)


def test_a_message_already_past_its_budget_gives_up() -> None:
    """A lowered OUTBOX_MAX_RETRIES applies to messages that already failed more often."""
    assert _decide(9, max_retries=3) == GiveUp(retry_count=10)


def test_retry_delays_grow_with_the_retry_count() -> None:
    delays = []
    for retry_count in range(5):
        decision = _decide(retry_count, max_retries=5)
        assert isinstance(decision, RetryLater)
        delays.append(decision.delay_seconds)

    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]


@pytest.mark.parametrize(
    "failures", [1, 2, 63, 64, 1_000, 10**6, 10**18], ids=lambda n: f"{n}-failures"
)
@pytest.mark.parametrize("jitter", [0.0, ALMOST_ONE], ids=["no-jitter", "full-jitter"])
def test_huge_failure_counts_neither_overflow_nor_go_negative(failures: int, jitter: float) -> None:
    delay = _delay(failures, jitter, base=0.001, cap=3600.0)

    assert math.isfinite(delay)
    assert 0 < delay <= 3600.0


def test_a_huge_retry_count_gives_up_without_overflowing() -> None:
    assert _decide(10**18, max_retries=1000) == GiveUp(retry_count=10**18 + 1)


@pytest.mark.parametrize("retry_count", range(0, 20))
def test_a_retry_delay_is_never_negative(retry_count: int) -> None:
    decision = _decide(retry_count, max_retries=1000, jitter=0.0)

    assert isinstance(decision, RetryLater)
    assert decision.delay_seconds > 0
