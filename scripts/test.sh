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
# Most tests wait on real services and worker processes, not on the CPU: three pytest workers
# (each its own template database and Redis db) keep a 2-core machine busy. Whole files go to one
# worker, so a file's fixtures are built once. OUTBOX_TEST_WORKERS=0 runs in one process.
WORKERS=${OUTBOX_TEST_WORKERS:-3}
if [ "$WORKERS" = 0 ]; then
  exec "$VENV/bin/pytest" "$@"
fi
exec "$VENV/bin/pytest" -n "$WORKERS" --dist loadfile "$@"
