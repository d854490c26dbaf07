"""Platform admins in the Django admin: comp seats, grant credits, suspend and reactivate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import requests
from django.test import Client

from billing import services
from billing.models import BillingAccount, CreditGrant, SeatLedgerEntry
from tenants.models import AuditLog, User
from tests.control.billing_helpers import SECRET_KEY

pytest_plugins = ["tests.control.billing_support"]

URL = "/admin/billing/billingaccount/"


@pytest.fixture
def admin_client_for(db: None) -> Client:
    admin = User.objects.create_superuser(
        username="root@berth.example", email="root@berth.example", password="x" * 12
    )
    client = Client()
    client.force_login(admin)
    return client


def act(client: Client, account: BillingAccount, action: str, **fields: Any) -> Any:
    return client.post(
        URL, {"action": action, "_selected_action": [account.pk], **fields}, follow=True
    )


def test_admin_comps_seats_and_grants_credit(
    make_tenant: Callable[..., Any],
    admin_client_for: Client,
    localstripe: str,
    eager_celery: None,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    tenant, _ = make_tenant("acme", plan="team", seats=3)
    account = services.account_for(tenant)

    response = act(admin_client_for, account, "comp_seats", count=2, reason="design partner")
    assert response.status_code == 200
    tenant.refresh_from_db()
    account.refresh_from_db()
    assert (tenant.seats, account.comp_seats) == (5, 2)
    assert services.billable_seats(tenant, account) == 3
    entry = SeatLedgerEntry.objects.get(tenant=tenant)
    assert (entry.kind, entry.note, entry.actor_label) == (
        "comp",
        "design partner",
        "root@berth.example",
    )

    with django_capture_on_commit_callbacks(execute=True):
        act(admin_client_for, account, "grant_credit", amount_cents=2500, reason="outage 3 May")
    grant = CreditGrant.objects.get(tenant=tenant)
    assert grant.amount_cents == 2500 and grant.stripe_invoice_item_id.startswith("ii_")
    account.refresh_from_db()
    item = requests.get(
        f"{localstripe}/v1/invoiceitems/{grant.stripe_invoice_item_id}",
        auth=(SECRET_KEY, ""),
        timeout=5,
    ).json()
    assert (item["amount"], item["customer"]) == (-2500, account.stripe_customer_id)
    assert services.estimate(tenant)["credits_cents"] == 2500

    # Bad input: a message, nothing written.
    response = act(admin_client_for, account, "grant_credit", amount_cents="", reason="")
    assert b"amount must be between" in response.content
    response = act(admin_client_for, account, "grant_credit", amount_cents="lots", reason="x")
    assert response.status_code == 200
    assert CreditGrant.objects.count() == 1


def test_admin_suspends_and_reactivates(
    make_tenant: Callable[..., Any], admin_client_for: Client, stripe_settings: Any
) -> None:
    tenant, _ = make_tenant("acme", plan="team", seats=3)
    account = services.account_for(tenant)

    act(admin_client_for, account, "suspend_for_billing", reason="chargeback")
    tenant.refresh_from_db()
    account.refresh_from_db()
    assert tenant.status == "suspended" and tenant.status_reason == "billing: chargeback"
    assert account.dunning_state == "suspended"

    act(admin_client_for, account, "reactivate", reason="resolved")
    tenant.refresh_from_db()
    account.refresh_from_db()
    assert tenant.status == "active" and account.dunning_state == "ok"
    actions = list(
        AuditLog.objects.filter(tenant=tenant).order_by("id").values_list("action", "actor_label")
    )
    assert ("tenant.suspend", "root@berth.example") in actions
    assert ("tenant.reactivate", "root@berth.example") in actions
    assert admin_client_for.get("/admin/billing/seatledgerentry/").status_code == 200
    assert admin_client_for.get("/admin/billing/stripeevent/").status_code == 200
