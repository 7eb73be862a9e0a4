"""Publishers for tests: the real one, wrapped to misbehave on purpose."""

from __future__ import annotations

from collections.abc import Iterable

from outbox_tasks.publisher import BrokerPublisher
from outbox_tasks.testing import RecordingPublisher


class RefusingPublisher(RecordingPublisher):
    """Wraps the real publisher and fails every attempt of chosen events (a poison message).
    ``attempts`` counts the attempts per event id."""

    def __init__(self, inner: BrokerPublisher, refuse: Iterable[str] = ()) -> None:
        super().__init__(inner)
        self.fail(*refuse, times=None, error="PoisonError: refused by test")
