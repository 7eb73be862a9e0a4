"""Aggregate -> slot -> partition. Slots are a fixed range; partitions are contiguous slot ranges.

Partition ``p`` of ``n`` owns slots ``[ceil(p * 1024 / n), ceil((p + 1) * 1024 / n))``, so every
aggregate (one slot) belongs to exactly one partition for a given partition count.
"""

from __future__ import annotations

from outbox_tasks.schema import slot_of
from outbox_tasks.settings import SLOT_COUNT

__all__ = [
    "SLOT_COUNT",
    "aligned_blocks",
    "partition_of",
    "partition_of_aggregate",
    "slot_of",
    "slot_range",
]


def slot_range(partition: int, partitions: int) -> tuple[int, int]:
    """The half-open slot range ``[lo, hi)`` of one partition."""
    if not 0 <= partition < partitions <= SLOT_COUNT:
        raise ValueError(f"partition {partition} is outside 0..{partitions - 1}")
    lo = -(-partition * SLOT_COUNT // partitions)
    hi = -(-(partition + 1) * SLOT_COUNT // partitions)
    return lo, hi


def partition_of(slot: int, partitions: int) -> int:
    """The partition that owns ``slot``."""
    return slot * partitions // SLOT_COUNT


def partition_of_aggregate(aggregate_type: str, aggregate_id: str, partitions: int) -> int:
    return partition_of(slot_of(aggregate_type, aggregate_id), partitions)


def aligned_blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` as the fewest blocks ``(start, free_bits)`` of ``2**free_bits`` slots each,
    every ``start`` a multiple of its block's size, in slot order (at most 2 per bit: a range of
    1024 slots needs at most 18 blocks). What a topic pattern over the slot's bits can match."""
    if not 0 <= lo <= hi <= SLOT_COUNT:
        raise ValueError(f"[{lo}, {hi}) is not a range of slots")
    blocks: list[tuple[int, int]] = []
    start = lo
    while start < hi:
        bits = (start & -start).bit_length() - 1 if start else SLOT_COUNT.bit_length() - 1
        while start + (1 << bits) > hi:
            bits -= 1
        blocks.append((start, bits))
        start += 1 << bits
    return blocks
