"""Request and response bodies of the billing API."""

from __future__ import annotations

from django.conf import settings
from rest_framework import serializers

from billing.models import SeatLedgerEntry
from tenants.api.serializers import StrictSerializer


class SeatsSerializer(StrictSerializer):
    seats = serializers.IntegerField(min_value=1, max_value=settings.BILLING_MAX_SEATS)


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
