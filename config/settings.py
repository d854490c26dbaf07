"""Berth control plane settings, read from the environment and parsed strictly.

Environment variables:
  DEBUG          boolean, default false: Django's debug pages show settings and paths to
                 whoever triggers an error, so debug is on only when asked for.
  SECRET_KEY     required, always (infra/run.sh generates one into var/secrets.env).
  STRIPE_WEBHOOK_SECRET  required, always: Stripe webhooks are verified with it.
  DATABASE_URL   postgres://user:pw@host:port/db or sqlite:///path (default sqlite:///var/berth.db
                 under the project).
  REDIS_URL      redis://host:port/db (default redis://127.0.0.1:6379/0): Celery broker,
                 result backend, cache and rate limits.
  ALLOWED_HOSTS  comma-separated (default 127.0.0.1,localhost).
  BERTH_PUBLIC_URL  the URL users reach the control plane at (default http://127.0.0.1:8000).
  EMAIL_BACKEND  required unless DEBUG (the console backend is refused then: mail carries
                 invitation keys and reset links); EMAIL_HOST/PORT/HOST_USER/HOST_PASSWORD/
                 USE_TLS for SMTP, EMAIL_FILE_PATH for the file backend.
"""

from __future__ import annotations

from pathlib import Path

from config.env import (
    ConfigError,
    env_bool,
    env_int,
    env_list,
    env_str,
    parse_database_url,
    require_url,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", False)

#: Values that were once written in this source as defaults: anyone can read them, so a
#: deployment that still uses one is refused like a missing secret.
PUBLISHED_SECRETS = frozenset(
    {
        "berth-insecure-development-key-do-not-use-in-production",
        "whsec_berth_local",
        "sk_test_berth_local",
    }
)


def required_secret(name: str) -> str:
    """The secret in environment variable ``name``; a missing or published one stops start-up.

    No secret has a default in this file (issue #17 item 6): a default is public, and a
    forgeable ``STRIPE_WEBHOOK_SECRET`` let anyone sign billing events. ``infra/run.sh``
    generates local values once (``var/secrets.env``, mode 0600); the test suite sets test
    values explicitly (``tests/settings.py``).
    """
    value = env_str(name, "").strip()
    if not value:
        raise ConfigError(
            f"{name} is required (infra/run.sh generates local secrets into var/secrets.env)"
        )
    if value in PUBLISHED_SECRETS:
        raise ConfigError(f"{name} is a value published in Berth's source; generate a new one")
    return value


SECRET_KEY = required_secret("SECRET_KEY")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
BERTH_PUBLIC_URL = require_url(
    "BERTH_PUBLIC_URL", env_str("BERTH_PUBLIC_URL", "http://127.0.0.1:8000"), {"http", "https"}
)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "tenants",
    "billing",
    "workloads",
    "dashboard",
    "registry",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Before authentication: every /api/ request counts against its address (throttling.py).
    "tenants.api.throttling.AddressRateLimitMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "tenants.api.middleware.APINotFoundMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": parse_database_url(
        env_str("DATABASE_URL", "sqlite:///var/berth.db"), base_dir=BASE_DIR
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "tenants.User"

REDIS_URL = require_url(
    "REDIS_URL", env_str("REDIS_URL", "redis://127.0.0.1:6379/0"), {"redis", "rediss"}
)
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
    }
}

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "control"
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# Workloads: how long a node may stay silent before its work moves elsewhere, how often
# the reconciler runs, and where agents reach Redis (BERTH_AGENT_BROKER_URL: its scheme,
# host, port and database only; default REDIS_URL's) — each node gets its own ACL user
# there, never this URL's credentials (workloads/services/broker.py).
BERTH_NODE_TIMEOUT_SECONDS = env_int("BERTH_NODE_TIMEOUT_SECONDS", 30, minimum=2)
BERTH_RECONCILE_SECONDS = env_int("BERTH_RECONCILE_SECONDS", 5, minimum=1)
BERTH_DEPLOY_TIMEOUT_SECONDS = env_int("BERTH_DEPLOY_TIMEOUT_SECONDS", 300, minimum=5)
BERTH_AGENT_BROKER_URL = env_str("BERTH_AGENT_BROKER_URL", "")
# Host ports a tenant may not publish on a node: every port below
# BERTH_TENANT_MIN_HOST_PORT (privileged) and BERTH_RESERVED_HOST_PORTS, the node's own
# services (SSH, the control plane, the registry, Postgres, Redis, the edge's HTTP/HTTPS and
# admin ports). Comma-separated; set it to what a fleet's nodes really run.
BERTH_TENANT_MIN_HOST_PORT = env_int("BERTH_TENANT_MIN_HOST_PORT", 1024, minimum=1)


