"""Stripe webhooks with locally signed payloads: valid, forged, replayed, out of order,
unknown type, unknown customer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from billing import services
from billing.models import BillingAccount, Plan, PlanPrice, SeatLedgerEntry, StripeEvent
from tenants.models import Tenant
from tests.control.billing_helpers import make_event, post_event, sign

pytest_plugins = ["tests.control.billing_support"]


@pytest.fixture
def subscribed(
    make_tenant: Callable[..., Any], stripe_settings: Any, eager_celery: None
) -> tuple[Tenant, BillingAccount]:
    """A Team tenant with 3 seats linked to a Stripe customer and subscription."""
    tenant, _ = make_tenant("acme", plan="team", seats=3)
    for code in ("team", "business"):
        plan = Plan.objects.get(code=code)
        PlanPrice.objects.create(
            plan=plan,
            stripe_price_id=f"price_{code}",
            stripe_product_id=f"berth_plan_{code}",
            lookup_key=f"k_{code}",
            unit_amount_cents=plan.seat_price_cents,
        )
    account = services.account_for(tenant)
    account.stripe_customer_id = "cus_acme"
    account.stripe_subscription_id = "sub_acme"
    account.stripe_subscription_item_id = "si_acme"
    account.subscription_status = "active"
    account.synced_quantity = 3
    account.save()
    return tenant, account


def subscription(quantity: int, price: str = "price_team", status: str = "active") -> dict:
    return {
        "id": "sub_acme",
        "object": "subscription",
        "customer": "cus_acme",
        "status": status,
        "quantity": quantity,
        "items": {
            "object": "list",
            "data": [{"id": "si_acme", "quantity": quantity, "plan": {"id": price}}],
        },
    }


def deliver(client: Client, capture: Callable[..., Any], payload: bytes, **kw: Any) -> Any:
    with capture(execute=True):
        return post_event(client, payload, **kw)


def test_valid_event_is_stored_once_and_applied(
    client: Client,
    subscribed: tuple[Tenant, BillingAccount],
    django_capture_on_commit_callbacks: Any,
) -> None:
    tenant, _ = subscribed
    now = int(time.time())
    payload = make_event(
        "customer.subscription.updated", subscription(7), created=now, event_id="evt_1"
    )

    response = deliver(client, django_capture_on_commit_callbacks, payload)

    assert response.status_code == 200
    assert response.json() == {"received": True, "duplicate": False}
    event = StripeEvent.objects.get(stripe_id="evt_1")
    assert (event.status, event.result, event.attempts) == ("processed", "applied team × 7", 1)
    tenant.refresh_from_db()
    assert tenant.seats == 7
    assert tenant.quota_limits()["memory_mib"] == 7 * tenant.plan.memory_mib


def test_forged_and_stale_signatures_are_refused(
    client: Client,
    subscribed: tuple[Tenant, BillingAccount],
    django_capture_on_commit_callbacks: Any,
) -> None:
    now = int(time.time())
    payload = make_event(
        "customer.subscription.updated", subscription(9), created=now, event_id="evt_forged"
    )
    cases = [
        sign(payload, secret="whsec_wrong"),  # wrong secret
        sign(payload + b" ", timestamp=now),  # signed a different body
        sign(payload, timestamp=now - 3600),  # replay of an old capture: outside tolerance
        "",  # no signature
    ]
    for signature in cases:
        response = deliver(client, django_capture_on_commit_callbacks, payload, signature=signature)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "bad_signature"
    assert not StripeEvent.objects.exists()
    assert Tenant.objects.get(slug="acme").seats == 3


def test_replayed_event_is_processed_once(
    client: Client,
    subscribed: tuple[Tenant, BillingAccount],
    django_capture_on_commit_callbacks: Any,
) -> None:
    tenant, _ = subscribed
    payload = make_event(
        "customer.subscription.updated", subscription(4), created=int(time.time()), event_id="e2"
    )
    first = deliver(client, django_capture_on_commit_callbacks, payload)
    again = deliver(client, django_capture_on_commit_callbacks, payload, signature=sign(payload))

    assert first.json()["duplicate"] is False and again.json()["duplicate"] is True
    assert StripeEvent.objects.filter(stripe_id="e2").count() == 1
    assert SeatLedgerEntry.objects.filter(tenant=tenant, kind="stripe").count() == 1


def test_out_of_order_subscription_events_never_roll_back(
    client: Client,
    subscribed: tuple[Tenant, BillingAccount],
    django_capture_on_commit_callbacks: Any,
) -> None:
    tenant, _ = subscribed
    now = int(time.time())
    newer = make_event(
        "customer.subscription.updated",
        subscription(6, price="price_business"),
        created=now,
        event_id="evt_new",
    )
    older = make_event(
        "customer.subscription.updated", subscription(4), created=now - 60, event_id="evt_old"
    )

    deliver(client, django_capture_on_commit_callbacks, newer)
    deliver(client, django_capture_on_commit_callbacks, older)

    tenant.refresh_from_db()
    assert (tenant.plan.code, tenant.seats) == ("business", 6)
    old = StripeEvent.objects.get(stripe_id="evt_old")
    assert old.status == "processed" and old.result.startswith("stale")


def test_payment_failure_older_than_a_payment_is_ignored(
    client: Client,
    subscribed: tuple[Tenant, BillingAccount],
    django_capture_on_commit_callbacks: Any,
) -> None:
    _, account = subscribed
    now = int(time.time())
    invoice = {"id": "in_1", "object": "invoice", "customer": "cus_acme"}
    paid = make_event("invoice.paid", invoice, created=now, event_id="evt_paid")
    failed = make_event("invoice.payment_failed", invoice, created=now - 30, event_id="evt_fail")

    deliver(client, django_capture_on_commit_callbacks, paid)
    deliver(client, django_capture_on_commit_callbacks, failed)

    account.refresh_from_db()
    assert account.dunning_state == "ok"
    assert StripeEvent.objects.get(stripe_id="evt_fail").result.startswith("stale")


def test_unknown_type_and_unknown_customer_are_stored_and_ignored(
    client: Client,
    subscribed: tuple[Tenant, BillingAccount],
    django_capture_on_commit_callbacks: Any,
) -> None:
    now = int(time.time())
    unknown_type = make_event("charge.dispute.created", {"id": "dp_1"}, created=now, event_id="u1")
    stranger = dict(subscription(50), customer="cus_nobody")
    unknown_customer = make_event(
        "customer.subscription.updated", stranger, created=now, event_id="u2"
    )

    for payload in (unknown_type, unknown_customer):
        assert deliver(client, django_capture_on_commit_callbacks, payload).status_code == 200

    results = dict(StripeEvent.objects.values_list("stripe_id", "status"))
    assert results == {"u1": "ignored", "u2": "ignored"}
    assert "cus_nobody" in StripeEvent.objects.get(stripe_id="u2").result
    assert Tenant.objects.get(slug="acme").seats == 3


def test_malformed_bodies_get_clear_errors(client: Client, stripe_settings: Any, db: None) -> None:
    not_json = b"{not json"
    response = post_event(client, not_json)
    assert response.status_code == 400
    not_event = json.dumps({"hello": "world"}).encode()
    response = post_event(client, not_event)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid"
    for bad in (
        {"id": "evt_x", "type": "invoice.paid", "created": "yesterday"},
        {"id": "", "type": "invoice.paid", "created": 1},
        {"id": "evt_x", "type": 5, "created": 1},
    ):
        response = post_event(client, json.dumps(bad).encode())
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid"
    assert client.get("/billing/stripe/webhook").status_code == 405
    assert not StripeEvent.objects.exists()


def test_trial_will_end_is_noted_and_audited(
    client: Client,
    subscribed: tuple[Tenant, BillingAccount],
    django_capture_on_commit_callbacks: Any,
) -> None:
    tenant, account = subscribed
    trial_end = int(time.time()) + 3 * 86400
    payload = make_event(
        "customer.subscription.trial_will_end",
        dict(subscription(3, status="trialing"), trial_end=trial_end),
        created=int(time.time()),
        event_id="evt_trial",
    )
    deliver(client, django_capture_on_commit_callbacks, payload)
    account.refresh_from_db()
    assert account.trial_ends_at is not None
    assert int(account.trial_ends_at.timestamp()) == trial_end
    from tenants.models import AuditLog

    assert AuditLog.objects.filter(tenant=tenant, action="billing.trial_will_end").exists()


def test_stripe_outage_while_processing_keeps_the_event_pending(
    client: Client,
    subscribed: tuple[Tenant, BillingAccount],
    django_capture_on_commit_callbacks: Any,
) -> None:
    from billing import stripe_api, webhooks

    session = {
        "id": "cs_1",
        "object": "checkout.session",
        "mode": "subscription",
        "customer": "cus_acme",
        "subscription": "sub_new",
    }
    payload = make_event(
        "checkout.session.completed", session, created=int(time.time()), event_id="evt_cs"
    )
    response = post_event(client, payload)  # stored; the task is not run here
    assert response.status_code == 200
    event = StripeEvent.objects.get(stripe_id="evt_cs")

    with pytest.raises(stripe_api.StripeUnavailable):  # Stripe is down (stripe_settings)
        webhooks.process_event(event.pk)

    event.refresh_from_db()
    assert (event.status, event.attempts) == ("pending", 1)
    assert event.result.startswith("Stripe unavailable")


@pytest.mark.django_db(transaction=True)
def test_concurrent_workers_run_an_event_once(stripe_settings: Any) -> None:
    import threading
    from datetime import UTC, datetime

    from django.db import connection

    from billing import webhooks
    from tests.control.conftest import seed_plans

    seed_plans()
    tenant, _ = services.tenant_services.create_tenant(
        slug="race",
        owner_email="o@race.example",
        plan_code="team",
        seats=2,
        actor=services.BILLING_ACTOR,
    )
    account = services.account_for(tenant)
    account.stripe_customer_id = "cus_race"
    account.save()
    now = int(time.time())
    event = StripeEvent.objects.create(
        stripe_id="evt_race",
        type="invoice.payment_failed",
        created=datetime.fromtimestamp(now, tz=UTC),
        payload=json.loads(
            make_event(
                "invoice.payment_failed",
                {"id": "in_1", "customer": "cus_race"},
                created=now,
                event_id="evt_race",
            )
        ),
    )
    n = 6
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = webhooks.process_event(event.pk)
        except Exception as exc:
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert results.count("past_due") == 1
    assert all(
        r in ("past_due", "already processed", "being processed by another worker") for r in results
    )
    event.refresh_from_db()
    assert (event.status, event.attempts) == ("processed", 1)
    from tenants.models import AuditLog

    assert AuditLog.objects.filter(tenant=tenant, action="billing.past_due").count() == 1
