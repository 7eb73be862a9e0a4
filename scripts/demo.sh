#!/usr/bin/env bash
# The README's first command: a venv with the demo extra, then `outbox-tasks demo` (Celery
# workers with the metrics endpoint, beat, Flower, a producer and a consumer, live progress;
# Ctrl-C stops it cleanly). Arguments go to the demo (e.g. --duration 30 --no-tty).
# Nothing to install but Python: without OUTBOX_DATABASE_URL / OUTBOX_BROKER_URL the demo starts
# an embedded PostgreSQL and an embedded Redis-compatible server (fakeredis), and removes them
# and their data when it stops. With the variables set, it uses those services instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(EXTRAS=${EXTRAS:-demo} scripts/venv.sh)
exec "$VENV/bin/outbox-tasks" demo "$@"