def _ports(name: str, default: list[str]) -> frozenset[int]:
    ports = set()
    for raw in env_list(name, default):
        if not raw.isdigit() or not 1 <= int(raw) <= 65535:
            raise ConfigError(f"{name} must list ports 1-65535, got {raw!r}")
        ports.add(int(raw))
    return frozenset(ports)


BERTH_RESERVED_HOST_PORTS = _ports(
    "BERTH_RESERVED_HOST_PORTS",
    ["22", "2019", "5000", "5432", "6379", "8000", "8080", "8443"],
)
BERTH_DEFAULT_NETWORK_MODE = env_str("BERTH_DEFAULT_NETWORK_MODE", "bridge")
if BERTH_DEFAULT_NETWORK_MODE not in ("bridge", "none"):
    raise ConfigError("BERTH_DEFAULT_NETWORK_MODE must be bridge or none")
BERTH_SECRETS_KEY = env_str("BERTH_SECRETS_KEY", "")
# Builds: uploaded contexts are spooled here (never into the database), capped in size;
# the last BERTH_BUILD_LOG_KEEP_BYTES of each build's log are kept.
BERTH_BUILD_CONTEXT_DIR = Path(
    env_str("BERTH_BUILD_CONTEXT_DIR", str(BASE_DIR / "var" / "build-contexts"))
)
BERTH_BUILD_CONTEXT_MAX_BYTES = env_int(
    "BERTH_BUILD_CONTEXT_MAX_BYTES", 256 * 1024 * 1024, minimum=1024
)
BERTH_BUILD_LOG_KEEP_BYTES = env_int("BERTH_BUILD_LOG_KEEP_BYTES", 256 * 1024, minimum=1024)
BERTH_BUILD_TIMEOUT_SECONDS = env_int("BERTH_BUILD_TIMEOUT_SECONDS", 3600, minimum=10)
CELERY_BEAT_SCHEDULE = {
    "reconcile": {"task": "workloads.reconcile", "schedule": float(BERTH_RECONCILE_SECONDS)},
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"

# The dashboard (dashboard/) signs people in at /login/ and returns them where they were.
LOGIN_URL = "dashboard:login"
LOGIN_REDIRECT_URL = "dashboard:home"
# Password sign-ins (dashboard, /admin/login/, /api-auth/login/) lock an account after
# BERTH_LOGIN_FAILURES_PER_ACCOUNT failures and an address after
# BERTH_LOGIN_FAILURES_PER_ADDRESS, for BERTH_LOGIN_LOCKOUT_SECONDS from the first failure
# (tenants/login_throttle.py); 0 disables a limit.
AUTHENTICATION_BACKENDS = [
    "tenants.login_throttle.LoginThrottleBackend",
    "django.contrib.auth.backends.ModelBackend",
]
BERTH_LOGIN_FAILURES_PER_ACCOUNT = env_int("BERTH_LOGIN_FAILURES_PER_ACCOUNT", 10, minimum=0)
BERTH_LOGIN_FAILURES_PER_ADDRESS = env_int("BERTH_LOGIN_FAILURES_PER_ADDRESS", 50, minimum=0)
BERTH_LOGIN_LOCKOUT_SECONDS = env_int("BERTH_LOGIN_LOCKOUT_SECONDS", 15 * 60, minimum=1)
# Sign-up attempts (refused ones too) per client address per hour; 0 disables.
BERTH_SIGNUPS_PER_ADDRESS_HOUR = env_int("BERTH_SIGNUPS_PER_ADDRESS_HOUR", 10, minimum=0)

# Mail carries invitation keys, password-reset and sign-up links: the console backend
# would write them into the server's log, so it is for debugging only and a real backend
# (SMTP; infra/run.sh uses the file backend in a 0700 directory) is required otherwise.
_CONSOLE_EMAIL = "django.core.mail.backends.console.EmailBackend"
EMAIL_BACKEND = env_str("EMAIL_BACKEND", _CONSOLE_EMAIL if DEBUG else "")
if not EMAIL_BACKEND:
    raise ConfigError(
        "EMAIL_BACKEND is required unless DEBUG is on (e.g. "
        "django.core.mail.backends.smtp.EmailBackend with EMAIL_HOST, EMAIL_PORT, "
        "EMAIL_HOST_USER, EMAIL_HOST_PASSWORD, EMAIL_USE_TLS)"
    )
if EMAIL_BACKEND == _CONSOLE_EMAIL and not DEBUG:
    raise ConfigError(
        "the console EMAIL_BACKEND writes invitation keys and reset links into the log: "
        "set a real backend, or DEBUG=1"
    )
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_FILE_PATH = env_str("EMAIL_FILE_PATH", str(BASE_DIR / "var" / "mail"))
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "berth@localhost")

DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("DATA_UPLOAD_MAX_MEMORY_SIZE", 1024 * 1024, minimum=1024)

# The API foundation lives in tenants/api/ (docs/control-plane.md).
REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "tenants.api.schema.BerthAutoSchema",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tenants.api.authentication.BearerTokenAuthentication",
        "tenants.api.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["tenants.api.parsers.LimitedJSONParser"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PAGINATION_CLASS": "tenants.api.pagination.IdCursorPagination",
    "DEFAULT_THROTTLE_CLASSES": ["tenants.api.throttling.TokenRateThrottle"],
    "EXCEPTION_HANDLER": "tenants.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
# Requests per minute per user (all their tokens and sessions together, failures included;
# anonymous: per address), per client address (every /api/ request, before authentication),
# and log/build streams open at once per user (tenants/api/throttling.py); 0 disables.
BERTH_API_RATE_LIMIT = env_int("BERTH_API_RATE_LIMIT", 600, minimum=0)
BERTH_API_ADDRESS_RATE_LIMIT = env_int("BERTH_API_ADDRESS_RATE_LIMIT", 1200, minimum=0)
BERTH_API_STREAMS_PER_USER = env_int("BERTH_API_STREAMS_PER_USER", 8, minimum=0)
# How long an emailed invitation key stays valid.
BERTH_INVITATION_TTL_HOURS = env_int("BERTH_INVITATION_TTL_HOURS", 7 * 24, minimum=1)

