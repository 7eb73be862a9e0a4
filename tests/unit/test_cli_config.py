"""`outbox-tasks config` prints every setting as written in its variable, never a password
(issue 11, item 8); a refused URL is named without its password too."""

from __future__ import annotations

import os
import subprocess
import sys

SECRETS = {
    "OUTBOX_DATABASE_URL": "postgresql://app:dbsecret@db:5432/orders",
    "OUTBOX_BROKER_URL": "redis://:brokersecret@cache:6379/0",
    "OUTBOX_PUBLISH_URL": "amqp://app:publishsecret@rabbit:5672//?password=querysecret",
}


def _config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    return subprocess.run(
        [sys.executable, "-m", "outbox_tasks.cli", "config"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_outbox_tasks_config_prints_every_url_without_its_password() -> None:
    result = _config(SECRETS)

    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for secret in ("dbsecret", "brokersecret", "publishsecret", "querysecret"):
        assert secret not in output
    assert "OUTBOX_DATABASE_URL='postgresql://app:***@db:5432/orders'" in result.stdout
    assert "OUTBOX_BROKER_URL='redis://:***@cache:6379/0'" in result.stdout
    assert "OUTBOX_PARTITIONS='8'" in result.stdout


def test_a_refused_url_is_named_without_its_password() -> None:
    result = _config({"OUTBOX_DATABASE_URL": "postgresql://app:dbsecret@db:notaport/orders"})

    assert result.returncode != 0
    assert "dbsecret" not in result.stdout + result.stderr
    assert "OUTBOX_DATABASE_URL='postgresql://app:***@db:notaport/orders'" in result.stderr
