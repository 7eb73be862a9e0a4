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


def aligned_blocks(
    lo: int, hi: int, sizes: tuple[int, ...] = tuple(range(10, -1, -1))
) -> list[tuple[int, int]]:
    """``[lo, hi)`` as the fewest blocks ``(start, bits)`` of ``2**bits`` slots each, ``bits``
    one of ``sizes`` (0 must be one), every ``start`` a multiple of its block's size, in slot
    order. With every size (the default) a range needs at most 2 blocks per bit."""
    if not 0 <= lo <= hi <= SLOT_COUNT:
        raise ValueError(f"[{lo}, {hi}) is not a range of slots")
    if 0 not in sizes:
        raise ValueError("blocks of one slot (bits 0) are needed to cover any range")
    largest_first = sorted(set(sizes), reverse=True)
    blocks: list[tuple[int, int]] = []
    start = lo
    while start < hi:
        bits = next(b for b in largest_first if start % (1 << b) == 0 and start + (1 << b) <= hi)
        blocks.append((start, bits))
        start += 1 << bits
    return blocks
