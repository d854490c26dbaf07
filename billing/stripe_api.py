"""The one module that talks to Stripe.

Everything else in Berth calls these functions and gets plain dicts back (the SDK's objects
are not dicts), and only two error types: ``StripeUnavailable`` (network trouble or a
Stripe 5xx / rate limit: safe to retry later) and ``StripeRequestError`` (Stripe refused
the request: retrying the same request will not help).

Configuration (Django settings): ``STRIPE_SECRET_KEY``, ``STRIPE_API_BASE`` (empty for
the real Stripe; tests point it at localstripe), ``STRIPE_WEBHOOK_SECRET``.
"""

from __future__ import annotations

import logging
from typing import Any

import stripe
from django.conf import settings

# The SDK logs every request at INFO; Berth logs what matters itself.
logging.getLogger("stripe").setLevel(logging.WARNING)


class StripeUnavailable(Exception):
    """Stripe could not be reached or failed on its side; the call may be retried."""


class StripeRequestError(Exception):
    """Stripe rejected the request (bad parameters, unknown object, declined card)."""

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class SignatureInvalid(Exception):
    """A webhook payload's Stripe-Signature header does not verify."""


def _client() -> stripe.StripeClient:
    base = getattr(settings, "STRIPE_API_BASE", "")
    # No key (the settings default) and no STRIPE_API_BASE: Berth has no Stripe to talk to.
    if not base and not settings.STRIPE_SECRET_KEY:
        raise StripeUnavailable("Stripe is not configured (set STRIPE_SECRET_KEY)")
    kwargs: dict[str, Any] = {"max_network_retries": 0}
    if base:
        kwargs["base_addresses"] = {"api": base}
    return stripe.StripeClient(settings.STRIPE_SECRET_KEY, **kwargs)


def _plain(obj: Any) -> dict[str, Any]:
    if isinstance(obj, stripe.StripeObject):
        return obj.to_dict(recursive=True)
    return dict(obj)


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one SDK call, translating its many exceptions into our two."""
    try:
        return fn(*args, **kwargs)
    except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
        raise StripeUnavailable(str(exc)) from exc
    except stripe.StripeError as exc:
        status = exc.http_status
        if status is None or status >= 500:
            raise StripeUnavailable(str(exc)) from exc
        raise StripeRequestError(exc.user_message or str(exc), http_status=status) from exc


# --- catalogue ---------------------------------------------------------------------------


def ensure_product(product_id: str, name: str, metadata: dict[str, str]) -> dict[str, Any]:
    """Return the product with this id, creating it if Stripe doesn't have it yet."""
    client = _client()
    try:
        return _plain(_call(client.v1.products.retrieve, product_id))
    except StripeRequestError as exc:
        if exc.http_status != 404:
            raise
    return _plain(
        _call(
            client.v1.products.create,
            params={"id": product_id, "name": name, "metadata": metadata},
        )
    )


def ensure_monthly_price(
    *, product_id: str, lookup_key: str, unit_amount: int, currency: str, usage_type: str
) -> tuple[dict[str, Any], bool]:
    """Return (price, created) for a monthly price found by its lookup key.

    Prices are immutable in Stripe, so the lookup key encodes the amount: a changed seat
    price gets a new key and a new price, and old subscriptions keep their old price.
    """
    client = _client()
    found = _call(
        client.v1.prices.list, params={"lookup_keys": [lookup_key], "active": True, "limit": 1}
    )
    data = _plain(found)["data"]
    if data:
        return data[0], False
    recurring: dict[str, Any] = {"interval": "month", "usage_type": usage_type}
    price = _call(
        client.v1.prices.create,
        params={
            "product": product_id,
            "unit_amount": unit_amount,
            "currency": currency,
            "recurring": recurring,
            "lookup_key": lookup_key,
        },
    )
    return _plain(price), True


# --- customers and subscriptions ---------------------------------------------------------


def create_customer(
    *, name: str, email: str, metadata: dict[str, str], idempotency_key: str
) -> dict[str, Any]:
    client = _client()
    return _plain(
        _call(
            client.v1.customers.create,
            params={"name": name, "email": email, "metadata": metadata},
            options={"idempotency_key": idempotency_key},
        )
    )


def attach_default_payment_method(customer_id: str, payment_method: str) -> None:
    """Attach a payment method and make it the default for invoices (operators, tests)."""
    client = _client()
    _call(client.v1.payment_methods.attach, payment_method, params={"customer": customer_id})
    _call(
        client.v1.customers.update,
        customer_id,
        params={"invoice_settings": {"default_payment_method": payment_method}},
    )


