"""Celery tasks of the control plane: thin, idempotent, taking primary keys."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.db import transaction

from runtime_agent import protocol
from workloads.choices import ContainerState
from workloads.models import Container
from workloads.services import builds, dispatch, jobs, placement, reconcile, reports

log = logging.getLogger(__name__)


@shared_task(name="workloads.reconcile")
def reconcile_task() -> dict[str, int]:
    return reconcile.reconcile()


@shared_task(name="workloads.schedule_pending")
def schedule_pending_task() -> int:
    return placement.schedule_pending()


@shared_task(name="workloads.dispatch_runs")
def dispatch_runs_task() -> int:
    admitted = jobs.dispatch_runs()
    if admitted:
        placement.schedule_pending()
    return admitted


@shared_task(name=protocol.CONTROL_NODE_REPORT)
def node_report_task(report: dict[str, Any]) -> None:
    reports.handle_node_report(protocol.from_dict(protocol.NodeReport, report))


@shared_task(name=protocol.CONTROL_BUILD_LOG)
def build_log_task(report: dict[str, Any]) -> None:
    builds.handle_build_report(protocol.from_dict(protocol.BuildReport, report))


@shared_task(name=protocol.CONTROL_BUILD_RESULT)
def build_result_task(report: dict[str, Any]) -> None:
    builds.handle_build_report(protocol.from_dict(protocol.BuildReport, report))


@shared_task(name="workloads.collect_run_logs")
def collect_run_logs_task(container_id: str) -> None:
    """Keep a finished run's output on its JobRun, then remove its container."""
    container = (
        Container.objects.select_related("tenant", "node", "job_run")
        .filter(pk=container_id)
        .first()
    )
    if container is None or container.node is None or container.job_run is None:
        return
    try:
        result = dispatch.call(
            container.node,
            protocol.AGENT_LOGS,
            tenant=container.tenant.slug,
            name=container.agent_name,
            tail=jobs.LOG_LINES_KEPT,
        )
        jobs.keep_run_log(
            container.job_run.pk, [line.get("line", "") for line in result.get("lines", [])]
        )
    except Exception as exc:  # the node may be gone; the run's outcome is already recorded
        log.warning("could not collect logs of %s: %s", container_id, exc)
    with transaction.atomic():
        locked = (
            Container.objects.select_for_update(of=("self",))
            .select_related("tenant", "node")
            .get(pk=container_id)
        )
        if locked.state != ContainerState.REMOVED:
            from workloads.services.deploy import retire

            retire(locked)


@shared_task(name="workloads.health_check")
def health_check_task(container_id: str) -> bool | None:
    """Run the service's health check command in one container and record the outcome."""
    container = (
        Container.objects.select_related("tenant", "node", "service")
        .filter(pk=container_id)
        .first()
    )
    if container is None or container.node is None or container.service is None:
        return None
    check = container.service.health_check or {}
    if container.state != ContainerState.RUNNING or not check:
        return None
    try:
        result = dispatch.call(
            container.node,
            protocol.AGENT_EXEC,
            timeout=float(check.get("timeout", 5)) + 10,
            tenant=container.tenant.slug,
            name=container.agent_name,
            argv=check["test"],
            exec_timeout=check.get("timeout", 5),
        )
        healthy = result.get("exit_code") == 0
    except dispatch.NodeOperationFailed as exc:
        if exc.details.get("code") == "resource_exhausted":
            # The node refused the check for now (its interactive slots are full, possibly
            # by this tenant's own execs): not a verdict on the container; the next pass
            # checks again.
            return None
        healthy = False
    if healthy:
        Container.objects.filter(pk=container.pk).update(healthy=True)
    else:
        from django.db.models import F

        Container.objects.filter(pk=container.pk).update(
            healthy=False, health_failures=F("health_failures") + 1
        )
    return healthy
