"""Parsers of ``OUTBOX_*`` values: each takes the raw string and returns the typed value, or
raises :class:`Invalid` saying what is expected (``settings`` names the variable)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from urllib.parse import urlsplit


class Invalid(ValueError):
    """Raised by a parser; turned into a ConfigurationError naming the variable."""


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    expected = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"

    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise Invalid(expected) from None
        if value < low or (high is not None and value > high):
            raise Invalid(expected)
        return value

    return parse


def seconds(*, allow_zero: bool = False) -> Callable[[str], float]:
    expected = "a number of seconds >= 0" if allow_zero else "a number of seconds > 0"

    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise Invalid(expected) from None
        if not math.isfinite(value):
            raise Invalid(expected)
        if value < 0 or (value == 0 and not allow_zero):
            raise Invalid(expected)
        return value

    return parse


def boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise Invalid("one of true/false, yes/no, on/off, 1/0")


def choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise Invalid("one of " + ", ".join(choices))
        return value

    return parse


def url(*schemes: str) -> Callable[[str], str]:
    expected = "a URL starting with " + " or ".join(f"{s}://" for s in schemes)

    def parse(raw: str) -> str:
        value = raw.strip()
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            raise Invalid(expected) from None
        if parts.scheme not in schemes or not (parts.hostname or parts.path.strip("/")):
            raise Invalid(expected)
        return value

    return parse


def optional_url(*schemes: str) -> Callable[[str], str | None]:
    inner = url(*schemes)

    def parse(raw: str) -> str | None:
        return inner(raw) if raw.strip() else None

    return parse


NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")


def name(raw: str) -> str:
    value = raw.strip()
    if not NAME.match(value):
        raise Invalid("a non-empty name of letters, digits, '.', '_', ':' or '-'")
    return value


def string(raw: str) -> str:
    return raw.strip()


def event_type_policies(raw: str) -> dict[str, str]:
    """``OrderViewed=skip,PriceChanged=skip``: event types whose dead letters do not park."""
    result: dict[str, str] = {}
    expected = "a comma-separated list of EventType=park|skip"
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, policy = item.partition("=")
        if not sep or not name.strip() or policy.strip() not in ("park", "skip"):
            raise Invalid(expected)
        result[name.strip()] = policy.strip()
    return result
