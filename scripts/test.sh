#!/usr/bin/env bash
# The test command: venv + install, services up, lint, type-check, then the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(scripts/venv.sh)
scripts/tools.sh "$VENV"
scripts/ensure-services.sh
echo "== ruff"
"$VENV/bin/ruff" check outbox_tasks tests migrations
"$VENV/bin/ruff" format --check outbox_tasks tests migrations
echo "== mypy (strict)"
"$VENV/bin/mypy" outbox_tasks
echo "== import-linter (layers, no cycles; contracts in pyproject.toml)"
"$VENV/bin/lint-imports"
echo "== pytest"
exec "$VENV/bin/pytest" "$@"
