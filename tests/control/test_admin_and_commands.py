"""The admin console (platform admins) and the management commands."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from billing.models import Plan
from tenants.choices import TenantStatus
from tenants.models import APIToken, AuditLog, Membership, QuotaOverride, Tenant, User

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client() -> Client:
    staff = User.objects.create_superuser("root@berth.example", "root@berth.example", "pw")
    client = Client()
    client.force_login(staff)
    return client


def change_form(tenant: Tenant, **changes) -> dict:
    data = {
        "name": tenant.name,
        "status": tenant.status,
        "plan": tenant.plan_id,
        "seats": tenant.seats,
        "change_reason": "",
        "quota_overrides-TOTAL_FORMS": "1",
        "quota_overrides-INITIAL_FORMS": "0",
        "quota_overrides-MIN_NUM_FORMS": "0",
        "quota_overrides-MAX_NUM_FORMS": "1000",
        "quota_overrides-0-quota": "",
        "quota_overrides-0-value": "",
        "quota_overrides-0-reason": "",
        "quota_usage-TOTAL_FORMS": "0",
        "quota_usage-INITIAL_FORMS": "0",
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
    }
    data.update(changes)
    return data


def test_admin_lists_searches_and_filters_tenants(staff_client, acme, make_tenant) -> None:
    make_tenant("zeta", plan="pro", seats=2)
    page = staff_client.get("/admin/tenants/tenant/?q=owner@acme.example").content.decode()
    assert "acme" in page and "zeta" not in page
    page = staff_client.get(
        f"/admin/tenants/tenant/?plan__id__exact={Plan.objects.get(code='pro').pk}"
    )
    assert "zeta" in page.content.decode()


def test_admin_suspend_needs_reason_and_is_audited(staff_client, acme) -> None:
    tenant, _ = acme
    url = f"/admin/tenants/tenant/{tenant.pk}/change/"
    response = staff_client.post(url, change_form(tenant, status="suspended"))
    assert response.status_code == 200 and "Give a reason" in response.content.decode()
    assert Tenant.objects.get(pk=tenant.pk).status == TenantStatus.ACTIVE
    response = staff_client.post(
        url, change_form(tenant, status="suspended", change_reason="fraud review")
    )
    assert response.status_code == 302
    tenant.refresh_from_db()
    assert tenant.status == TenantStatus.SUSPENDED and tenant.status_reason == "fraud review"
    entry = AuditLog.objects.get(action="tenant.suspend")
    assert entry.actor_user is not None and entry.actor_user.email == "root@berth.example"
    assert entry.ip == "127.0.0.1"


def test_admin_plan_seats_and_override_go_through_services(staff_client, acme) -> None:
    tenant, _ = acme
    url = f"/admin/tenants/tenant/{tenant.pk}/change/"
    business = Plan.objects.get(code="business")
    response = staff_client.post(
        url, change_form(tenant, plan=business.pk, seats=2, change_reason="upgrade")
    )
    assert "at least 5" in response.content.decode()
    response = staff_client.post(
        url,
        change_form(
            tenant,
            plan=business.pk,
            seats=6,
            change_reason="upgrade",
            **{"quota_overrides-0-quota": "gpus", "quota_overrides-0-value": "2"},
        ),
    )
    assert response.status_code == 302
    tenant.refresh_from_db()
    assert (tenant.plan.code, tenant.seats) == ("business", 6)
    assert QuotaOverride.objects.get(tenant=tenant, quota="gpus").value == 2
    assert tenant.quota_limits()["gpus"] == 6 * business.gpus + 2
    actions = set(AuditLog.objects.values_list("action", flat=True))
    assert {"tenant.change_plan", "quota.override"} <= actions


def test_create_tenant_command_prints_working_admin_token(plans, capsys, client_for) -> None:
    call_command(
        "create_tenant", "cli-co", "--owner", "Ops@Cli.example", "--plan", "pro", "--seats", "3"
    )
    out = capsys.readouterr().out.strip().splitlines()
    token = out[-1]
    assert APIToken.objects.get(prefix=token[:12]).scope == "admin"
    tenant = Tenant.objects.get(slug="cli-co")
    assert (tenant.plan.code, tenant.seats) == ("pro", 3)
    assert Membership.objects.get(tenant=tenant).user.email == "ops@cli.example"
    response = client_for(token).get("/api/v1/tenants/cli-co/")
    assert response.status_code == 200 and response.json()["role"] == "owner"


@pytest.mark.parametrize(
    "args",
    [
        ["Bad_Slug", "--owner", "a@b.example"],
        ["ok", "--owner", "nope"],
        ["ok", "--owner", "a@b.example", "--plan", "gold"],
        ["ok", "--owner", "a@b.example", "--plan", "team", "--seats", "1"],
    ],
)
def test_create_tenant_command_rejects_bad_input(plans, args) -> None:
    with pytest.raises(CommandError):
        call_command("create_tenant", *args)
    assert not Tenant.objects.exists() and not User.objects.exists()


def test_bootstrap_demo_is_idempotent_and_rotates_credentials(plans, capsys, client_for) -> None:
    call_command("bootstrap_demo")
    first = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines() if ":" in line)
    call_command("bootstrap_demo")
    second = dict(
        line.split(":", 1) for line in capsys.readouterr().out.splitlines() if ":" in line
    )
    assert Tenant.objects.filter(slug="demo").count() == 1
    assert Membership.objects.filter(tenant__slug="demo").count() == 1
    old_token, new_token = first["API token"].strip(), second["API token"].strip()
    assert old_token != new_token
    assert client_for(old_token).get("/api/v1/me/").status_code == 401
    assert client_for(new_token).get("/api/v1/tenants/demo/").status_code == 200
    user = User.objects.get(username=second["Login"].strip())
    assert user.check_password(second["Password"].strip())


def test_admin_bulk_suspend_asks_for_a_reason(staff_client, acme, make_tenant) -> None:
    tenant, _ = acme
    other, _ = make_tenant("other")
    picked = {"action": "suspend_selected", "_selected_action": [tenant.pk, other.pk]}
    page = staff_client.post("/admin/tenants/tenant/", picked)
    assert page.status_code == 200 and 'name="reason"' in page.content.decode()
    assert not Tenant.objects.filter(status=TenantStatus.SUSPENDED).exists()
    staff_client.post("/admin/tenants/tenant/", {**picked, "apply": "1", "reason": ""})
    assert not Tenant.objects.filter(status=TenantStatus.SUSPENDED).exists()
    staff_client.post("/admin/tenants/tenant/", {**picked, "apply": "1", "reason": "abuse"})
    assert set(Tenant.objects.values_list("status_reason", flat=True)) == {"abuse"}
    assert AuditLog.objects.filter(action="tenant.suspend").count() == 2
    staff_client.post(
        "/admin/tenants/tenant/",
        {"action": "reactivate_selected", "_selected_action": [tenant.pk]},
    )
    tenant.refresh_from_db()
    assert tenant.status == TenantStatus.ACTIVE


def test_bootstrap_demo_reactivates_a_suspended_demo(plans, capsys, client_for) -> None:
    from tenants import services

    call_command("bootstrap_demo")
    services.suspend_tenant(
        Tenant.objects.get(slug="demo"), reason="test", actor=services.Actor.for_system("t")
    )
    call_command("bootstrap_demo")
    token = capsys.readouterr().out.strip().splitlines()[-2].split(":", 1)[1].strip()
    assert Tenant.objects.get(slug="demo").status == TenantStatus.ACTIVE
    response = client_for(token).post(
        "/api/v1/tenants/demo/tokens/", {"name": "x", "scope": "read"}, format="json"
    )
    assert response.status_code == 201


@pytest.mark.django_db(transaction=True)
def test_admin_node_deletion_goes_through_the_service(staff_client) -> None:
    """Deleting a node in the admin is remove_node: audited, and its broker user goes."""
    import redis
    from django.conf import settings

    from tests.control.conftest import SYSTEM
    from workloads.models import Node
    from workloads.services import broker, nodes

    _, token = nodes.create_join_token(actor=SYSTEM)
    node, _ = nodes.join_node(token, name="doomed", capacity={}, labels={})
    nodes.broker_login(node)
    admin_redis = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    assert broker.node_user(node.pk) in admin_redis.acl_users()
    response = staff_client.post(
        f"/admin/workloads/node/{node.pk}/delete/", {"post": "yes"}, follow=False
    )
    assert response.status_code == 302
    assert not Node.objects.filter(pk=node.pk).exists()
    assert AuditLog.objects.filter(action="node.remove").exists()
    assert broker.node_user(node.pk) not in admin_redis.acl_users()
