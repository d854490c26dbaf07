"""Launch localstripe with the Stripe APIs Berth uses but localstripe lacks.

Run as ``python tests/localstripe_ext/server.py --port N``; it listens on 127.0.0.1 only and
keeps its store in memory (stock localstripe pickles every write to /tmp/localstripe.pickle,
which concurrent test runs would share).

Added on top of localstripe 1.15:
- ``/v1/prices`` (create, retrieve, list by lookup_keys / product / active). Each price is
  also registered as a legacy localstripe Plan with the same id, so subscriptions and
  invoices priced with it work unchanged; subscription ``items[].price`` is accepted.
- ``proration_behavior`` / ``payment_behavior`` on subscription updates (stock localstripe
  crashes on them).
- ``customer.subscription.updated`` after every subscription update and ``invoice.paid``
  next to ``invoice.payment_succeeded`` (stock localstripe sends neither).
- Checkout sessions (``/v1/checkout/sessions``, subscription mode) and billing portal
  sessions (``/v1/billing_portal/sessions``). A test completes a Checkout session with
  ``POST /_ext/checkout/sessions/<id>/complete`` (what a customer paying on Stripe's page
  does): the card is attached, the subscription created and
  ``checkout.session.completed`` sent.
- Billing meter events (``/v1/billing/meter_events``), deduplicated by ``identifier`` as
  Stripe does; ``GET /_ext/meter_events`` lists what was received, ``DELETE`` forgets them.
- ``DELETE /_config/webhooks/<id>`` unregisters a webhook endpoint.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from aiohttp import web
from localstripe import resources, server
from localstripe import webhooks as localstripe_webhooks
from localstripe.errors import UserError
from localstripe.resources import (
    Customer,
    Event,
    Invoice,
    List,
    PaymentMethod,
    Plan,
    StripeObject,
    Subscription,
    random_id,
    store,
)
from localstripe.webhooks import schedule_webhook

# In-memory store only.
resources.Store.dump_to_disk = lambda self: None
resources.Store.try_load_from_disk = lambda self: None


class Price(StripeObject):
    """A recurring price; mirrored as a legacy Plan with the same id."""

    object = "price"
    _id_prefix = "price_"
    lookup_key: str | None

    def __init__(
        self,
        product: str | None = None,
        unit_amount: Any = None,
        currency: str | None = None,
        recurring: dict[str, Any] | None = None,
        lookup_key: str | None = None,
        transfer_lookup_key: Any = None,
        nickname: str | None = None,
        metadata: dict[str, Any] | None = None,
        active: Any = True,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
        unit_amount = resources.try_convert_to_int(unit_amount)
        recurring = recurring or {}
        if not isinstance(product, str) or not isinstance(unit_amount, int) or unit_amount < 0:
            raise UserError(400, "Bad request: product and unit_amount are required")
        if not currency or recurring.get("interval") not in ("day", "week", "month", "year"):
            raise UserError(400, "Bad request: currency and recurring[interval] are required")
        usage_type = recurring.get("usage_type", "licensed")
        if lookup_key:
            holders = [p for p in _prices() if p.lookup_key == lookup_key]
            if holders and str(transfer_lookup_key).lower() != "true":
                raise UserError(400, f"lookup_key {lookup_key} is already used by another price")
            for holder in holders:
                holder.lookup_key = None
        super().__init__()
        Plan(
            id=self.id,
            amount=unit_amount,
            currency=currency,
            interval=recurring["interval"],
            interval_count=resources.try_convert_to_int(recurring.get("interval_count", 1)),
            product=product,
            usage_type=usage_type,
            nickname=nickname,
            metadata=metadata,
        )
        self.product = product
        self.unit_amount = unit_amount
        self.currency = currency
        self.recurring = {
            "interval": recurring["interval"],
            "interval_count": int(recurring.get("interval_count", 1)),
            "usage_type": usage_type,
        }
        self.type = "recurring"
        self.lookup_key = lookup_key
        self.nickname = nickname
        self.metadata = metadata or {}
        self.active = str(active).lower() != "false"
        schedule_webhook(Event("price.created", self))

    @classmethod
    def _api_list_all(
        cls,
        url: str,
        lookup_keys: list[str] | None = None,
        product: str | None = None,
        active: Any = None,
        limit: Any = None,
        starting_after: str | None = None,
        **kwargs: Any,
    ) -> List:
        li = List(url, limit=limit, starting_after=starting_after)
        prices = _prices()
        if lookup_keys is not None:
            keys = lookup_keys if isinstance(lookup_keys, list) else [lookup_keys]
            prices = [p for p in prices if p.lookup_key in keys]
        if product is not None:
            prices = [p for p in prices if p.product == product]
        if active is not None:
            wanted = str(active).lower() == "true"
            prices = [p for p in prices if p.active == wanted]
        li._list = prices
        return li


def _prices() -> list[Price]:
    return [v for k, v in store.items() if k.startswith("price:")]


def _prices_to_plans(items: Any) -> Any:
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and "price" in item:
                item["plan"] = item.pop("price")
    return items


_subscription_init = Subscription.__init__
_subscription_update = Subscription._update


def _patched_subscription_init(self: Subscription, *args: Any, **data: Any) -> None:
    data["items"] = _prices_to_plans(data.get("items"))
    _subscription_init(self, *args, **data)


def _patched_subscription_update(self: Subscription, **data: Any) -> None:
    data.pop("proration_behavior", None)
    data.pop("payment_behavior", None)
    data["items"] = _prices_to_plans(data.get("items"))
    if data["items"] is None:
        del data["items"]
    previous = {"quantity": self.quantity, "status": self.status}
    _subscription_update(self, **data)
    event = Event("customer.subscription.updated", self)
    event.data["previous_attributes"] = previous
    schedule_webhook(event)


Subscription.__init__ = _patched_subscription_init
Subscription._update = _patched_subscription_update

_invoice_paid = Invoice._on_payment_success


def _patched_invoice_paid(self: Invoice) -> None:
    _invoice_paid(self)
    schedule_webhook(Event("invoice.paid", self))


Invoice._on_payment_success = _patched_invoice_paid


class CheckoutSession(StripeObject):
    """A subscription-mode Checkout session; completed by a test-only route."""

    object = "checkout.session"
    _id_prefix = "cs_test_"

    def __init__(
        self,
        mode: str | None = None,
        customer: str | None = None,
        line_items: list[dict[str, Any]] | None = None,
        success_url: str | None = None,
        cancel_url: str | None = None,
        client_reference_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        subscription_data: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
        if mode != "subscription" or not line_items or len(line_items) != 1:
            raise UserError(400, "Bad request: subscription mode with one line item")
        if not success_url:
            raise UserError(400, "Bad request: success_url is required")
        if customer is not None:
            Customer._api_retrieve(customer)
        Price._api_retrieve(line_items[0]["price"])
        super().__init__()
        self.mode = mode
        self.customer = customer
        self.line_items = line_items
        self.success_url = success_url
        self.cancel_url = cancel_url
        self.client_reference_id = client_reference_id
        self.metadata = metadata or {}
        self.subscription_data = subscription_data or {}
        self.status = "open"
        self.payment_status = "unpaid"
        self.subscription = None
        self.url = f"{_public_url}/checkout/{self.id}"


class PortalSession(StripeObject):
    object = "billing_portal.session"
    _id_prefix = "bps_"

    def __init__(
        self, customer: str | None = None, return_url: str | None = None, **kwargs: Any
    ) -> None:
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
        if not customer:
            raise UserError(400, "Bad request: customer is required")
        Customer._api_retrieve(customer)
        super().__init__()
        self.customer = customer
        self.return_url = return_url
        self.url = f"{_public_url}/portal/{self.id}"


_meter_events: dict[str, dict[str, Any]] = {}
_public_url = "http://127.0.0.1"


async def create_meter_event(request: web.Request) -> web.Response:
    data = await server.get_post_data(request) or {}
    payload = data.get("payload") or {}
    name = data.get("event_name")
    if not name or not payload.get("stripe_customer_id") or "value" not in payload:
        raise UserError(400, "Bad request: event_name, payload[stripe_customer_id], value")
    identifier = data.get("identifier") or "mev_" + random_id(14)
    if identifier in _meter_events:
        # Stripe rejects a second event with an identifier it has seen.
        raise UserError(400, f"An event with identifier {identifier} already exists")
    Customer._api_retrieve(payload["stripe_customer_id"])
    event = {
        "object": "billing.meter_event",
        "event_name": name,
        "identifier": identifier,
        "payload": payload,
        "timestamp": int(data.get("timestamp") or time.time()),
        "created": int(time.time()),
        "livemode": False,
    }
    _meter_events[identifier] = event
    return server.json_response(event)


async def list_meter_events(request: web.Request) -> web.Response:
    customer = request.query.get("customer")
    events = [
        e
        for e in _meter_events.values()
        if customer is None or e["payload"]["stripe_customer_id"] == customer
    ]
    return server.json_response({"data": events})


async def delete_webhook(request: web.Request) -> web.Response:
    """Stop delivering to a webhook registered with ``POST /_config/webhooks/<id>``."""
    localstripe_webhooks._webhooks.pop(request.match_info["id"], None)
    return web.Response()


async def clear_meter_events(request: web.Request) -> web.Response:
    _meter_events.clear()
    return web.Response()


async def complete_checkout(request: web.Request) -> web.Response:
    session = CheckoutSession._api_retrieve(request.match_info["id"])
    if session.status != "open":
        raise UserError(400, "Checkout session is not open")
    data = await server.get_post_data(request) or {}
    if session.customer is None:
        session.customer = Customer(email=data.get("email")).id
    pm = PaymentMethod._api_retrieve(data.get("payment_method", "pm_card_visa"))
    PaymentMethod._api_attach(pm.id, customer=session.customer)
    customer = Customer._api_retrieve(session.customer)
    customer.invoice_settings["default_payment_method"] = pm.id
    item = session.line_items[0]
    sub = Subscription(
        customer=session.customer,
        items=[{"price": item["price"], "quantity": item.get("quantity", 1)}],
        metadata=(session.subscription_data.get("metadata") or session.metadata),
    )
    session.subscription = sub.id
    session.status = "complete"
    session.payment_status = "paid"
    schedule_webhook(Event("checkout.session.completed", session))
    return server.json_response(session._export())


def _routes(app: web.Application) -> None:
    for cls, url in (
        (Price, "/v1/prices"),
        (CheckoutSession, "/v1/checkout/sessions"),
        (PortalSession, "/v1/billing_portal/sessions"),
    ):
        app.router.add_route("POST", url, server.api_create(cls, url))
        app.router.add_route("GET", url + "/{id}", server.api_retrieve(cls, url))
        app.router.add_route("GET", url, server.api_list_all(cls, url))
    app.router.add_route("POST", "/v1/prices/{id}", server.api_update(Price, "/v1/prices"))
    app.router.add_route("POST", "/v1/billing/meter_events", create_meter_event)
    app.router.add_route("GET", "/_ext/meter_events", list_meter_events)
    app.router.add_route("DELETE", "/_ext/meter_events", clear_meter_events)
    app.router.add_route("DELETE", "/_config/webhooks/{id}", delete_webhook)
    app.router.add_route("POST", "/_ext/checkout/sessions/{id}/complete", complete_checkout)


def main() -> None:
    global _public_url
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    _public_url = f"http://127.0.0.1:{args.port}"
    _routes(server.app)
    web.run_app(server.app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
