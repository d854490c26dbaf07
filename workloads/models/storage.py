"""Tenant volumes and networks as the control plane knows them.

A volume is node-local: it lives on the node of the first container that mounts it
(``node`` is set then) and every later container mounting it is placed on that node.
Its ``size_gib`` is reserved from the tenant's ``storage_gib`` quota while it exists.
A network is a tenant-wide name; agents create it on a node the first time a container
there attaches to it.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from tenants.models import TenantScopedQuerySet
from workloads.models.services import name_validator


class Volume(models.Model):
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="volumes")
    name = models.CharField(max_length=63, validators=[name_validator])
    size_gib = models.PositiveIntegerField(default=1)
    node = models.ForeignKey(
        "workloads.Node",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="volumes",
        help_text="Where the volume lives, once a container mounting it was placed.",
    )
    reservation = models.ForeignKey(
        "tenants.QuotaReservation", null=True, blank=True, on_delete=models.SET_NULL
    )
    labels = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="volume_unique_name")
        ]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.name}"


class Network(models.Model):
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="networks")
    name = models.CharField(max_length=63, validators=[name_validator])
    labels = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="network_unique_name")
        ]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.name}"