def create_subscription(
    *, customer_id: str, price_id: str, quantity: int, metadata: dict[str, str]
) -> dict[str, Any]:
    client = _client()
    return _plain(
        _call(
            client.v1.subscriptions.create,
            params={
                "customer": customer_id,
                "items": [{"price": price_id, "quantity": quantity}],
                "metadata": metadata,
            },
        )
    )


def retrieve_subscription(subscription_id: str) -> dict[str, Any]:
    return _plain(_call(_client().v1.subscriptions.retrieve, subscription_id))


def update_subscription_item(
    *, subscription_id: str, item_id: str, price_id: str, quantity: int
) -> dict[str, Any]:
    """Set the seat item's price and quantity; Stripe prorates the difference."""
    return _plain(
        _call(
            _client().v1.subscriptions.update,
            subscription_id,
            params={
                "items": [{"id": item_id, "price": price_id, "quantity": quantity}],
                "proration_behavior": "create_prorations",
            },
        )
    )


def cancel_subscription(subscription_id: str) -> dict[str, Any]:
    return _plain(_call(_client().v1.subscriptions.cancel, subscription_id))


# --- invoices ----------------------------------------------------------------------------


def list_invoices(customer_id: str, limit: int = 24) -> list[dict[str, Any]]:
    page = _call(_client().v1.invoices.list, params={"customer": customer_id, "limit": limit})
    return list(_plain(page)["data"])


def preview_invoice(customer_id: str, subscription_id: str) -> dict[str, Any]:
    """The next invoice for this subscription as Stripe would draw it up now."""
    return _plain(
        _call(
            _client().v1.invoices.create_preview,
            params={"customer": customer_id, "subscription": subscription_id},
        )
    )


def add_invoice_credit(
    *, customer_id: str, amount_cents: int, currency: str, description: str, idempotency_key: str
) -> dict[str, Any]:
    """A negative pending invoice item: the credit is taken off the next invoice."""
    return _plain(
        _call(
            _client().v1.invoice_items.create,
            params={
                "customer": customer_id,
                "amount": -abs(amount_cents),
                "currency": currency,
                "description": description,
            },
            options={"idempotency_key": idempotency_key},
        )
    )


# --- Checkout and the customer portal ----------------------------------------------------


def create_checkout_session(
    *,
    customer_id: str,
    price_id: str,
    quantity: int,
    success_url: str,
    cancel_url: str,
    metadata: dict[str, str],
) -> dict[str, Any]:
    return _plain(
        _call(
            _client().v1.checkout.sessions.create,
            params={
                "mode": "subscription",
                "customer": customer_id,
                "line_items": [{"price": price_id, "quantity": quantity}],
                "success_url": success_url,
                "cancel_url": cancel_url,
                "client_reference_id": metadata.get("tenant_id", ""),
                "metadata": metadata,
                "subscription_data": {"metadata": metadata},
            },
        )
    )


def create_portal_session(*, customer_id: str, return_url: str) -> dict[str, Any]:
    return _plain(
        _call(
            _client().v1.billing_portal.sessions.create,
            params={"customer": customer_id, "return_url": return_url},
        )
    )


# --- metered usage -----------------------------------------------------------------------


def report_meter_event(
    *, event_name: str, customer_id: str, value: int, identifier: str, timestamp: int
) -> None:
    """Report usage to a Stripe billing meter; a repeated identifier is already counted."""
    try:
        _call(
            _client().v1.billing.meter_events.create,
            params={
                "event_name": event_name,
                "payload": {"stripe_customer_id": customer_id, "value": str(value)},
                "identifier": identifier,
                "timestamp": timestamp,
            },
        )
    except StripeRequestError as exc:
        if "already exists" not in str(exc):
            raise


# --- webhooks ----------------------------------------------------------------------------


def verify_webhook(payload: bytes, signature_header: str | None) -> dict[str, Any]:
    """Check the Stripe-Signature header (HMAC-SHA256, 5 minute tolerance); return the event."""
    try:
        event = stripe.Webhook.construct_event(
            payload, signature_header, settings.STRIPE_WEBHOOK_SECRET
        )
    except stripe.SignatureVerificationError as exc:
        raise SignatureInvalid(str(exc)) from exc
    except ValueError as exc:
        raise SignatureInvalid(f"payload is not JSON: {exc}") from exc
    return _plain(event)
