"""The shared broker plumbing (outbox_tasks.broker) and error descriptions, without a broker."""

from __future__ import annotations

import json

import pytest

from outbox_tasks.broker import (
    as_bytes,
    broker_call,
    broker_scheme,
    decode_redis_item,
    is_amqp,
    mark_redelivered,
)
from outbox_tasks.errors import BrokerUnavailable, ConfigurationError, describe_error

URL = "redis://user:s3cret@127.0.0.1:6379/0"


def test_describe_error_is_one_line_with_the_type_and_bounded() -> None:
    assert describe_error(ValueError("bad\n  value")) == "ValueError: bad value"
    assert describe_error(KeyError()) == "KeyError"
    long = describe_error(RuntimeError("x" * 500), limit=20)
    assert long == "RuntimeError: " + "x" * 17 + "..."


def test_only_redis_and_amqp_urls_are_accepted_and_the_password_is_never_shown() -> None:
    assert broker_scheme("REDISS://h:6379/0") == "rediss"
    assert not is_amqp(URL)
    assert is_amqp("pyamqp://guest:guest@h//")
    with pytest.raises(ConfigurationError) as caught:
        is_amqp("memory://user:s3cret@h/")
    assert "s3cret" not in str(caught.value)


def test_a_broker_outage_becomes_broker_unavailable_after_the_failure_hook() -> None:
    dropped: list[str] = []

    with (
        pytest.raises(BrokerUnavailable) as caught,
        broker_call(URL, "testing", on_failure=lambda: dropped.append("dropped")),
    ):
        raise ConnectionRefusedError("refused")

    assert dropped == ["dropped"]
    assert "unavailable while testing: ConnectionRefusedError: refused" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


def test_our_own_errors_and_bugs_pass_through_the_broker_call_unchanged() -> None:
    dropped: list[str] = []

    for error in (ConfigurationError("ours"), KeyError("bug")):
        with (
            pytest.raises(type(error)),
            broker_call(URL, "testing", on_failure=lambda: dropped.append("x")),
        ):
            raise error

    assert dropped == ["x", "x"]


def test_a_redis_item_decodes_and_can_be_marked_redelivered() -> None:
    item = json.dumps(
        {
            "body": "aGk=",
            "headers": {"h": 1},
            "properties": {"body_encoding": "base64", "message_id": "m-1"},
        }
    ).encode()

    assert decode_redis_item(item) == (b"hi", {"h": 1}, False, "m-1")
    assert decode_redis_item(mark_redelivered(item)) == (b"hi", {"h": 1}, True, "m-1")
    assert decode_redis_item(b"not json") == (b"not json", {}, False, None)
    assert as_bytes({"a": 1}) == b'{"a": 1}'
