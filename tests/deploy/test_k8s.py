"""deploy/k8s: every manifest validated against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields fail), plus the properties the relay relies on."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.helpers import DEPLOY, load_yaml, load_yaml_all, output, run

K8S = DEPLOY / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
# Everything but the kustomization; optional/ holds CRD-based extras (ServiceMonitor), which have
# no schema here.
MANIFESTS = sorted(path for path in K8S.glob("*.yaml") if path != KUSTOMIZATION)
KUBERNETES_VERSIONS = ("1.28.0", "1.37.0")
WORKER_LABELS = {"app.kubernetes.io/name": "outbox-tasks", "app.kubernetes.io/component": "worker"}


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in load_yaml_all(path)]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents() if doc["kind"] == kind]


def deployment(name: str) -> dict[str, Any]:
    (found,) = [doc for doc in by_kind("Deployment") if doc["metadata"]["name"] == name]
    return found


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate(kubernetes_validate: str, version: str) -> None:
    result = run([kubernetes_validate, "--strict", "-k", version, *map(str, MANIFESTS)])
    assert result.returncode == 0, output(result)
    text = result.stdout + result.stderr
    assert "Couldn't find schema" not in text, output(result)
    assert text.count(" passed for resource ") == len(documents()), output(result)


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = load_yaml(KUSTOMIZATION)
    listed = set(kustomization["resources"])
    assert SECRET_EXAMPLE.name not in listed
    assert listed == {path.name for path in MANIFESTS} - {SECRET_EXAMPLE.name}
    assert kustomization["namespace"] == "outbox"


def test_secret_example_holds_placeholders_only() -> None:
    secrets = load_yaml_all(SECRET_EXAMPLE)
    assert {doc["kind"] for doc in secrets} == {"Secret"}
    for secret in secrets:
        assert "data" not in secret, "use stringData placeholders, never encoded values"
        for key, value in secret["stringData"].items():
            assert value == "" or "CHANGE-ME" in value, key


def test_workers() -> None:
    worker = deployment("outbox-worker")
    template = worker["spec"]["template"]
    assert selects(worker["spec"]["selector"], template["metadata"]["labels"])
    assert WORKER_LABELS.items() <= template["metadata"]["labels"].items()
    spec = template["spec"]
    # Longer than one publish task plus a lease: the warm shutdown finishes its batch.
    assert spec["terminationGracePeriodSeconds"] >= 60
    (container,) = spec["containers"]
    assert container["command"][:4] == ["celery", "-A", "outbox_tasks", "worker"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    (config,) = by_kind("ConfigMap")
    assert config["data"]["OUTBOX_METRICS_PORT"] == str(ports["metrics"])


def test_worker_pod_disruption_budget() -> None:
    worker_labels = deployment("outbox-worker")["spec"]["template"]["metadata"]["labels"]
    budgets = [
        pdb
        for pdb in by_kind("PodDisruptionBudget")
        if selects(pdb["spec"]["selector"], worker_labels)
    ]
    assert budgets, "no PodDisruptionBudget selects the workers"


def test_every_container_has_requests_limits_and_runs_unprivileged() -> None:
    workloads = by_kind("Deployment") + by_kind("Job")
    assert len(workloads) == 4
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        for container in pod["containers"]:
            name = f"{workload['metadata']['name']}/{container['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_beat_is_a_single_replica_recreated() -> None:
    beat = deployment("outbox-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"


def test_migrate_job() -> None:
    (job,) = by_kind("Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["outbox-tasks", "migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")


def test_flower_stays_internal() -> None:
    flower = deployment("outbox-flower")
    labels = flower["spec"]["template"]["metadata"]["labels"]
    env = {
        item["name"]: item for item in flower["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["key"] == "FLOWER_BASIC_AUTH"
    assert "OUTBOX_DATABASE_URL" not in env
    services = [
        svc
        for svc in by_kind("Service")
        if selects({"matchLabels": svc["spec"]["selector"]}, labels)
    ]
    assert services
    for service in services:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not by_kind("Ingress")
    policies = [
        policy
        for policy in by_kind("NetworkPolicy")
        if selects(policy["spec"]["podSelector"], labels) and policy["spec"].get("ingress")
    ]
    assert policies, "no NetworkPolicy restricts ingress to Flower"
    for policy in policies:
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), f"{policy['metadata']['name']}: ingress from anywhere"
            assert [port["port"] for port in rule["ports"]] == [5555]


def test_worker_metrics_service_and_optional_service_monitor() -> None:
    (service,) = [svc for svc in by_kind("Service") if svc["metadata"]["name"] == "outbox-workers"]
    assert service["spec"]["selector"] == WORKER_LABELS
    assert [port["name"] for port in service["spec"]["ports"]] == ["metrics"]
    (monitor,) = load_yaml_all(K8S / "optional" / "servicemonitor.yaml")
    assert monitor["kind"] == "ServiceMonitor"
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics"]


def test_every_document_is_a_kubernetes_object_in_the_namespace() -> None:
    assert MANIFESTS
    for path in MANIFESTS:
        for doc in load_yaml_all(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "outbox", (path, doc["kind"])
