"""Celery tasks of billing: thin, idempotent, named ``*_task``, taking primary keys."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from billing import services, stripe_api, webhooks
from billing.models import BillingAccount, StripeEvent

_RETRY = {
    "autoretry_for": (stripe_api.StripeUnavailable,),
    "retry_backoff": 5,
    "retry_backoff_max": 600,
    "retry_jitter": True,
    "max_retries": None,
}


@shared_task(**_RETRY)
def process_stripe_event_task(event_pk: int) -> str:
    return webhooks.process_event(event_pk)


@shared_task(**_RETRY)
def sync_subscription_task(tenant_id: int) -> str:
    """Push the tenant's plan and paid seats to Stripe; retried while Stripe is down."""
    return services.sync_subscription(tenant_id)


@shared_task(**_RETRY)
def push_credit_task(grant_id: int) -> str:
    return services.push_credit(grant_id)


@shared_task
def sweep_billing_task() -> dict[str, int]:
    """Periodic safety net: re-queue unsynced subscriptions and unprocessed events (their
    first message may have been lost with a broker outage)."""
    pending = list(
        BillingAccount.objects.filter(sync_pending=True).values_list("tenant_id", flat=True)
    )
    for tenant_id in pending:
        sync_subscription_task.delay(tenant_id)
    stuck = list(
        StripeEvent.objects.filter(
            status=StripeEvent.Status.PENDING,
            received_at__lt=timezone.now() - timedelta(minutes=5),
        ).values_list("pk", flat=True)
    )
    for pk in stuck:
        process_stripe_event_task.delay(pk)
    return {"subscriptions": len(pending), "events": len(stuck)}


@shared_task
def enforce_dunning_task() -> dict[str, int]:
    return services.enforce_dunning()


@shared_task
def aggregate_usage_task() -> int:
    """Recompute the usage ledger hours that have new readings or builds."""
    return services.aggregate_pending_usage()


@shared_task
def report_usage_task() -> int:
    """Report overage to Stripe for every customer, then warn near spend caps."""
    for tenant_id in BillingAccount.objects.filter(stripe_customer_id__isnull=False).values_list(
        "tenant_id", flat=True
    ):
        report_tenant_usage_task.delay(tenant_id)
    return services.warn_spend_caps()


@shared_task(**_RETRY)
def report_tenant_usage_task(tenant_id: int) -> int:
    """Report this month's overage; on the 1st also settle the month that just ended."""
    now = timezone.now()
    reported = services.report_overage(tenant_id, now)
    if now.day == 1:
        last_second = services.month_start(now) - timedelta(seconds=1)
        reported += services.report_overage(tenant_id, last_second)
    return reported
