"""Nodes (machines running an agent) and the one-time tokens they join with."""

from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone

from workloads.choices import NodeState


class Node(models.Model):
    """A machine running a Berth agent, consuming Celery queue ``node.<id>``.

    ``credential_hash`` is the SHA-256 of the secret the agent received when it joined; it
    signs every report the agent sends, so a report can't be forged by another node.
    Names are unique: a node joining under a running node's name is refused.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100, unique=True)
    state = models.CharField(max_length=16, choices=NodeState.choices, default=NodeState.READY)
    credential_hash = models.CharField(max_length=64, unique=True)
    cpu_millicores = models.PositiveIntegerField(default=0)
    memory_mib = models.PositiveIntegerField(default=0)
    disk_gib = models.PositiveIntegerField(default=0)
    gpus = models.PositiveIntegerField(default=0)
    arch = models.CharField(max_length=32, blank=True)
    version = models.CharField(max_length=32, blank=True)
    labels = models.JSONField(default=dict, blank=True)
    joined_at = models.DateTimeField(default=timezone.now)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    last_report = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.state})"

    @property
    def queue(self) -> str:
        return f"node.{self.id}"


class JoinToken(models.Model):
    """A one-time token a platform admin hands to a new node. Only its hash is stored."""

    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.SET_NULL)
    labels = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"join token {self.pk} ({'used' if self.used_at else 'unused'})"
