"""What nodes report: heartbeats and the actual state of containers.

Reports are the only source of actual state. A report about a container the control plane
doesn't want there (unknown, retired, or placed elsewhere since) makes the node remove it:
that is how orphans left by a lost message or a node that came back are cleaned up.

A start is lost only when nothing says otherwise: a container the node reports
``starting`` (its apply acknowledged and under way: pulling, creating, starting) stays
scheduled however long that takes — the deployment's own deadline bounds it — and one
absent from a report is given :func:`start_grace` from when it was sent to show up.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from runtime_agent import protocol
from tenants import services as tenant_services
from tenants.services import Actor
from workloads.choices import ContainerState, DesiredState, NodeState
from workloads.models import Container, Node
from workloads.services import dispatch, nodes

SYSTEM = Actor.for_system("reconciler")


def start_grace() -> timedelta:
    """How long a container sent to a node may be absent from its full reports before it
    is presumed lost in transit (``BERTH_START_GRACE_SECONDS``, 20 s): the time for the
    apply to reach the node and the node to acknowledge it."""
    return timedelta(seconds=getattr(settings, "BERTH_START_GRACE_SECONDS", 20))


def _when(value: str | None) -> datetime | None:
    return parse_datetime(value) if value else None


def finish_container(container: Container, *, state: str = ContainerState.REMOVED) -> None:
    """The container is gone for good: record it and release its quota, exactly once."""
    updates = {"state": state, "finished_at": container.finished_at or timezone.now()}
    Container.objects.filter(pk=container.pk).update(**updates, reservation=None)
    for key, value in updates.items():
        setattr(container, key, value)
    if container.reservation_id is not None:
        tenant_services.release(container.reservation_id, actor=SYSTEM, reason="container gone")
        container.reservation_id = None


def _restart_delay(container: Container) -> timedelta:
    """Exponential back-off like docker's: 1 s, 2 s, 4 s … capped at 60 s."""
    return timedelta(seconds=min(60, 2 ** min(container.restart_count, 6)))


def _wants_restart(container: Container) -> bool:
    if container.desired_state != DesiredState.RUNNING or container.service_id is None:
        return False
    policy = container.service.restart_policy if container.service else "no"
    if policy in ("always", "unless-stopped"):
        return True
    return policy == "on-failure" and (container.exit_code or 0) != 0


def apply_report(container: Container, report: protocol.ContainerReport) -> None:
    """Move ``container`` to the state its node reports."""
    from workloads.services import jobs

    now = timezone.now()
    container.last_reported_at = now
    if report.state == "missing":
        if container.desired_state == DesiredState.REMOVED:
            finish_container(container)
            return
        if (
            container.state == ContainerState.SCHEDULED
            and container.scheduled_at
            and (now - container.scheduled_at < start_grace())
        ):
            return  # the apply is probably still on its way
        report = protocol.ContainerReport(
            uid=report.uid,
            tenant=report.tenant,
            name=report.name,
            state="stopped",
            exit_code=None,
            error=report.error or "the container disappeared from its node",
        )
    if report.state == "starting":
        # Acknowledged by the node and under way: not running yet, and not lost.
        container.save(update_fields=["last_reported_at"])
        return
    if report.state in ("running", "paused", "created"):
        if container.desired_state == DesiredState.REMOVED:
            return  # the remove op is on its way
        container.state = ContainerState.RUNNING
        container.started_at = _when(report.started_at) or container.started_at or now
        container.save(update_fields=["state", "started_at", "last_reported_at"])
        if container.job_run_id is not None:
            jobs.run_started(container)
        return
    # stopped (exited), or failed to start
    first_time = container.state not in (ContainerState.EXITED, ContainerState.FAILED)
    container.state = (
        ContainerState.FAILED
        if report.error and report.exit_code is None
        else (ContainerState.EXITED)
    )
    container.exit_code = report.exit_code
    container.oom_killed = report.oom_killed
    container.started_at = _when(report.started_at) or container.started_at
    container.finished_at = _when(report.finished_at) or now
    if report.error:
        container.pending_reason = report.error[:500]
    if first_time and _wants_restart(container):
        container.next_restart_at = now + _restart_delay(container)
    container.save(
        update_fields=[
            "state",
            "exit_code",
            "oom_killed",
            "started_at",
            "finished_at",
            "pending_reason",
            "next_restart_at",
            "last_reported_at",
        ]
    )
    if container.job_run_id is not None and first_time:
        jobs.run_finished(container, cpu_seconds=report.cpu_seconds, memory=report.memory_bytes)
    elif container.desired_state == DesiredState.REMOVED:
        dispatch.send_after_commit(
            container.node,  # type: ignore[arg-type]
            protocol.AGENT_REMOVE_CONTAINER,
            op_id=f"{container.id}:remove-exited",
            tenant=container.tenant.slug,
            name=container.agent_name,
        )


