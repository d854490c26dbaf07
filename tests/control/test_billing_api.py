"""The billing API: what each role and token scope may do, other tenants, the error format,
and Checkout, portal, invoices and the upcoming invoice through localstripe."""

from __future__ import annotations

from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
import requests
from django.core.management import call_command

from tenants import services as tenant_services
from tenants.choices import Role, Scope
from tenants.models import Tenant
from tests.control.billing_helpers import SECRET_KEY, mark_subscribed

pytest_plugins = ["tests.control.billing_support"]

BASE = "/api/v1/tenants/acme/billing"


@pytest.fixture
def owner_client(
    make_tenant: Callable[..., Any],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
) -> Any:
    tenant, owner = make_tenant("acme", plan="team", seats=4)
    return client_for(make_token(tenant, owner))


def test_owner_reads_and_changes_seats(owner_client: Any, stripe_settings: Any) -> None:
    summary = owner_client.get(f"{BASE}/").json()
    assert (summary["plan"], summary["seats"], summary["members"]) == ("team", 4, 1)
    assert summary["dunning_state"] == "ok" and summary["subscription_status"] == "none"

    # No subscription yet: paid seats are bought through Checkout, nothing changes.
    unpaid = owner_client.post(f"{BASE}/seats/", {"seats": 100}, format="json")
    assert unpaid.status_code == 409, unpaid.content
    assert unpaid.json()["error"]["code"] == "checkout_required"
    assert owner_client.get(f"{BASE}/").json()["seats"] == 4

    mark_subscribed(Tenant.objects.get(slug="acme"))
    response = owner_client.post(f"{BASE}/seats/", {"seats": 6}, format="json")
    assert response.status_code == 200 and response.json()["seats"] == 6
    ledger = owner_client.get(f"{BASE}/seat-ledger/").json()["results"]
    assert [(e["kind"], e["previous_seats"], e["seats"]) for e in ledger] == [
        ("seats_changed", 4, 6)
    ]
    quotas = owner_client.get("/api/v1/tenants/acme/quotas/").json()["quotas"]
    assert {q["quota"]: q["limit"] for q in quotas}["containers"] == 6 * 25


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"seats": -3}, "seats"),
        ({"seats": 10**9}, "seats"),
        ({"seats": "many"}, "seats"),
        ({"seats": 5, "price": 0}, "price"),
        ({}, "seats"),
    ],
)
def test_bad_seat_requests_get_clear_errors(
    owner_client: Any, stripe_settings: Any, body: dict[str, Any], field: str
) -> None:
    response = owner_client.post(f"{BASE}/seats/", body, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert field in error["details"]["fields"]
    assert owner_client.get(f"{BASE}/").json()["seats"] == 4


def test_downgrade_below_usage_is_refused_with_what_must_shrink(
    owner_client: Any, stripe_settings: Any
) -> None:
    from tenants.models import Tenant

    tenant = Tenant.objects.get(slug="acme")
    tenant_services.reserve(
        tenant, {"containers": 4}, actor=tenant_services.Actor.for_system("t"), reason="x"
    )
    response = owner_client.post(f"{BASE}/plan/", {"plan": "free", "seats": 1}, format="json")
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "downgrade_blocked"
    assert error["details"]["must_shrink"][0]["quota"] == "containers"
    assert error["details"]["must_shrink"][0]["shrink_by"] == 1

    response = owner_client.post(f"{BASE}/plan/", {"plan": "business"}, format="json")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "checkout_required"


def test_spend_cap_and_usage(owner_client: Any, stripe_settings: Any) -> None:
    response = owner_client.put(f"{BASE}/spend-cap/", {"cap_cents": 10_000}, format="json")
    assert response.status_code == 200
    assert response.json()["cap_cents"] == 10_000 and response.json()["state"] == "ok"
    response = owner_client.put(f"{BASE}/spend-cap/", {"cap_cents": 100}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["details"]["minimum"] == 4 * 1500
    usage = owner_client.get(f"{BASE}/usage/").json()
    assert usage["seats_cents"] == 6000 and usage["total_cents"] == 6000
    assert {u["metric"] for u in usage["usage"]} == {
        "cpu_seconds",
        "memory_gib_hours",
        "gpu_hours",
        "storage_gib_hours",
        "build_minutes",
    }
    assert owner_client.get(f"{BASE}/invoices/").json() == {"results": []}


def test_roles_scopes_and_other_tenants(
    make_tenant: Callable[..., Any],
    make_token: Callable[..., str],
    add_member: Callable[..., Any],
    client_for: Callable[..., Any],
    stripe_settings: Any,
) -> None:
    tenant, owner = make_tenant("acme", plan="team", seats=6)
    other, other_owner = make_tenant("globex", plan="team", seats=2)
    developer = add_member(tenant, Role.DEVELOPER)
    billing = add_member(tenant, Role.BILLING)

    dev = client_for(make_token(tenant, developer, Scope.WRITE))
    assert dev.get(f"{BASE}/").status_code == 403
    assert dev.post(f"{BASE}/seats/", {"seats": 7}, format="json").status_code == 403

    bill = client_for(make_token(tenant, billing, Scope.WRITE))
    assert bill.get(f"{BASE}/usage/").status_code == 200
    refused = bill.post(f"{BASE}/seats/", {"seats": 7}, format="json")  # needs admin scope
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_scope"

    read = client_for(make_token(tenant, owner, Scope.READ))
    assert read.get(f"{BASE}/").status_code == 200
    assert read.put(f"{BASE}/spend-cap/", {"cap_cents": None}, format="json").status_code == 403

    stranger = client_for(make_token(other, other_owner))
    for path in ("/", "/usage/", "/seat-ledger/", "/invoices/", "/spend-cap/"):
        assert stranger.get(f"{BASE}{path}").status_code == 404
    assert stranger.post(f"{BASE}/seats/", {"seats": 9}, format="json").status_code == 404
    tenant.refresh_from_db()
    assert tenant.seats == 6


def test_checkout_portal_invoices_and_upcoming(
    owner_client: Any,
    localstripe: str,
    deliver_stripe_events: Callable[..., list[str]],
    eager_celery: None,
) -> None:
    call_command("sync_stripe_plans", stdout=StringIO())
    response = owner_client.post(f"{BASE}/checkout/", {"plan": "team", "seats": 5}, format="json")
    assert response.status_code == 201
    session = response.json()
    assert session["url"].startswith(f"{localstripe}/checkout/cs_test_")
    requests.post(
        f"{localstripe}/_ext/checkout/sessions/{session['id']}/complete",
        auth=(SECRET_KEY, ""),
        timeout=5,
    ).raise_for_status()
    deliver_stripe_events()

    summary = owner_client.get(f"{BASE}/").json()
    assert (summary["seats"], summary["subscription_status"]) == (5, "active")
    invoices = owner_client.get(f"{BASE}/invoices/").json()["results"]
    assert [(i["status"], i["total_cents"]) for i in invoices] == [("paid", 5 * 1500)]
    upcoming = owner_client.get(f"{BASE}/upcoming/").json()
    assert upcoming["upcoming_invoice"]["total_cents"] == 5 * 1500
    assert upcoming["estimate"]["seats_cents"] == 5 * 1500
    again = owner_client.post(f"{BASE}/checkout/", {"plan": "team", "seats": 6}, format="json")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "already_subscribed"
    portal = owner_client.post(f"{BASE}/portal/", {}, format="json")
    assert portal.status_code == 201 and portal.json()["url"].startswith(f"{localstripe}/portal/")


def test_relative_seat_changes(owner_client: Any, stripe_settings: Any) -> None:
    mark_subscribed(Tenant.objects.get(slug="acme"))
    assert owner_client.post(f"{BASE}/seats/", {"add": 2}, format="json").json()["seats"] == 6
    assert owner_client.post(f"{BASE}/seats/", {"add": -1}, format="json").json()["seats"] == 5
    for body in ({"add": 0}, {"seats": 5, "add": 1}, {"add": -10}):
        response = owner_client.post(f"{BASE}/seats/", body, format="json")
        assert response.status_code == 400, body
        assert response.json()["error"]["code"]
    assert owner_client.get(f"{BASE}/").json()["seats"] == 5
