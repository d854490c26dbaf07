"""Upgrading through Stripe Checkout from the billing page, against localstripe: the
redirect, the subscription the webhooks bring back, invoices and the portal link."""

from __future__ import annotations

from collections.abc import Callable
from io import StringIO

import pytest
import requests
from django.core.management import call_command
from django.test import Client

from tenants.models import Tenant, User
from tests.control.billing_helpers import SECRET_KEY

pytest_plugins = ["tests.control.billing_support"]
pytestmark = pytest.mark.django_db


def test_upgrade_through_checkout_then_invoices_and_portal(
    make_tenant: Callable[..., tuple[Tenant, User]],
    login: Callable[[User], Client],
    localstripe: str,
    deliver_stripe_events: Callable[..., list[str]],
    eager_celery: None,
) -> None:
    call_command("sync_stripe_plans", stdout=StringIO())
    _tenant, owner = make_tenant("acme", plan="free", seats=1)
    client = login(owner)
    page = client.get("/t/acme/billing/").content.decode()
    assert "Free" in page and "Continue to checkout" in page

    too_few = client.post("/t/acme/billing/checkout/", {"plan": "team", "seats": "1"})
    assert too_few.status_code == 400
    assert 'value="1"' in too_few.content.decode()

    response = client.post("/t/acme/billing/checkout/", {"plan": "team", "seats": "2"})
    assert response.status_code == 302
    assert response["Location"].startswith(f"{localstripe}/checkout/cs_test_")
    session_id = response["Location"].rsplit("/", 1)[1].split("?")[0]
    requests.post(
        f"{localstripe}/_ext/checkout/sessions/{session_id}/complete",
        auth=(SECRET_KEY, ""),
        timeout=5,
    ).raise_for_status()
    deliver_stripe_events()

    page = client.get("/t/acme/billing/?checkout=success").content.decode()
    assert "Team ($15.00 per seat per month)" in page
    assert "2 seats, 1 used" in page
    assert ">active<" in page
    assert "paid" in page and "$30.00" in page
    assert "Continue to checkout" not in page

    again = client.post("/t/acme/billing/checkout/", {"plan": "team", "seats": "3"})
    assert again.status_code == 400
    assert "already has a subscription" in again.content.decode()

    portal = client.post("/t/acme/billing/portal/")
    assert portal.status_code == 302
    assert portal["Location"].startswith(localstripe)
