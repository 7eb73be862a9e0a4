"""A web process that only writes events must not pay for Celery or kombu (DESIGN 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.services import ROOT

PROBE = """
import json, sys
import outbox_tasks
from outbox_tasks import OutboxMessage
OutboxMessage(aggregate_type="Order", aggregate_id=1, event_type="OrderCreated", payload={})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("celery", "kombu"))
print(json.dumps({"heavy": heavy, "has_outbox": "outbox_tasks.schema" in sys.modules}))
"""


def test_importing_the_producer_api_does_not_import_celery_or_kombu() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}

    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["has_outbox"] is True
    assert report["heavy"] == []
