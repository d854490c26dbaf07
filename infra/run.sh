#!/usr/bin/env bash
# Set up and run Berth on this machine, as root: control plane on http://127.0.0.1:8000,
# a Celery worker, with SQLite and a local Redis by default. Idempotent; Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
# shellcheck source=infra/services.sh
source infra/services.sh
berth_start_redis

export DEBUG="${DEBUG:-1}"
export DATABASE_URL="${DATABASE_URL:-sqlite:///var/berth.db}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p var/log

python manage.py migrate --noinput
python manage.py bootstrap_demo

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

celery -A config worker -Q control -l info --concurrency 2 >var/log/celery.log 2>&1 &
pids+=($!)
echo "Berth control plane on http://127.0.0.1:8000 (logs in var/log/)"
python manage.py runserver 127.0.0.1:8000 --noreload &
pids+=($!)
wait -n
