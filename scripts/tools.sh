#!/usr/bin/env bash
# Install the tools that validate deploy/ (tests/deploy): idempotent, quick once installed.
#
#   promtool             Debian's `prometheus` package, extracted into .tools/ (not installed,
#                        no service started): .tools/bin/promtool
#   docker-compose       Debian's `docker-compose` package (v1, validates files without an engine)
#   kubernetes-validate  PyPI, into the virtualenv given as $1 (default: $VENV, else .venv)
#
# Usage: scripts/tools.sh [VENV_DIR]     (as root on Debian 12; needs Debian's and PyPI's
# registries). .tools/ is local: it carries its own .gitignore ('*').
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TOOLS="$ROOT/.tools"
VENV_DIR=${1:-${VENV:-.venv}}
mkdir -p "$TOOLS/bin"
# .tools/ ignores itself, so it can never be committed by accident (as a virtualenv does).
[ -f "$TOOLS/.gitignore" ] || echo '*' >"$TOOLS/.gitignore"

log() { echo "tools: $*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

APT_UPDATED=0
apt_update_once() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    as_root apt-get update -qq
    APT_UPDATED=1
  fi
}

# -- promtool ---------------------------------------------------------------------------------
install_promtool() {
  local bin="$TOOLS/bin/promtool"
  if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
    return 0
  fi
  local work
  work=$(mktemp -d)
  # apt-get download needs a directory its sandbox user (_apt) may write to.
  chmod 0777 "$work"
  log "downloading Debian's prometheus package for promtool"
  if ! (cd "$work" && apt-get download -q prometheus >/dev/null 2>&1); then
    apt_update_once
    (cd "$work" && apt-get download -q prometheus >/dev/null)
  fi
  # Keep promtool only (the package also holds the server and its web assets).
  dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
  install -m 0755 "$work/root/usr/bin/promtool" "$bin.new"
  mv -f "$bin.new" "$bin"
  rm -rf "$work"
  "$bin" --version >/dev/null
}

# -- docker-compose ---------------------------------------------------------------------------
install_compose() {
  if command -v docker-compose >/dev/null 2>&1 && docker-compose version >/dev/null 2>&1; then
    return 0
  fi
  log "installing Debian's docker-compose package"
  if ! as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; then
    apt_update_once
    as_root env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
  fi
  docker-compose version >/dev/null
}

# -- kubernetes-validate ----------------------------------------------------------------------
install_kubernetes_validate() {
  local py="$VENV_DIR/bin/python"
  if [ ! -x "$py" ]; then
    echo "tools: no virtualenv at $VENV_DIR (pass the project's venv: scripts/tools.sh VENV_DIR)" >&2
    exit 1
  fi
  if [ -x "$VENV_DIR/bin/kubernetes-validate" ] \
    && "$VENV_DIR/bin/kubernetes-validate" --version >/dev/null 2>&1; then
    return 0
  fi
  log "installing kubernetes-validate into $VENV_DIR"
  "$py" -m pip install --quiet --disable-pip-version-check kubernetes-validate
  "$VENV_DIR/bin/kubernetes-validate" --version >/dev/null
}

install_promtool
install_compose
install_kubernetes_validate

VENV_ABS=$(cd "$VENV_DIR" && pwd)
echo "promtool:            $TOOLS/bin/promtool ($("$TOOLS/bin/promtool" --version 2>&1 | head -n1))"
echo "docker-compose:      $(command -v docker-compose) ($(docker-compose version --short 2>/dev/null))"
echo "kubernetes-validate: $VENV_ABS/bin/kubernetes-validate ($("$VENV_ABS/bin/kubernetes-validate" --version 2>&1 | tail -n1))"
