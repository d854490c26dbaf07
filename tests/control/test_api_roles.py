"""Permissions per role over HTTP (session login, so only the role decides), and token
scopes on top of roles. The table mirrors docs/control-plane.md."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from tenants.choices import Role
from tenants.models import Invitation, Membership

pytestmark = pytest.mark.django_db

ROLES = [Role.OWNER, Role.ADMIN, Role.DEVELOPER, Role.BILLING, Role.VIEWER]

# (action, allowed roles)
MATRIX = {
    "view tenant": set(ROLES),
    "list members": set(ROLES),
    "rename tenant": {Role.OWNER, Role.ADMIN},
    "invite": {Role.OWNER, Role.ADMIN},
    "change role": {Role.OWNER, Role.ADMIN},
    "remove member": {Role.OWNER, Role.ADMIN},
    "create own token": set(ROLES),
    "read quotas": set(ROLES),
    "write quotas": set(),  # platform admins only
    "read audit log": {Role.OWNER, Role.ADMIN},
}


def perform(client: APIClient, action: str, tenant, target: Membership) -> int:
    base = f"/api/v1/tenants/{tenant.slug}"
    calls = {
        "view tenant": lambda: client.get(f"{base}/"),
        "list members": lambda: client.get(f"{base}/members/"),
        "rename tenant": lambda: client.patch(f"{base}/", {"name": "Renamed"}, format="json"),
        "invite": lambda: client.post(
            f"{base}/invitations/", {"email": "new@x.example", "role": "viewer"}, format="json"
        ),
        "change role": lambda: client.patch(
            f"{base}/members/{target.pk}/", {"role": "billing"}, format="json"
        ),
        "remove member": lambda: client.delete(f"{base}/members/{target.pk}/"),
        "create own token": lambda: client.post(
            f"{base}/tokens/", {"name": "mine", "scope": "read"}, format="json"
        ),
        "read quotas": lambda: client.get(f"{base}/quotas/"),
        "write quotas": lambda: client.patch(
            f"{base}/quotas/", {"overrides": {"gpus": 1}}, format="json"
        ),
        "read audit log": lambda: client.get(f"{base}/audit-log/"),
    }
    return calls[action]().status_code


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", list(MATRIX))
def test_role_matrix(role, action, acme, add_member) -> None:
    tenant, _ = acme
    user = add_member(tenant, role, f"actor-{role}@x.example") if role != Role.OWNER else acme[1]
    victim = add_member(tenant, Role.VIEWER, "target@x.example")
    target = Membership.objects.get(tenant=tenant, user=victim)
    client = APIClient()
    client.force_login(user)
    status = perform(client, action, tenant, target)
    if role in MATRIX[action]:
        assert 200 <= status < 300, f"{role} should be able to {action}: {status}"
    else:
        assert status == 403, f"{role} must not {action}: {status}"
        assert Invitation.objects.count() == 0 or action != "invite"


def test_non_member_session_gets_404(acme, make_tenant) -> None:
    _, stranger = make_tenant("elsewhere")
    client = APIClient()
    client.force_login(stranger)
    assert client.get("/api/v1/tenants/acme/").status_code == 404
    assert client.get("/api/v1/tenants/acme/members/").status_code == 404


@pytest.mark.parametrize(
    ("scope", "read", "write", "admin"),
    [("read", 200, 403, 403), ("write", 200, 201, 403), ("admin", 200, 201, 201)],
)
def test_token_scope_on_top_of_owner_role(acme, make_token, client_for, scope, read, write, admin):
    tenant, owner = acme
    client = client_for(make_token(tenant, owner, scope))
    assert client.get("/api/v1/tenants/acme/members/").status_code == read
    # Creating one's own token is an ordinary write; inviting needs the admin scope.
    assert (
        client.post(
            "/api/v1/tenants/acme/tokens/", {"name": "x", "scope": "read"}, format="json"
        ).status_code
        == write
    )
    response = client.post(
        "/api/v1/tenants/acme/invitations/", {"email": "s@x.example"}, format="json"
    )
    assert response.status_code == admin
    if admin == 403:
        error = response.json()["error"]
        assert error["code"] == "insufficient_scope"
        prefix = client._credentials["HTTP_AUTHORIZATION"][len("Bearer ") :][:12]
        expected = f"needs a token with scope 'admin'; token {prefix} has '{scope}'"
        assert expected in error["message"]


def test_admin_cannot_grant_owner_but_owner_can(acme, add_member) -> None:
    tenant, owner = acme
    admin = add_member(tenant, Role.ADMIN)
    dev = add_member(tenant, Role.DEVELOPER)
    target = Membership.objects.get(user=dev)
    client = APIClient()
    client.force_login(admin)
    url = f"/api/v1/tenants/acme/members/{target.pk}/"
    assert client.patch(url, {"role": "owner"}, format="json").status_code == 403
    client.force_login(owner)
    assert client.patch(url, {"role": "owner"}, format="json").status_code == 200
