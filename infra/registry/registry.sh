#!/usr/bin/env bash
# Berth's image registry: CNCF distribution (Debian's docker-registry) with token auth
# served by the control plane.
#
#   infra/registry/registry.sh setup   generate the token signing key + certificate, the
#                                      notification secret and config.yml (idempotent)
#   infra/registry/registry.sh serve   setup, then exec docker-registry in the foreground
#   infra/registry/registry.sh gc      run the registry's garbage collector on its storage
#
# Everything lives under $BERTH_REGISTRY_DIR (default var/registry in the project):
#   token.key / token.crt   RS256 key the control plane signs tokens with, and the
#                           self-signed certificate the registry verifies them with
#   notify.secret           bearer secret on the registry's notifications to the control plane
#   http.secret             the registry's upload-state secret
#   config.yml              rendered from config.yml.template
#   storage/                blobs and repositories (filesystem driver)
# The control plane reads the same files (settings BERTH_REGISTRY_DIR), so both agree.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
project="$(cd "$here/../.." && pwd)"

export BERTH_REGISTRY_DIR="${BERTH_REGISTRY_DIR:-$project/var/registry}"
export BERTH_REGISTRY_ADDR="${BERTH_REGISTRY_ADDR:-127.0.0.1:5000}"
export BERTH_REGISTRY_STORAGE="${BERTH_REGISTRY_STORAGE:-$BERTH_REGISTRY_DIR/storage}"
export BERTH_PUBLIC_URL="${BERTH_PUBLIC_URL:-http://127.0.0.1:8000}"
export BERTH_REGISTRY_REALM="${BERTH_REGISTRY_REALM:-$BERTH_PUBLIC_URL/registry/token}"
export BERTH_REGISTRY_NOTIFY_URL="${BERTH_REGISTRY_NOTIFY_URL:-$BERTH_PUBLIC_URL/registry/events/}"
export BERTH_REGISTRY_SERVICE="${BERTH_REGISTRY_SERVICE:-berth-registry}"
export BERTH_REGISTRY_ISSUER="${BERTH_REGISTRY_ISSUER:-berth}"
export BERTH_REGISTRY_LOG_LEVEL="${BERTH_REGISTRY_LOG_LEVEL:-warn}"

setup() {
  mkdir -p "$BERTH_REGISTRY_DIR" "$BERTH_REGISTRY_STORAGE"
  chmod 700 "$BERTH_REGISTRY_DIR"
  if [[ ! -s "$BERTH_REGISTRY_DIR/token.key" || ! -s "$BERTH_REGISTRY_DIR/token.crt" ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
      -subj "/CN=berth-registry-token-signer" \
      -keyout "$BERTH_REGISTRY_DIR/token.key.tmp" -out "$BERTH_REGISTRY_DIR/token.crt.tmp" \
      2>/dev/null
    chmod 600 "$BERTH_REGISTRY_DIR/token.key.tmp"
    mv "$BERTH_REGISTRY_DIR/token.key.tmp" "$BERTH_REGISTRY_DIR/token.key"
    mv "$BERTH_REGISTRY_DIR/token.crt.tmp" "$BERTH_REGISTRY_DIR/token.crt"
  fi
  for name in notify.secret http.secret; do
    if [[ ! -s "$BERTH_REGISTRY_DIR/$name" ]]; then
      (umask 077 && openssl rand -hex 32 >"$BERTH_REGISTRY_DIR/$name")
    fi
  done
  BERTH_REGISTRY_NOTIFY_SECRET="$(cat "$BERTH_REGISTRY_DIR/notify.secret")"
  BERTH_REGISTRY_HTTP_SECRET="$(cat "$BERTH_REGISTRY_DIR/http.secret")"
  export BERTH_REGISTRY_NOTIFY_SECRET BERTH_REGISTRY_HTTP_SECRET
  (umask 077 && envsubst <"$here/config.yml.template" >"$BERTH_REGISTRY_DIR/config.yml")
}

case "${1:-serve}" in
  setup) setup ;;
  serve)
    setup
    exec docker-registry serve "$BERTH_REGISTRY_DIR/config.yml"
    ;;
  gc)
    setup
    shift
    exec docker-registry garbage-collect "$@" "$BERTH_REGISTRY_DIR/config.yml"
    ;;
  *)
    echo "usage: $0 setup|serve|gc [--delete-untagged] [--dry-run]" >&2
    exit 2
    ;;
esac
