"""Control-plane defaults a hostile outsider or tenant could use (#17 items 6 and 11,
#27 item 7): secrets published in the source, debug pages, volume quota that is never
released, and logins with no limit on guesses."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client

from billing.models import StripeEvent
from tests.control.billing_helpers import make_event, sign

ROOT = Path(__file__).resolve().parents[2]
#: The values config/settings.py once used as defaults: anyone could read them.
OLD_WEBHOOK_SECRET = "whsec_berth_local"
OLD_SECRET_KEY = "berth-insecure-development-key-do-not-use-in-production"


def run_clean(
    args: list[str], cwd: Path, env: dict[str, str], timeout: int = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` with exactly ``env`` (nothing of this process's environment leaks in)."""
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def import_settings(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Set Django up in a fresh process whose environment holds only ``env`` (plus basics)."""
    clean = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path}/settings.db",
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        **env,
    }
    code = "import django; django.setup(); from django.conf import settings; print(settings.DEBUG)"
    return run_clean([sys.executable, "-c", code], tmp_path, clean)


def test_the_control_plane_refuses_to_start_without_its_secrets(tmp_path: Path) -> None:
    good = {
        "SECRET_KEY": "k" * 50,
        "STRIPE_WEBHOOK_SECRET": "whsec_" + "a" * 32,
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
    }
    started = import_settings(tmp_path, **good)
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "False"  # debug is off unless asked for

    cases = {
        "no webhook secret": ({"SECRET_KEY": good["SECRET_KEY"]}, "STRIPE_WEBHOOK_SECRET"),
        "blank webhook secret": ({**good, "STRIPE_WEBHOOK_SECRET": "  "}, "STRIPE_WEBHOOK_SECRET"),
        "old default webhook secret": (
            {**good, "STRIPE_WEBHOOK_SECRET": OLD_WEBHOOK_SECRET},
            "STRIPE_WEBHOOK_SECRET",
        ),
        "no secret key": ({"STRIPE_WEBHOOK_SECRET": good["STRIPE_WEBHOOK_SECRET"]}, "SECRET_KEY"),
        # DEBUG used to bring a fixed development key with it.
        "no secret key, debug on": (
            {"STRIPE_WEBHOOK_SECRET": good["STRIPE_WEBHOOK_SECRET"], "DEBUG": "1"},
            "SECRET_KEY",
        ),
        "old development key": ({**good, "SECRET_KEY": OLD_SECRET_KEY}, "SECRET_KEY"),
        # Mail carries invitation keys and reset links: never into the log by default.
        "no email backend": ({**good, "EMAIL_BACKEND": ""}, "EMAIL_BACKEND"),
        "console email backend": (
            {**good, "EMAIL_BACKEND": "django.core.mail.backends.console.EmailBackend"},
            "EMAIL_BACKEND",
        ),
        "old default stripe key": (
            {**good, "STRIPE_SECRET_KEY": "sk_test_berth_local"},
            "STRIPE_SECRET_KEY",
        ),
    }
    for case, (env, name) in cases.items():
        result = import_settings(tmp_path, **env)
        assert result.returncode != 0, case
        assert "ConfigError" in result.stderr and name in result.stderr, (case, result.stderr)


@pytest.mark.django_db
def test_a_webhook_signed_with_the_old_default_secret_is_refused() -> None:
    client = Client()
    now = int(time.time())
    invoice = {"id": "in_1", "object": "invoice", "customer": "cus_victim", "status": "paid"}
    forged = make_event("invoice.paid", invoice, created=now, event_id="evt_forged")
    for secret in (OLD_WEBHOOK_SECRET, ""):
        response = client.post(
            "/billing/stripe/webhook",
            data=forged,
            content_type="application/json",
            HTTP_STRIPE_SIGNATURE=sign(forged, secret=secret),
        )
        assert response.status_code == 400, response.content
        assert response.json()["error"]["code"] == "bad_signature"
    assert not StripeEvent.objects.exists()
    # Positive control: the configured secret verifies.
    genuine = make_event("invoice.paid", invoice, created=now, event_id="evt_genuine")
    response = client.post(
        "/billing/stripe/webhook",
        data=genuine,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=sign(genuine, secret=settings.STRIPE_WEBHOOK_SECRET),
    )
    assert response.status_code == 200, response.content
    assert list(StripeEvent.objects.values_list("stripe_id", flat=True)) == ["evt_genuine"]


def _run_sh_secrets(var_dir: Path, **env: str) -> dict[str, str]:
    """Run infra/run.sh's own secret generation (its function, extracted) in ``var_dir``."""
    script = (ROOT / "infra" / "run.sh").read_text()
    start = script.index("berth_local_secrets() {")
    function = script[start : script.index("\n}\n", start) + 3]
    names = ("SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "BERTH_SECRETS_KEY")
    dump = "import json, os, sys; print(json.dumps({n: os.environ[n] for n in sys.argv[1:]}))"
    body = f"set -euo pipefail\n{function}berth_local_secrets\npython3 -c '{dump}' " + " ".join(
        names
    )
    result = run_clean(["bash", "-c", body], var_dir, {"PATH": os.environ["PATH"], **env})
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_run_sh_generates_local_secrets_once_and_privately(tmp_path: Path) -> None:
    first = _run_sh_secrets(tmp_path)
    secrets_file = tmp_path / "var" / "secrets.env"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert len(set(first.values())) == 3 and all(len(v) >= 32 for v in first.values())
    assert first["STRIPE_WEBHOOK_SECRET"] != OLD_WEBHOOK_SECRET
    # The next run reuses them (sessions and encrypted secrets survive a restart) ...
    assert _run_sh_secrets(tmp_path) == first
    # ... an operator's own value wins ...
    assert _run_sh_secrets(tmp_path, SECRET_KEY="operator-key")["SECRET_KEY"] == "operator-key"
    # ... and the control plane starts with what run.sh generated.
    started = import_settings(tmp_path, **first)
    assert started.returncode == 0, started.stderr
    # Another install gets other values.
    other = tmp_path / "other"
    other.mkdir()
    assert set(_run_sh_secrets(other).values()).isdisjoint(first.values())


def storage_used(client: Any, tenant: str) -> int:
    quotas = client.get(f"/api/v1/tenants/{tenant}/quotas/").json()["quotas"]
    return int(next(q["used"] for q in quotas if q["quota"] == "storage_gib"))


def volume_deletion_scenario(owner: Any, other: Any) -> None:
    """Through the API: deleting a volume answers 204 and gives its storage back; one a
    service mounts stays; another tenant cannot delete either (works on any database)."""
    base = "/api/v1/tenants/acme"
    for name, size in (("data", 2), ("spare", 3)):
        created = owner.post(f"{base}/volumes/", {"name": name, "size_gib": size}, format="json")
        assert created.status_code == 201, created.content
    service = {"name": "db", "image": "busybox", "volumes": [{"name": "data", "target": "/d"}]}
    assert owner.post(f"{base}/services/", service, format="json").status_code == 201
    assert storage_used(owner, "acme") == 5
    # Another tenant's token: 404, nothing released.
    assert other.delete(f"{base}/volumes/spare/").status_code == 404
    assert storage_used(owner, "acme") == 5
    in_use = owner.delete(f"{base}/volumes/data/")
    assert in_use.status_code == 409, in_use.content
    deleted = owner.delete(f"{base}/volumes/spare/")
    assert deleted.status_code == 204, deleted.content
    assert storage_used(owner, "acme") == 2
    assert owner.get(f"{base}/volumes/spare/").status_code == 404


@pytest.mark.django_db
def test_volume_deletion_releases_quota_on_postgres(
    acme: Any, make_tenant: Any, make_token: Any, client_for: Any
) -> None:
    tenant, owner = acme
    intruder_tenant, intruder = make_tenant("intruder")
    volume_deletion_scenario(
        client_for(make_token(tenant, owner)), client_for(make_token(intruder_tenant, intruder))
    )


SQLITE_SCENARIO = """
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from rest_framework.test import APIClient
from tenants import services
from tests.control.conftest import seed_plans
from tests.security.test_control_plane_defaults import volume_deletion_scenario
system = services.Actor.for_system("tests")
seed_plans()
def client(slug):
    tenant, user = services.create_tenant(
        slug=slug, owner_email=f"o@{slug}.example", plan_code="team", seats=5, actor=system
    )
    _, secret = services.create_api_token(tenant, user, name="t", scope="admin", actor=system)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return api
volume_deletion_scenario(client("acme"), client("intruder"))
print("scenario passed")
"""


def test_volume_deletion_releases_quota_on_sqlite(tmp_path: Path) -> None:
    """infra/run.sh's default database: deletion used a Postgres-only JSON lookup (500)."""
    env = {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path}/berth.db",
        "REDIS_URL": settings.REDIS_URL,
        "ALLOWED_HOSTS": "testserver",
        "CELERY_TASK_ALWAYS_EAGER": "0",
        "SECRET_KEY": settings.SECRET_KEY,
    }
    clean = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env}
    ran = run_clean([sys.executable, "-c", SQLITE_SCENARIO], tmp_path, clean, timeout=240)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "scenario passed" in ran.stdout


# --------------------------------------------------------------------------- sign-ins

#: Every password sign-in form.
LOGIN_FORMS = ("/login/", "/admin/login/", "/api-auth/login/")
PASSWORD = "Correct-horse-battery-9"


def make_user(email: str) -> Any:
    from tenants.models import User

    User.objects.filter(email=email).delete()
    user = User.objects.create_user(username=email, email=email, password=PASSWORD)
    user.is_staff = True  # /admin/login/ signs in staff only: the same account for all three
    user.save()
    return user


def sign_in(url: str, email: str, password: str, address: str) -> tuple[bool, str]:
    """POST a sign-in form from ``address``; (signed in?, the page's text)."""
    client = Client(REMOTE_ADDR=address)
    response = client.post(url, {"username": email, "password": password})
    return "_auth_user_id" in client.session, response.content.decode()


@pytest.fixture
def fresh_counters(settings: Any) -> Any:
    """Forget earlier runs' failures of the accounts and addresses a test uses (they live
    in Redis for the lockout period); a fast password hasher keeps 25 guesses quick."""
    from tenants import login_throttle

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

    def forget(email: str, *addresses: str) -> None:
        login_throttle.reset(username=email)
        for address in addresses:
            login_throttle.reset(address=address)

    return forget


@pytest.mark.django_db
def test_25_wrong_passwords_lock_the_account_on_every_sign_in_form(fresh_counters: Any) -> None:
    """The issue's reproduction, default limits: 25 wrong passwords, then the right one."""
    for n, url in enumerate(LOGIN_FORMS):
        victim = f"victim{n}@acme.example"
        make_user(victim)
        attacker, owner = f"203.0.113.{10 + n}", f"198.51.100.{10 + n}"
        fresh_counters(victim, attacker, owner)
        for i in range(25):
            # Other spellings of the same account count against it too.
            spelling = victim.upper() if i % 2 else f" {victim}"
            assert sign_in(url, spelling, f"guess-{i}", attacker)[0] is False
        signed_in, page = sign_in(url, victim, PASSWORD, attacker)
        assert not signed_in, url
        # Locked for the account: the owner, from elsewhere, waits too (or resets).
        assert sign_in(url, victim, PASSWORD, owner)[0] is False, url
        if url == "/login/":
            assert "Too many failed sign-ins" in page
        # Positive control: another account from another address signs in.
        other = f"bystander{n}@acme.example"
        make_user(other)
        fresh_counters(other, "192.0.2.200")
        assert sign_in(url, other, PASSWORD, "192.0.2.200")[0] is True, url


