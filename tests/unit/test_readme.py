"""The README's configuration table is generated from the settings object; keep them in sync."""

from __future__ import annotations

from pathlib import Path

from outbox_tasks.cli import config_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_configuration_table_matches_the_settings_object() -> None:
    text = README.read_text()
    start = text.index("<!-- config-table:start -->") + len("<!-- config-table:start -->")
    end = text.index("<!-- config-table:end -->")
    assert text[start:end].strip() == config_table(), (
        "README configuration table is stale: regenerate it with `outbox-tasks config --markdown`"
    )


def test_the_readme_names_both_commands_that_ci_and_people_run() -> None:
    text = README.read_text()
    assert "scripts/demo.sh" in text
    assert "scripts/test.sh" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci
