"""The /api/v1 surface driven over HTTP (DRF test client, real Postgres and Redis)."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.core import mail
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from tenants import services
from tenants.api.errors import exception_handler
from tenants.choices import Role, Scope
from tenants.errors import QuotaExceeded
from tenants.models import APIToken, AuditLog, Invitation, Membership, QuotaOverride, Tenant, User
from tests.control.conftest import SYSTEM

pytestmark = pytest.mark.django_db

V1 = "/api/v1"


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    return body["error"]


# ------------------------------------------------------------------ me & tenants


def test_me_with_token_shows_only_the_token_tenant(acme, make_tenant, owner_token, client_for):
    _, owner = acme
    make_tenant("other", owner=owner.email)  # same person owns a second tenant
    body = client_for(owner_token).get(f"{V1}/me/").json()
    assert body["user"]["email"] == owner.email
    assert body["token"]["prefix"] == owner_token[:12] and "token" not in body["token"]
    assert [t["slug"] for t in body["tenants"]] == ["acme"]
    listed = client_for(owner_token).get(f"{V1}/tenants/").json()["results"]
    assert [t["slug"] for t in listed] == ["acme"]
    session = APIClient()
    session.force_login(owner)
    assert {t["slug"] for t in session.get(f"{V1}/tenants/").json()["results"]} == {"acme", "other"}


def test_unauthenticated_is_401_in_error_format(acme):
    response = APIClient().get(f"{V1}/tenants/acme/")
    assert response.status_code == 401
    assert error_of(response)["code"] == "not_authenticated"
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_tenant_rename_and_strict_input(acme, owner_token, client_for):
    client = client_for(owner_token)
    response = client.patch(f"{V1}/tenants/acme/", {"name": "Acme Inc"}, format="json")
    assert response.status_code == 200 and response.json()["name"] == "Acme Inc"
    for bad in ({"name": "x", "color": "red"}, {"slug": "stolen"}, {"name": ""}):
        response = client.patch(f"{V1}/tenants/acme/", bad, format="json")
        assert response.status_code == 400
        assert error_of(response)["code"] == "invalid"
    assert Tenant.objects.get(slug="acme").name == "Acme Inc"
    assert not Tenant.objects.filter(slug="stolen").exists()


# ------------------------------------------------------------------ bad input


def test_malformed_json_non_object_and_wrong_media_type(owner_token, client_for):
    client = client_for(owner_token)
    url = f"{V1}/tenants/acme/tokens/"
    response = client.post(url, data="{nope", content_type="application/json")
    assert response.status_code == 400 and error_of(response)["code"] == "malformed_request"
    response = client.post(url, data="[1, 2]", content_type="application/json")
    assert response.status_code == 400 and error_of(response)["code"] == "invalid"
    response = client.post(url, data="name=x", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415 and error_of(response)["code"] == "unsupported_media_type"
    assert APIToken.objects.count() == 1


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=2048)
def test_oversize_body_is_413_and_writes_nothing(owner_token, client_for):
    body = json.dumps({"name": "x" * 5000, "scope": "read"})
    response = client_for(owner_token).post(
        f"{V1}/tenants/acme/tokens/", data=body, content_type="application/json"
    )
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"
    assert APIToken.objects.count() == 1


@pytest.mark.parametrize("debug", [False, True])
def test_unknown_api_url_is_json_404_even_in_debug(settings, debug):
    settings.DEBUG = debug
    response = APIClient().get(f"{V1}/tenants/acme/nothing-here/")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


def test_unknown_route_and_wrong_method_use_error_format(owner_token, client_for):
    client = client_for(owner_token)
    response = client.get(f"{V1}/no-such-thing/")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"
    response = client.put(f"{V1}/tenants/acme/", {"name": "x"}, format="json")
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"


def test_quota_refusal_renders_quota_limit_used_requested():
    response = exception_handler(QuotaExceeded("memory_mib", 1024, 1000, 512), {})
    assert response.status_code == 409
    assert response.data["error"]["code"] == "quota_exceeded"
    assert response.data["error"]["details"] == {
        "quota": "memory_mib",
        "limit": 1024,
        "used": 1000,
        "requested": 512,
    }


# ------------------------------------------------------------------ tokens


def test_token_lifecycle_secret_shown_once_then_revoked(acme, owner_token, client_for):
    client = client_for(owner_token)
    created = client.post(
        f"{V1}/tenants/acme/tokens/", {"name": "ci", "scope": "write"}, format="json"
    )
    assert created.status_code == 201
    secret = created.json()["token"]
    assert secret.startswith(created.json()["prefix"] + "_")
    listing = client.get(f"{V1}/tenants/acme/tokens/").content.decode()
    assert secret not in listing and '"token"' not in listing and "token_hash" not in listing
    assert client_for(secret).get(f"{V1}/me/").status_code == 200
    token_id = created.json()["id"]
    assert client.delete(f"{V1}/tenants/acme/tokens/{token_id}/").status_code == 204
    refused = client_for(secret).get(f"{V1}/me/")
    assert refused.status_code == 401 and error_of(refused)["code"] == "token_revoked"
    assert client.get(f"{V1}/tenants/acme/tokens/{token_id}/").json()["state"] == "revoked"


def test_expired_unknown_malformed_and_orphaned_tokens_are_401(
    acme, add_member, make_token, client_for
):
    tenant, owner = acme
    expiring = make_token(tenant, owner, "read", expires_at=timezone.now() + timedelta(hours=1))
    APIToken.objects.filter(prefix=expiring[:12]).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    response = client_for(expiring).get(f"{V1}/me/")
    assert response.status_code == 401 and error_of(response)["code"] == "token_expired"
    response = client_for("brt_deadbeef_nothing").get(f"{V1}/me/")
    assert error_of(response)["code"] == "invalid_token"
    response = client_for("garbage").get(f"{V1}/me/")
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_token"
    dev = add_member(tenant, Role.DEVELOPER)
    dev_token = make_token(tenant, dev, "read")
    Membership.objects.filter(user=dev).delete()  # left without the service revoking
    assert error_of(client_for(dev_token).get(f"{V1}/me/"))["code"] == "token_orphaned"


def test_token_last_use_is_recorded(acme, owner_token, client_for):
    client_for(owner_token).get(f"{V1}/me/", REMOTE_ADDR="198.51.100.7")
    token = APIToken.objects.get(prefix=owner_token[:12])
    assert token.last_used_at is not None and token.last_used_ip == "198.51.100.7"


def test_developers_see_only_their_own_tokens(acme, add_member, make_token, client_for):
    tenant, owner = acme
    dev = add_member(tenant, Role.DEVELOPER)
    dev_token = make_token(tenant, dev, "write")
    make_token(tenant, owner, "admin")
    seen = client_for(dev_token).get(f"{V1}/tenants/acme/tokens/").json()["results"]
    assert {t["user"] for t in seen} == {dev.email}
    other = APIToken.objects.filter(user=owner).first()
    assert client_for(dev_token).delete(f"{V1}/tenants/acme/tokens/{other.pk}/").status_code == 404
    response = client_for(dev_token).post(
        f"{V1}/tenants/acme/tokens/", {"name": "x", "scope": "admin"}, format="json"
    )
    assert response.status_code == 403


def test_cursor_pagination_walks_every_row_once(acme, make_token, client_for, owner_token):
    tenant, owner = acme
    for _ in range(6):
        make_token(tenant, owner, "read")
    client = client_for(owner_token)
    url, seen = f"{V1}/tenants/acme/tokens/?page_size=4", []
    while url:
        page = client.get(url).json()
        assert "count" not in page
        seen += [t["id"] for t in page["results"]]
        url = page["next"]
    assert len(seen) == len(set(seen)) == 7
    assert seen == sorted(seen, reverse=True)


@override_settings(BERTH_API_RATE_LIMIT=3)
def test_rate_limit_per_user(acme, make_token, client_for, add_member, monkeypatch):
    # Pin the clock inside one window so a minute boundary cannot reset the count mid-test.
    pinned = (time.time() // 60) * 60 + 30
    monkeypatch.setattr("tenants.api.throttling._now", lambda: pinned)
    tenant, owner = acme
    first, second = make_token(tenant, owner, "read"), make_token(tenant, owner, "read")
    codes = [client_for(first).get(f"{V1}/me/").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    limited = client_for(first).get(f"{V1}/me/")
    assert error_of(limited)["code"] == "rate_limited"
    assert int(limited["Retry-After"]) >= 0 and "retry_after" in error_of(limited)["details"]
    # The user's other token shares the budget (#27 item 10); another user's does not.
    assert client_for(second).get(f"{V1}/me/").status_code == 429
    other = make_token(tenant, add_member(tenant, "viewer"), "read")
    assert client_for(other).get(f"{V1}/me/").status_code == 200


# ------------------------------------------------------------------ members & invitations


def test_invite_accept_over_http_and_error_cases(
    acme, owner_token, client_for, django_capture_on_commit_callbacks
):
    client = client_for(owner_token)
    with django_capture_on_commit_callbacks(execute=True):
        created = client.post(
            f"{V1}/tenants/acme/invitations/",
            {"email": "Dev@X.example", "role": "developer"},
            format="json",
        )
    assert created.status_code == 201
    key = created.json()["key"]
    assert key in mail.outbox[-1].body
    again = client.post(
        f"{V1}/tenants/acme/invitations/", {"email": "dev@x.example"}, format="json"
    )
    assert again.status_code == 409 and error_of(again)["code"] == "already_member"
    bad = client.post(f"{V1}/tenants/acme/invitations/", {"email": "nope"}, format="json")
    assert bad.status_code == 400 and "email" in error_of(bad)["details"]["fields"]
    bad_role = client.post(
        f"{V1}/tenants/acme/invitations/", {"email": "a@b.example", "role": "god"}, format="json"
    )
    assert bad_role.status_code == 400
    anon = APIClient()
    short = anon.post(f"{V1}/invitations/accept/", {"key": key, "password": "123"}, format="json")
    assert short.status_code == 400 and not User.objects.filter(email="dev@x.example").exists()
    accepted = anon.post(
        f"{V1}/invitations/accept/", {"key": key, "password": "Sturdy-pass-2024"}, format="json"
    )
    assert accepted.status_code == 201 and accepted.json()["role"] == "developer"
    twice = anon.post(
        f"{V1}/invitations/accept/", {"key": key, "password": "Sturdy-pass-2024"}, format="json"
    )
    assert twice.status_code == 410 and error_of(twice)["details"] == {"state": "accepted"}
    existing = client.post(
        f"{V1}/tenants/acme/invitations/", {"email": "dev@x.example"}, format="json"
    )
    assert existing.status_code == 409
    assert Membership.objects.filter(tenant__slug="acme").count() == 2


def test_revoked_invitation_cannot_be_accepted(acme, owner_token, client_for):
    client = client_for(owner_token)
    created = client.post(
        f"{V1}/tenants/acme/invitations/", {"email": "r@x.example"}, format="json"
    ).json()
    assert client.delete(f"{V1}/tenants/acme/invitations/{created['id']}/").status_code == 204
    response = APIClient().post(
        f"{V1}/invitations/accept/",
        {"key": created["key"], "password": "Sturdy-pass-2024"},
        format="json",
    )
    assert response.status_code == 410 and error_of(response)["details"]["state"] == "revoked"
    assert client.delete(f"{V1}/tenants/acme/invitations/{created['id']}/").status_code == 410


def test_session_user_accepts_with_their_own_email(acme, owner_token, client_for):
    created = (
        client_for(owner_token)
        .post(
            f"{V1}/tenants/acme/invitations/",
            {"email": "s@x.example", "role": "viewer"},
            format="json",
        )
        .json()
    )
    wrong, _ = services.get_or_create_user("wrong@x.example", password="Sturdy-pass-2024")
    session = APIClient()
    session.force_login(wrong)
    response = session.post(f"{V1}/invitations/accept/", {"key": created["key"]}, format="json")
    assert response.status_code == 403
    right, _ = services.get_or_create_user("s@x.example", password="Sturdy-pass-2024")
    session.force_login(right)
    assert (
        session.post(
            f"{V1}/invitations/accept/", {"key": created["key"]}, format="json"
        ).status_code
        == 201
    )


def test_members_role_change_and_last_owner(acme, add_member, owner_token, client_for):
    tenant, owner = acme
    dev = add_member(tenant, Role.DEVELOPER)
    client = client_for(owner_token)
    dev_m = Membership.objects.get(user=dev)
    owner_m = Membership.objects.get(user=owner)
    response = client.patch(
        f"{V1}/tenants/acme/members/{dev_m.pk}/", {"role": "admin"}, format="json"
    )
    assert response.status_code == 200 and response.json()["role"] == "admin"
    response = client.patch(
        f"{V1}/tenants/acme/members/{owner_m.pk}/", {"role": "viewer"}, format="json"
    )
    assert response.status_code == 409 and error_of(response)["code"] == "last_owner"
    response = client.delete(f"{V1}/tenants/acme/members/{owner_m.pk}/")
    assert response.status_code == 409
    assert client.delete(f"{V1}/tenants/acme/members/{dev_m.pk}/").status_code == 204
    assert list(Membership.objects.filter(tenant=tenant).values_list("role", flat=True)) == [
        "owner"
    ]


def test_session_writes_need_csrf(acme):
    _, owner = acme
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(owner)
    assert client.get(f"{V1}/tenants/acme/").status_code == 200
    response = client.patch(f"{V1}/tenants/acme/", {"name": "x"}, format="json")
    assert response.status_code == 403 and error_of(response)["code"] == "permission_denied"


# ------------------------------------------------------------------ suspension


def test_suspended_tenant_can_read_but_not_write(acme, owner_token, client_for):
    tenant, _ = acme
    services.suspend_tenant(tenant, reason="payment failed", actor=SYSTEM)
    client = client_for(owner_token)
    assert client.get(f"{V1}/tenants/acme/").json()["status"] == "suspended"
    response = client.post(f"{V1}/tenants/acme/tokens/", {"name": "x"}, format="json")
    assert response.status_code == 403
    err = error_of(response)
    assert err["code"] == "tenant_suspended" and err["details"]["reason"] == "payment failed"
    assert APIToken.objects.count() == 1


# ------------------------------------------------------------------ quotas & audit


def test_quotas_read_for_members_write_for_platform_admins(acme, owner_token, client_for):
    tenant, _ = acme
    client = client_for(owner_token)
    quotas = {q["quota"]: q for q in client.get(f"{V1}/tenants/acme/quotas/").json()["quotas"]}
    assert quotas["containers"]["limit"] == tenant.quota_limits()["containers"]
    assert quotas["blkio_bps"]["per_container"] is True
    response = client.patch(f"{V1}/tenants/acme/quotas/", {"overrides": {"gpus": 4}}, format="json")
    assert response.status_code == 403 and not QuotaOverride.objects.exists()
    staff = User.objects.create_user("root@berth.example", "root@berth.example", "x", is_staff=True)
    admin = APIClient()
    admin.force_login(staff)
    response = admin.patch(
        f"{V1}/tenants/acme/quotas/",
        {"overrides": {"gpus": 4, "containers": -5}, "reason": "pilot"},
        format="json",
    )
    assert response.status_code == 200
    quotas = {q["quota"]: q for q in response.json()["quotas"]}
    assert quotas["gpus"]["override"] == 4 and quotas["containers"]["override"] == -5
    bad = admin.patch(
        f"{V1}/tenants/acme/quotas/", {"overrides": {"gpus": 1, "nope": 2}}, format="json"
    )
    assert bad.status_code == 400 and QuotaOverride.objects.get(quota="gpus").value == 4
    entry = AuditLog.objects.filter(action="quota.override").first()
    assert entry.actor_user == staff and entry.details["reason"] == "pilot"


def test_audit_log_visibility(acme, make_tenant, add_member, make_token, owner_token, client_for):
    tenant, _ = acme
    make_tenant("elsewhere")
    entries = client_for(owner_token).get(f"{V1}/tenants/acme/audit-log/").json()["results"]
    assert entries and {e["tenant"] for e in entries} == {"acme"}
    only = client_for(owner_token).get(f"{V1}/tenants/acme/audit-log/?action=token.create")
    assert [e["action"] for e in only.json()["results"]] == ["token.create"]
    dev = add_member(tenant, Role.DEVELOPER)
    assert (
        client_for(make_token(tenant, dev, "read")).get(f"{V1}/tenants/acme/audit-log/").status_code
        == 403
    )
    assert client_for(owner_token).get(f"{V1}/audit-log/").status_code == 403
    staff = User.objects.create_user("root@berth.example", "root@berth.example", "x", is_staff=True)
    admin = APIClient()
    admin.force_login(staff)
    everything = admin.get(f"{V1}/audit-log/").json()["results"]
    assert {"acme", "elsewhere"} <= {e["tenant"] for e in everything}
    filtered = admin.get(f"{V1}/audit-log/?tenant=elsewhere").json()["results"]
    assert {e["tenant"] for e in filtered} == {"elsewhere"}


# ------------------------------------------------------------------ schema


def test_openapi_schema_documents_routes_auth_and_error_format(client_for):
    response = APIClient().get(f"{V1}/schema/?format=json")
    assert response.status_code == 200
    schema = json.loads(response.content)
    assert schema["openapi"].startswith("3.")
    assert "/api/v1/tenants/{tenant_slug}/members/" in schema["paths"]
    assert {"bearerAuth", "cookieAuth"} <= set(schema["components"]["securitySchemes"])
    assert "Error" in schema["components"]["schemas"]
    op = schema["paths"]["/api/v1/tenants/{tenant_slug}/tokens/"]["post"]
    assert op["responses"]["409"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/Error"
    )
    assert APIClient().get(f"{V1}/docs/").status_code == 200


def test_invitation_rows_never_store_the_key(acme, owner_token, client_for):
    key = (
        client_for(owner_token)
        .post(f"{V1}/tenants/acme/invitations/", {"email": "k@x.example"}, format="json")
        .json()["key"]
    )
    assert not Invitation.objects.filter(key_hash__contains=key[4:20]).exists()


def test_scope_constants_are_ordered():
    assert [s.value for s in Scope] == ["read", "write", "admin"]
