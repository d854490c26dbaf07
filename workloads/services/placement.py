"""From pending containers to operations on nodes: placement, specs, apply.

``schedule_pending`` is the only place that assigns containers to nodes. It locks the
ready nodes' rows first, so two schedulers (the reconciler's beat and an on-demand task)
never hand out the same free capacity twice.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from django.db import transaction
from django.db.models import Count, Sum
from django.utils import timezone

from runtime_agent import protocol
from workloads.choices import ContainerState, DesiredState, NodeState
from workloads.models import Container, Node
from workloads.scheduling import (
    HostPort,
    NodeCapacity,
    PlacementRequest,
    is_platform_label,
    place,
)
from workloads.services import dispatch, storage
from workloads.services.storage import NODE_ID_LABEL

#: States in which a container holds capacity on its node.
HOLDS_CAPACITY = (ContainerState.SCHEDULED, ContainerState.RUNNING, ContainerState.EXITED)


def agent_spec(container: Container) -> dict[str, Any]:
    """The ContainerSpec payload for the node. Service secrets are not in it (the broker
    is no place for them): ``secrets_from`` names the container, whose node fetches them
    over HTTP with its credential when it creates it (``nodes.container_secrets``)."""
    spec = dict(container.spec)
    secrets_token = spec.pop("secrets_encrypted", "")
    spec.pop("constraints", None)
    spec["secrets_from"] = str(container.pk) if secrets_token else None
    # Validate the payload shape here, where a bug is ours, not on the node.
    protocol.from_dict(protocol.ContainerSpec, spec)
    return spec


def apply_op_id(container: Container) -> str:
    return f"{container.id}:apply:{container.generation}:{container.restart_count}"


def send_apply(container: Container) -> None:
    assert container.node is not None
    dispatch.send_after_commit(
        container.node,
        protocol.AGENT_APPLY_CONTAINER,
        op_id=apply_op_id(container),
        spec=agent_spec(container),
    )


def send_remove(container: Container, *, node: Node | None = None) -> None:
    target = node or container.node
    if target is None:
        return
    dispatch.send_after_commit(
        target,
        protocol.AGENT_REMOVE_CONTAINER,
        op_id=f"{container.id}:remove:{container.generation}:{container.restart_count}",
        tenant=container.tenant.slug,
        name=container.agent_name,
    )


def host_ports(spec: dict[str, Any]) -> frozenset[HostPort]:
    """The fixed host ports a container spec publishes (port 0, ephemeral, is not one)."""
    return frozenset(
        (int(p["host_port"]), str(p.get("protocol") or "tcp"))
        for p in spec.get("ports") or []
        if p.get("host_port")
    )


def _capacities(nodes: list[Node]) -> list[NodeCapacity]:
    used: dict[Any, dict[str, int]] = defaultdict(lambda: {"cpu": 0, "mem": 0, "gpus": 0})
    for row in (
        Container.objects.filter(node__in=nodes, state__in=HOLDS_CAPACITY)
        .values("node_id")
        .annotate(cpu=Sum("cpu_millicores"), mem=Sum("memory_mib"), gpus=Sum("gpus"))
    ):
        used[row["node_id"]] = {"cpu": row["cpu"], "mem": row["mem"], "gpus": row["gpus"]}
    groups: dict[Any, dict[str, int]] = defaultdict(dict)
    for group_row in (
        Container.objects.filter(node__in=nodes, state__in=HOLDS_CAPACITY, service__isnull=False)
        .values("node_id", "service_id")
        .annotate(n=Count("id"))
    ):
        groups[group_row["node_id"]][f"svc{group_row['service_id']}"] = group_row["n"]
    ports: dict[Any, set[HostPort]] = defaultdict(set)
    for node_id, spec in Container.objects.filter(
        node__in=nodes, state__in=HOLDS_CAPACITY
    ).values_list("node_id", "spec"):
        ports[node_id].update(host_ports(spec))
    return [
        NodeCapacity(
            id=str(node.pk),
            cpu_millicores=max(0, node.cpu_millicores - used[node.pk]["cpu"]),
            memory_mib=max(0, node.memory_mib - used[node.pk]["mem"]),
            gpus=max(0, node.gpus - used[node.pk]["gpus"]),
            # Every node carries its id as a label, so a constraint on it pins work there
            # (node-local volumes, images built on that node).
            labels={**node.labels, NODE_ID_LABEL: str(node.pk)},
            group_counts=groups[node.pk],
            total_cpu_millicores=node.cpu_millicores,
            total_memory_mib=node.memory_mib,
            host_ports=frozenset(ports[node.pk]),
        )
        for node in nodes
    ]


def _group(container: Container) -> str:
    if container.service_id is not None:
        return f"svc{container.service_id}"
    return f"run{container.pk}"


@transaction.atomic
def schedule_pending(*, limit: int = 1000) -> int:
    """Place pending containers on ready nodes and send them there. Returns how many."""
    nodes = list(
        Node.objects.select_for_update(no_key=True).filter(state=NodeState.READY).order_by("pk")
    )
    pending = list(
        Container.objects.select_for_update(skip_locked=True, of=("self",))
        .filter(state=ContainerState.PENDING, desired_state=DesiredState.RUNNING)
        .select_related("tenant")
        .order_by("created_at")[:limit]
    )
    if not pending:
        return 0
    if not nodes:
        Container.objects.filter(pk__in=[c.pk for c in pending]).update(
            pending_reason="no ready node"
        )
        return 0
    pins = storage.pin_constraints(pending)
    # The API refuses platform labels in a tenant's constraints; a spec stored before
    # that rule is held here, with its reason, rather than placed where it asked.
    for c in pending:
        reserved = sorted(k for k in c.spec.get("constraints") or {} if is_platform_label(k))
        if reserved:
            pins.deferred[str(c.pk)] = (
                f"constraint on {', '.join(reserved)}: labels berth.* are the platform's; "
                "deploy without it"
            )
    requests = [
        PlacementRequest(
            key=str(c.pk),
            group=_group(c),
            cpu_millicores=c.cpu_millicores,
            memory_mib=c.memory_mib,
            gpus=c.gpus,
            constraints={
                **(c.spec.get("constraints") or {}),
                **pins.constraints.get(str(c.pk), {}),
            },
            host_ports=host_ports(c.spec),
        )
        for c in pending
        if str(c.pk) not in pins.deferred
    ]
    result = place(requests, _capacities(nodes))
    pins.explain(result.unplaced)
    result.unplaced.update(pins.deferred)
    if storage.pin_placed(pins, result.assignments) and pins.deferred:
        schedule_soon()  # the containers waiting for those volumes can go now
    by_id = {str(n.pk): n for n in nodes}
    now = timezone.now()
    placed = 0
    for container in pending:
        node_id = result.assignments.get(str(container.pk))
        if node_id is None:
            reason = result.unplaced.get(str(container.pk), "")
            if container.pending_reason != reason:
                Container.objects.filter(pk=container.pk).update(pending_reason=reason[:500])
            continue
        container.node = by_id[node_id]
        container.state = ContainerState.SCHEDULED
        container.scheduled_at = now
        container.pending_reason = ""
        container.save(update_fields=["node", "state", "scheduled_at", "pending_reason"])
        send_apply(container)
        placed += 1
    return placed


def schedule_soon() -> None:
    """Ask the control-plane worker to run the scheduler after this transaction commits."""
    from workloads.tasks import schedule_pending_task

    transaction.on_commit(schedule_pending_task.delay)


def replace_container(container: Container, *, reason: str, node_down: bool) -> Container:
    """Give up on ``container`` where it is and queue a fresh copy for placement.

    The copy inherits the quota reservation, so moving work never needs quota twice and
    never releases it in between.
    """
    replacement = Container(
        tenant=container.tenant,
        service=container.service,
        name=container.name,
        generation=container.generation,
        cpu_millicores=container.cpu_millicores,
        memory_mib=container.memory_mib,
        gpus=container.gpus,
        reservation=container.reservation,
        pending_reason=reason,
    )
    # Same spec, but its own identity on the node: a name and uid label of its own, so
    # reports about the old copy (if its node comes back) never pass for the new one.
    spec = dict(container.spec)
    spec["name"] = replacement.agent_name
    spec["labels"] = {**spec.get("labels", {}), protocol.CONTAINER_UID_LABEL: str(replacement.id)}
    replacement.spec = spec
    replacement.save()
    old_node = container.node
    container.reservation = None
    container.desired_state = DesiredState.REMOVED
    if node_down:
        container.state = ContainerState.LOST
        container.finished_at = timezone.now()
    container.save(update_fields=["reservation", "desired_state", "state", "finished_at"])
    if not node_down:
        send_remove(container, node=old_node)
    schedule_soon()
    return replacement
