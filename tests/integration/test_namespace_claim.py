"""A deployment's namespace is held on its Redis broker by its database (issue 11, item 4)."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import Engine

from outbox_tasks.deployment import NamespaceConflict, claim_namespace, identify
from outbox_tasks.settings import Settings
from tests.support import services


def test_the_database_holding_a_namespace_keeps_it_and_another_is_refused_naming_the_fix(
    settings: Settings, engine: Engine
) -> None:
    mine = settings.with_changes(namespace=services.unique("ns"))
    identity = identify(engine)

    assert identity.endswith("/" + mine.database_url.rsplit("/", 1)[1])
    assert claim_namespace(mine, identity)
    assert claim_namespace(mine, identity)  # refreshing is fine
    with pytest.raises(NamespaceConflict) as caught:
        claim_namespace(mine, "123/another")
    message = str(caught.value)
    assert "\n" not in message
    assert f"OUTBOX_NAMESPACE={mine.namespace!r} is already used on this broker" in message
    assert "give each deployment sharing the broker its own OUTBOX_NAMESPACE" in message


def test_on_rabbitmq_as_celerys_broker_the_namespace_is_not_held(
    settings: Settings, amqp_url: str
) -> None:
    assert claim_namespace(settings.with_changes(broker_url=amqp_url), "1/x") is False
