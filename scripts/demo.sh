#!/usr/bin/env bash
# The main job: venv + install, services up, then `outbox-tasks demo` (workers, beat, Flower,
# a producer and a consumer, live progress). Arguments go to the demo (e.g. --duration 30).
# Uses OUTBOX_DATABASE_URL / OUTBOX_BROKER_URL when set; else the local services.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(scripts/venv.sh)
if [ -z "${OUTBOX_DATABASE_URL:-}" ] || [ -z "${OUTBOX_BROKER_URL:-}" ]; then
  scripts/ensure-services.sh
fi
export OUTBOX_DATABASE_URL=${OUTBOX_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/outbox_demo}
export OUTBOX_BROKER_URL=${OUTBOX_BROKER_URL:-redis://127.0.0.1:6379/0}
exec "$VENV/bin/outbox-tasks" demo "$@"
