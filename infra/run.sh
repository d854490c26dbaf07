#!/usr/bin/env bash
# Set up and run Berth on this machine, as root: control plane on http://127.0.0.1:8000,
# a Celery worker with the reconciler's beat, and a local node agent that joins by itself,
# with SQLite and a local Redis by default. Idempotent; Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
# shellcheck source=infra/services.sh
source infra/services.sh

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
  for name in SECRET_KEY STRIPE_WEBHOOK_SECRET BERTH_SECRETS_KEY BERTH_REDIS_PASSWORD; do
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
# Mail carries invitation keys and sign-up and reset links: here it is written to files in
# var/mail (0700), never to a log (the control plane refuses the console backend without
# DEBUG). Production sets an SMTP EMAIL_BACKEND (docs/control-plane.md).
export EMAIL_BACKEND="${EMAIL_BACKEND:-django.core.mail.backends.filebased.EmailBackend}"
export EMAIL_FILE_PATH="${EMAIL_FILE_PATH:-$PWD/var/mail}"
(umask 077 && mkdir -p "$EMAIL_FILE_PATH")
# Redis's default user requires BERTH_REDIS_PASSWORD: it is the control plane's admin
# login; every node gets an ACL user that reaches only its own queue and results.
berth_start_redis "$BERTH_REDIS_PASSWORD"
if ! REDISCLI_AUTH="$BERTH_REDIS_PASSWORD" redis-cli -h 127.0.0.1 ping 2>/dev/null | grep -q PONG; then
  echo "warning: the Redis on 127.0.0.1:6379 does not take BERTH_REDIS_PASSWORD (started" \
    "without it?): restart it so that its default user requires a password" >&2
fi
export DATABASE_URL="${DATABASE_URL:-sqlite:///var/berth.db}"
export REDIS_URL="${REDIS_URL:-redis://:$BERTH_REDIS_PASSWORD@127.0.0.1:6379/0}"
export PATH="$PWD/.venv/bin:$PATH"
# Logs hold tenants' names, addresses and errors: readable by root only.
(umask 077 && mkdir -p var/log && touch var/log/{web,celery,registry,agent}.log)
chmod 700 var/log
chmod 600 var/log/*.log

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
else
  # A node that joined before: a fresh broker user of its own (the old URL may be the
  # shared one, or Redis was restarted and forgot the ACL users), written to node.json.
  python manage.py shell --no-imports -c "
import json
from workloads.services import broker
path = '$BERTH_ROOT/node.json'
identity = json.load(open(path))
identity['broker_url'] = broker.provision_node(identity['node_id'])
with open(path, 'w') as handle:
    json.dump(identity, handle, indent=2)"
fi
# The node's registry login came with its join (a credential keyed by the node's id, kept
# in the agent's registry-auth.json); a tenant's pull gets a token for that tenant.
berth-agent worker >var/log/agent.log 2>&1 &
pids+=($!)

echo "Berth control plane on http://127.0.0.1:8000, registry on 127.0.0.1:5000 (logs in var/log/); Ctrl-C stops it"
wait -n
