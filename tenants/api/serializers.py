"""Serializers of the tenants API, and :class:`StrictSerializer` for every API input.

Views validate input with a serializer and hand the validated data to one service call;
serializers never write to the database themselves.
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from billing.plans import QUOTA_NAMES
from tenants.choices import Role, Scope
from tenants.models import APIToken, AuditLog, Invitation, Membership, Tenant, User


class StrictSerializerMixin:
    """Refuse unknown and read-only fields instead of silently ignoring them."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            writable = {
                name
                for name, field in self.fields.items()  # type: ignore[attr-defined]
                if not field.read_only
            }
            unknown = sorted(set(data) - writable)
            if unknown:
                raise serializers.ValidationError(
                    {name: ["Unknown or read-only field."] for name in unknown}
                )
        elif data is not None:
            raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
        return super().to_internal_value(data)  # type: ignore[misc]


class StrictSerializer(StrictSerializerMixin, serializers.Serializer):
    pass


class StrictModelSerializer(StrictSerializerMixin, serializers.ModelSerializer):
    pass


class UserSerializer(serializers.ModelSerializer):
    class Meta:
        model = User
        fields = ["id", "email", "username", "first_name", "last_name"]


class TenantSerializer(StrictModelSerializer):
    plan = serializers.CharField(source="plan.code", read_only=True)
    role = serializers.SerializerMethodField()

    class Meta:
        model = Tenant
        fields = [
            "id",
            "slug",
            "name",
            "status",
            "status_reason",
            "plan",
            "seats",
            "role",
            "created_at",
        ]
        read_only_fields = ["id", "slug", "status", "status_reason", "plan", "seats", "created_at"]

    def get_role(self, tenant: Tenant) -> str | None:
        roles: dict[int, str] = self.context.get("roles", {})
        return roles.get(tenant.pk)


class TenantUpdateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=100)


class MembershipSerializer(StrictModelSerializer):
    user = UserSerializer(read_only=True)

    class Meta:
        model = Membership
        fields = ["id", "user", "role", "created_at"]
        read_only_fields = ["id", "user", "created_at"]


class MemberRemoveQuerySerializer(serializers.Serializer):
    """Query parameters of ``DELETE …/members/<id>/`` (not strict: ``?format=`` is DRF's)."""

    release_seat = serializers.BooleanField(
        default=False,
        help_text="Also drop the seat the member frees (owners, admins and billing members; "
        "the subscription quantity follows with proration). Never below the plan minimum "
        "plus comped seats, nor below members plus open invitations. If the seat change is "
        "refused, the member is not removed either.",
    )


class MemberRemovedSerializer(serializers.Serializer):
    """The answer to a removal with ``release_seat=true``."""

    seat_released = serializers.BooleanField(
        source="released",
        help_text="False when the plan minimum, comped seats or open invitations kept it",
    )
    previous_seats = serializers.IntegerField()
    seats = serializers.IntegerField()


class RoleChangeSerializer(StrictSerializer):
    role = serializers.ChoiceField(choices=Role.choices)


class InvitationSerializer(StrictModelSerializer):
    state = serializers.CharField(read_only=True)
    invited_by = serializers.EmailField(source="invited_by.email", read_only=True, default=None)

    class Meta:
        model = Invitation
        fields = ["id", "email", "role", "state", "invited_by", "created_at", "expires_at"]
        read_only_fields = ["id", "state", "invited_by", "created_at", "expires_at"]


class InvitationCreateSerializer(StrictSerializer):
    email = serializers.EmailField()
    role = serializers.ChoiceField(choices=Role.choices, default=Role.DEVELOPER)
    buy_seat = serializers.BooleanField(
        default=False,
        help_text="When every paid seat is taken, buy one more (owners, admins and billing "
        "members; the subscription is updated with proration) instead of refusing.",
    )


class InvitationCreatedSerializer(InvitationSerializer):
    key = serializers.CharField(read_only=True, help_text="Shown once; also emailed.")

    class Meta(InvitationSerializer.Meta):
        fields = [*InvitationSerializer.Meta.fields, "key"]


class InvitationAcceptSerializer(StrictSerializer):
    key = serializers.CharField(max_length=200)
    password = serializers.CharField(
        required=False,
        write_only=True,
        max_length=256,
        help_text="Needed when not logged in: the new account's password, or the existing "
        "account's password.",
    )


class APITokenSerializer(StrictModelSerializer):
    user = serializers.EmailField(source="user.email", read_only=True)
    state = serializers.CharField(read_only=True)

    class Meta:
        model = APIToken
        fields = [
            "id",
            "name",
            "prefix",
            "scope",
            "user",
            "state",
            "created_at",
            "expires_at",
            "last_used_at",
            "last_used_ip",
            "revoked_at",
        ]
        read_only_fields = fields


class APITokenCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=100)
    scope = serializers.ChoiceField(choices=Scope.choices, default=Scope.READ)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class APITokenCreatedSerializer(APITokenSerializer):
    token = serializers.CharField(read_only=True, help_text="The secret. Shown only once.")

    class Meta(APITokenSerializer.Meta):
        fields = [*APITokenSerializer.Meta.fields, "token"]
        read_only_fields = fields


class QuotaSerializer(serializers.Serializer):
    quota = serializers.ChoiceField(choices=list(QUOTA_NAMES))
    per_seat = serializers.IntegerField()
    seats = serializers.IntegerField()
    override = serializers.IntegerField()
    limit = serializers.IntegerField()
    used = serializers.IntegerField()
    available = serializers.IntegerField()
    per_container = serializers.BooleanField(
        help_text="A cap per container (not pooled, no usage, not multiplied by seats)."
    )


class QuotaListSerializer(serializers.Serializer):
    tenant = serializers.CharField()
    plan = serializers.CharField()
    seats = serializers.IntegerField()
    quotas = QuotaSerializer(many=True)


class QuotaOverrideUpdateSerializer(StrictSerializer):
    overrides = serializers.DictField(
        child=serializers.IntegerField(allow_null=True),
        help_text="{quota: value} added to plan × seats; null removes the override.",
    )
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")

    def validate_overrides(self, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(QUOTA_NAMES))
        if unknown:
            raise serializers.ValidationError(f"unknown quota(s): {', '.join(unknown)}")
        if not value:
            raise serializers.ValidationError("name at least one quota")
        return value


class AuditLogSerializer(serializers.ModelSerializer):
    tenant = serializers.CharField(source="tenant_slug")
    actor = serializers.CharField(source="actor_label")
    actor_user = serializers.EmailField(source="actor_user.email", default=None)
    actor_token = serializers.CharField(source="actor_token.prefix", default=None)

    class Meta:
        model = AuditLog
        fields = [
            "id",
            "created_at",
            "tenant",
            "actor",
            "actor_user",
            "actor_token",
            "action",
            "target_type",
            "target_id",
            "target_repr",
            "details",
            "ip",
        ]
        read_only_fields = fields


class MembershipSummarySerializer(serializers.Serializer):
    slug = serializers.CharField()
    name = serializers.CharField()
    status = serializers.CharField()
    role = serializers.CharField()


class MeSerializer(serializers.Serializer):
    user = UserSerializer()
    is_platform_admin = serializers.BooleanField()
    token = APITokenSerializer(allow_null=True)
    tenants = MembershipSummarySerializer(many=True)
