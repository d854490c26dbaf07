#!/usr/bin/env bash
# Set up and run Berth's whole test suite, as root, on a Debian machine. Idempotent.
# Uses Postgres on 127.0.0.1:5432 and Redis on 127.0.0.1:6379, starting local ones if needed.
# Extra arguments go to pytest (e.g. infra/test.sh tests/agent -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
# shellcheck source=infra/services.sh
source infra/services.sh
# A Redis that infra/run.sh started requires its generated password (var/secrets.env);
# a password-less one (CI's) accepts any, so the same URL serves both.
redis_password=$(sed -n 's/^BERTH_REDIS_PASSWORD=//p' var/secrets.env 2>/dev/null || true)
berth_start_redis "$redis_password"
berth_start_postgres
berth_start_dockerd

export DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/berth}"
export REDIS_URL="${TEST_REDIS_URL:-redis://${redis_password:+:$redis_password@}127.0.0.1:6379/15}"
export SECRET_KEY="test-secret-key-not-for-production"
export PATH="$PWD/.venv/bin:$PATH"

.venv/bin/ruff check .
.venv/bin/mypy .
# Old pytest temp dirs may hold trees deeper than pytest's recursive clean-up can remove.
rm -rf "/tmp/pytest-of-$(id -un)"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
exit $status
