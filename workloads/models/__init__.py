"""Workload models: nodes, services and their containers, deployments, batch jobs."""

from __future__ import annotations

from workloads.models.builds import Build
from workloads.models.jobs import BatchJob, JobRun
from workloads.models.nodes import JoinToken, Node
from workloads.models.services import Container, Deployment, Service
from workloads.models.storage import Network, Volume

__all__ = [
    "BatchJob",
    "Build",
    "Container",
    "Deployment",
    "JobRun",
    "JoinToken",
    "Network",
    "Node",
    "Service",
    "Volume",
]
