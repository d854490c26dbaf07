"""Settings for the test suite: config.settings with explicit test values for its secrets
(and the per-address API and sign-up rate limits off).

``config/settings.py`` gives no secret a default (issue #17 item 6), so the suite names
its own here, before the real settings are read. A value already in the environment
(``infra/test.sh`` exports ``SECRET_KEY``) wins. Processes the suite starts (workers,
agents, ``manage.py``) inherit these through ``os.environ``.
"""

from __future__ import annotations

import os

#: Test-only values; ``tests/control/billing_support.py`` points webhooks at its own secret.
TEST_SECRETS = {
    "SECRET_KEY": "test-secret-key-not-for-production",
    "STRIPE_WEBHOOK_SECRET": "whsec_test_suite_not_for_production",
    # pytest-django swaps in locmem for the tests themselves; processes the suite starts
    # (the e2e control plane) need a backend that is not the console's.
    "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend",
    # Every test request comes from 127.0.0.1: the whole suite would share one address's
    # budget. The tests of that limit (tests/security/test_api_limits.py) set it.
    "BERTH_API_ADDRESS_RATE_LIMIT": "0",
    # Likewise for sign-ups (tests/security/test_control_plane_defaults.py sets it).
    "BERTH_SIGNUPS_PER_ADDRESS_HOUR": "0",
}
for _name, _value in TEST_SECRETS.items():
    os.environ.setdefault(_name, _value)

from config.settings import *  # noqa: E402,F403
