"""Request and response bodies of the billing API."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import serializers

from billing.models import SeatLedgerEntry
from tenants.api.serializers import StrictSerializer


class SeatsSerializer(StrictSerializer):
    """Either ``seats`` (the new total) or ``add`` (a relative change, e.g. +1 to invite
    one more member; concurrent additions all count)."""

    seats = serializers.IntegerField(
        min_value=1, max_value=settings.BILLING_MAX_SEATS, required=False
    )
    add = serializers.IntegerField(
        min_value=-settings.BILLING_MAX_SEATS, max_value=settings.BILLING_MAX_SEATS, required=False
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("seats" in attrs) == ("add" in attrs):
            raise serializers.ValidationError({"seats": ["Give either seats or add."]})
        if attrs.get("add") == 0:
            raise serializers.ValidationError({"add": ["Must not be zero."]})
        return attrs


class PlanChangeSerializer(StrictSerializer):
    plan = serializers.SlugField(max_length=32)
    seats = serializers.IntegerField(
        min_value=1, max_value=settings.BILLING_MAX_SEATS, required=False
    )


class CheckoutSerializer(StrictSerializer):
    plan = serializers.SlugField(max_length=32)
    seats = serializers.IntegerField(min_value=1, max_value=settings.BILLING_MAX_SEATS)
    success_url = serializers.URLField(required=False)
    cancel_url = serializers.URLField(required=False)


class PortalSerializer(StrictSerializer):
    return_url = serializers.URLField(required=False)


class SpendCapSerializer(StrictSerializer):
    cap_cents = serializers.IntegerField(min_value=0, allow_null=True)


class LinkSerializer(serializers.Serializer):
    url = serializers.URLField()


class SeatLedgerSerializer(serializers.ModelSerializer):
    class Meta:
        model = SeatLedgerEntry
        fields = [
            "id",
            "kind",
            "plan_code",
            "seats",
            "comp_seats",
            "previous_plan_code",
            "previous_seats",
            "actor_label",
            "note",
            "created_at",
        ]


class BillingSummarySerializer(serializers.Serializer):
    plan = serializers.CharField()
    seats = serializers.IntegerField()
    comp_seats = serializers.IntegerField()
    members = serializers.IntegerField()
    subscription_status = serializers.CharField()
    sync_pending = serializers.BooleanField()
    dunning_state = serializers.CharField()
    past_due_since = serializers.DateTimeField(allow_null=True)
    grace_ends_at = serializers.DateTimeField(allow_null=True)
    suspended_at = serializers.DateTimeField(allow_null=True)
    stop_services_at = serializers.DateTimeField(allow_null=True)
    spend_cap_cents = serializers.IntegerField(allow_null=True)
    trial_ends_at = serializers.DateTimeField(allow_null=True)
    events = serializers.ListField(child=serializers.DictField())


class UsageLineSerializer(serializers.Serializer):
    metric = serializers.CharField()
    unit = serializers.CharField()
    used = serializers.DecimalField(max_digits=20, decimal_places=6)
    included = serializers.DecimalField(max_digits=20, decimal_places=6)
    overage = serializers.DecimalField(max_digits=20, decimal_places=6)
    cents = serializers.IntegerField()


class SpendCapStatusSerializer(serializers.Serializer):
    cap_cents = serializers.IntegerField(allow_null=True)
    state = serializers.ChoiceField(choices=["none", "ok", "warning", "reached"])
    warn_at_cents = serializers.IntegerField(required=False)
    spend_cents = serializers.IntegerField(required=False)


class EstimateSerializer(serializers.Serializer):
    month = serializers.DateField()
    plan = serializers.CharField()
    seats = serializers.IntegerField()
    paid_seats = serializers.IntegerField()
    comp_seats = serializers.IntegerField()
    seat_price_cents = serializers.IntegerField()
    seats_cents = serializers.IntegerField()
    usage = UsageLineSerializer(many=True)
    overage_cents = serializers.IntegerField()
    overage_billed_cents = serializers.IntegerField()
    credits_cents = serializers.IntegerField()
    total_cents = serializers.IntegerField()
    currency = serializers.CharField()
    spend_cap = SpendCapStatusSerializer()


class InvoiceLineSerializer(serializers.Serializer):
    description = serializers.CharField(allow_null=True)
    amount_cents = serializers.IntegerField(allow_null=True)
    quantity = serializers.IntegerField(allow_null=True)
    proration = serializers.BooleanField(allow_null=True)


class InvoiceSerializer(serializers.Serializer):
    id = serializers.CharField(allow_null=True)
    number = serializers.CharField(allow_null=True)
    status = serializers.CharField(allow_null=True)
    currency = serializers.CharField(allow_null=True)
    total_cents = serializers.IntegerField(allow_null=True)
    amount_due_cents = serializers.IntegerField(allow_null=True)
    amount_paid_cents = serializers.IntegerField(allow_null=True)
    created = serializers.DateTimeField(allow_null=True)
    hosted_invoice_url = serializers.URLField(allow_null=True)
    lines = InvoiceLineSerializer(many=True)


class InvoiceListSerializer(serializers.Serializer):
    results = InvoiceSerializer(many=True)


class UpcomingSerializer(serializers.Serializer):
    upcoming_invoice = InvoiceSerializer(allow_null=True)
    estimate = EstimateSerializer()
