"""deploy/prometheus: alert rules, their unit tests, the scrape config, and the runbook links."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.helpers import (
    DEPLOY,
    RUNBOOK,
    RUNBOOK_URL,
    load_yaml,
    metric_names,
    output,
    run,
    runbook_anchors,
    unknown_metrics,
)

PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))

EXPECTED_ALERTS = {
    "OutboxPendingMessagesHigh",
    "OutboxPublishErrorRateHigh",
    "OutboxPublisherNotRunning",
    "OutboxWorkersDown",
    "OutboxOldestMessageTooOld",
    "OutboxDeadLetters",
    "OutboxAggregatesParked",
    "OutboxPartitionsUnowned",
    "OutboxCircuitOpenTooLong",
    "OutboxRelayStalled",
    "OutboxTableBloat",
    "OutboxConsumerLag",
    "OutboxBrokerBackpressure",
    "OutboxUnknownPublishErrors",
}

# Topics the on-call person must find in the runbook, besides one section per alert.
RUNBOOK_TOPICS = {
    "high-pending-message-count",
    "publisher-not-running",
    "consumer-lag",
    "stuck-consumer-partition",
    "failed-message-investigation",
    "dead-letters-and-replay",
    "bloat",
    "publish-error-reasons",
    "deployments-sharing-a-broker",
}


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def test_promtool_check_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, output(result)


def test_promtool_rule_unit_tests(promtool: str) -> None:
    assert RULE_TESTS, "no promtool unit tests in deploy/prometheus/tests/"
    result = run([promtool, "test", "rules", *map(str, RULE_TESTS)])
    assert result.returncode == 0, output(result)
    assert "FAILED" not in result.stdout + result.stderr, output(result)


def test_promtool_check_config(promtool: str) -> None:
    result = run([promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert result.returncode == 0, output(result)


def test_the_expected_alerts_exist() -> None:
    assert {rule["alert"] for rule in alert_rules()} == EXPECTED_ALERTS


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    for rule in alert_rules():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in ("critical", "warning"), name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert str(annotations.get(key, "")).strip(), f"{name}: no {key}"
        assert "{{" in annotations["description"], f"{name}: the description shows no value"
        assert annotations["runbook_url"] == f"{RUNBOOK_URL}#{name.lower()}", name


def test_every_runbook_url_anchor_exists_in_the_runbook() -> None:
    anchors = runbook_anchors(RUNBOOK.read_text(encoding="utf-8"))
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_URL + "#"), url
        anchor = url.split("#", 1)[1]
        assert anchor in anchors, f"{rule['alert']}: docs/runbook.md has no #{anchor}"


def test_runbook_internal_links_and_topics() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    anchors = runbook_anchors(text)
    missing_topics = RUNBOOK_TOPICS - anchors
    assert not missing_topics, f"docs/runbook.md lacks sections: {sorted(missing_topics)}"
    broken = {link for link in re.findall(r"\]\(#([^)]+)\)", text) if link not in anchors}
    assert not broken, f"docs/runbook.md links to missing anchors: {sorted(broken)}"


def test_every_alert_section_says_how_to_confirm_fix_and_verify() -> None:
    sections = re.split(r"^## ", RUNBOOK.read_text(encoding="utf-8"), flags=re.MULTILINE)
    by_title = {section.splitlines()[0].strip(): section for section in sections[1:]}
    for name in EXPECTED_ALERTS:
        section = by_title.get(name)
        assert section is not None, f"docs/runbook.md has no '## {name}' section"
        for step in ("Confirm", "Look at", "Fix", "Verify"):
            assert re.search(rf"\*\*[^*\n]*{step}[^*\n]*\*\*", section), (
                f"runbook section {name} lacks a **{step}** step"
            )


def test_rules_use_only_catalog_metrics() -> None:
    exprs = [str(rule["expr"]) for rule in rules()]
    assert all(metric_names(expr) for expr in exprs)
    assert unknown_metrics(exprs) == {}
    # Queries inside annotation templates: {{ with query `...` }}
    queries = [
        query
        for rule in alert_rules()
        for text in rule.get("annotations", {}).values()
        for query in re.findall(r"query\s+`([^`]*)`", str(text))
    ]
    assert queries
    assert unknown_metrics(queries) == {}


def _unit_test_cases() -> dict[str, dict[str, int]]:
    """Per alert name: how many checks expect it firing, how many expect it quiet."""
    counts: dict[str, dict[str, int]] = {}
    for path in RULE_TESTS:
        data = load_yaml(path)
        assert data["rule_files"] == ["../alerts.yml"], path
        for case in data["tests"]:
            for check in case.get("alert_rule_test", []):
                kind = "firing" if check.get("exp_alerts") else "quiet"
                entry = counts.setdefault(check["alertname"], {"firing": 0, "quiet": 0})
                entry[kind] += 1
    return counts


@pytest.mark.parametrize("alert", sorted(EXPECTED_ALERTS))
def test_every_alert_has_a_firing_and_a_quiet_unit_test(alert: str) -> None:
    counts = _unit_test_cases().get(alert, {"firing": 0, "quiet": 0})
    assert counts["firing"] >= 1, f"{alert}: no promtool test expects it to fire"
    assert counts["quiet"] >= 1, f"{alert}: no promtool test expects it to stay quiet"


def test_unit_tests_check_the_annotations_they_expect() -> None:
    for path in RULE_TESTS:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                for alert in check.get("exp_alerts") or []:
                    annotations = alert.get("exp_annotations", {})
                    assert {"summary", "description", "runbook_url"} <= set(annotations), (
                        f"{Path(path).name}: {case['name']}"
                    )


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('absent(up{job="outbox-workers"} == 1)', {"up"}),
        (
            "histogram_quantile(0.99, sum by (le) (rate(outbox_publish_latency_seconds_bucket"
            "[$__rate_interval])))".replace("$__rate_interval", "5m"),
            {"outbox_publish_latency_seconds_bucket"},
        ),
        ("(time() - max(a_b)) > 300 and on () max(c) > 1e6", {"a_b", "c"}),
        ('sum by (group, outcome) (rate(x_total{outcome="ok"}[5m] offset 1h))', {"x_total"}),
        ("topk(10, sum without (instance) (y)) or vector(0)", {"y"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
