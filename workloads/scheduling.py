"""Placement of containers on nodes: a pure function, no database, no I/O.

``place(requests, nodes)`` decides, for each requested container, which node runs it:

1. *Filter*: the node is ready, carries every label the request's constraints ask for,
   has the free CPU, memory and GPUs the request needs, and none of the fixed host ports
   the request publishes is taken there (a host port exists once per node: two replicas
   that publish the same one never share a node, whoever's they are).
2. *Score*: among eligible nodes, prefer the one holding the fewest containers of the same
   group (a service's replicas spread across nodes), then one without GPUs for a request
   that needs none (GPU nodes stay free for GPU work), then the least allocated node.

Requests of one group have the same size, so they are placed together from one heap of
that group's eligible nodes: a node that can't fit the next replica can't fit any later
one and simply drops out. That keeps 10,000 placements on 1,000 nodes well under a second.

A request no node can take is returned in ``unplaced`` with the reason a user can act on
(which resource ran short, or which constraint matched no node); it is never half-placed.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

#: Node labels under this prefix are the platform's (``berth.node.id``, which every node
#: carries implicitly): the scheduler sets constraints on them to keep node-local things
#: together; a tenant may not (one could co-locate with a victim's container).
PLATFORM_LABEL_PREFIX = "berth."


def is_platform_label(key: str) -> bool:
    """Whether ``key`` names a platform label, in any case or with surrounding spaces."""
    return key.strip().lower().startswith(PLATFORM_LABEL_PREFIX)


#: A host port a container publishes: (port, "tcp" | "udp"). Port 0 (ephemeral) never
#: conflicts and is not listed.
HostPort = tuple[int, str]


@dataclass(frozen=True)
class NodeCapacity:
    """A node as the scheduler sees it: what is free now, and its labels."""

    id: str
    cpu_millicores: int  # free
    memory_mib: int  # free
    gpus: int = 0  # free
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True
    # Containers already on the node per group, so new replicas spread around old ones.
    group_counts: Mapping[str, int] = field(default_factory=dict)
    total_cpu_millicores: int | None = None  # defaults to the free amount
    total_memory_mib: int | None = None
    # Fixed host ports the node's containers already publish.
    host_ports: frozenset[HostPort] = frozenset()


@dataclass(frozen=True)
class PlacementRequest:
    """One container to place. ``group`` is typically the service (or job) it belongs to."""

    key: str
    group: str
    cpu_millicores: int
    memory_mib: int
    gpus: int = 0
    constraints: Mapping[str, str] = field(default_factory=dict)
    host_ports: frozenset[HostPort] = frozenset()


@dataclass
class Placement:
    assignments: dict[str, str] = field(default_factory=dict)  # request key -> node id
    unplaced: dict[str, str] = field(default_factory=dict)  # request key -> reason


@dataclass
class _NodeState:
    node: NodeCapacity
    cpu: int
    memory: int
    gpus: int
    total_cpu: int
    total_memory: int
    counts: dict[str, int]
    ports: set[HostPort]

    def fits(self, request: PlacementRequest) -> bool:
        return (
            self.cpu >= request.cpu_millicores
            and self.memory >= request.memory_mib
            and self.gpus >= request.gpus
            and self.ports.isdisjoint(request.host_ports)
        )

    def allocated_fraction(self) -> float:
        cpu = 1 - self.cpu / self.total_cpu if self.total_cpu else 1.0
        memory = 1 - self.memory / self.total_memory if self.total_memory else 1.0
        return max(cpu, memory)


def place(requests: Sequence[PlacementRequest], nodes: Iterable[NodeCapacity]) -> Placement:
    """Assign each request to a node, or explain why it can't be placed."""
    states = [
        _NodeState(
            node=node,
            cpu=node.cpu_millicores,
            memory=node.memory_mib,
            gpus=node.gpus,
            total_cpu=node.total_cpu_millicores or node.cpu_millicores,
            total_memory=node.total_memory_mib or node.memory_mib,
            counts=dict(node.group_counts),
            ports=set(node.host_ports),
        )
        for node in nodes
        if node.ready
    ]
    states.sort(key=lambda s: s.node.id)  # deterministic tie-breaking

    groups: dict[tuple[object, ...], list[PlacementRequest]] = defaultdict(list)
    for request in requests:
        _validate(request)
        signature = (
            request.group,
            request.cpu_millicores,
            request.memory_mib,
            request.gpus,
            tuple(sorted(request.constraints.items())),
            tuple(sorted(request.host_ports)),
        )
        groups[signature].append(request)

    placement = Placement()
    # Biggest requests first: they are the hardest to fit once the fleet fills up.
    ordered = sorted(
        groups.values(),
        key=lambda g: (-g[0].gpus, -g[0].cpu_millicores, -g[0].memory_mib, g[0].group),
    )
    by_labels: dict[tuple[tuple[str, str], ...], list[_NodeState]] = {}
    for group_requests in ordered:
        constraints = tuple(sorted(group_requests[0].constraints.items()))
        if constraints not in by_labels:
            by_labels[constraints] = [
                s for s in states if all(s.node.labels.get(k) == v for k, v in constraints)
            ]
        _place_group(group_requests, by_labels[constraints], placement)
    return placement


