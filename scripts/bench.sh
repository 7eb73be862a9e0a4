#!/usr/bin/env bash
# Benchmarks from a clean clone in one command: venv + services, then `python -m bench ...`
# (e.g. scripts/bench.sh throughput --events 100000 --repeats 3). Results: docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(scripts/venv.sh)
scripts/ensure-services.sh
exec "$VENV/bin/python" -m bench "$@"
