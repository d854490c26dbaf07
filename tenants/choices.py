"""Enumerations shared by tenants models, services and the API."""

from __future__ import annotations

from django.db import models

from billing.plans import QUOTA_NAMES


class TenantStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    SUSPENDED = "suspended", "Suspended"


class Role(models.TextChoices):
    """Membership roles, most powerful first (see ``tenants.permissions``)."""

    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    DEVELOPER = "developer", "Developer"
    BILLING = "billing", "Billing"
    VIEWER = "viewer", "Viewer"


class Scope(models.TextChoices):
    """API token scopes. Each includes the ones below it: admin ⊃ write ⊃ read."""

    READ = "read", "Read"
    WRITE = "write", "Write"
    ADMIN = "admin", "Admin"


SCOPE_LEVEL: dict[str, int] = {Scope.READ: 1, Scope.WRITE: 2, Scope.ADMIN: 3}

QuotaName = models.TextChoices("QuotaName", [(name, name) for name in QUOTA_NAMES])  # type: ignore[misc]