@pytest.mark.django_db
def test_one_address_guessing_many_accounts_is_locked(settings: Any, fresh_counters: Any) -> None:
    settings.BERTH_LOGIN_FAILURES_PER_ACCOUNT = 3
    settings.BERTH_LOGIN_FAILURES_PER_ADDRESS = 6
    target = "target@acme.example"
    make_user(target)
    spray, home = "203.0.113.77", "198.51.100.77"
    fresh_counters(target, spray, home)
    for i in range(6):  # a spray: one guess per account, none reaches the account limit
        email = f"guess{i}@acme.example"
        fresh_counters(email)
        assert sign_in(LOGIN_FORMS[i % 3], email, "Winter2026!", spray)[0] is False
    for url in LOGIN_FORMS:
        assert sign_in(url, target, PASSWORD, spray)[0] is False, url
        # The account itself is not locked: its owner signs in from home.
        assert sign_in(url, target, PASSWORD, home)[0] is True, url


@pytest.mark.django_db
def test_a_success_clears_the_account_count_and_the_lock_expires(
    settings: Any, fresh_counters: Any
) -> None:
    settings.BERTH_LOGIN_FAILURES_PER_ACCOUNT = 3
    settings.BERTH_LOGIN_LOCKOUT_SECONDS = 2
    user = "forgetful@acme.example"
    make_user(user)
    address = "198.51.100.88"
    fresh_counters(user, address)
    for _ in range(2):
        assert sign_in("/login/", user, "typo", address)[0] is False
    assert sign_in("/login/", user, PASSWORD, address)[0] is True  # 2 < 3: and clears
    for _ in range(2):
        assert sign_in("/login/", user, "typo", address)[0] is False
    assert sign_in("/login/", user, PASSWORD, address)[0] is True
    for _ in range(3):
        assert sign_in("/login/", user, "typo", address)[0] is False
    assert sign_in("/login/", user, PASSWORD, address)[0] is False
    time.sleep(2.5)
    assert sign_in("/login/", user, PASSWORD, address)[0] is True


