#!/usr/bin/env bash
# Install everything Berth needs on a Debian machine, as root. Idempotent.
#   infra/setup.sh            control plane + agent + test tooling
# Sets up .venv in the project with the Python dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "infra/setup.sh must run as root (the node agent drives runc, cgroups and netns)" >&2
  exit 1
fi

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc git curl ca-certificates
  runc conmon busybox-static nftables iproute2 iptables e2fsprogs uidmap kmod
  skopeo docker-registry docker.io zstd gettext-base openssl
  redis-server postgresql postgresql-client
  chromium
)
# npm: Debian's package, unless the machine already has Node.js with its own npm (Debian's
# npm conflicts with NodeSource-style nodejs packages).
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Debian's own interpreter (statically linked libpython, built with the distribution's
# optimisation flags), not whatever python3 comes first in PATH: measured here against a
# shared-libpython build, it starts ~1.2 ms sooner and runs Python code ~18% faster, which
# every `berth-agent` command and container start pays. A venv made from another
# interpreter is made again.
if [ ! -x .venv/bin/python ] || ! grep -qx 'home = /usr/bin' .venv/pyvenv.cfg 2>/dev/null; then
  log "creating .venv (/usr/bin/python3)"
  rm -rf .venv
  /usr/bin/python3 -m venv .venv
fi
# editable_mode=compat installs the project as a plain path in a .pth file: setuptools'
# default import-hook finder costs every Python process here ~25 ms at start-up, which
# every `berth-agent` command would pay.
stamp=.venv/.berth-deps
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != compat ]; then
  log "pip install -e .[dev]"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]' --config-settings editable_mode=compat
  echo compat > "$stamp"
fi
# berth-agent as the native client (runtime_agent/cli/client.c, built with gcc) in front
# of berth-agent-py, a launcher that starts Python without the site module (pip's console
# script can't pass -S): commands mostly run in the agent's CLI server and need only a
# client, which costs ~0.5 ms compiled against ~8 ms as Python (runtime_agent/cli/launcher.py).
.venv/bin/python -m runtime_agent.cli.launcher >/dev/null

# The dashboard's htmx, from the npm registry through npm, served from dashboard/static
# (git-ignored; no CDN at run time). Debian's chromium runs the Playwright browser tests.
HTMX_VERSION=2.0.11
vendor=dashboard/static/dashboard/vendor
if [ "$(cat "$vendor/.htmx-version" 2>/dev/null)" != "$HTMX_VERSION" ]; then
  log "htmx $HTMX_VERSION"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "htmx.org@$HTMX_VERSION" >/dev/null)
  tar -xzf "$tmp/htmx.org-$HTMX_VERSION.tgz" -C "$tmp"
  install -D -m 0644 "$tmp/package/dist/htmx.min.js" "$vendor/htmx.min.js"
  echo "$HTMX_VERSION" > "$vendor/.htmx-version"
  rm -rf "$tmp"
fi

# Debian's docker-registry unit and redis unit may start on install; Berth runs its own.
mkdir -p var
log "setup done"
