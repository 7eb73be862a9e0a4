#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install outbox_tasks with its dev extra.
# Prints the venv path. VENV overrides the location (default: .venv in the project root);
# EXTRAS the extras to install (default: dev; scripts/demo.sh uses demo).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" >&2
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]" >&2
echo "$VENV"
