"""Workload models: nodes, services and their containers, deployments, batch jobs."""

from __future__ import annotations

from workloads.models.jobs import BatchJob, JobRun
from workloads.models.nodes import JoinToken, Node
from workloads.models.services import Container, Deployment, Service

__all__ = ["BatchJob", "Container", "Deployment", "JobRun", "JoinToken", "Node", "Service"]
