"""The command line's contract, without services: the exit codes (0 ok, 1 an OutboxError, 2 a
usage or configuration error, 130 Ctrl-C), help that names the variable behind each option, and
the two other ways in (``python -m outbox_tasks.consumer``, ``celery -A outbox_tasks outbox``)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from outbox_tasks.cli import main, outbox, settings_from_options
from outbox_tasks.settings import describe, env_var

ROOT = Path(__file__).resolve().parents[2]
# A database nobody listens on: commands that fail before connecting never notice.
NOWHERE = "postgresql://127.0.0.1:1/nowhere"
# Each option of settings_from_options, and the variable it overrides.
OVERRIDES = {
    "database_url": env_var("database_url"),
    "broker_url": env_var("publish_url"),
    "exchange": env_var("exchange"),
}


def commands(group: click.Group = outbox, path: str = "") -> Iterator[tuple[str, click.Command]]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        yield f"{path}{name}", command
        if isinstance(command, click.Group):
            yield from commands(command, f"{path}{name} ")


def test_the_overrides_the_help_checks_are_the_ones_the_settings_helper_takes() -> None:
    assert set(inspect.signature(settings_from_options).parameters) == set(OVERRIDES)


def test_every_option_that_overrides_a_variable_names_it_in_its_help() -> None:
    unnamed = [
        f"{path} --{option.name}"
        for path, command in commands()
        for option in command.params
        if isinstance(option, click.Option)
        and option.name in OVERRIDES
        and f"env {OVERRIDES[option.name]}" not in (option.help or "")
    ]
    assert unnamed == []


def test_every_variable_a_help_text_names_exists() -> None:
    known = {var for var, _default, _doc in describe()}
    texts = [(path, command.help or "") for path, command in commands()] + [
        (f"{path} --{p.name}", p.help or "")
        for path, command in commands()
        for p in command.params
        if isinstance(p, click.Option)
    ]
    unknown = [(where, var) for where, text in texts for var in re.findall(r"OUTBOX_[A-Z_]+", text)]
    assert [(where, var) for where, var in unknown if var not in known] == []
    assert unknown, "the help names no variable at all: this check would pass on anything"


def test_help_exits_0_and_a_usage_error_exits_2() -> None:
    assert main(["--help"]) == 0
    assert main(["dlq", "list", "--help"]) == 0
    for argv in ([], ["bogus"], ["dlq"], ["dlq", "list", "--status", "nope"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2, argv


def test_a_bad_variable_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OUTBOX_PARTITIONS", "many")

    assert main(["config"]) == 2
    assert "configuration error: OUTBOX_PARTITIONS='many'" in capsys.readouterr().err


def test_an_outbox_error_exits_1_with_its_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dlq", "show", "not-a-uuid", "--database-url", NOWHERE]) == 1
    assert "outbox-tasks: not an event id: not-a-uuid" in capsys.readouterr().err


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted() -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("outbox_tasks.cli.commands.config_table", interrupted)

    assert main(["config", "--markdown"]) == 130


def python_m(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m argv...`` from the source tree, without the developer's OUTBOX_* variables."""
    return subprocess.run(
        [sys.executable, "-m", *argv],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")},
        timeout=120,
    )


def test_python_m_outbox_tasks_consumer_is_the_same_command_line() -> None:
    shown = python_m("outbox_tasks.consumer", "consume", "--help")

    assert shown.returncode == 0, shown.stderr
    assert "Usage: python -m outbox_tasks.consumer consume [OPTIONS]" in shown.stdout
    assert f"env {env_var('publish_url')}" in shown.stdout


def test_celery_runs_the_commands_as_celery_outbox_with_the_same_exit_codes() -> None:
    # Found through the `celery.commands` entry point of the installed package.
    celery = ["celery", "-A", "outbox_tasks", "outbox"]
    ran = python_m(*celery, "dlq", "show", "not-a-uuid", "--database-url", NOWHERE)

    assert ran.returncode == 1, ran.stderr
    assert "not an event id: not-a-uuid" in ran.stderr
