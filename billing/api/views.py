"""Billing endpoints. Views translate HTTP; billing.services does the work.

Reading needs ``billing.view`` (owners, admins, billing members), changing needs
``billing.manage``. Checkout and the portal stay open while a tenant is suspended, so a
suspended tenant can pay.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework import mixins
from rest_framework.request import Request
from rest_framework.response import Response

from billing import services, stripe_api
from billing.api.serializers import (
    BillingSummarySerializer,
    CheckoutSerializer,
    EstimateSerializer,
    InvoiceListSerializer,
    LinkSerializer,
    PlanChangeSerializer,
    PortalSerializer,
    SeatLedgerSerializer,
    SeatsSerializer,
    SpendCapSerializer,
    SpendCapStatusSerializer,
    UpcomingSerializer,
)
from billing.models import SeatLedgerEntry
from tenants import permissions as perms
from tenants.api.views import TenantScopedAPIView, TenantScopedViewSet
from tenants.models import AuditLog


class BillingView(TenantScopedAPIView):
    read_permission = perms.BILLING_VIEW
    write_permission = perms.BILLING_MANAGE
    pagination_class = None

    def _billing_url(self, suffix: str = "") -> str:
        base = settings.BERTH_PUBLIC_URL.rstrip("/")
        return f"{base}/billing/{self.tenant.slug}/{suffix}"


def _summary(tenant: Any) -> dict[str, Any]:
    account = services.account_for(tenant)
    events = AuditLog.objects.filter(tenant=tenant, action__startswith="billing.").order_by("-id")[
        :20
    ]
    return {
        "plan": tenant.plan.code,
        "seats": tenant.seats,
        "comp_seats": account.comp_seats,
        "members": tenant.memberships.count(),
        "subscription_status": account.subscription_status or "none",
        "sync_pending": account.sync_pending,
        "dunning_state": account.dunning_state,
        "past_due_since": account.past_due_since,
        "grace_ends_at": account.grace_ends_at,
        "suspended_at": account.suspended_at,
        "stop_services_at": account.stop_services_at,
        "spend_cap_cents": account.spend_cap_cents,
        "trial_ends_at": account.trial_ends_at,
        "events": [
            {"action": e.action, "at": e.created_at.isoformat(), "details": e.details}
            for e in events
        ],
    }


class BillingSummaryView(BillingView):
    """Plan, seats, subscription and dunning state, and the recent billing events."""

    @extend_schema(responses=BillingSummarySerializer)
    def get(self, request: Request, tenant_slug: str) -> Response:
        return Response(BillingSummarySerializer(_summary(self.tenant)).data)


class PlanView(BillingView):
    """POST {plan, seats?}: change plan (refused below current usage, naming what to shrink)."""

    @extend_schema(request=PlanChangeSerializer, responses=BillingSummarySerializer)
    def post(self, request: Request, tenant_slug: str) -> Response:
        body = PlanChangeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        tenant = services.change_plan(
            self.tenant,
            body.validated_data["plan"],
            seats=body.validated_data.get("seats"),
            actor=self.actor,
        )
        return Response(BillingSummarySerializer(_summary(tenant)).data)


class SeatsView(BillingView):
    """POST {seats} or {add}: buy or release seats; Stripe's quantity follows, prorated."""

    @extend_schema(request=SeatsSerializer, responses=BillingSummarySerializer)
    def post(self, request: Request, tenant_slug: str) -> Response:
        body = SeatsSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        if "add" in body.validated_data:
            tenant = services.add_seats(self.tenant, body.validated_data["add"], actor=self.actor)
        else:
            tenant = services.change_seats(
                self.tenant, body.validated_data["seats"], actor=self.actor
            )
        return Response(BillingSummarySerializer(_summary(tenant)).data)


class SeatLedgerViewSet(mixins.ListModelMixin, TenantScopedViewSet):
    """The append-only history of plan and seat changes."""

    queryset = SeatLedgerEntry.objects.all()
    serializer_class = SeatLedgerSerializer
    read_permission = perms.BILLING_VIEW
    write_permission = perms.BILLING_MANAGE

    def get_queryset(self) -> Any:
        return SeatLedgerEntry.objects.filter(tenant=self.tenant)


