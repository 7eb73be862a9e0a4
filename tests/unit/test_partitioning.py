"""Aggregate -> slot -> partition: contiguous ranges covering every slot, a stable hash."""

from __future__ import annotations

import itertools
import uuid

import pytest

from outbox_tasks.partitioning import (
    SLOT_COUNT,
    aligned_blocks,
    partition_of,
    partition_of_aggregate,
    slot_of,
    slot_range,
)

PARTITION_COUNTS = [1, 2, 3, 7, 8, 16, 100, 1000, 1023, 1024]


def test_there_are_1024_slots() -> None:
    assert SLOT_COUNT == 1024


@pytest.mark.parametrize("partitions", PARTITION_COUNTS, ids=lambda n: f"{n}-partitions")
def test_slot_ranges_cover_every_slot_contiguously_without_overlap(partitions: int) -> None:
    ranges = [slot_range(p, partitions) for p in range(partitions)]

    assert ranges[0][0] == 0
    assert ranges[-1][1] == SLOT_COUNT
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert hi == lo
    for lo, hi in ranges:
        assert lo < hi


@pytest.mark.parametrize("partitions", PARTITION_COUNTS, ids=lambda n: f"{n}-partitions")
def test_slot_ranges_are_balanced_to_within_one_slot(partitions: int) -> None:
    sizes = [hi - lo for lo, hi in (slot_range(p, partitions) for p in range(partitions))]

    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("partitions", PARTITION_COUNTS, ids=lambda n: f"{n}-partitions")
def test_partition_of_agrees_with_slot_range(partitions: int) -> None:
    for partition in range(partitions):
        lo, hi = slot_range(partition, partitions)
        for slot in range(lo, hi):
            assert partition_of(slot, partitions) == partition


def test_eight_partitions_own_128_slots_each() -> None:
    assert [slot_range(p, 8) for p in (0, 1, 7)] == [(0, 128), (128, 256), (896, 1024)]


@pytest.mark.parametrize(
    ("partition", "partitions"),
    [(-1, 8), (8, 8), (0, 0), (0, 1025)],
    ids=["negative", "past-the-end", "zero-partitions", "more-partitions-than-slots"],
)
def test_a_partition_outside_the_count_is_refused(partition: int, partitions: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        slot_range(partition, partitions)


@pytest.mark.parametrize(
    ("aggregate_type", "aggregate_id", "slot"),
    [("Order", "1", 102), ("Order", "2", 206), ("Order", "42", 853)],
)
def test_slot_of_is_pinned_to_known_values(
    aggregate_type: str, aggregate_id: str, slot: int
) -> None:
    """These values are what PostgreSQL's generated column computes; changing the hash would move
    every stored aggregate to another partition."""
    assert slot_of(aggregate_type, aggregate_id) == slot


def test_slot_of_is_stable_and_in_range() -> None:
    ids = [str(uuid.UUID(int=i)) for i in range(2000)]

    first = [slot_of("Order", i) for i in ids]

    assert first == [slot_of("Order", i) for i in ids]
    assert all(0 <= slot < SLOT_COUNT for slot in first)
    assert len(set(first)) > 700  # 2000 ids spread over most of the 1024 slots


def test_the_type_and_id_are_separated_in_the_hash() -> None:
    """("Ab", "c") and ("A", "bc") are different aggregates and hash differently."""
    assert slot_of("Ab", "c") != slot_of("A", "bc")


def test_partition_of_aggregate_is_the_partition_of_its_slot() -> None:
    for aggregate_id in map(str, range(200)):
        slot = slot_of("Order", aggregate_id)
        for partitions in (1, 8, 64):
            assert partition_of_aggregate("Order", aggregate_id, partitions) == partition_of(
                slot, partitions
            )


@pytest.mark.parametrize("partitions", PARTITION_COUNTS, ids=lambda n: f"{n}-partitions")
def test_aligned_blocks_cover_a_partitions_slots_exactly_with_aligned_power_of_two_blocks(
    partitions: int,
) -> None:
    for partition in range(partitions):
        lo, hi = slot_range(partition, partitions)
        blocks = aligned_blocks(lo, hi)
        covered = [s for start, bits in blocks for s in range(start, start + (1 << bits))]

        assert covered == list(range(lo, hi))
        assert all(start % (1 << bits) == 0 for start, bits in blocks)
        assert len(blocks) <= 18


def test_the_whole_slot_range_is_one_block() -> None:
    assert aligned_blocks(0, SLOT_COUNT) == [(0, 10)]
    assert aligned_blocks(5, 5) == []
