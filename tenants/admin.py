"""Platform admins' console: tenants (plan, seats, suspension, quota overrides), users,
tokens and the audit log.

Every change goes through :mod:`tenants.services` so it is validated and audited exactly
like the API's; a plan, seat or status change needs a written reason.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils.html import format_html_join

from tenants import services
from tenants.choices import TenantStatus
from tenants.models import (
    APIToken,
    AuditLog,
    Invitation,
    Membership,
    QuotaOverride,
    QuotaReservation,
    QuotaUsage,
    Tenant,
    User,
)


def _actor(request: HttpRequest) -> services.Actor:
    return services.Actor.from_request(request)


class QuotaOverrideInline(admin.TabularInline):
    model = QuotaOverride
    extra = 1
    fields = ("quota", "value", "reason", "updated_at")
    readonly_fields = ("updated_at",)


class QuotaUsageInline(admin.TabularInline):
    model = QuotaUsage
    extra = 0
    can_delete = False
    fields = ("quota", "used", "updated_at")
    readonly_fields = fields
    verbose_name_plural = "quota usage"

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    can_delete = False
    fields = ("user", "role", "created_at")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class SuspendForm(forms.Form):
    reason = forms.CharField(
        max_length=500, help_text="Recorded in the audit log and shown to the tenant."
    )


class TenantAdminForm(forms.ModelForm):
    change_reason = forms.CharField(
        required=False,
        max_length=500,
        help_text="Required when changing status, plan or seats; recorded in the audit log.",
    )

    class Meta:
        model = Tenant
        fields = ("name", "status", "plan", "seats")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        changed = {"status", "plan", "seats"} & set(self.changed_data)
        if changed and not data.get("change_reason", "").strip():
            self.add_error(
                "change_reason", f"Give a reason for changing {', '.join(sorted(changed))}."
            )
        plan, seats = data.get("plan"), data.get("seats")
        if plan is not None and seats is not None and {"plan", "seats"} & changed:
            if problem := plan.seats_error(seats):
                self.add_error("seats", problem)
            members = self.instance.memberships.count() if self.instance.pk else 0
            if seats < members:
                self.add_error("seats", f"the tenant has {members} members")
        return data


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    form = TenantAdminForm
    list_display = ("slug", "name", "status", "plan", "seats", "member_count", "created_at")
    list_filter = ("status", "plan")
    search_fields = ("slug", "name", "memberships__user__email")
    readonly_fields = ("slug", "status_reason", "created_at", "effective_quotas")
    fields = (
        "slug",
        "name",
        "status",
        "status_reason",
        "plan",
        "seats",
        "change_reason",
        "effective_quotas",
        "created_at",
    )
    inlines = (QuotaOverrideInline, QuotaUsageInline, MembershipInline)
    actions = ("suspend_selected", "reactivate_selected")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tenant]:
        return (
            super()
            .get_queryset(request)
            .select_related("plan")
            .annotate(_members=Count("memberships"))
        )

    @admin.display(description="members", ordering="_members")
    def member_count(self, tenant: Tenant) -> int:
        return getattr(tenant, "_members", 0)

    @admin.display(description="effective quotas (plan × seats + overrides)")
    def effective_quotas(self, tenant: Tenant) -> str:
        if not tenant.pk:
            return "-"
        rows = services.quota_report(tenant)
        return format_html_join(
            "\n",
            "<div><b>{}</b>: {} (used {})</div>",
            ((r["quota"], r["limit"], r["used"]) for r in rows),
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Tenants are created by sign-up, the API or `manage.py create_tenant` (which also
        # creates the owner); the console manages existing ones.
        return False

    def save_model(self, request: HttpRequest, obj: Tenant, form: Any, change: bool) -> None:
        reason = form.cleaned_data.get("change_reason", "").strip()
        actor = _actor(request)
        current = Tenant.objects.get(pk=obj.pk)
        if "name" in form.changed_data:
            Tenant.objects.filter(pk=obj.pk).update(name=obj.name)
            services.record(
                actor,
                "tenant.update",
                tenant=obj,
                target=obj,
                details={"name": [current.name, obj.name]},
            )
        if {"plan", "seats"} & set(form.changed_data):
            services.change_plan(
                current, plan=obj.plan, seats=obj.seats, reason=reason, actor=actor
            )
        if "status" in form.changed_data:
            if obj.status == TenantStatus.SUSPENDED:
                services.suspend_tenant(current, reason=reason, actor=actor)
            else:
                services.reactivate_tenant(current, reason=reason, actor=actor)
        obj.refresh_from_db()

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        if formset.model is not QuotaOverride:
            super().save_formset(request, form, formset, change)
            return
        # Overrides are written by the service (validated, audited), not by the formset;
        # the admin's change message still expects these lists.
        formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []
        tenant = form.instance
        for inline_form in formset.forms:
            if not inline_form.has_changed() and inline_form not in formset.deleted_forms:
                continue
            data = inline_form.cleaned_data
            if not data or not data.get("quota"):
                continue
            value = None if inline_form in formset.deleted_forms else data.get("value")
            previous = inline_form.initial.get("quota")
            if previous and previous != data["quota"]:
                services.set_quota_override(tenant, previous, None, actor=_actor(request))
            services.set_quota_override(
                tenant, data["quota"], value, actor=_actor(request), reason=data.get("reason") or ""
            )

    @admin.action(description="Suspend selected tenants…")
    def suspend_selected(
        self, request: HttpRequest, queryset: QuerySet[Tenant]
    ) -> TemplateResponse | None:
        """Ask for a reason on an intermediate page, then suspend through the service."""
        form = SuspendForm(request.POST if "apply" in request.POST else None)
        if form.is_valid():
            for tenant in queryset:
                services.suspend_tenant(
                    tenant, reason=form.cleaned_data["reason"], actor=_actor(request)
                )
            self.message_user(request, f"Suspended {queryset.count()} tenant(s).", messages.SUCCESS)
            return None
        return TemplateResponse(
            request,
            "admin/tenants/tenant/suspend_selected.html",
            {**self.admin_site.each_context(request), "tenants": queryset, "form": form},
        )

    @admin.action(description="Reactivate selected tenants (reason: reactivated from the console)")
    def reactivate_selected(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        for tenant in queryset.filter(status=TenantStatus.SUSPENDED):
            services.reactivate_tenant(
                tenant, reason="reactivated from the admin console", actor=_actor(request)
            )
        self.message_user(request, "Reactivated.", messages.SUCCESS)


@admin.register(User)
class BerthUserAdmin(UserAdmin):
    list_display = ("email", "username", "is_staff", "is_active", "date_joined")
    search_fields = ("email", "username", "first_name", "last_name")


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("tenant", "user", "role", "created_at")
    list_filter = ("role",)
    search_fields = ("tenant__slug", "user__email")
    readonly_fields = ("tenant", "user", "role", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    list_display = ("email", "tenant", "role", "state", "created_at", "expires_at")
    search_fields = ("email", "tenant__slug")
    list_filter = ("role",)
    exclude = ("key_hash",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(APIToken)
class APITokenAdmin(admin.ModelAdmin):
    list_display = ("prefix", "name", "tenant", "user", "scope", "state", "last_used_at")
    list_filter = ("scope",)
    search_fields = ("prefix", "name", "tenant__slug", "user__email")
    exclude = ("token_hash",)
    actions = ("revoke_selected",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Revoke selected tokens")
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[APIToken]) -> None:
        for token in queryset:
            services.revoke_api_token(token, actor=_actor(request))


@admin.register(AuditLog)
class AuditLogAdmin(admin.ModelAdmin):
    list_display = ("created_at", "tenant_slug", "actor_label", "action", "target_repr", "ip")
    list_filter = ("action",)
    search_fields = ("tenant_slug", "actor_label", "action", "target_repr")
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(QuotaReservation)
class QuotaReservationAdmin(admin.ModelAdmin):
    list_display = ("id", "tenant", "amounts", "reason", "created_at", "released_at")
    search_fields = ("tenant__slug", "reason")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
