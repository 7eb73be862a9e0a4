"""Shared by the deploy/ tests: where things are, the validation tools, PromQL metric names.

The tools (promtool, docker-compose, kubernetes-validate) are installed by ``scripts/tools.sh``.
A missing tool fails a test under CI=true and skips it otherwise, saying how to install it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest

from outbox_tasks.metrics import METRIC_CATALOG

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TOOLS_BIN = ROOT / ".tools" / "bin"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/outbox-tasks/outbox_tasks/blob/main/docs/runbook.md"

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
INSTALL_HINT = "install the deploy tools: scripts/tools.sh <venv> (e.g. scripts/tools.sh .venv)"


def missing(what: str) -> NoReturn:
    """A tool is not installed: fail under CI, skip elsewhere, with the install command."""
    message = f"{what} is not installed; {INSTALL_HINT}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def find_tool(name: str) -> str | None:
    """``.tools/bin``, then the running interpreter's bin directory (venv), then PATH."""
    for directory in (TOOLS_BIN, Path(sys.executable).parent):
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        missing(f"{name} (looked in .tools/bin, {Path(sys.executable).parent} and PATH)")
    return path


def run(args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=300, check=False, **kwargs
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"$ {' '.join(result.args)}\nexit {result.returncode}\n{result.stdout}{result.stderr}"


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        missing("PyYAML (it comes with kubernetes-validate)")
    return yaml


def parse_yaml(text: str) -> Any:
    return _yaml().safe_load(text)


def load_yaml(path: Path) -> Any:
    return parse_yaml(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in _yaml().safe_load_all(path.read_text(encoding="utf-8")) if doc]


def dump_yaml(data: Any) -> str:
    return str(_yaml().safe_dump(data, sort_keys=False))


# -- metric names -------------------------------------------------------------------------------


def allowed_metrics() -> set[str]:
    """Series names that rules and dashboards may use: the catalog (histograms with their
    _bucket/_sum/_count series; counters carry _total in their name) and Prometheus' ``up``."""
    names = {"up"}
    for name, kind, _labels in METRIC_CATALOG:
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
}

# Grafana's built-in variables, replaced by a value PromQL accepts before parsing.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${__rate_interval}": "5m",
    "${__interval}": "1m",
    "${__range}": "1h",
}


def substitute_grafana_variables(expr: str) -> str:
    for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (identifiers that are not functions,
    aggregations, keywords, label names or label values)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # label lists
    text = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:[smhdwy]|ms)*\b", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def unknown_metrics(exprs: Iterable[str]) -> dict[str, set[str]]:
    allowed = allowed_metrics()
    bad = {}
    for expr in exprs:
        unknown = metric_names(expr) - allowed
        if unknown:
            bad[expr] = unknown
    return bad


# -- runbook anchors ----------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())  # markup is not part of the text
    text = re.sub(r"[^\w\- ]", "", text)  # punctuation goes, letters/digits/_/- stay
    return text.replace(" ", "-")


def runbook_anchors(markdown: str) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            anchor = github_anchor(heading.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            anchors.add(anchor if count == 0 else f"{anchor}-{count}")
        anchors.update(re.findall(r'<a\s+(?:id|name)="([^"]+)"', line))
    return anchors
