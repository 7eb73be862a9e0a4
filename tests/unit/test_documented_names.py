"""What the README and docs/ tell people to import, call or open exists: every
``from outbox_tasks... import ...`` in a code block, every `outbox_tasks.module.name` in
backticks, and every `outbox_tasks/path.py` they name. Moving code cannot strand the docs."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
DOTTED = re.compile(r"`(outbox_tasks(?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"`(outbox_tasks/[\w/]*?(?:\.py|/))`")


def resolves(dotted: str) -> bool:
    """True when ``dotted`` is a module of the package, or a name reachable from one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


def imported_names(code: str) -> list[str]:
    """``module.name`` of every ``from outbox_tasks... import name`` in a block of Python."""
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("outbox_tasks"):
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.extend(a.name for a in node.names if a.name.startswith("outbox_tasks"))
    return names


def references(text: str) -> list[str]:
    found = [name for block in CODE_BLOCK.findall(text) for name in imported_names(block)]
    return found + DOTTED.findall(text)


def unresolved(text: str) -> list[str]:
    return [name for name in references(text) if not resolves(name)]


def test_the_checker_finds_a_stranded_import_and_a_stranded_reference() -> None:
    text = (
        "```python\nfrom outbox_tasks.cleanup import no_such_name, run_cleanup\n```\n"
        "Call `outbox_tasks.status.no_such_function(engine)` or `outbox_tasks.status.Status`."
    )
    assert unresolved(text) == [
        "outbox_tasks.cleanup.no_such_name",
        "outbox_tasks.status.no_such_function",
    ]


def test_every_name_the_docs_import_or_mention_exists() -> None:
    missing = [
        f"{doc.relative_to(ROOT)}: {name}"
        for doc in DOCS
        for name in unresolved(doc.read_text(encoding="utf-8"))
    ]
    assert missing == [], "the docs name code that is not there (moved? renamed?)"


def test_every_source_path_the_docs_name_exists() -> None:
    missing = [
        f"{doc.relative_to(ROOT)}: {path}"
        for doc in DOCS
        for path in PATH.findall(doc.read_text(encoding="utf-8"))
        if not (ROOT / path).exists()
    ]
    assert missing == [], "the docs point at files that are not there (moved? renamed?)"
