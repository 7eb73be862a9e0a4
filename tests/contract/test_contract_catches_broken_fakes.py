"""The contract can fail: run against a fake broken on purpose, its checks do.

Each broken store wraps the in-memory one and gets one thing wrong, the way a hand-written fake
easily would: it ignores the epoch fence, or it hands out the newest rows first without knowing
about earlier pending rows of their aggregate, or it forgets that a row in backoff holds back its
aggregate."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Any

import pytest

from outbox_tasks.protocols import RelayStore
from outbox_tasks.store.records import Failure, FinishResult, Lease, Row
from outbox_tasks.testing import InMemoryRelayStore, InMemoryRelayTransaction
from outbox_tasks.testing.batches import select_batch_of
from tests.contract import test_relay_contract as contract
from tests.contract.backends import MemoryBackend


class _Wrapped:
    """A transaction that passes every statement through, except those a subclass redefines."""

    def __init__(self, tx: InMemoryRelayTransaction, memory: InMemoryRelayStore) -> None:
        self.tx = tx
        self.memory = memory

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tx, name)

    def select_batch(self, lease: Lease, start: int, limit: int, **options: Any) -> Any:
        # Made of this wrapper's statements, so a redefined one takes effect here too.
        return select_batch_of(self, lease, start, limit, **options)  # type: ignore[arg-type]


class _IgnoresTheEpoch(_Wrapped):
    """Writes with the partition's current epoch, whatever epoch the writer holds."""

    def _current(self, lease: Lease) -> Lease:
        record = self.memory.lease(lease.partition, lease.partition_count)
        return lease if record is None else replace(lease, epoch=record.epoch)

    def mark_inflight(self, lease: Lease, **options: Any) -> bool:
        return self.tx.mark_inflight(self._current(lease), **options)

    def release_lease(self, lease: Lease) -> bool:
        return self.tx.release_lease(self._current(lease))

    def finish_batch(
        self,
        lease: Lease,
        published_ids: Sequence[uuid.UUID],
        failures: Sequence[Failure],
        *,
        delete_published: bool,
        maybe_sent: Sequence[uuid.UUID] = (),
    ) -> FinishResult:
        return self.tx.finish_batch(
            self._current(lease),
            published_ids,
            failures,
            delete_published=delete_published,
            maybe_sent=maybe_sent,
        )

    def take_over_lease(self, *, partition_count: int, partition: int, **options: Any) -> Any:
        record = self.memory.lease(partition, partition_count)
        if record is not None:
            options["epoch"] = record.epoch
        return self.tx.take_over_lease(
            partition_count=partition_count, partition=partition, **options
        )


class _NewestFirst(_Wrapped):
    """Selects the newest due rows first and reports no earlier pending rows."""

    def select_candidates(
        self, slot_lo: int, slot_hi: int, limit: int, *, skip: Collection[tuple[str, str]] = ()
    ) -> list[Row]:
        rows = self.tx.select_candidates(slot_lo, slot_hi, 1_000_000, skip=skip)
        return sorted(rows, key=lambda r: -r.seq)[:limit]

    def pending_seqs(
        self, max_seq_by_aggregate: dict[tuple[str, str], int]
    ) -> dict[tuple[str, str], list[int]]:
        return {}


class _ForgetsBackoff(_Wrapped):
    """Treats a row in backoff as if it were not there: later rows of its aggregate go ahead."""

    def select_candidates(
        self, slot_lo: int, slot_hi: int, limit: int, *, skip: Collection[tuple[str, str]] = ()
    ) -> list[Row]:
        now = self.memory.clock()
        due = [
            r
            for r in self.memory.rows()
            if slot_lo <= r.slot < slot_hi
            and r.due(now)
            and (r.aggregate_type, r.aggregate_id) not in skip
        ]
        return [r.as_row() for r in sorted(due, key=lambda r: (r.slot, r.seq))[:limit]]

    def pending_seqs(
        self, max_seq_by_aggregate: dict[tuple[str, str], int]
    ) -> dict[tuple[str, str], list[int]]:
        pending = self.tx.pending_seqs(max_seq_by_aggregate)
        now = self.memory.clock()
        waiting = {r.seq for r in self.memory.rows() if r.pending and not r.due(now)}
        return {key: [q for q in seqs if q not in waiting] for key, seqs in pending.items()}


def broken(kind: type[_Wrapped]) -> Callable[[InMemoryRelayStore], RelayStore]:
    class BrokenStore:
        def __init__(self, memory: InMemoryRelayStore) -> None:
            self.memory = memory

        @contextmanager
        def transaction(self, what: str = "relay") -> Iterator[Any]:
            with self.memory.transaction(what) as tx:
                yield kind(tx, self.memory)

        def session(self) -> AbstractContextManager[None]:
            return self.memory.session()

    return BrokenStore


def test_the_fencing_check_fails_against_a_fake_that_ignores_the_epoch() -> None:
    with pytest.raises(AssertionError):
        contract.test_a_stale_epoch_can_neither_mark_nor_fail_nor_release(
            MemoryBackend(wrap=broken(_IgnoresTheEpoch))
        )


def test_the_ordering_check_fails_against_a_fake_that_selects_newest_first() -> None:
    with pytest.raises(AssertionError):
        contract.test_each_aggregate_is_published_in_sequence_order(
            MemoryBackend(wrap=broken(_NewestFirst))
        )


def test_the_backoff_check_fails_against_a_fake_that_lets_rows_overtake_one_in_backoff() -> None:
    with pytest.raises(AssertionError):
        contract.test_a_message_in_backoff_holds_back_its_aggregate_and_no_other(
            MemoryBackend(wrap=broken(_ForgetsBackoff))
        )


def test_the_wrapped_fakes_pass_the_checks_they_do_not_break() -> None:
    """So the failures above come from the one broken rule, not from the wrapping."""
    contract.test_each_aggregate_is_published_in_sequence_order(
        MemoryBackend(wrap=broken(_IgnoresTheEpoch))
    )
    for kind in (_NewestFirst, _ForgetsBackoff):
        contract.test_a_stale_epoch_can_neither_mark_nor_fail_nor_release(
            MemoryBackend(wrap=broken(kind))
        )