# --------------------------------------------------------------------------- sign-ups


def sign_up(address: str, email: str, slug: str, password: str = PASSWORD) -> Any:
    return Client(REMOTE_ADDR=address).post(
        "/signup/", {"email": email, "password": password, "organisation": "Org", "slug": slug}
    )


@pytest.mark.django_db
def test_sign_ups_are_limited_per_address_refusals_included(settings: Any) -> None:
    import redis

    from tenants.models import Tenant

    counters = redis.Redis.from_url(settings.REDIS_URL)  # an earlier run's attempts
    for key in counters.scan_iter("berth:ratelimit:signup:*"):
        counters.delete(key)
    settings.BERTH_SIGNUPS_PER_ADDRESS_HOUR = 4
    bulk, other = "203.0.113.50", "198.51.100.50"
    # Probing for taken emails or slugs costs attempts like real sign-ups do.
    assert sign_up(bulk, "a@bulk.example", "bulk-a").status_code == 302
    assert sign_up(bulk, "a@bulk.example", "bulk-b").status_code == 302  # email taken
    assert sign_up(bulk, "b@bulk.example", "bulk-a").status_code == 400  # slug taken
    assert sign_up(bulk, "c@bulk.example", "bulk-c").status_code == 302
    refused = sign_up(bulk, "d@bulk.example", "bulk-d")
    assert refused.status_code == 429
    assert "Too many sign-ups from your address" in refused.content.decode()
    assert int(refused["Retry-After"]) > 0
    assert not Tenant.objects.filter(slug="bulk-d").exists()
    # Positive control: another address signs up.
    assert sign_up(other, "d@bulk.example", "bulk-d").status_code == 302


@pytest.mark.django_db
def test_sign_up_never_says_whether_an_email_has_an_account(mailoutbox: Any) -> None:
    import re

    from tenants.models import Tenant, User

    address = "192.0.2.60"
    make_user("taken@acme.example")
    new = sign_up(address, "fresh@acme.example", "fresh-org")
    taken = sign_up(address, "Taken@acme.example", "taken-org", password="Another-pass-123")
    # The same answer for both: where to go next, nothing about the address.
    assert (new.status_code, new["Location"]) == (taken.status_code, taken["Location"])
    assert new["Location"] == "/signup/sent/"
    pages = [Client().get(r["Location"]).content.decode() for r in (new, taken)]
    csrf = re.compile(r'(csrfmiddlewaretoken" value="|X-CSRFToken": ")[^"]*"')  # per client
    assert csrf.sub("", pages[0]) == csrf.sub("", pages[1])
    assert not Tenant.objects.filter(slug="taken-org").exists()
    assert User.objects.get(email="taken@acme.example").check_password(PASSWORD)
    # Only the mailboxes learn more: a link for the new one, a note for the taken one.
    by_to = {message.to[0]: message.body for message in mailoutbox}
    assert "has an account already" in by_to["taken@acme.example"]
    link = re.search(r"http://testserver(/signup/verify/\S+/)", by_to["fresh@acme.example"])
    assert link is not None

    # Until the link is opened, the new account cannot sign in.
    assert sign_in("/login/", "fresh@acme.example", PASSWORD, address)[0] is False
    client = Client()
    tampered = link.group(1)[:-3] + "xx/"
    assert client.get(tampered).status_code == 400
    assert client.get(link.group(1))["Location"] == "/t/fresh-org/"
    assert "_auth_user_id" in client.session
    # A link works once; an account an admin deactivates stays deactivated.
    assert Client().get(link.group(1)).status_code == 400
    User.objects.filter(email="fresh@acme.example").update(is_active=False)
    assert Client().get(link.group(1)).status_code == 400
