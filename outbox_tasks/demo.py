"""``outbox-tasks demo``: placeholder replaced below."""

from __future__ import annotations

from typing import Any


def add_demo_parser(sub: Any) -> None:
    pass
