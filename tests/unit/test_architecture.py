"""The package's shape, checked: no SQL outside the store, no borrowed private names, small
modules. (Layering and import cycles are checked by import-linter: `lint-imports`, contracts in
pyproject.toml.) Each checker is tested on a planted violation, so a checker that finds nothing
cannot pass unnoticed."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "outbox_tasks"
# Where SQL text may live (docs/architecture.md): the store package and the consumer's store.
SQL_HOMES = ("store/", "consumer/store.py")
MAX_MODULE_LINES = 520
# NamedTuple's public API is underscored so that it cannot clash with field names.
NAMEDTUPLE_API = frozenset({"_fields", "_asdict", "_replace", "_make", "_field_defaults"})
# Statements, written the way this code base writes SQL (keywords upper case).
SQL_STATEMENT = re.compile(
    r"\b(SELECT\s+[\w*(]|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|WITH\s+\w+\s+AS\s*\(|"
    r"ON\s+CONFLICT|LOCK\s+TABLE)"
)


def modules() -> Iterator[tuple[str, str]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), path.read_text(encoding="utf-8")


def docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def sql_strings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string constant that holds an SQL statement (docstrings excluded)."""
    tree = ast.parse(source)
    skip = docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in skip
            and SQL_STATEMENT.search(node.value)
        ):
            found.append((node.lineno, node.value.strip().splitlines()[0][:60]))
    return found


def private_imports(source: str, module: str) -> list[tuple[int, str]]:
    """(line, name) of every underscored name imported from another outbox_tasks module, or
    read as an attribute of an imported outbox_tasks module."""
    tree = ast.parse(source)
    found = []
    imported_modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level == 0 and not target.startswith("outbox_tasks"):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append((node.lineno, f"{target}.{alias.name}"))
                else:
                    imported_modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("outbox_tasks"):
                    imported_modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and node.attr not in NAMEDTUPLE_API
            and isinstance(node.value, ast.Name)
            and node.value.id in imported_modules
            and node.value.id not in {"self", "cls"}
        ):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


def test_the_sql_checker_finds_a_planted_statement() -> None:
    source = 'from sqlalchemy import text\nQ = text("DELETE FROM outbox WHERE id = :id")\n'
    assert sql_strings(source) == [(2, "DELETE FROM outbox WHERE id = :id")]
    assert sql_strings('"""SELECT x FROM y is only prose in a docstring."""\n') == []


def test_the_private_name_checker_finds_planted_imports() -> None:
    source = (
        "from outbox_tasks.cli import _alembic_config\n"
        "from outbox_tasks import publisher\n"
        "publisher._describe(None)\n"
        "from collections import _sentinel\n"
    )
    assert private_imports(source, "x") == [
        (1, "outbox_tasks.cli._alembic_config"),
        (3, "publisher._describe"),
    ]


def test_no_sql_text_lives_outside_the_store() -> None:
    offenders = [
        f"{name}:{line}: {snippet}"
        for name, source in modules()
        if not name.startswith(SQL_HOMES)
        for line, snippet in sql_strings(source)
    ]
    assert offenders == [], "SQL belongs in store/ (one named function per statement)"


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = [
        f"{name}:{line}: {what}"
        for name, source in modules()
        for line, what in private_imports(source, name)
    ]
    assert offenders == [], "make the name public where it is defined, or keep it in its module"


@pytest.mark.parametrize("name", [name for name, _ in modules()])
def test_every_module_stays_small(name: str) -> None:
    lines = (PACKAGE / name).read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines: split it by concern"
