"""``outbox-tasks demo``: placeholder replaced below."""
from __future__ import annotations
import argparse
from typing import Any


def add_demo_parser(sub: Any) -> None:
    pass
