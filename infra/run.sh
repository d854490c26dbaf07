#!/usr/bin/env bash
# Set up and run Berth on this machine, as root: control plane on http://127.0.0.1:8000,
# a Celery worker with the reconciler's beat, and a local node agent that joins by itself,
# with SQLite and a local Redis by default. Idempotent; Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
# shellcheck source=infra/services.sh
source infra/services.sh
berth_start_redis

# Debug pages show settings and paths to whoever triggers an error: off unless asked for
# (DEBUG=1 infra/run.sh).
export DEBUG="${DEBUG:-0}"

# Local secrets: generated once into var/secrets.env (mode 0600) and reused on every later
# run; a value already in the environment wins. The control plane refuses to start without
# them (config/settings.py) and no secret has a default in the source.
berth_local_secrets() {
  local file=var/secrets.env name value
  mkdir -p var
  (umask 077 && touch "$file")
  chmod 600 "$file"
  for name in SECRET_KEY STRIPE_WEBHOOK_SECRET BERTH_SECRETS_KEY; do
    grep -q "^$name=" "$file" && continue
    case "$name" in
      STRIPE_WEBHOOK_SECRET) value="whsec_$(python3 -c 'import secrets; print(secrets.token_hex(32))')" ;;
      BERTH_SECRETS_KEY) value=$(python3 -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())') ;;
      *) value=$(python3 -c 'import secrets; print(secrets.token_urlsafe(50))') ;;
    esac
    printf '%s=%s\n' "$name" "$value" >>"$file"
  done
  while IFS='=' read -r name value; do
    [ -n "$name" ] && [ -z "${!name:-}" ] && export "$name=$value"
  done <"$file"
  return 0
}
berth_local_secrets
export DATABASE_URL="${DATABASE_URL:-sqlite:///var/berth.db}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p var/log

python manage.py migrate --noinput
python manage.py bootstrap_demo

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

celery -A config worker -B -s var/celerybeat-schedule -Q control -l info --concurrency 2 \
  >var/log/celery.log 2>&1 &
pids+=($!)
# --insecure: the development server serves static files (admin, dashboard) with debug
# off too; a production server replaces runserver later.
python manage.py runserver 127.0.0.1:8000 --noreload --insecure >var/log/web.log 2>&1 &
pids+=($!)
# The image registry (docker-registry) on 127.0.0.1:5000; the control plane is its token
# server and receives its notifications (infra/registry/, docs/registry.md).
bash infra/registry/registry.sh setup
bash infra/registry/registry.sh serve >var/log/registry.log 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:5000/v2/ && break; sleep 0.1; done
for _ in $(seq 300); do curl -fs -o /dev/null http://127.0.0.1:8000/admin/login/ && break; sleep 0.2; done

# The local node agent: busybox base image, then join this control plane (again, if the
# database it joined before is gone), then consume its queue.
export BERTH_ROOT="${BERTH_ROOT:-/var/lib/berth}"
berth-agent bootstrap >/dev/null
node_known() {
  [ -f "$BERTH_ROOT/node.json" ] && python manage.py shell --no-imports -c "
import json, sys
from workloads.models import Node
node_id = json.load(open('$BERTH_ROOT/node.json'))['node_id']
sys.exit(0 if Node.objects.filter(pk=node_id).exists() else 1)" 2>/dev/null
}
if ! node_known; then
  token=$(python manage.py create_join_token | tail -n 1)
  berth-agent join http://127.0.0.1:8000 "$token" --name "$(hostname)-local"
fi
# The node's registry login: it pulls the images of the containers placed on the node.
python manage.py registry_node_credential "$(hostname)-local" |
  berth-agent login 127.0.0.1:5000 -u "node-$(hostname)-local" --password-stdin >/dev/null ||
  echo "warning: the node could not log in to the registry (see var/log/registry.log)" >&2
berth-agent worker >var/log/agent.log 2>&1 &
pids+=($!)

echo "Berth control plane on http://127.0.0.1:8000, registry on 127.0.0.1:5000 (logs in var/log/); Ctrl-C stops it"
wait -n
