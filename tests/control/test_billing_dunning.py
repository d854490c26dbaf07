"""Dunning under a controlled clock: payment failure → past_due (grace) → suspended →
services stopped after notice → reactivated on payment; every step audited and shown."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rest_framework.test import APIClient

from billing import services
from billing.models import DunningState
from tenants.errors import TenantSuspended
from tenants.models import AuditLog, Tenant

pytest_plugins = ["tests.control.billing_support"]

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
STOPPED: list[tuple[str, str]] = []


def record_stop(tenant: Tenant, *, reason: str) -> None:
    """Stand-in for the workloads app's stop hook: records what billing asked to stop."""
    STOPPED.append((tenant.slug, reason))


@pytest.fixture
def dunning_settings(settings: Any) -> Any:
    settings.BILLING_GRACE_PERIOD_HOURS = 72
    settings.BILLING_STOP_SERVICES_AFTER_HOURS = 24
    settings.BILLING_STOP_SERVICES_HOOK = f"{__name__}.record_stop"
    STOPPED.clear()
    return settings


def billing_actions(tenant: Tenant) -> list[str]:
    return list(
        AuditLog.objects.filter(tenant=tenant, action__startswith="billing.")
        .order_by("id")
        .values_list("action", flat=True)
    )


def test_dunning_timeline(
    make_tenant: Callable[..., Any],
    dunning_settings: Any,
    mailoutbox: list[Any],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    tenant, _ = make_tenant("acme", plan="team", seats=2)
    account = services.account_for(tenant)

    with django_capture_on_commit_callbacks(execute=True):
        assert (
            services.record_payment_failed(account, failed_at=T0, invoice_id="in_1", now=T0)
            == "past_due"
        )
    account.refresh_from_db()
    assert account.dunning_state == DunningState.PAST_DUE
    assert account.grace_ends_at == T0 + timedelta(hours=72)
    assert "payment failed" in mailoutbox[-1].subject.lower()
    # A second failure during the grace period does not extend it.
    services.record_payment_failed(
        account, failed_at=T0 + timedelta(hours=24), invoice_id="in_1", now=T0 + timedelta(hours=24)
    )
    account.refresh_from_db()
    assert account.grace_ends_at == T0 + timedelta(hours=72)

    # Grace period: still active, new work allowed.
    assert services.enforce_dunning(now=T0 + timedelta(hours=72) - timedelta(seconds=1)) == {
        "suspended": 0,
        "services_stopped": 0,
    }
    tenant.refresh_from_db()
    assert tenant.status == "active"
    services.check_new_usage_allowed(tenant, "deploy")

    # Grace over: suspended, new work refused, services still running until the notice ends.
    t_suspend = T0 + timedelta(hours=72)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.enforce_dunning(now=t_suspend)["suspended"] == 1
    tenant.refresh_from_db()
    account.refresh_from_db()
    assert tenant.status == "suspended" and tenant.status_reason.startswith("billing:")
    assert account.stop_services_at == t_suspend + timedelta(hours=24)
    with pytest.raises(TenantSuspended):
        services.check_new_usage_allowed(tenant, "deploy")
    assert services.enforce_dunning(now=t_suspend + timedelta(hours=23))["services_stopped"] == 0
    assert STOPPED == []

    # Notice over: running services are stopped (once), data kept.
    assert services.enforce_dunning(now=t_suspend + timedelta(hours=24))["services_stopped"] == 1
    assert services.enforce_dunning(now=t_suspend + timedelta(hours=25))["services_stopped"] == 0
    assert STOPPED == [("acme", "suspended for non-payment")]

    # Payment: reactivated automatically.
    paid_at = t_suspend + timedelta(hours=30)
    result = services.record_payment_succeeded(
        account, paid_at=paid_at, invoice_id="in_1", now=paid_at
    )
    assert result == "reactivated from suspended"
    tenant.refresh_from_db()
    account.refresh_from_db()
    assert tenant.status == "active" and account.dunning_state == DunningState.OK
    services.check_new_usage_allowed(tenant, "deploy")
    assert billing_actions(tenant) == [
        "billing.past_due",
        "billing.suspended",
        "billing.services_stopped",
        "billing.reactivated",
    ]
    assert AuditLog.objects.filter(tenant=tenant, action="tenant.suspend").count() == 1
    assert AuditLog.objects.filter(tenant=tenant, action="tenant.reactivate").count() == 1


def test_payment_does_not_lift_a_suspension_for_another_reason(
    make_tenant: Callable[..., Any], dunning_settings: Any
) -> None:
    tenant, _ = make_tenant("acme", plan="team", seats=2)
    account = services.account_for(tenant)
    services.record_payment_failed(account, failed_at=T0, invoice_id="in_1", now=T0)
    services.tenant_services.suspend_tenant(
        tenant, reason="abuse report #12", actor=services.BILLING_ACTOR
    )

    services.record_payment_succeeded(
        account, paid_at=T0 + timedelta(hours=1), invoice_id="in_1", now=T0 + timedelta(hours=1)
    )

    tenant.refresh_from_db()
    account.refresh_from_db()
    assert account.dunning_state == DunningState.OK
    assert tenant.status == "suspended" and tenant.status_reason == "abuse report #12"


def test_the_tenant_sees_its_dunning_state(
    make_tenant: Callable[..., Any],
    make_token: Callable[..., str],
    dunning_settings: Any,
    stripe_settings: Any,
) -> None:
    tenant, owner = make_tenant("acme", plan="team", seats=2)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {make_token(tenant, owner)}")
    account = services.account_for(tenant)
    services.record_payment_failed(account, failed_at=T0, invoice_id="in_9", now=T0)
    services.enforce_dunning(now=T0 + timedelta(hours=72))

    body = client.get("/api/v1/tenants/acme/billing/").json()

    assert body["dunning_state"] == "suspended"
    assert body["grace_ends_at"].startswith("2026-03-05T09:00")
    assert body["stop_services_at"].startswith("2026-03-06T09:00")
    assert [e["action"] for e in body["events"]] == ["billing.suspended", "billing.past_due"]
    # A suspended tenant can still reach the portal to pay (Stripe is down here: 503).
    response = client.post("/api/v1/tenants/acme/billing/portal/", {}, format="json")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "billing_unavailable"


def test_suspension_stops_running_services_and_keeps_them(
    make_tenant: Callable[..., Any], settings: Any
) -> None:
    from workloads.models import Service
    from workloads.services.deploy import create_service

    settings.BILLING_GRACE_PERIOD_HOURS = 1
    settings.BILLING_STOP_SERVICES_AFTER_HOURS = 2
    tenant, _ = make_tenant("acme", plan="team", seats=2)
    create_service(
        tenant,
        name="web",
        data={"image": "library/busybox:latest"},
        replicas=2,
        actor=services.BILLING_ACTOR,
    )
    containers_used = tenant.quota_usage.get(quota="containers").used
    assert containers_used == 2
    account = services.account_for(tenant)
    services.record_payment_failed(account, failed_at=T0, invoice_id="in_1", now=T0)
    services.enforce_dunning(now=T0 + timedelta(hours=1))
    assert Service.objects.get(tenant=tenant, name="web").state == "active"  # notice period

    services.enforce_dunning(now=T0 + timedelta(hours=3))

    service = Service.objects.get(tenant=tenant, name="web")
    assert service.state == "stopped" and service.replicas == 2  # spec kept
    assert tenant.quota_usage.get(quota="containers").used == 0
    entry = AuditLog.objects.get(tenant=tenant, action="billing.services_stopped")
    assert entry.details == {"services": ["web"]}
