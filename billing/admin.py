"""Admin for plans (platform admins edit tiers as data)."""

from __future__ import annotations

from django.contrib import admin

from billing.models import Plan


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
