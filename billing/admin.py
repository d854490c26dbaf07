"""Admin for plans (platform admins edit tiers as data)."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.db.models import QuerySet
from django.http import HttpRequest

from billing import services as billing_services
from billing.models import (
    BillingAccount,
    CreditGrant,
    Plan,
    SeatLedgerEntry,
    StripeEvent,
    UsageLedgerEntry,
)
from tenants.errors import BerthError
from tenants.services import Actor


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "code",
        "seat_price_cents",
        "min_seats",
        "max_seats",
        "cpu_millicores",
        "memory_mib",
        "storage_gib",
        "containers",
        "gpus",
        "is_public",
    )
    list_filter = ("is_public",)
    search_fields = ("code", "name")
    ordering = ("sort_order", "seat_price_cents")


# --- Stripe accounts, seat ledger, webhook events, usage (billing helper) -----------------


class BillingActionForm(ActionForm):
    """Extra inputs for the billing actions (count for comps, cents for credits)."""

    count = forms.IntegerField(required=False, help_text="seats to comp (negative: take back)")
    amount_cents = forms.IntegerField(required=False, min_value=1)
    reason = forms.CharField(required=False, max_length=400)


def _int_field(request: HttpRequest, name: str) -> int:
    """The action form's integer (0 when empty or not a number: the service then refuses)."""
    try:
        return int(request.POST.get(name) or 0)
    except ValueError:
        return 0


def _admin_actor(request: HttpRequest) -> Actor:
    return Actor.from_request(request)


def _run_on_each(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet[BillingAccount],
    fn: object,
) -> None:
    done = 0
    for account in queryset.select_related("tenant"):
        try:
            fn(account)  # type: ignore[operator]
            done += 1
        except BerthError as exc:
            modeladmin.message_user(request, f"{account.tenant}: {exc.message}", messages.ERROR)
    if done:
        modeladmin.message_user(request, f"done for {done} tenant(s)", messages.SUCCESS)


@admin.register(BillingAccount)
class BillingAccountAdmin(admin.ModelAdmin):
    list_display = (
        "tenant",
        "subscription_status",
        "dunning_state",
        "comp_seats",
        "spend_cap_cents",
        "sync_pending",
        "grace_ends_at",
    )
    list_filter = ("dunning_state", "subscription_status", "sync_pending")
    search_fields = ("tenant__slug", "stripe_customer_id", "stripe_subscription_id")
    readonly_fields = [f.name for f in BillingAccount._meta.fields]
    action_form = BillingActionForm
    actions = ["comp_seats", "grant_credit", "suspend_for_billing", "reactivate"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Comp seats (count, reason)")
    def comp_seats(self, request: HttpRequest, queryset: QuerySet[BillingAccount]) -> None:
        count = _int_field(request, "count")
        reason = request.POST.get("reason", "")
        _run_on_each(
            self,
            request,
            queryset,
            lambda a: billing_services.comp_seats(
                a.tenant, count, actor=_admin_actor(request), reason=reason
            ),
        )

    @admin.action(description="Grant credit (amount_cents, reason)")
    def grant_credit(self, request: HttpRequest, queryset: QuerySet[BillingAccount]) -> None:
        amount = _int_field(request, "amount_cents")
        reason = request.POST.get("reason", "")
        _run_on_each(
            self,
            request,
            queryset,
            lambda a: billing_services.grant_credit(
                a.tenant, amount, actor=_admin_actor(request), reason=reason
            ),
        )

    @admin.action(description="Suspend for billing (reason)")
    def suspend_for_billing(self, request: HttpRequest, queryset: QuerySet[BillingAccount]) -> None:
        reason = request.POST.get("reason", "") or "suspended by a platform admin"
        _run_on_each(
            self,
            request,
            queryset,
            lambda a: billing_services.suspend_for_billing(
                a.tenant, reason=reason, actor=_admin_actor(request)
            ),
        )

    @admin.action(description="Reactivate (reason)")
    def reactivate(self, request: HttpRequest, queryset: QuerySet[BillingAccount]) -> None:
        reason = request.POST.get("reason", "") or "reactivated by a platform admin"
        _run_on_each(
            self,
            request,
            queryset,
            lambda a: billing_services.reactivate_by_admin(
                a.tenant, reason=reason, actor=_admin_actor(request)
            ),
        )


class _ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(SeatLedgerEntry)
class SeatLedgerEntryAdmin(_ReadOnlyAdmin):
    list_display = (
        "created_at",
        "tenant",
        "kind",
        "plan_code",
        "seats",
        "comp_seats",
        "actor_label",
    )
    list_filter = ("kind", "plan_code")
    search_fields = ("tenant__slug",)


@admin.register(StripeEvent)
class StripeEventAdmin(_ReadOnlyAdmin):
    list_display = ("received_at", "stripe_id", "type", "status", "attempts", "result")
    list_filter = ("status", "type")
    search_fields = ("stripe_id",)
    actions = ["reprocess"]

    @admin.action(description="Process again (failed or pending events)")
    def reprocess(self, request: HttpRequest, queryset: QuerySet[StripeEvent]) -> None:
        from billing.tasks import process_stripe_event_task

        pks = list(
            queryset.filter(
                status__in=[StripeEvent.Status.FAILED, StripeEvent.Status.PENDING]
            ).values_list("pk", flat=True)
        )
        for pk in pks:
            process_stripe_event_task.delay(pk)
        self.message_user(request, f"queued {len(pks)} event(s)")


@admin.register(UsageLedgerEntry)
class UsageLedgerEntryAdmin(_ReadOnlyAdmin):
    list_display = ("hour", "tenant", "metric", "quantity")
    list_filter = ("metric",)
    search_fields = ("tenant__slug",)


@admin.register(CreditGrant)
class CreditGrantAdmin(_ReadOnlyAdmin):
    list_display = ("created_at", "tenant", "amount_cents", "reason", "granted_by")
    search_fields = ("tenant__slug",)
