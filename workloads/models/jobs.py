"""Batch jobs: an array of runs of one command, under the tenant's concurrency quota."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from tenants.models import TenantScopedQuerySet
from workloads.choices import JobState, RunState
from workloads.models.services import name_validator


class JobRunQuerySet(TenantScopedQuerySet):
    tenant_field = "job__tenant"


class BatchJob(models.Model):
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="jobs")
    name = models.CharField(max_length=63, validators=[name_validator])
    image = models.CharField(max_length=300)
    resolved_image = models.CharField(
        max_length=400,
        blank=True,
        help_text="The registry digest reference ``image`` (a Build's bare tag) resolved to "
        "at submission; what every run runs. Blank: ``image`` as written.",
    )
    command = models.JSONField(null=True, blank=True)
    env = models.JSONField(default=dict, blank=True)
    cpu_millicores = models.PositiveIntegerField(default=250)
    memory_mib = models.PositiveIntegerField(default=256)
    gpus = models.PositiveIntegerField(default=0)
    array_size = models.PositiveIntegerField(default=1)
    parallelism = models.PositiveIntegerField(default=1)
    max_retries = models.PositiveIntegerField(default=0)
    backoff_seconds = models.PositiveIntegerField(default=10)
    timeout_seconds = models.PositiveIntegerField(null=True, blank=True)
    priority = models.IntegerField(default=0)
    state = models.CharField(max_length=16, choices=JobState.choices, default=JobState.QUEUED)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["state", "-priority", "created_at"])]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.name} ({self.state})"

    @property
    def run_image(self) -> str:
        """The image its runs run: the resolved build digest, else ``image``."""
        return self.resolved_image or self.image


class JobRun(models.Model):
    """One attempt at one array index. A retry is a new run with attempt + 1."""

    job = models.ForeignKey(BatchJob, on_delete=models.CASCADE, related_name="runs")
    index = models.PositiveIntegerField()
    attempt = models.PositiveIntegerField(default=1)
    state = models.CharField(max_length=16, choices=RunState.choices, default=RunState.PENDING)
    not_before = models.DateTimeField(default=timezone.now)
    exit_code = models.IntegerField(null=True, blank=True)
    reason = models.CharField(max_length=500, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    cpu_seconds = models.FloatField(null=True, blank=True)
    max_memory_bytes = models.BigIntegerField(null=True, blank=True)
    log = models.TextField(
        blank=True, help_text="The run's output (last lines), kept after it ends."
    )

    class Meta:
        ordering = ["job_id", "index", "attempt"]
        constraints = [
            models.UniqueConstraint(fields=["job", "index", "attempt"], name="run_unique_attempt"),
            # Never two live runs of one index: the database enforces it, not just the code.
            models.UniqueConstraint(
                fields=["job", "index"],
                condition=models.Q(state__in=["pending", "running"]),
                name="run_one_live_per_index",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.job} #{self.index} try {self.attempt} ({self.state})"

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()
