"""Enumerations and lifecycle tables of workloads."""

from __future__ import annotations

from django.db import models


class NodeState(models.TextChoices):
    READY = "ready", "Ready"
    CORDONED = "cordoned", "Cordoned"  # keeps its work, takes no new work
    DRAINING = "draining", "Draining"  # its work is being moved elsewhere
    DOWN = "down", "Down"  # stopped heart-beating


class ContainerState(models.TextChoices):
    PENDING = "pending", "Pending"  # waiting for a node (reason in pending_reason)
    SCHEDULED = "scheduled", "Scheduled"  # placed, operation sent to the node
    RUNNING = "running", "Running"
    EXITED = "exited", "Exited"
    FAILED = "failed", "Failed"  # the node could not create or start it
    LOST = "lost", "Lost"  # its node went down
    REMOVED = "removed", "Removed"


class DesiredState(models.TextChoices):
    RUNNING = "running", "Running"
    STOPPED = "stopped", "Stopped"
    REMOVED = "removed", "Removed"


class ServiceState(models.TextChoices):
    ACTIVE = "active", "Active"
    STOPPED = "stopped", "Stopped"
    DELETED = "deleted", "Deleted"


class RestartPolicy(models.TextChoices):
    NO = "no", "No"
    ON_FAILURE = "on-failure", "On failure"
    ALWAYS = "always", "Always"
    UNLESS_STOPPED = "unless-stopped", "Unless stopped"


class DeploymentState(models.TextChoices):
    IN_PROGRESS = "in_progress", "In progress"
    SUCCEEDED = "succeeded", "Succeeded"
    ROLLED_BACK = "rolled_back", "Rolled back"
    FAILED = "failed", "Failed"  # a first deployment that never became healthy


class JobState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class BuildState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class RunState(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    TIMED_OUT = "timed_out", "Timed out"
    CANCELLED = "cancelled", "Cancelled"


#: Allowed container state moves (actual state, as reports and the reconciler change it).
CONTAINER_TRANSITIONS: dict[str, frozenset[str]] = {
    ContainerState.PENDING: frozenset({"scheduled", "removed"}),
    ContainerState.SCHEDULED: frozenset({"running", "exited", "failed", "lost", "removed"}),
    ContainerState.RUNNING: frozenset({"exited", "lost", "removed", "scheduled"}),
    ContainerState.EXITED: frozenset({"scheduled", "running", "removed", "lost"}),
    ContainerState.FAILED: frozenset({"scheduled", "removed", "lost"}),
    ContainerState.LOST: frozenset({"removed", "running", "exited"}),
    ContainerState.REMOVED: frozenset(),
}

TERMINAL_RUN_STATES = frozenset(
    {RunState.SUCCEEDED, RunState.FAILED, RunState.TIMED_OUT, RunState.CANCELLED}
)
