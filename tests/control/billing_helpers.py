"""Helpers for the billing tests: Stripe-signed webhook payloads and free ports."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import requests
from django.test import Client

from billing import services
from billing.models import BillingAccount
from tenants.models import Tenant

WEBHOOK_SECRET = "whsec_test_berth"
SECRET_KEY = "sk_test_berth"
CUSTOMER = services.Actor.for_system("tests")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """A Stripe-Signature header: t=<ts>,v1=HMAC-SHA256(secret, "<ts>.<payload>")."""
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def make_event(event_type: str, obj: dict[str, Any], *, created: int, event_id: str) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created": created,
            "api_version": "2024-06-20",
            "livemode": False,
            "data": {"object": obj},
        }
    ).encode()


def post_event(client: Client, payload: bytes, signature: str | None = None) -> Any:
    return client.post(
        "/billing/stripe/webhook",
        data=payload,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=signature if signature is not None else sign(payload),
    )


def stripe_get(url: str, path: str, **params: Any) -> Any:
    """What localstripe holds at ``path`` (e.g. ``/v1/subscriptions/<id>``)."""
    response = requests.get(f"{url}{path}", params=params, auth=(SECRET_KEY, ""), timeout=5)
    response.raise_for_status()
    return response.json()


def subscribe(
    tenant: Tenant, plan: str, seats: int, localstripe: str, deliver: Callable[..., list[str]]
) -> BillingAccount:
    """What a customer does: open Checkout, pay on Stripe's page, Stripe calls the webhook."""
    session = services.start_checkout(
        tenant,
        plan,
        seats,
        actor=CUSTOMER,
        success_url="http://127.0.0.1:8000/ok",
        cancel_url="http://127.0.0.1:8000/cancel",
    )
    assert session["url"].startswith(localstripe)
    done = requests.post(
        f"{localstripe}/_ext/checkout/sessions/{session['id']}/complete",
        auth=(SECRET_KEY, ""),
        timeout=5,
    )
    assert done.status_code == 200, done.text
    deliver()
    return BillingAccount.objects.get(tenant=tenant)


def mark_subscribed(tenant: Tenant) -> BillingAccount:
    """The account as Checkout leaves it (a live subscription), for tests of what a
    subscribed tenant may do that need no Stripe round trip."""
    account = services.account_for(tenant)
    account.stripe_subscription_id = f"sub_test_{tenant.slug}"
    account.subscription_status = "active"
    account.save()
    return account
