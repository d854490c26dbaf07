"""Stripe webhooks: verify, store once, process in a Celery task through a dict of handlers.

The view does as little as possible: it checks the signature, stores the event under its
unique Stripe id (a replay finds the row and stops there) and enqueues
``process_stripe_event_task`` after the commit. Handlers are idempotent and compare
Stripe's ``created`` times with what was applied already, so a retried or out-of-order
event never rolls a tenant's state back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from billing import services, stripe_api
from billing.models import BillingAccount, StripeEvent
from tenants.errors import NotFound
from tenants.services import record

log = logging.getLogger(__name__)

#: Larger bodies are refused before parsing; Stripe events are a few kB.
MAX_WEBHOOK_BYTES = 512 * 1024

Handler = Callable[[StripeEvent, dict[str, Any]], str]


def _error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message, "details": {}}}, status=status)


@csrf_exempt
@require_POST
def stripe_webhook(request: HttpRequest) -> JsonResponse:
    """POST /billing/stripe/webhook"""
    if int(request.META.get("CONTENT_LENGTH") or 0) > MAX_WEBHOOK_BYTES:
        return _error(413, "payload_too_large", "webhook body too large")
    if not settings.STRIPE_WEBHOOK_SECRET:
        # Settings refuse to start without it; an empty key would make any HMAC "verify".
        log.error("refused a Stripe webhook: STRIPE_WEBHOOK_SECRET is not set")
        return _error(503, "unavailable", "webhooks are not configured")
    payload = request.body
    try:
        event = stripe_api.verify_webhook(payload, request.headers.get("Stripe-Signature"))
    except stripe_api.SignatureInvalid as exc:
        log.warning("refused a Stripe webhook: %s", exc)
        return _error(400, "bad_signature", "Stripe-Signature does not verify")
    event_id, event_type = event.get("id"), event.get("type")
    created_ts = event.get("created")
    if (
        not isinstance(event_id, str)
        or not event_id
        or len(event_id) > 255
        or not isinstance(event_type, str)
        or not isinstance(created_ts, int)
        or isinstance(created_ts, bool)
        or created_ts <= 0
    ):
        return _error(400, "invalid", "not a Stripe event")
    created = datetime.fromtimestamp(created_ts, tz=UTC)
    try:
        with transaction.atomic():
            row = StripeEvent.objects.create(
                stripe_id=event_id, type=event_type, created=created, payload=json.loads(payload)
            )
            transaction.on_commit(lambda: _enqueue(row.pk))
    except IntegrityError:
        return JsonResponse({"received": True, "duplicate": True})
    return JsonResponse({"received": True, "duplicate": False})


def _enqueue(pk: int) -> None:
    from billing.tasks import process_stripe_event_task

    try:
        process_stripe_event_task.delay(pk)
    except Exception:  # broker down: the periodic sweep re-queues pending events
        log.exception("could not enqueue Stripe event %s", pk)


def process_event(pk: int) -> str:
    """Run the handler of one stored event, exactly once.

    The event row stays locked while its handler runs, so two workers given the same event
    (a redelivered message, the sweep) never run it twice: the second skips it. A handler's
    writes commit together with the event's new status. ``StripeUnavailable`` propagates
    (the task retries); any other error marks the event ``failed``.
    """
    try:
        with transaction.atomic():
            event = StripeEvent.objects.select_for_update(skip_locked=True).filter(pk=pk).first()
            if event is None:
                return "being processed by another worker"
            if event.status in (StripeEvent.Status.PROCESSED, StripeEvent.Status.IGNORED):
                return f"already {event.status}"
            status, result = _run_handler(event)
            _finish(pk, status, result)
            return result
    except stripe_api.StripeUnavailable as exc:
        _finish(pk, StripeEvent.Status.PENDING, f"Stripe unavailable, will retry: {exc}")
        raise
    except Exception as exc:
        log.exception("Stripe event %s failed", pk)
        _finish(pk, StripeEvent.Status.FAILED, f"{type(exc).__name__}: {exc}")
        raise


def _run_handler(event: StripeEvent) -> tuple[str, str]:
    handler = HANDLERS.get(event.type)
    if handler is None:
        return StripeEvent.Status.IGNORED, f"no handler for {event.type}"
    obj = event.payload.get("data", {}).get("object", {})
    try:
        with transaction.atomic():
            return StripeEvent.Status.PROCESSED, handler(event, obj)
    except NotFound as exc:
        return StripeEvent.Status.IGNORED, exc.message


def _finish(pk: int, status: str, result: str) -> None:
    StripeEvent.objects.filter(pk=pk).update(
        status=status,
        result=result[:500],
        attempts=F("attempts") + 1,
        processed_at=timezone.now() if status != StripeEvent.Status.PENDING else None,
    )


def _account(obj: dict[str, Any]) -> BillingAccount:
    customer = obj.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    return services.tenant_for_customer(customer)


def on_checkout_completed(event: StripeEvent, obj: dict[str, Any]) -> str:
    if obj.get("mode") not in (None, "subscription"):
        return "not a subscription checkout"
    try:
        account = _account(obj)
    except NotFound:
        tenant_id = (obj.get("metadata") or {}).get("tenant_id") or obj.get("client_reference_id")
        account = BillingAccount.objects.filter(tenant_id=int(tenant_id or 0)).first()  # type: ignore[assignment]
        if account is None:
            raise
    return services.link_checkout(
        account, obj, event_created=event.created, event_id=event.stripe_id
    )


def on_subscription_changed(event: StripeEvent, obj: dict[str, Any]) -> str:
    account = _account(obj)
    if (
        account.subscription_event_at == event.created
        and event.type != "customer.subscription.deleted"
    ):
        # Same second as the state already applied: the order is ambiguous, so ask Stripe
        # for the subscription as it is now instead of trusting either payload.
        obj = stripe_api.retrieve_subscription(str(obj["id"]))
    return services.apply_subscription_state(
        account, obj, event_created=event.created, event_id=event.stripe_id
    )


def on_invoice_paid(event: StripeEvent, obj: dict[str, Any]) -> str:
    account = _account(obj)
    return services.record_payment_succeeded(
        account, paid_at=event.created, invoice_id=str(obj.get("id"))
    )


def on_invoice_payment_failed(event: StripeEvent, obj: dict[str, Any]) -> str:
    account = _account(obj)
    return services.record_payment_failed(
        account, failed_at=event.created, invoice_id=str(obj.get("id"))
    )


def on_trial_will_end(event: StripeEvent, obj: dict[str, Any]) -> str:
    account = _account(obj)
    trial_end = obj.get("trial_end")
    with transaction.atomic():
        if trial_end:
            account.trial_ends_at = datetime.fromtimestamp(int(trial_end), tz=UTC)
            account.save(update_fields=["trial_ends_at", "updated_at"])
        record(
            services.STRIPE_ACTOR,
            "billing.trial_will_end",
            tenant=account.tenant,
            target=account.tenant,
            details={"trial_end": trial_end},
        )
    return "trial end noted"


HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": on_checkout_completed,
    "customer.subscription.created": on_subscription_changed,
    "customer.subscription.updated": on_subscription_changed,
    "customer.subscription.deleted": on_subscription_changed,
    "invoice.paid": on_invoice_paid,
    "invoice.payment_failed": on_invoice_payment_failed,
    "customer.subscription.trial_will_end": on_trial_will_end,
}
