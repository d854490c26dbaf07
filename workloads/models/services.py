"""Services, their containers and their deployments.

A Service is desired state ("run N replicas of this spec"); each replica is a Container row
carrying its own desired state (``desired_state``) and the actual state the node reports
(``state``). A Deployment records one roll-out of a new spec generation.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from tenants.models import TenantScopedQuerySet
from workloads.choices import (
    ContainerState,
    DeploymentState,
    DesiredState,
    RestartPolicy,
    ServiceState,
)

NAME_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
name_validator = RegexValidator(
    NAME_RE,
    "Names are 1-63 characters of lowercase letters, digits and '-', starting and ending "
    "with a letter or digit.",
    code="invalid_name",
)


class Service(models.Model):
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="services")
    name = models.CharField(max_length=63, validators=[name_validator])
    state = models.CharField(
        max_length=16, choices=ServiceState.choices, default=ServiceState.ACTIVE
    )
    # The current spec. ``generation`` grows with every deploy; containers carry the
    # generation they were made from.
    image = models.CharField(max_length=300)
    resolved_image = models.CharField(
        max_length=400,
        blank=True,
        help_text="The registry digest reference ``image`` (a Build's bare tag) resolved to "
        "at the last create or deploy; what the replicas run. Blank: ``image`` as written.",
    )
    command = models.JSONField(null=True, blank=True)
    entrypoint = models.JSONField(null=True, blank=True)
    env = models.JSONField(default=dict, blank=True)
    secrets_encrypted = models.TextField(blank=True, default="")
    secret_names = models.JSONField(default=list, blank=True)
    ports = models.JSONField(default=list, blank=True)
    volumes = models.JSONField(default=list, blank=True)
    networks = models.JSONField(default=list, blank=True)
    cpu_millicores = models.PositiveIntegerField(default=250)
    memory_mib = models.PositiveIntegerField(default=256)
    blkio_bps = models.PositiveBigIntegerField(null=True, blank=True)
    gpus = models.PositiveIntegerField(default=0)
    replicas = models.PositiveIntegerField(default=1)
    restart_policy = models.CharField(
        max_length=16, choices=RestartPolicy.choices, default=RestartPolicy.ALWAYS
    )
    health_check = models.JSONField(null=True, blank=True)
    constraints = models.JSONField(default=dict, blank=True)
    generation = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "name"],
                condition=~models.Q(state="deleted"),
                name="service_unique_live_name",
            )
        ]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.name}"

    @property
    def run_image(self) -> str:
        """The image its containers run: the resolved build digest, else ``image``."""
        return self.resolved_image or self.image

    def spec(self) -> dict[str, Any]:
        """The deployable part of the service, as stored on a Deployment."""
        return {
            "image": self.image,
            "resolved_image": self.resolved_image,
            "command": self.command,
            "entrypoint": self.entrypoint,
            "env": self.env,
            "secrets_encrypted": self.secrets_encrypted,
            "secret_names": self.secret_names,
            "ports": self.ports,
            "volumes": self.volumes,
            "networks": self.networks,
            "cpu_millicores": self.cpu_millicores,
            "memory_mib": self.memory_mib,
            "blkio_bps": self.blkio_bps,
            "gpus": self.gpus,
            "restart_policy": self.restart_policy,
            "health_check": self.health_check,
            "constraints": self.constraints,
        }


class Deployment(models.Model):
    """One roll-out: start-first, gated on health checks, rolled back when it fails."""

    service = models.ForeignKey(Service, on_delete=models.CASCADE, related_name="deployments")
    generation = models.PositiveIntegerField()
    previous_generation = models.PositiveIntegerField(null=True, blank=True)
    spec = models.JSONField()
    previous_spec = models.JSONField(null=True, blank=True)
    state = models.CharField(
        max_length=16, choices=DeploymentState.choices, default=DeploymentState.IN_PROGRESS
    )
    reason = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["service", "generation"], name="deployment_unique_gen")
        ]

    def __str__(self) -> str:
        return f"{self.service} gen {self.generation} ({self.state})"


class Container(models.Model):
    """One container Berth wants somewhere: a service replica or a batch job run."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="containers"
    )
    service = models.ForeignKey(
        Service, null=True, blank=True, on_delete=models.CASCADE, related_name="containers"
    )
    job_run = models.OneToOneField(
        "workloads.JobRun",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="container",
    )
    name = models.CharField(max_length=128)
    generation = models.PositiveIntegerField(default=1)
    spec = models.JSONField(help_text="The runtime_agent.protocol.ContainerSpec sent to the node.")
    node = models.ForeignKey(
        "workloads.Node",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="containers",
    )
    desired_state = models.CharField(
        max_length=16, choices=DesiredState.choices, default=DesiredState.RUNNING
    )
    state = models.CharField(
        max_length=16, choices=ContainerState.choices, default=ContainerState.PENDING
    )
    pending_reason = models.CharField(max_length=500, blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    oom_killed = models.BooleanField(default=False)
    restart_count = models.PositiveIntegerField(default=0)
    reservation = models.ForeignKey(
        "tenants.QuotaReservation", null=True, blank=True, on_delete=models.SET_NULL
    )
    cpu_millicores = models.PositiveIntegerField(default=0)
    memory_mib = models.PositiveIntegerField(default=0)
    gpus = models.PositiveIntegerField(default=0)
    healthy = models.BooleanField(null=True, blank=True)
    health_failures = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    scheduled_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    next_restart_at = models.DateTimeField(null=True, blank=True)
    last_reported_at = models.DateTimeField(null=True, blank=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["created_at"]
        indexes = [
            models.Index(fields=["node", "state"]),
            models.Index(fields=["state", "desired_state"]),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.state})"

    @property
    def agent_name(self) -> str:
        """The container's name on the node: unique per tenant there too."""
        return f"{self.name}-{self.id.hex[:8]}"
