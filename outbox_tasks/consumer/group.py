"""A consumer group: name, bindings, handler, partitions and retry policy; its queue names."""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from sqlalchemy.orm import Session

from outbox_tasks.consumer.events import Event, EventHandler
from outbox_tasks.envelope import slot_binding_pattern
from outbox_tasks.errors import ConfigurationError
from outbox_tasks.partitioning import aligned_blocks, partition_of, slot_of, slot_range
from outbox_tasks.settings import SLOT_COUNT

QUEUE_PREFIX: Final = "outbox.consumer."

_GROUP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
_BINDING = re.compile(r"^[^\s]{1,255}$")


def load_handler(spec: str) -> EventHandler:
    """``"package.module:function"`` (or ``package.module:Class.method``) -> the callable."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"handler {spec!r} is not valid: expected 'package.module:function'"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigurationError(
            f"handler {spec!r}: cannot import {module_name}: {error}"
        ) from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(
                f"handler {spec!r}: {module_name} has no attribute {attribute}"
            ) from None
    if not callable(target):
        raise ConfigurationError(f"handler {spec!r} is not callable")
    handler: EventHandler = target
    return handler


@dataclass(frozen=True, slots=True)
class ConsumerGroup:
    """What a group consumes, how it handles it, and how hard it retries.

    ``partitions=0`` (default): unordered, one shared queue. ``partitions=N``: ordered per
    aggregate, N partition queues bound to the N slot ranges (each event reaches one of them),
    one active process per partition. Retries: ``max_attempts`` attempts in all, waiting
    ``backoff_base_seconds`` doubling up to ``backoff_max_seconds`` (with jitter) between them.
    ``prefetch``: unacknowledged messages a process may hold per queue (RabbitMQ).
    ``gap_wait_seconds`` (ordered groups): how long an event that follows a missing one of its
    aggregate waits for it before the aggregate is parked with reason ``gap``.
    """

    name: str
    bindings: tuple[str, ...]
    handler: EventHandler
    partitions: int = 0
    max_attempts: int = 5
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    prefetch: int = 50
    gap_wait_seconds: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bindings", tuple(self.bindings))
        if not isinstance(self.name, str) or not _GROUP_NAME.match(self.name):
            raise ConfigurationError(
                f"consumer group name {self.name!r} is not valid: expected 1-100 letters, "
                "digits, '_' or '-'"
            )
        if not self.bindings:
            raise ConfigurationError(
                f"consumer group {self.name}: give at least one binding pattern (e.g. 'Order.*')"
            )
        for pattern in self.bindings:
            if not isinstance(pattern, str) or not _BINDING.match(pattern):
                raise ConfigurationError(
                    f"consumer group {self.name}: binding {pattern!r} is not a topic pattern "
                    "like 'Order.*' or 'Order.OrderPaid' or '#'"
                )
        if not callable(self.handler):
            raise ConfigurationError(f"consumer group {self.name}: the handler is not callable")
        _check_int(self.name, "partitions", self.partitions, 0, SLOT_COUNT)
        _check_int(self.name, "max_attempts", self.max_attempts, 1, 1000)
        _check_int(self.name, "prefetch", self.prefetch, 1, 65535)
        for label, value in (
            ("backoff_base_seconds", self.backoff_base_seconds),
            ("backoff_max_seconds", self.backoff_max_seconds),
            ("gap_wait_seconds", self.gap_wait_seconds),
        ):
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigurationError(
                    f"consumer group {self.name}: {label}={value!r} is not a number of seconds >= 0"
                )
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ConfigurationError(
                f"consumer group {self.name}: backoff_max_seconds ({self.backoff_max_seconds}) "
                f"is below backoff_base_seconds ({self.backoff_base_seconds})"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | ConsumerGroup) -> ConsumerGroup:
        """A group from a mapping: ``name``, ``bind`` (or ``bindings``), ``handler`` (a callable
        or ``"module:function"``), and optionally the other fields by name."""
        if isinstance(config, ConsumerGroup):
            return config
        values = dict(config)
        bindings = values.pop("bind", None) or values.pop("bindings", None) or ()
        if isinstance(bindings, str):
            bindings = (bindings,)
        handler = values.pop("handler", None)
        if isinstance(handler, str):
            handler = load_handler(handler)
        if "name" not in values:
            raise ConfigurationError(f"consumer group config {config!r} has no 'name'")
        try:
            return cls(bindings=tuple(bindings), handler=handler, **values)
        except TypeError as error:
            raise ConfigurationError(f"consumer group config {config!r}: {error}") from None

    @property
    def ordered(self) -> bool:
        return self.partitions > 0

    @property
    def queue(self) -> str:
        """The shared queue of an unordered group."""
        return f"{QUEUE_PREFIX}{self.name}"

    def partition_queue(self, partition: int) -> str:
        return f"{QUEUE_PREFIX}{self.name}.p{partition}"

    @property
    def dead_letter_queue(self) -> str:
        return f"{QUEUE_PREFIX}{self.name}.dead"

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues events arrive in (not the dead-letter queue)."""
        if self.ordered:
            return tuple(self.partition_queue(k) for k in range(self.partitions))
        return (self.queue,)

    def partition_bindings(self, partition: int) -> tuple[str, ...]:
        """The topic patterns partition queue ``partition`` is bound with: the group's patterns
        over the slot routing keys of the partition's slot range (1 to 18 per pattern)."""
        blocks = aligned_blocks(*slot_range(partition, self.partitions))
        return tuple(
            slot_binding_pattern(start, bits, pattern)
            for pattern in self.bindings
            for start, bits in blocks
        )

    def partition_of(self, aggregate_type: str, aggregate_id: str) -> int:
        return partition_of(slot_of(aggregate_type, aggregate_id), self.partitions)

    def queue_for(self, aggregate_type: str, aggregate_id: str) -> str:
        """Where a replayed event of this aggregate goes."""
        if self.ordered:
            return self.partition_queue(self.partition_of(aggregate_type, aggregate_id))
        return self.queue


def _check_int(group: str, label: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(
            f"consumer group {group}: {label}={value!r} is not an integer from {low} to {high}"
        )


def _no_handler(event: Event, session: Session) -> None:
    raise ConfigurationError("this consumer group was built for administration, not handling")


def admin_group(group: ConsumerGroup | str, partitions: int | None) -> ConsumerGroup:
    """A group for queue names and administration; a name alone means unordered unless
    ``partitions`` says otherwise."""
    if isinstance(group, ConsumerGroup):
        if partitions is not None and partitions != group.partitions:
            return replace(group, partitions=partitions)
        return group
    return ConsumerGroup(group, ("#",), _no_handler, partitions=partitions or 0)
