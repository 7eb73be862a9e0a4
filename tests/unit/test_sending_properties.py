"""Property (issue 11): whatever a publisher throws at whatever messages (any exception, refusals,
nacks, outages), the partition drains: every aggregate is published in order up to its first
message that cannot go, which is parked; the healthy aggregates are published completely; every
copy after the first is flagged ``outbox-redelivered``; no message is re-sent in a loop."""

from __future__ import annotations

import struct
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outbox_tasks import OutboxMessage
from outbox_tasks.envelope import H_REDELIVERED
from outbox_tasks.relay import Relay
from outbox_tasks.settings import Settings
from outbox_tasks.testing import InMemoryRelayStore, ManualClock, RecordingPublisher, drain


class Weird(Exception):
    """An exception no library defines."""


EXCEPTIONS: list[type[Exception]] = [
    ValueError,
    KeyError,
    TypeError,
    RuntimeError,
    AttributeError,
    AssertionError,
    UnicodeError,
    struct.error,
    OSError,  # raised raw by a publisher, not translated: not known to be an outage
    Weird,
]


@dataclass(frozen=True)
class Fault:
    kind: str  # "raise", "fail" or "nack"
    times: int | None
    exception: type[Exception] = ValueError


faults = st.builds(
    Fault,
    kind=st.sampled_from(["raise", "fail", "nack"]),
    times=st.one_of(st.none(), st.integers(1, 4)),
    exception=st.sampled_from(EXCEPTIONS),
)


@st.composite
def scenarios(draw: Any) -> dict[str, Any]:
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=6))
    total = sum(sizes)
    planned = draw(st.dictionaries(st.integers(0, total - 1), faults, max_size=4))
    return {
        "sizes": sizes,
        "faults": planned,
        "batch_size": draw(st.integers(1, 12)),
        "max_retries": draw(st.integers(0, 3)),
        "outages": draw(st.sets(st.integers(0, 60), max_size=10)),
    }


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(scenarios())
def test_whatever_the_publisher_throws_the_partition_drains_its_healthy_aggregates(
    scenario: dict[str, Any],
) -> None:
    clock = ManualClock()
    store = InMemoryRelayStore(clock=clock)
    publisher = RecordingPublisher()
    relay = Relay(
        Settings.from_env(
            {},
            partitions=1,
            batch_size=scenario["batch_size"],
            max_retries=scenario["max_retries"],
            backoff_base_seconds=1,
            backoff_max_seconds=8,
            backpressure_max_seconds=30,
        ),
        store,
        publisher,
        owner="property",
        clock=clock,
    )
    aggregates: list[list[str]] = []
    for number, size in enumerate(scenario["sizes"]):
        ids = store.add(
            *(
                OutboxMessage(
                    aggregate_type="Order", aggregate_id=str(number), event_type=f"E{n}", payload={}
                )
                for n in range(size)
            )
        )
        aggregates.append([str(i) for i in ids])
    every = [event_id for ids in aggregates for event_id in ids]
    faulted: set[str] = set()
    for index, fault in scenario["faults"].items():
        event_id = every[index]
        faulted.add(event_id)
        if fault.kind == "raise":
            publisher.raise_on(event_id, exception=fault.exception("planned"), times=fault.times)
        elif fault.kind == "fail":
            publisher.fail(event_id, times=fault.times)
        else:
            publisher.nack(event_id, times=fault.times)

    for step in range(200):  # 200 s of fake time: every backoff and backpressure bound ends
        publisher.unavailable = step in scenario["outages"]
        drain(relay)
        clock.advance(1.0)
    publisher.unavailable = False
    drain(relay)

    sent = publisher.published_ids()
    copies = Counter(sent)
    first_arrivals = list(dict.fromkeys(sent))
    for ids in aggregates:
        arrived = [i for i in first_arrivals if i in set(ids)]
        # In order, and only a prefix: nothing overtakes a message that has not gone out.
        assert arrived == ids[: len(arrived)]
        if not faulted & set(ids):
            assert arrived == ids, "a healthy aggregate was not published completely"
        if len(arrived) < len(ids):
            stuck = store.row(uuid.UUID(ids[len(arrived)]))
            assert stuck is not None and stuck.parked, (
                "an aggregate was left neither sent nor parked"
            )
    for message in publisher.published:
        if copies[message.event_id] > 1 and message is not _first(publisher, message.event_id):
            assert message.headers[H_REDELIVERED] is True
    # Each failed attempt re-sends a message at most once more.
    assert max(copies.values(), default=1) <= 2 + 4 * (scenario["max_retries"] + 1)


def _first(publisher: RecordingPublisher, event_id: str) -> Any:
    return next(m for m in publisher.published if m.event_id == event_id)
