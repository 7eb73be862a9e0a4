"""deploy/grafana: the dashboard's shape, its PromQL (parsed by promtool), and provisioning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.helpers import (
    DEPLOY,
    ROOT,
    dump_yaml,
    load_yaml,
    metric_names,
    output,
    run,
    substitute_grafana_variables,
    unknown_metrics,
)

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "outbox.json"

# Panel title -> fragments its queries must contain, together.
REQUIRED_PANELS = {
    "Outbox queue depth": ["outbox_pending_messages"],
    "Publish rate": ["rate(outbox_messages_published_total"],
    "Publish latency p50 / p95 / p99": [
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "outbox_publish_latency_seconds_bucket",
    ],
    "Publish errors by type": ["by (error_type)", "outbox_publish_errors_total"],
    "Top aggregate types by volume": ["topk(", "by (aggregate_type)"],
    "Dead letters and parked aggregates": [
        "outbox_dead_letter_messages",
        "outbox_parked_aggregates",
    ],
    "Partitions unowned / lease losses": ["outbox_partitions_unowned", "outbox_lease_lost_total"],
    "Oldest pending age": ["outbox_oldest_pending_age_seconds"],
    "Consumer lag": ["outbox_consumer_lag_messages"],
    "Consumer oldest message age": ["outbox_consumer_oldest_message_age_seconds"],
    "Dead tuples": ["outbox_table_dead_tuples"],
    "Circuit state": ["outbox_circuit_open"],
}


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def panels() -> list[dict[str, Any]]:
    return list(dashboard()["panels"])


def data_panels() -> list[dict[str, Any]]:
    return [panel for panel in panels() if panel["type"] != "row"]


def exprs() -> list[tuple[str, str]]:
    """(where, expr) of every query, Grafana variables replaced by PromQL values."""
    return [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
        for panel in data_panels()
        for target in panel["targets"]
    ]


def test_dashboard_shape() -> None:
    data = dashboard()
    assert data["title"]
    assert data["uid"] == "outbox-relay"
    assert isinstance(data["schemaVersion"], int)
    assert data["schemaVersion"] >= 36
    assert data["panels"]
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels():
        for key in ("id", "type", "title", "gridPos"):
            assert key in panel, f"panel {panel.get('title')!r} has no {key}"
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid), panel["title"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no targets"
        for target in panel["targets"]:
            assert target["refId"] and target["expr"].strip(), panel["title"]
            assert target["datasource"]["type"] == "prometheus", panel["title"]


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels():
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']!r} overlaps {other!r}"


def test_every_query_parses(promtool: str, tmp_path: Path) -> None:
    """promtool has no PromQL-only check: one recording rule per query, then check rules."""
    queries = exprs()
    rule_file = tmp_path / "dashboard_queries.yml"
    rule_file.write_text(
        dump_yaml(
            {
                "groups": [
                    {
                        "name": "dashboard",
                        "rules": [
                            {
                                "record": f"dashboard:query_{index}",
                                "expr": substitute_grafana_variables(expr),
                            }
                            for index, (_where, expr) in enumerate(queries)
                        ],
                    }
                ]
            }
        ),
        encoding="utf-8",
    )
    result = run([promtool, "check", "rules", str(rule_file)])
    assert result.returncode == 0, output(result)
    assert f"{len(queries)} rules found" in result.stdout, output(result)


def test_queries_use_only_catalog_metrics() -> None:
    queries = [substitute_grafana_variables(expr) for _where, expr in exprs()]
    assert all(metric_names(query) for query in queries)
    assert unknown_metrics(queries) == {}


@pytest.mark.parametrize("title", sorted(REQUIRED_PANELS))
def test_required_panel(title: str) -> None:
    matching = [panel for panel in data_panels() if panel["title"] == title]
    assert matching, f"no panel titled {title!r}"
    text = " ".join(target["expr"] for target in matching[0]["targets"])
    for fragment in REQUIRED_PANELS[title]:
        assert fragment in text, f"panel {title!r} does not query {fragment!r}"


def test_datasource_provisioning_matches_the_dashboard() -> None:
    config = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == source["uid"]
    for panel in data_panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_provisioning_points_at_the_mounted_dashboards() -> None:
    config = load_yaml(GRAFANA / "provisioning" / "dashboards" / "outbox.yml")
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    grafana = load_yaml(ROOT / "docker-compose.yml")["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts.get("./deploy/grafana/dashboards") == path
    assert mounts.get("./deploy/grafana/provisioning") == "/etc/grafana/provisioning"