SPECTACULAR_SETTINGS = {
    "TITLE": "Berth API",
    "DESCRIPTION": (
        "Multi-tenant container hosting: tenants, quotas, workloads, billing.\n\n"
        "Authenticate with `Authorization: Bearer brt_…` (an API token, bound to one tenant) "
        "or a session. Tenant resources live under `/api/v1/tenants/{tenant_slug}/`; another "
        "tenant's objects answer 404. Lists use cursor pagination (`next`/`previous` links). "
        'Every error has the body `{"error": {"code": "...", "message": "...", '
        '"details": {...}}}`; a quota refusal (409 `quota_exceeded`) has details `quota`, '
        "`limit`, `used` and `requested`."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}

# Billing (docs/billing.md). STRIPE_API_BASE is empty for the real Stripe; tests point it at
# localstripe. Money is in integer cents. An empty STRIPE_SECRET_KEY means no Stripe to talk
# to; the webhook secret is always required (it is what makes a webhook unforgeable).
STRIPE_SECRET_KEY = env_str("STRIPE_SECRET_KEY", "")
if STRIPE_SECRET_KEY in PUBLISHED_SECRETS:
    raise ConfigError("STRIPE_SECRET_KEY is a value published in Berth's source")
STRIPE_API_BASE = env_str("STRIPE_API_BASE", "")
STRIPE_WEBHOOK_SECRET = required_secret("STRIPE_WEBHOOK_SECRET")
BILLING_CURRENCY = env_str("BILLING_CURRENCY", "usd")
BILLING_GRACE_PERIOD_HOURS = env_int("BILLING_GRACE_PERIOD_HOURS", 7 * 24, minimum=0)
BILLING_STOP_SERVICES_AFTER_HOURS = env_int("BILLING_STOP_SERVICES_AFTER_HOURS", 72, minimum=0)
BILLING_SPEND_CAP_WARN_PERCENT = env_int("BILLING_SPEND_CAP_WARN_PERCENT", 80, minimum=1)
BILLING_MAX_SEATS = env_int("BILLING_MAX_SEATS", 10000, minimum=1)

# Image registry (docs/registry.md). infra/registry/registry.sh generates the token signing
# key, the notification secret and the docker-registry config under BERTH_REGISTRY_DIR;
# the control plane reads the same files. BERTH_REGISTRY_HOST is what users type in image
# names; BERTH_REGISTRY_URL is how the control plane reaches the registry's API.
BERTH_REGISTRY_DIR = Path(env_str("BERTH_REGISTRY_DIR", str(BASE_DIR / "var" / "registry")))
BERTH_REGISTRY_HOST = env_str("BERTH_REGISTRY_HOST", "127.0.0.1:5000")
BERTH_REGISTRY_URL = env_str("BERTH_REGISTRY_URL", f"http://{BERTH_REGISTRY_HOST}")
BERTH_REGISTRY_SERVICE = env_str("BERTH_REGISTRY_SERVICE", "berth-registry")
BERTH_REGISTRY_ISSUER = env_str("BERTH_REGISTRY_ISSUER", "berth")
BERTH_REGISTRY_TOKEN_TTL = env_int("BERTH_REGISTRY_TOKEN_TTL", 300, minimum=30)
# Registries a tenant's image may name besides the platform's own (BERTH_REGISTRY_HOST,
# always allowed): host[:port] exactly as written in image references, comma-separated,
# e.g. an internal mirror. Checked when a service or job is submitted; each node applies
# its own list again before pulling (docs/workloads.md, "Which registries").
BERTH_ALLOWED_REGISTRIES = env_list("BERTH_ALLOWED_REGISTRIES", [])
CELERY_BEAT_SCHEDULE["registry-retention"] = {
    "task": "registry.tasks.apply_retention_task",
    "schedule": float(env_int("BERTH_REGISTRY_RETENTION_SECONDS", 3600, minimum=60)),
}
# Blobs pushed without a manifest send no notification: the scan counts them (docs/registry.md).
CELERY_BEAT_SCHEDULE["registry-storage-scan"] = {
    "task": "registry.tasks.scan_storage_task",
    "schedule": float(env_int("BERTH_REGISTRY_SCAN_SECONDS", 900, minimum=60)),
}
CELERY_BEAT_SCHEDULE.update(
    {
        "billing-sweep": {"task": "billing.tasks.sweep_billing_task", "schedule": 300.0},
        "billing-dunning": {"task": "billing.tasks.enforce_dunning_task", "schedule": 600.0},
        "billing-aggregate-usage": {
            "task": "billing.tasks.aggregate_usage_task",
            "schedule": 300.0,
        },
        "billing-report-usage": {"task": "billing.tasks.report_usage_task", "schedule": 3600.0},
    }
)