class UsageView(BillingView):
    """Month-to-date usage per metric, what the seats include, overage and the estimate."""

    serializer_class = EstimateSerializer

    def get(self, request: Request, tenant_slug: str) -> Response:
        return Response(services.estimate(self.tenant))


def _invoice(inv: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": inv.get("id"),
        "number": inv.get("number"),
        "status": inv.get("status"),
        "currency": inv.get("currency"),
        "total_cents": inv.get("total"),
        "amount_due_cents": inv.get("amount_due"),
        "amount_paid_cents": inv.get("amount_paid"),
        "created": datetime.fromtimestamp(int(inv.get("created") or 0), tz=UTC).isoformat()
        if inv.get("created")
        else None,
        "hosted_invoice_url": inv.get("hosted_invoice_url"),
        "lines": [
            {
                "description": line.get("description"),
                "amount_cents": line.get("amount"),
                "quantity": line.get("quantity"),
                "proration": line.get("proration"),
            }
            for line in (inv.get("lines") or {}).get("data", [])
        ],
    }


def _stripe(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except stripe_api.StripeUnavailable as exc:
        raise services.BillingUnavailable(f"Stripe is unreachable: {exc}") from exc
    except stripe_api.StripeRequestError as exc:
        raise services.BillingRefused(str(exc)) from exc


class InvoicesView(BillingView):
    """The tenant's invoices, read from Stripe."""

    serializer_class = InvoiceListSerializer

    def get(self, request: Request, tenant_slug: str) -> Response:
        account = services.account_for(self.tenant)
        if not account.stripe_customer_id:
            return Response({"results": []})
        invoices = _stripe(stripe_api.list_invoices, account.stripe_customer_id)
        return Response({"results": [_invoice(i) for i in invoices]})


class UpcomingView(BillingView):
    """Stripe's preview of the next invoice plus Berth's month-to-date usage estimate."""

    serializer_class = UpcomingSerializer

    def get(self, request: Request, tenant_slug: str) -> Response:
        account = services.account_for(self.tenant)
        upcoming = None
        if account.stripe_customer_id and account.stripe_subscription_id:
            upcoming = _invoice(
                _stripe(
                    stripe_api.preview_invoice,
                    account.stripe_customer_id,
                    account.stripe_subscription_id,
                )
            )
        return Response({"upcoming_invoice": upcoming, "estimate": services.estimate(self.tenant)})


class SpendCapView(BillingView):
    """GET the cap and where the month stands; PUT {cap_cents} (null removes the cap)."""

    serializer_class = SpendCapStatusSerializer

    def get(self, request: Request, tenant_slug: str) -> Response:
        return Response(services.estimate(self.tenant)["spend_cap"])

    @extend_schema(request=SpendCapSerializer, responses=SpendCapStatusSerializer)
    def put(self, request: Request, tenant_slug: str) -> Response:
        body = SpendCapSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        services.set_spend_cap(self.tenant, body.validated_data["cap_cents"], actor=self.actor)
        return Response(services.estimate(self.tenant)["spend_cap"])


class CheckoutView(BillingView):
    """POST {plan, seats}: a Stripe Checkout link to subscribe (or resubscribe)."""

    allow_when_suspended = True

    @extend_schema(request=CheckoutSerializer, responses=LinkSerializer)
    def post(self, request: Request, tenant_slug: str) -> Response:
        body = CheckoutSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        session = services.start_checkout(
            self.tenant,
            data["plan"],
            data["seats"],
            actor=self.actor,
            success_url=data.get("success_url") or self._billing_url("?checkout=success"),
            cancel_url=data.get("cancel_url") or self._billing_url("?checkout=canceled"),
        )
        return Response(session, status=201)


class PortalView(BillingView):
    """POST: a Stripe customer portal link (payment methods, invoices, plan)."""

    allow_when_suspended = True

    @extend_schema(request=PortalSerializer, responses=LinkSerializer)
    def post(self, request: Request, tenant_slug: str) -> Response:
        body = PortalSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        url = services.portal_link(
            self.tenant, return_url=body.validated_data.get("return_url") or self._billing_url()
        )
        return Response({"url": url}, status=201)
