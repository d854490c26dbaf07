"""Seats without payment (#27 item 3): a tenant cannot raise its paid seats without a live
subscription, and cancelling the subscription in Stripe's portal does not leave it on the
paid plan's quotas. Through the API, localstripe and signed webhooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import requests

from billing.models import BillingAccount, DunningState, PlanPrice
from tenants.choices import Role, Scope, TenantStatus
from tenants.models import Tenant
from tests.control.billing_helpers import SECRET_KEY, subscribe

pytest_plugins = ["tests.control.billing_support"]


@pytest.mark.django_db
def test_seats_on_a_paid_plan_need_a_subscription(
    make_tenant: Callable[..., Any],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
    add_member: Callable[..., Any],
    stripe_settings: Any,
) -> None:
    tenant, owner = make_tenant("nopay", plan="team", seats=6)
    client = client_for(make_token(tenant, owner, Scope.ADMIN))
    base = "/api/v1/tenants/nopay/billing/seats/"
    for body in ({"seats": 100}, {"add": 94}):
        response = client.post(base, body, format="json")
        assert response.status_code == 409, response.content
        assert response.json()["error"]["code"] == "checkout_required"
    # Buying a seat for an invitation is the same purchase.
    for n in range(5):
        add_member(tenant, Role.DEVELOPER, email=f"dev{n}@nopay.example")
    invite = client.post(
        "/api/v1/tenants/nopay/invitations/",
        {"email": "seven@x.example", "buy_seat": True},
        format="json",
    )
    assert invite.status_code == 409
    assert Tenant.objects.get(pk=tenant.pk).seats == 6
    # Releasing seats needs no payment.
    tenant.memberships.exclude(user=owner).delete()
    assert client.post(base, {"seats": 5}, format="json").status_code == 200


@pytest.mark.django_db
def test_cancelling_in_the_portal_with_members_suspends_new_work(
    make_tenant: Callable[..., Any],
    add_member: Callable[..., Any],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
    stripe_plans: dict[str, PlanPrice],
    localstripe: str,
    deliver_stripe_events: Callable[..., list[str]],
    eager_celery: None,
    mailoutbox: list[Any],
) -> None:
    tenant, owner = make_tenant("quitter", plan="free", seats=1)
    account = subscribe(tenant, "pro", 3, localstripe, deliver_stripe_events)
    tenant.refresh_from_db()
    assert (tenant.plan.code, tenant.seats) == ("pro", 3)
    add_member(tenant, Role.DEVELOPER)
    add_member(tenant, Role.DEVELOPER, email="second@quitter.example")
    client = client_for(make_token(tenant, owner, Scope.ADMIN))

    # The customer cancels in Stripe's portal; Stripe tells Berth with a signed webhook.
    cancelled = requests.delete(
        f"{localstripe}/v1/subscriptions/{account.stripe_subscription_id}",
        auth=(SECRET_KEY, ""),
        timeout=5,
    )
    assert cancelled.status_code == 200, cancelled.text
    assert "customer.subscription.deleted" in deliver_stripe_events()

    tenant.refresh_from_db()
    account = BillingAccount.objects.get(tenant=tenant)
    assert tenant.status == TenantStatus.SUSPENDED
    assert "subscription ended" in tenant.status_reason
    assert account.dunning_state == DunningState.SUSPENDED
    assert account.stripe_subscription_id is None
    assert any("subscription" in m.subject for m in mailoutbox)
    # New work is refused, with the reason; reads still work.
    refused = client.post("/api/v1/tenants/quitter/billing/seats/", {"seats": 20}, format="json")
    assert refused.status_code in (403, 409), refused.content
    assert client.get("/api/v1/tenants/quitter/quotas/").status_code == 200
