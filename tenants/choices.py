"""Enumerations shared by tenants models, services and the API."""

from __future__ import annotations

from django.db import models


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


class QuotaName(models.TextChoices):
    """The quotas of :data:`billing.plans.QUOTA_NAMES` (a test keeps the two in step)."""

    CPU_MILLICORES = "cpu_millicores"
    MEMORY_MIB = "memory_mib"
    BLKIO_BPS = "blkio_bps"
    STORAGE_GIB = "storage_gib"
    CONTAINERS = "containers"
    CONCURRENT_JOBS = "concurrent_jobs"
    BUILD_MINUTES_MONTH = "build_minutes_month"
    GPUS = "gpus"
    PIDS = "pids"
    NETWORKS = "networks"
    NETWORKS_PER_CONTAINER = "networks_per_container"
    ARRAY_SIZE = "array_size"
