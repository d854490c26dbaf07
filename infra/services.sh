#!/usr/bin/env bash
# Start the local Postgres and Redis servers if nothing answers on their ports.
# Sourced by run.sh and test.sh.
berth_start_redis() {
  # With a password ($1), a Redis started here requires it for the default user (nodes get
  # ACL users of their own: workloads/services/broker.py). The password goes in on stdin,
  # never on a command line. Without one (CI, tests) the default user has none.
  local password="${1:-}"
  # (redis-cli exits 0 on NOAUTH too: only a PONG counts.)
  if ! REDISCLI_AUTH="$password" redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
    mkdir -p /var/lib/redis /var/log/redis
    { [ -n "$password" ] && printf 'requirepass %s\n' "$password"; true; } |
      redis-server - --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/berth.log
    for _ in $(seq 50); do
      REDISCLI_AUTH="$password" redis-cli -h 127.0.0.1 ping 2>/dev/null | grep -q PONG && break
      sleep 0.1
    done
  fi
}

berth_start_postgres() {
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 100); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.1; done
  fi
}

# Berth's tests compare against a real Docker engine when one runs; start it if installed.
berth_start_dockerd() {
  if command -v dockerd >/dev/null && ! docker info >/dev/null 2>&1; then
    mkdir -p /var/log
    (dockerd >/var/log/berth-dockerd.log 2>&1 &)
    for _ in $(seq 100); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
  fi
}
