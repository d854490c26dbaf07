"""Image builds: a context tar uploaded by a user, built on a node into a tenant image."""

from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone

from tenants.models import TenantScopedQuerySet
from workloads.choices import BuildState


class Build(models.Model):
    """One ``docker build``. The context lives on disk (``context_path``), never here;
    ``log`` keeps the last ``BERTH_BUILD_LOG_KEEP_BYTES`` of the step log."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="builds")
    tag = models.CharField(max_length=300, help_text="repository:tag in the tenant's namespace")
    dockerfile = models.CharField(max_length=500, default="Dockerfile")
    build_args = models.JSONField(default=dict, blank=True)
    target = models.CharField(max_length=128, blank=True)
    no_cache = models.BooleanField(default=False)
    context_path = models.CharField(max_length=1000, blank=True)
    context_size = models.PositiveBigIntegerField(default=0)
    context_sha256 = models.CharField(max_length=64, blank=True)
    state = models.CharField(max_length=16, choices=BuildState.choices, default=BuildState.QUEUED)
    reason = models.CharField(max_length=1000, blank=True)
    node = models.ForeignKey(
        "workloads.Node", null=True, blank=True, on_delete=models.SET_NULL, related_name="builds"
    )
    image_digest = models.CharField(max_length=100, blank=True)
    image_reference = models.CharField(max_length=400, blank=True)
    pushed = models.BooleanField(
        default=False, help_text="False: the image is kept in the build node's store only."
    )
    log = models.TextField(blank=True)
    log_size = models.PositiveBigIntegerField(
        default=0, help_text="Characters the build's log has had in all (the kept tail is less)."
    )
    log_seq = models.PositiveIntegerField(default=0, help_text="Last log report applied.")
    reservation = models.ForeignKey(
        "tenants.QuotaReservation",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        help_text="One build minute held from admission until the build ends.",
    )
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["state", "created_at"]),
            # Services and jobs naming a build's tag look it up (resolve_image, pins).
            models.Index(fields=["tenant", "tag"]),
        ]

    def __str__(self) -> str:
        return f"{self.tenant.slug} build {self.tag} ({self.state})"

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()
