"""The reconciler: compares desired and actual state and repairs the difference.

Runs every few seconds (Celery beat, ``reconcile_task``) and is safe to run concurrently
with itself and with reports: each step locks the rows it changes. Steps:

1. nodes that stopped heart-beating go down; their service containers are placed elsewhere
   and their job runs fail (and retry per their job);
2. exited service containers restart per their restart policy, with back-off;
3. pending containers are placed on nodes;
4. job runs past their timeout are stopped; pending runs are admitted fairly;
5. deployments advance: health-checked, then the old generation retired — or rolled back.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from tenants.services import Actor, record
from workloads.choices import (
    ContainerState,
    DeploymentState,
    DesiredState,
    NodeState,
    ServiceState,
)
from workloads.models import Container, Deployment, Node, Service
from workloads.services import deploy, jobs, nodes, placement
from workloads.services.reports import finish_container

SYSTEM = Actor.for_system("reconciler")


def deploy_timeout() -> timedelta:
    return timedelta(seconds=getattr(settings, "BERTH_DEPLOY_TIMEOUT_SECONDS", 300))


@transaction.atomic
def mark_down_stale_nodes(*, now: Any = None) -> list[Node]:
    now = now or timezone.now()
    cutoff = now - nodes.heartbeat_timeout()
    stale = list(
        Node.objects.select_for_update(skip_locked=True)
        .exclude(state=NodeState.DOWN)
        .filter(last_heartbeat_at__lt=cutoff)
    )
    for node in stale:
        previous = node.state
        node.state = NodeState.DOWN
        node.save(update_fields=["state"])
        record(
            SYSTEM,
            "node.down",
            tenant=None,
            target=node,
            details={"from": previous, "last_heartbeat_at": str(node.last_heartbeat_at)},
        )
        nodes.evacuate(node, reason=f"node {node.name} stopped responding")
        for container in (
            Container.objects.select_for_update(of=("self",))
            .filter(node=node)
            .exclude(state__in=[ContainerState.REMOVED, ContainerState.LOST])
            .select_related("tenant", "service")
        ):
            if container.job_run_id is not None:
                container.pending_reason = f"node {node.name} went down"
                container.save(update_fields=["pending_reason"])
                container.finished_at = now
                jobs.run_finished(container, cpu_seconds=None, memory=None)
            finish_container(container, state=ContainerState.LOST)
    return stale


@transaction.atomic
def restart_exited(*, now: Any = None) -> int:
    now = now or timezone.now()
    restarted = 0
    for container in (
        Container.objects.select_for_update(skip_locked=True, of=("self",))
        .filter(
            desired_state=DesiredState.RUNNING,
            state__in=[ContainerState.EXITED, ContainerState.FAILED],
            next_restart_at__lte=now,
            service__isnull=False,
        )
        .select_related("tenant", "service", "node")
    ):
        container.next_restart_at = None
        if container.node is None or container.node.state not in (
            NodeState.READY,
            NodeState.CORDONED,
        ):
            container.save(update_fields=["next_restart_at"])
            placement.replace_container(container, reason="restarting elsewhere", node_down=False)
            continue
        container.restart_count += 1
        container.state = ContainerState.SCHEDULED
        container.scheduled_at = now
        container.save(update_fields=["restart_count", "state", "scheduled_at", "next_restart_at"])
        placement.send_apply(container)
        restarted += 1
    return restarted


def _rollback(deployment: Deployment, service: Service, reason: str) -> None:
    # Every container of the new generation still wanted goes: running or already exited.
    for container in service.containers.filter(
        generation=deployment.generation, desired_state=DesiredState.RUNNING
    ).select_related("tenant", "node"):
        deploy.retire(container)
    if deployment.previous_spec is not None and deployment.previous_generation is not None:
        # Specs stored before images were resolved have no resolved_image: none then.
        service.resolved_image = ""
        for key, value in deployment.previous_spec.items():
            setattr(service, key, value)
        service.generation = deployment.previous_generation
        service.save()
        deployment.state = DeploymentState.ROLLED_BACK
    else:
        deployment.state = DeploymentState.FAILED
    deployment.reason = reason[:500]
    deployment.finished_at = timezone.now()
    deployment.save(update_fields=["state", "reason", "finished_at"])
    record(
        SYSTEM,
        "service.deploy.rolled_back"
        if deployment.state == "rolled_back"
        else "service.deploy.failed",
        tenant=service.tenant,
        target=service,
        details={"generation": deployment.generation, "reason": reason},
    )


def _complete(deployment: Deployment, service: Service) -> None:
    for container in (
        deploy.live_containers(service)
        .exclude(generation=deployment.generation)
        .select_related("tenant", "node")
    ):
        deploy.retire(container)
    deployment.state = DeploymentState.SUCCEEDED
    deployment.finished_at = timezone.now()
    deployment.save(update_fields=["state", "finished_at"])
    record(
        SYSTEM,
        "service.deploy.succeeded",
        tenant=service.tenant,
        target=service,
        details={"generation": deployment.generation},
    )


@transaction.atomic
def advance_deployments(*, now: Any = None) -> list[str]:
    """Move each in-progress deployment forward; returns container ids to health-check."""
    now = now or timezone.now()
    to_check: list[str] = []
    for deployment in (
        Deployment.objects.select_for_update(skip_locked=True, of=("self",))
        .filter(state=DeploymentState.IN_PROGRESS)
        .select_related("service", "service__tenant")
    ):
        service = Service.objects.select_for_update().get(pk=deployment.service_id)
        if service.state != ServiceState.ACTIVE:
            continue
        new = list(
            service.containers.filter(
                generation=deployment.generation, desired_state=DesiredState.RUNNING
            )
        )
        broken = [
            c
            for c in new
            if c.state in (ContainerState.EXITED, ContainerState.FAILED) or c.restart_count > 0
        ]
        check = service.health_check or {}
        unhealthy = [c for c in new if c.health_failures > int(check.get("retries", 3))]
        if broken:
            c = broken[0]
            detail = c.pending_reason or (
                "out of memory" if c.oom_killed else f"exit code {c.exit_code}"
            )
            _rollback(deployment, service, f"a new replica stopped: {detail}")
            continue
        if unhealthy:
            _rollback(
                deployment,
                service,
                f"a new replica failed its health check {unhealthy[0].health_failures} times",
            )
            continue
        if now - deployment.created_at > deploy_timeout():
            _rollback(deployment, service, "the new replicas did not become ready in time")
            continue
        running = [c for c in new if c.state == ContainerState.RUNNING]
        if len(running) < service.replicas:
            continue
        if check:
            pending = [c for c in running if not c.healthy]
            if pending:
                start_period = timedelta(seconds=int(check.get("start_period", 0)))
                to_check.extend(
                    str(c.pk)
                    for c in pending
                    if c.started_at and now - c.started_at >= start_period
                )
                continue
        _complete(deployment, service)
    return to_check


def reconcile(*, now: Any = None) -> dict[str, int]:
    """One full pass. Each step commits on its own so one failure doesn't block the rest."""
    now = now or timezone.now()
    down = mark_down_stale_nodes(now=now)
    restarted = restart_exited(now=now)
    placed = placement.schedule_pending()
    timed_out = jobs.enforce_timeouts(now=now)
    admitted = jobs.dispatch_runs(now=now)
    if admitted:
        placed += placement.schedule_pending()
    to_check = advance_deployments(now=now)
    from workloads.services.builds import reconcile_builds

    builds_changed = reconcile_builds(now=now)
    if to_check:
        from workloads.tasks import health_check_task

        for container_id in to_check:
            health_check_task.delay(container_id)
    return {
        "nodes_down": len(down),
        "restarted": restarted,
        "placed": placed,
        "timed_out": timed_out,
        "admitted": admitted,
        "health_checks": len(to_check),
        "builds": builds_changed,
    }