def _validate(request: PlacementRequest) -> None:
    if request.cpu_millicores < 0 or request.memory_mib < 0 or request.gpus < 0:
        raise ValueError(f"request {request.key} asks for a negative amount of a resource")


def _place_group(
    requests: list[PlacementRequest], labelled: list[_NodeState], placement: Placement
) -> None:
    """Place one group of identical requests on the nodes that carry its labels."""
    sample = requests[0]
    if not labelled:
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(sample.constraints.items()))
        reason = f"no ready node has the labels {wanted}" if wanted else "no ready node"
        for request in requests:
            placement.unplaced[request.key] = reason
        return

    group = sample.group
    avoid_gpu_nodes = sample.gpus == 0
    heap = [
        _entry(state, group, avoid_gpu_nodes, index)
        for index, state in enumerate(labelled)
        if state.fits(sample)
    ]
    heapq.heapify(heap)

    for request in requests:
        if not heap:
            placement.unplaced[request.key] = _shortage_reason(request, labelled)
            continue
        _, _, _, index, state = heapq.heappop(heap)
        state.cpu -= request.cpu_millicores
        state.memory -= request.memory_mib
        state.gpus -= request.gpus
        state.counts[group] = state.counts.get(group, 0) + 1
        state.ports.update(request.host_ports)
        placement.assignments[request.key] = state.node.id
        if state.fits(sample):
            heapq.heappush(heap, _entry(state, group, avoid_gpu_nodes, index))


def _entry(
    state: _NodeState, group: str, avoid_gpu_nodes: bool, index: int
) -> tuple[int, int, float, int, _NodeState]:
    gpu_penalty = 1 if avoid_gpu_nodes and state.gpus > 0 else 0
    return (state.counts.get(group, 0), gpu_penalty, state.allocated_fraction(), index, state)


def _shortage_reason(request: PlacementRequest, candidates: list[_NodeState]) -> str:
    """Say which resource ran short, comparing with the roomiest candidate node."""
    roomy = [
        s
        for s in candidates
        if s.cpu >= request.cpu_millicores
        and s.memory >= request.memory_mib
        and s.gpus >= request.gpus
    ]
    if roomy:  # room enough, but every such node already publishes a port it needs
        taken = sorted(set().union(*(s.ports & request.host_ports for s in roomy)))
        ports = ", ".join(f"{port}/{proto}" for port, proto in taken)
        return (
            f"host port {ports} is already published on every node that could run it "
            f"({len(roomy)} node(s)); use fewer replicas, another host port, or port 0"
        )
    short = []
    if max(s.cpu for s in candidates) < request.cpu_millicores:
        short.append(
            f"cpu: needs {request.cpu_millicores}m, most free on a node is "
            f"{max(s.cpu for s in candidates)}m"
        )
    if max(s.memory for s in candidates) < request.memory_mib:
        short.append(
            f"memory: needs {request.memory_mib} MiB, most free on a node is "
            f"{max(s.memory for s in candidates)} MiB"
        )
    if request.gpus and max(s.gpus for s in candidates) < request.gpus:
        short.append(
            f"gpus: needs {request.gpus}, most free on a node is {max(s.gpus for s in candidates)}"
        )
    if not short:
        short.append("no single node has enough cpu, memory and gpus free at once")
    return "insufficient capacity (" + "; ".join(short) + ")"
