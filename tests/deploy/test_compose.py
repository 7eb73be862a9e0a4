"""docker-compose.yml, .env.example, the Dockerfile: validated by docker-compose itself.

docker-compose (Debian's package, v1) resolves and validates the file without a Docker engine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.helpers import DEPLOY, ROOT, load_yaml, output, parse_yaml, run

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SECRET_VARIABLES = (
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "FLOWER_BASIC_AUTH",
    "GRAFANA_ADMIN_PASSWORD",
)
LONG_RUNNING = ("postgres", "redis", "worker", "beat", "flower", "prometheus", "grafana")


def compose_env() -> dict[str, str]:
    """No variable from the developer's shell: .env is the only source of values."""
    return {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}


def compose(docker_compose: str, env_file: Path, *args: str) -> Any:
    return run(
        [docker_compose, "-f", str(COMPOSE), "--env-file", str(env_file), *args],
        cwd=ROOT,
        env=compose_env(),
    )


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / ".env"
    path.write_text(ENV_EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def resolved(docker_compose: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    result = compose(docker_compose, env_file, "config")
    assert result.returncode == 0, output(result)
    data = parse_yaml(result.stdout)
    assert isinstance(data, dict)
    return data


def raw() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def published(port: Any) -> tuple[str, str]:
    """(host ip, host port) of a port entry, short ('127.0.0.1:5555:5555/tcp') or long syntax."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port.get("published", ""))
    parts = str(port).split("/")[0].split(":")
    if len(parts) == 3:
        return parts[0], parts[1]
    if len(parts) == 2:
        return "", parts[0]
    return "", ""


def test_compose_config_is_valid(docker_compose: str, env_file: Path) -> None:
    result = compose(docker_compose, env_file, "config", "-q")
    assert result.returncode == 0, output(result)


@pytest.mark.parametrize("variable", SECRET_VARIABLES)
def test_compose_refuses_to_start_without_a_secret(
    docker_compose: str, env_file: Path, variable: str
) -> None:
    lines = env_file.read_text(encoding="utf-8").splitlines()
    env_file.write_text(
        "\n".join(line for line in lines if not line.startswith(f"{variable}=")) + "\n",
        encoding="utf-8",
    )
    result = compose(docker_compose, env_file, "config", "-q")
    assert result.returncode != 0, output(result)
    assert variable in result.stdout + result.stderr, output(result)


def test_services(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == {*LONG_RUNNING, "migrate"}


def test_worker_is_scalable(resolved: dict[str, Any]) -> None:
    worker = resolved["services"]["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports"), "a fixed host port prevents --scale worker=N"
    assert worker["stop_grace_period"] in ("60s", "1m", "1m0s"), "warm shutdown needs time"
    assert "outbox.claim,outbox.publish,outbox.maintenance" in " ".join(worker["command"])


def test_flower_is_bound_to_loopback_with_basic_auth_from_env(resolved: dict[str, Any]) -> None:
    flower = resolved["services"]["flower"]
    assert flower["ports"]
    for port in flower["ports"]:
        assert published(port)[0] == "127.0.0.1", port
    assert raw()["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith(
        "${FLOWER_BASIC_AUTH:?"
    )
    assert "OUTBOX_DATABASE_URL" not in flower["environment"], "Flower needs the broker only"


def test_every_published_port_is_on_loopback(resolved: dict[str, Any]) -> None:
    for name, service in resolved["services"].items():
        for port in service.get("ports") or []:
            assert published(port)[0] == "127.0.0.1", f"{name}: {port}"


def test_beat_runs_once_and_serves_nothing(resolved: dict[str, Any]) -> None:
    beat = resolved["services"]["beat"]
    assert "beat" in beat["command"]
    assert not beat.get("ports")
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    assert "scale" not in beat


def test_healthchecks_restart_policies_and_start_order(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        assert services[name].get("restart") in ("unless-stopped", "always"), name
    assert services["migrate"].get("restart") == "no"
    assert services["migrate"]["command"] == ["outbox-tasks", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    assert services["beat"]["healthcheck"]["test"][-2:] == ["outbox-tasks", "status"]


def test_metrics_travel_on_an_internal_network(resolved: dict[str, Any]) -> None:
    assert resolved["networks"]["metrics"].get("internal") is True
    services = resolved["services"]
    for name in ("worker", "flower", "prometheus", "grafana"):
        assert "metrics" in services[name]["networks"], name
    for name in ("postgres", "redis"):
        assert "metrics" not in services[name]["networks"], name


def test_prometheus_gets_the_rules_and_scrapes_every_worker(resolved: dict[str, Any]) -> None:
    prometheus = raw()["services"]["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert "alerts.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (discovery,) = jobs["outbox-workers"]["dns_sd_configs"]
    assert discovery["names"] == ["worker"], "DNS service discovery of the scaled service"
    port = resolved["services"]["worker"]["environment"]["OUTBOX_METRICS_PORT"]
    assert str(discovery["port"]) == str(port)
    assert jobs["flower"]["static_configs"][0]["targets"] == ["flower:5555"]


_INTERPOLATION = re.compile(r"\$\{[A-Z0-9_]+(?::?[-?][^}]*)?\}")


def _strings(node: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [item for key, value in node.items() for item in _strings(value, f"{path}.{key}")]
    if isinstance(node, list):
        return [item for index, value in enumerate(node) for item in _strings(value, path)]
    return [(path, str(node))] if isinstance(node, str) else []


def test_no_literal_secrets_in_the_compose_file() -> None:
    for path, value in _strings(raw()):
        key = path.rsplit(".", 1)[-1].upper()
        if re.search(r"PASSWORD|SECRET|TOKEN|BASIC_AUTH|API_KEY", key):
            assert _INTERPOLATION.fullmatch(value.strip()), f"{path} holds a literal value"
        for userinfo in re.findall(r"://([^/@\s]*)@", value):
            leftover = _INTERPOLATION.sub("", userinfo).replace(":", "")
            assert not leftover, f"{path}: credentials in a URL must come from .env"
    for variable in SECRET_VARIABLES:
        assert f"${{{variable}:?" in COMPOSE.read_text(encoding="utf-8"), variable


def test_env_example_holds_placeholders_only() -> None:
    values = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    )
    for variable in SECRET_VARIABLES:
        assert "change-me" in values[variable], variable


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    instructions = [
        line.split(None, 1) for line in text.splitlines() if line and not line[0].isspace()
    ]
    instructions = [i for i in instructions if not i[0].startswith("#")]
    assert instructions[0] == ["FROM", "python:3.11-slim"]
    assert "pip install ." in text
    users = [args for keyword, *args in instructions if keyword == "USER"]
    assert users, "the image must not run as root"
    assert users[-1][0].split(":")[0] not in ("root", "0")
    assert instructions[-1][0] == "CMD"


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    for entry in (".env", ".git", ".tools", ".venv"):
        assert entry in ignored, entry
    for needed in ("outbox_tasks", "migrations", "alembic.ini", "pyproject.toml", "README.md"):
        assert needed not in ignored, needed
