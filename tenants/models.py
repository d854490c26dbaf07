"""Tenants (organisations), users, memberships, invitations, API tokens, quotas, audit log.

Writes go through :mod:`tenants.services`; models hold single-object rules only.
Every tenant-owned model has a manager with ``.for_tenant(tenant)`` — the one place API
views scope their querysets (see :class:`tenants.api.views.TenantScopedViewSet`).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import TYPE_CHECKING, Any

from django.contrib.auth.models import AbstractUser
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from billing.plans import QUOTA_NAMES
from tenants.choices import SCOPE_LEVEL, QuotaName, Role, Scope, TenantStatus

if TYPE_CHECKING:
    from billing.models import Plan

#: Same rule as the node agent's tenant names (docs/agent.md): cgroup, bridge and image
#: namespace names derive from the slug.
SLUG_RE = r"^[a-z0-9][a-z0-9-]{0,62}$"
slug_validator = RegexValidator(
    SLUG_RE,
    "A slug is 1-63 characters: lowercase letters, digits and '-', starting with a letter "
    "or digit.",
    code="invalid_slug",
)

TOKEN_PREFIX = "brt_"  # noqa: S105 (a public marker, not a secret)
#: Length of the visible part of a token: ``brt_`` + 8 characters.
TOKEN_DISPLAY_LEN = len(TOKEN_PREFIX) + 8


def hash_secret(secret: str) -> str:
    """SHA-256 of a high-entropy secret (tokens, invitation keys). Never store the secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


class TenantScopedQuerySet(models.QuerySet):
    """Querysets of tenant-owned rows. ``tenant_field`` names the path to the tenant."""

    tenant_field = "tenant"

    def for_tenant(self, tenant: Tenant) -> TenantScopedQuerySet:
        return self.filter(**{self.tenant_field: tenant})


class User(AbstractUser):
    """A person. Logs in with ``username`` (set to the lower-cased email by the services)."""

    email = models.EmailField(unique=True)

    class Meta:
        ordering = ["id"]


class TenantQuerySet(models.QuerySet):
    def for_tenant(self, tenant: Tenant) -> TenantQuerySet:
        return self.filter(pk=tenant.pk)

    def for_user(self, user: Any) -> TenantQuerySet:
        return self.filter(memberships__user=user)


class Tenant(models.Model):
    """An organisation: owns members, tokens, quotas and (in other apps) workloads."""

    name = models.CharField(max_length=100)
    slug = models.CharField(max_length=63, unique=True, validators=[slug_validator])
    status = models.CharField(
        max_length=16, choices=TenantStatus.choices, default=TenantStatus.ACTIVE
    )
    status_reason = models.CharField(max_length=500, blank=True)
    plan = models.ForeignKey("billing.Plan", on_delete=models.PROTECT, related_name="tenants")
    seats = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(default=timezone.now)

    objects = TenantQuerySet.as_manager()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.slug

    @property
    def is_active(self) -> bool:
        return self.status == TenantStatus.ACTIVE

    def overrides(self) -> dict[str, int]:
        return {o.quota: o.value for o in self.quota_overrides.all()}

    def quota_limits(self) -> dict[str, int]:
        """Effective quotas: plan × seats + overrides (see :mod:`billing.plans`)."""
        plan: Plan = self.plan
        return plan.limits(self.seats, self.overrides())


class Membership(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey("tenants.User", on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(default=timezone.now)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "user"], name="membership_unique_user"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"


class Invitation(models.Model):
    """An emailed, single-use invitation. Only the SHA-256 of its key is stored."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField()
    role = models.CharField(max_length=16, choices=Role.choices)
    key_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(
        "tenants.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        "tenants.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "email"],
                condition=models.Q(accepted_at__isnull=True, revoked_at__isnull=True),
                name="invitation_one_open_per_email",
            ),
        ]

    def __str__(self) -> str:
        return f"invitation of {self.email} to {self.tenant}"

    @property
    def state(self) -> str:
        """pending, accepted, revoked or expired."""
        if self.accepted_at is not None:
            return "accepted"
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "pending"


class APIToken(models.Model):
    """A tenant API token. The secret is shown once; only its SHA-256 is kept.

    A token acts as its creator within its tenant: the creator's current role bounds what
    it may do, and its scope bounds it further (read < write < admin). A token stops working
    when revoked, expired, or when its creator leaves the tenant.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_tokens")
    user = models.ForeignKey("tenants.User", on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=TOKEN_DISPLAY_LEN, unique=True)
    token_hash = models.CharField(max_length=64, unique=True)
    scope = models.CharField(max_length=8, choices=Scope.choices)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_used_ip = models.GenericIPAddressField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name})"

    def allows(self, scope: str) -> bool:
        return SCOPE_LEVEL[self.scope] >= SCOPE_LEVEL[scope]

    @property
    def state(self) -> str:
        """active, revoked or expired."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= timezone.now():
            return "expired"
        return "active"


class QuotaOverride(models.Model):
    """A platform admin's adjustment added to plan × seats (may be negative)."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="quota_overrides")
    quota = models.CharField(max_length=32, choices=QuotaName.choices)
    value = models.BigIntegerField(help_text="Added to plan × seats; negative lowers the limit.")
    reason = models.CharField(max_length=500, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant_id", "quota"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "quota"], name="quota_override_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant} {self.quota} {self.value:+d}"


class QuotaUsage(models.Model):
    """Current use of one pooled quota by one tenant: the row ``reserve`` locks."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="quota_usage")
    quota = models.CharField(max_length=32, choices=QuotaName.choices)
    used = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant_id", "quota"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "quota"], name="quota_usage_unique"),
            models.CheckConstraint(condition=models.Q(used__gte=0), name="quota_usage_nonneg"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant} {self.quota}={self.used}"


class QuotaReservation(models.Model):
    """What one ``reserve`` call took; ``release`` gives it back exactly once."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="reservations")
    amounts = models.JSONField(help_text="{quota: amount} of pooled quotas taken.")
    reason = models.CharField(max_length=200)
    created_at = models.DateTimeField(default=timezone.now)
    released_at = models.DateTimeField(null=True, blank=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["created_at"]
        indexes = [models.Index(fields=["tenant", "released_at"])]

    def __str__(self) -> str:
        return f"reservation {self.id} {self.amounts}"


class AuditLog(models.Model):
    """One write: who (user and/or token), where (tenant), what, on what, when, from where."""

    tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.SET_NULL, related_name="audit_log"
    )
    tenant_slug = models.CharField(max_length=63, blank=True, help_text="Kept after deletion.")
    actor_user = models.ForeignKey(
        "tenants.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_token = models.ForeignKey(
        APIToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_label = models.CharField(max_length=200, help_text="Who, as text (kept after deletion).")
    action = models.CharField(max_length=64)
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    target_repr = models.CharField(max_length=200, blank=True)
    details = models.JSONField(default=dict, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["tenant", "-id"])]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_label} {self.action}"


__all__ = [
    "QUOTA_NAMES",
    "SLUG_RE",
    "TOKEN_DISPLAY_LEN",
    "TOKEN_PREFIX",
    "APIToken",
    "AuditLog",
    "Invitation",
    "Membership",
    "QuotaOverride",
    "QuotaReservation",
    "QuotaUsage",
    "Role",
    "Scope",
    "Tenant",
    "TenantScopedQuerySet",
    "TenantStatus",
    "User",
    "hash_secret",
    "slug_validator",
]
