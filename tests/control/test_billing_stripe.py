"""Customers, Checkout, subscriptions, seat quantities, invoices and metered usage against
localstripe (a local Stripe-compatible server, extended in tests/localstripe_ext)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from io import StringIO
from typing import Any

import pytest
import requests
from celery.exceptions import Retry
from django.core.management import call_command

from billing import metering, services, stripe_api
from billing.models import PlanPrice, SeatLedgerEntry, StripeEvent, UsageReport
from billing.tasks import sweep_billing_task, sync_subscription_task
from tests.control.billing_helpers import SECRET_KEY, free_port, stripe_get, subscribe

pytest_plugins = ["tests.control.billing_support"]

OWNER = services.Actor.for_system("tests")


def test_sync_stripe_plans_is_idempotent(localstripe: str, plans: None) -> None:
    out1, out2 = StringIO(), StringIO()
    call_command("sync_stripe_plans", stdout=out1)
    first = dict(PlanPrice.objects.values_list("lookup_key", "stripe_price_id"))
    call_command("sync_stripe_plans", stdout=out2)
    second = dict(PlanPrice.objects.values_list("lookup_key", "stripe_price_id"))

    assert first == second
    assert "created" in out1.getvalue() and "created" not in out2.getvalue()
    prices = stripe_get(localstripe, "/v1/prices", limit=100)["data"]
    assert len(prices) == 4  # pro, team, business per seat + the overage meter price
    by_key = {p["lookup_key"]: p for p in prices}
    team = by_key["berth_team_seat_monthly_usd_1500"]
    assert team["unit_amount"] == 1500
    assert team["recurring"]["interval"] == "month"
    assert by_key["berth_overage_cents_usd"]["recurring"]["usage_type"] == "metered"
    products = stripe_get(localstripe, "/v1/products", limit=100)["data"]
    assert sorted(p["id"] for p in products) == [
        "berth_plan_business",
        "berth_plan_pro",
        "berth_plan_team",
        "berth_usage_overage",
    ]


def test_checkout_subscribes_and_sets_plan_seats_and_quotas(
    make_tenant: Callable[..., Any],
    stripe_plans: dict[str, PlanPrice],
    localstripe: str,
    deliver_stripe_events: Callable[..., list[str]],
    eager_celery: None,
) -> None:
    tenant, _ = make_tenant("acme", plan="free", seats=1)

    account = subscribe(tenant, "team", 3, localstripe, deliver_stripe_events)

    tenant.refresh_from_db()
    assert (tenant.plan.code, tenant.seats) == ("team", 3)
    assert account.stripe_subscription_id and account.subscription_status == "active"
    assert account.stripe_price_id == stripe_plans["team"].stripe_price_id
    assert account.synced_quantity == 3
    assert tenant.quota_limits()["cpu_millicores"] == 3 * tenant.plan.cpu_millicores
    ledger = list(SeatLedgerEntry.objects.filter(tenant=tenant))
    assert [(e.kind, e.plan_code, e.seats, e.previous_plan_code) for e in ledger] == [
        ("stripe", "team", 3, "free")
    ]
    customer = stripe_get(localstripe, f"/v1/customers/{account.stripe_customer_id}")
    assert customer["metadata"]["tenant_slug"] == "acme"
    invoices = stripe_api.list_invoices(str(account.stripe_customer_id))
    assert [(i["status"], i["total"]) for i in invoices] == [("paid", 3 * 1500)]


def test_seat_change_updates_the_stripe_quantity_with_proration(
    make_tenant: Callable[..., Any],
    stripe_plans: dict[str, PlanPrice],
    localstripe: str,
    deliver_stripe_events: Callable[..., list[str]],
    eager_celery: None,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    tenant, _ = make_tenant("acme", plan="free", seats=1)
    account = subscribe(tenant, "team", 3, localstripe, deliver_stripe_events)

    with django_capture_on_commit_callbacks(execute=True):
        services.change_seats(tenant, 5, actor=OWNER)

    account.refresh_from_db()
    assert not account.sync_pending and account.synced_quantity == 5
    sub = stripe_get(localstripe, f"/v1/subscriptions/{account.stripe_subscription_id}")
    assert sub["quantity"] == 5
    preview = stripe_api.preview_invoice(
        str(account.stripe_customer_id), str(account.stripe_subscription_id)
    )
    lines = preview["lines"]["data"]
    assert any(line["proration"] for line in lines)  # the unused time of the old quantity
    assert any(line["amount"] == 5 * 1500 for line in lines)
    # Stripe's own updated event comes back: already in sync, nothing changes twice.
    assert "customer.subscription.updated" in deliver_stripe_events()
    tenant.refresh_from_db()
    assert tenant.seats == 5
    kinds = list(SeatLedgerEntry.objects.filter(tenant=tenant).values_list("kind", "seats"))
    assert kinds == [("stripe", 3), ("seats_changed", 5)]


def test_stripe_outage_during_seat_change_loses_nothing(
    make_tenant: Callable[..., Any],
    stripe_plans: dict[str, PlanPrice],
    localstripe: str,
    deliver_stripe_events: Callable[..., list[str]],
    eager_celery: None,
    stripe_settings: Any,
) -> None:
    tenant, _ = make_tenant("acme", plan="free", seats=1)
    account = subscribe(tenant, "team", 3, localstripe, deliver_stripe_events)
    stripe_settings.STRIPE_API_BASE = f"http://127.0.0.1:{free_port()}"  # Stripe is down

    services.change_seats(tenant, 4, actor=OWNER)  # committed although Stripe is down
    # Celery runs the task and schedules a retry (autoretry_for StripeUnavailable) each time.
    assert stripe_api.StripeUnavailable in sync_subscription_task.autoretry_for
    for _ in range(3):
        with pytest.raises(Retry):
            sync_subscription_task.apply(args=[tenant.pk])

    tenant.refresh_from_db()
    account.refresh_from_db()
    assert tenant.seats == 4 and tenant.quota_limits()["containers"] == 4 * tenant.plan.containers
    assert account.sync_pending and account.sync_attempts == 3 and account.sync_error
    assert account.synced_quantity == 3

    stripe_settings.STRIPE_API_BASE = localstripe  # Stripe is back; the sweep finishes it
    assert sweep_billing_task.apply().get() == {"subscriptions": 1, "events": 0}
    account.refresh_from_db()
    assert not account.sync_pending and account.synced_quantity == 4 and not account.sync_error
    sub = stripe_get(localstripe, f"/v1/subscriptions/{account.stripe_subscription_id}")
    assert sub["quantity"] == 4


def test_downgrade_to_free_cancels_the_subscription(
    make_tenant: Callable[..., Any],
    stripe_plans: dict[str, PlanPrice],
    localstripe: str,
    deliver_stripe_events: Callable[..., list[str]],
    eager_celery: None,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    tenant, _ = make_tenant("acme", plan="free", seats=1)
    account = subscribe(tenant, "pro", 2, localstripe, deliver_stripe_events)
    sub_id = account.stripe_subscription_id

    with django_capture_on_commit_callbacks(execute=True):
        services.change_plan(tenant, "free", seats=1, actor=OWNER)

    account.refresh_from_db()
    assert account.stripe_subscription_id is None and not account.sync_pending
    sub = stripe_get(localstripe, f"/v1/subscriptions/{sub_id}")
    assert sub["status"] == "canceled"
    deliver_stripe_events()  # customer.subscription.deleted: nothing left to change
    tenant.refresh_from_db()
    assert (tenant.plan.code, tenant.seats) == ("free", 1)


def test_overage_is_reported_once_as_metered_usage(
    make_tenant: Callable[..., Any],
    stripe_plans: dict[str, PlanPrice],
    localstripe: str,
    deliver_stripe_events: Callable[..., list[str]],
    eager_celery: None,
) -> None:
    tenant, _ = make_tenant("acme", plan="free", seats=1)
    account = subscribe(tenant, "pro", 1, localstripe, deliver_stripe_events)
    now = datetime(2026, 11, 20, 10, 30, tzinfo=UTC)
    # 100 vCPU-hours are included per Pro seat; this container burns 101.
    start = now - timedelta(minutes=20)
    services.record_reading(tenant, "n1/c1", metering.Reading(start.timestamp(), 0, 0))
    cpu_ns = 101 * 3600 * 10**9
    services.record_reading(
        tenant, "n1/c1", metering.Reading((start + timedelta(minutes=5)).timestamp(), cpu_ns, 0)
    )
    services.aggregate_hour(tenant.pk, now)
    # 3600 s over × 0.0012 cents = 4.32 cents → 4 whole cents.
    assert services.estimate(tenant, now)["overage_cents"] == 4

    assert services.report_overage(tenant.pk, now) == 4
    assert services.report_overage(tenant.pk, now) == 0  # nothing new
    # A crash after Stripe accepted but before Berth noted it: the retry re-sends the same
    # identifier and Stripe counts it once.
    UsageReport.objects.filter(tenant=tenant).update(reported_cents=0, pending_cents=4)
    assert services.report_overage(tenant.pk, now) == 4
    events = stripe_get(localstripe, "/_ext/meter_events", customer=account.stripe_customer_id)
    assert [(e["event_name"], e["payload"]["value"]) for e in events["data"]] == [
        ("berth_overage_cents", "4")
    ]


@pytest.mark.django_db(transaction=True)
def test_localstripe_delivers_signed_webhooks_over_http(
    live_server: Any, localstripe: str, eager_celery: None
) -> None:
    """The whole path: localstripe signs and POSTs its events to the running control plane,
    which verifies, stores and processes them (Celery eager in the server thread)."""
    from tests.control.billing_helpers import WEBHOOK_SECRET
    from tests.control.conftest import seed_plans

    seed_plans()
    call_command("sync_stripe_plans", stdout=StringIO())
    tenant, _ = services.tenant_services.create_tenant(
        slug="acme", owner_email="o@acme.example", plan_code="free", actor=OWNER
    )
    try:
        requests.post(
            f"{localstripe}/_config/webhooks/berth-e2e",
            data={
                "url": f"{live_server.url}/billing/stripe/webhook",
                "secret": WEBHOOK_SECRET,
                "events[]": [
                    "checkout.session.completed",
                    "customer.subscription.created",
                    "invoice.paid",
                ],
            },
            timeout=5,
        ).raise_for_status()
        session = services.start_checkout(
            tenant,
            "pro",
            2,
            actor=OWNER,
            success_url="http://x.invalid/ok",
            cancel_url="http://x.invalid/no",
        )
        requests.post(
            f"{localstripe}/_ext/checkout/sessions/{session['id']}/complete",
            auth=(SECRET_KEY, ""),
            timeout=5,
        ).raise_for_status()

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tenant.refresh_from_db()
            if tenant.plan.code == "pro":
                break
            time.sleep(0.2)
        assert (tenant.plan.code, tenant.seats) == ("pro", 2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            StripeEvent.objects.count() < 3 or StripeEvent.objects.filter(status="pending").exists()
        ):
            time.sleep(0.2)
    finally:  # later tests' events must not reach this server
        requests.delete(f"{localstripe}/_config/webhooks/berth-e2e", timeout=5).raise_for_status()
    assert sorted(StripeEvent.objects.values_list("type", "status")) == [
        ("checkout.session.completed", "processed"),
        ("customer.subscription.created", "processed"),
        ("invoice.paid", "processed"),
    ]


def test_same_second_subscription_events_use_stripes_current_state(
    make_tenant: Callable[..., Any],
    stripe_plans: dict[str, PlanPrice],
    localstripe: str,
    deliver_stripe_events: Callable[..., list[str]],
    eager_celery: None,
    django_capture_on_commit_callbacks: Callable[..., Any],
    client: Any,
) -> None:
    from tests.control.billing_helpers import make_event, post_event

    tenant, _ = make_tenant("acme", plan="free", seats=1)
    account = subscribe(tenant, "team", 3, localstripe, deliver_stripe_events)
    assert account.subscription_event_at is not None
    stale = stripe_get(localstripe, f"/v1/subscriptions/{account.stripe_subscription_id}")
    stale["quantity"] = 9
    stale["items"]["data"][0]["quantity"] = 9  # a payload claiming 9 seats, same second
    payload = make_event(
        "customer.subscription.updated",
        stale,
        created=int(account.subscription_event_at.timestamp()),
        event_id="evt_same_second",
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert post_event(client, payload).status_code == 200

    tenant.refresh_from_db()
    assert tenant.seats == 3  # Stripe says 3; the ambiguous payload was not trusted
    event = StripeEvent.objects.get(stripe_id="evt_same_second")
    assert (event.status, event.result) == ("processed", "no change")


def test_plan_change_moves_the_subscription_to_the_new_price(
    make_tenant: Callable[..., Any],
    stripe_plans: dict[str, PlanPrice],
    localstripe: str,
    deliver_stripe_events: Callable[..., list[str]],
    eager_celery: None,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    tenant, _ = make_tenant("acme", plan="free", seats=1)
    account = subscribe(tenant, "team", 3, localstripe, deliver_stripe_events)

    with django_capture_on_commit_callbacks(execute=True):
        services.change_plan(tenant, "business", seats=5, actor=OWNER)

    sub = stripe_get(localstripe, f"/v1/subscriptions/{account.stripe_subscription_id}")
    assert sub["plan"]["id"] == stripe_plans["business"].stripe_price_id
    assert sub["quantity"] == 5
    deliver_stripe_events()
    tenant.refresh_from_db()
    assert (tenant.plan.code, tenant.seats) == ("business", 5)
    assert tenant.quota_limits()["gpus"] == 5
    kinds = list(SeatLedgerEntry.objects.filter(tenant=tenant).values_list("kind", "plan_code"))
    assert kinds == [("stripe", "team"), ("plan_changed", "business")]
