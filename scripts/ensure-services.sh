#!/usr/bin/env bash
# Make sure PostgreSQL (5432), Redis (6379) and RabbitMQ (5672) answer on 127.0.0.1; start the
# local ones that do not. Used by scripts/test.sh, scripts/demo.sh and CI.
set -euo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
  local name=$1 port=$2 seconds=$3
  for _ in $(seq 1 "$seconds"); do
    up "$port" && return 0
    sleep 1
  done
  echo "ensure-services: $name did not come up on 127.0.0.1:$port after ${seconds}s" >&2
  return 1
}

need() {
  command -v "$1" >/dev/null 2>&1 || {
    echo "ensure-services: $2 is not running on 127.0.0.1 and '$1' is not installed here." >&2
    echo "  Start $2 yourself, or install it (Debian: apt-get install $3)." >&2
    exit 1
  }
}

if ! up 5432; then
  need pg_ctlcluster PostgreSQL postgresql
  echo "ensure-services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  wait_for PostgreSQL 5432 60
fi

if ! up 6379; then
  need redis-server Redis redis-server
  echo "ensure-services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis 6379 30
fi

if ! up 5672; then
  need rabbitmq-server RabbitMQ rabbitmq-server
  echo "ensure-services: starting RabbitMQ"
  rabbitmq-server -detached
  wait_for RabbitMQ 5672 120
fi

echo "ensure-services: PostgreSQL, Redis and RabbitMQ are up"