def _meter(
    container: Container, item: protocol.ContainerReport, *, node: Node, at: datetime
) -> None:
    """Hand the container's cgroup readings to usage metering (each reading counted once)."""
    if item.cpu_seconds is None or item.memory_bytes is None:
        return
    from billing.services import record_container_usage

    record_container_usage(
        container.tenant,
        node_id=str(node.pk),
        container_id=str(container.pk),
        at=at,
        cpu_seconds=item.cpu_seconds,
        memory_bytes=item.memory_bytes,
        gpus=container.gpus,
    )


@transaction.atomic
def handle_node_report(report: protocol.NodeReport) -> Node:
    node = nodes.authenticate_node(report.node_id, report.credential)
    # FOR NO KEY UPDATE: a report rewrites the node's columns, never its key, so it must
    # not block rows being inserted that reference the node (a build placed on it meanwhile
    # holds its tenant's lock: with FOR UPDATE here the two deadlocked).
    node = Node.objects.select_for_update(no_key=True).get(pk=node.pk)
    now = timezone.now()
    node.last_heartbeat_at = now
    fields = ["last_heartbeat_at", "last_report"]
    if node.state == NodeState.DOWN:
        node.state = NodeState.READY
        fields.append("state")
        tenant_services.record(
            Actor.for_system(f"node:{node.name}"), "node.ready", tenant=None, target=node
        )
    node.last_report = {
        "sent_at": report.sent_at,
        "containers": len(report.containers),
        "capacity": report.capacity,
    }
    node.save(update_fields=fields)

    by_uid = {c.uid: c for c in report.containers}
    known = {
        str(c.pk): c
        for c in Container.objects.select_for_update(of=("self",))
        .filter(pk__in=list(by_uid))
        .select_related("tenant", "service", "node")
    }
    for uid, item in by_uid.items():
        container = known.get(uid)
        if (
            container is None
            or container.node_id != node.pk
            or container.state in (ContainerState.REMOVED, ContainerState.LOST)
        ):
            dispatch.send_after_commit(
                node,
                protocol.AGENT_REMOVE_CONTAINER,
                op_id=f"orphan:{uid}:{item.name}",
                tenant=item.tenant,
                name=item.name,
            )
            continue
        apply_report(container, item)
        _meter(container, item, node=node, at=_when(report.sent_at) or now)

    if report.full:
        absent = (
            Container.objects.select_for_update(of=("self",))
            .filter(node=node)
            .exclude(pk__in=list(by_uid))
            .exclude(state__in=[ContainerState.REMOVED, ContainerState.LOST])
            .exclude(
                state__in=[ContainerState.EXITED, ContainerState.FAILED], desired_state="running"
            )
            .select_related("tenant", "service", "node")
        )
        for container in absent:
            apply_report(
                container,
                protocol.ContainerReport(
                    uid=str(container.pk),
                    tenant=container.tenant.slug,
                    name=container.agent_name,
                    state="missing",
                ),
            )
    return node
