"""Properties of the scheduler: capacity is never exceeded, constraints hold, replicas spread."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workloads.scheduling import NodeCapacity, PlacementRequest, place

nodes_strategy = st.lists(
    st.builds(
        NodeCapacity,
        id=st.uuids().map(str),
        cpu_millicores=st.integers(0, 8000),
        memory_mib=st.integers(0, 16384),
        gpus=st.integers(0, 2),
        labels=st.dictionaries(st.sampled_from(["zone", "disk"]), st.sampled_from(["a", "b"])),
        ready=st.booleans(),
    ),
    max_size=12,
    unique_by=lambda n: n.id,
)


@st.composite
def requests_strategy(draw: st.DrawFn) -> list[PlacementRequest]:
    requests = []
    for g in range(draw(st.integers(0, 5))):
        cpu = draw(st.integers(0, 3000))
        memory = draw(st.integers(0, 4096))
        gpus = draw(st.integers(0, 1))
        constraints = draw(
            st.dictionaries(st.sampled_from(["zone", "disk"]), st.sampled_from(["a", "b"]))
        )
        for r in range(draw(st.integers(1, 8))):
            requests.append(PlacementRequest(f"g{g}-r{r}", f"g{g}", cpu, memory, gpus, constraints))
    return requests


@settings(max_examples=300, deadline=None)
@given(nodes=nodes_strategy, requests=requests_strategy())
def test_placement_never_overcommits_and_honours_constraints(
    nodes: list[NodeCapacity], requests: list[PlacementRequest]
) -> None:
    result = place(requests, nodes)
    by_key = {r.key: r for r in requests}
    by_id = {n.id: n for n in nodes}

    # Every request is either placed or explained, never both.
    assert set(result.assignments) | set(result.unplaced) == set(by_key)
    assert not set(result.assignments) & set(result.unplaced)
    assert all(reason for reason in result.unplaced.values())

    used: dict[str, list[int]] = {n.id: [0, 0, 0] for n in nodes}
    for key, node_id in result.assignments.items():
        request, node = by_key[key], by_id[node_id]
        assert node.ready
        assert all(node.labels.get(k) == v for k, v in request.constraints.items())
        used[node_id][0] += request.cpu_millicores
        used[node_id][1] += request.memory_mib
        used[node_id][2] += request.gpus
    for node_id, (cpu, memory, gpus) in used.items():
        node = by_id[node_id]
        assert cpu <= node.cpu_millicores
        assert memory <= node.memory_mib
        assert gpus <= node.gpus


@settings(max_examples=100, deadline=None)
@given(node_count=st.integers(1, 10), replicas=st.integers(1, 40))
def test_replicas_spread_evenly_when_capacity_is_ample(node_count: int, replicas: int) -> None:
    nodes = [NodeCapacity(f"n{i}", 100_000, 100_000) for i in range(node_count)]
    requests = [PlacementRequest(f"r{i}", "web", 100, 64) for i in range(replicas)]
    result = place(requests, nodes)
    assert not result.unplaced
    counts = Counter(result.assignments.values())
    per_node = [counts.get(n.id, 0) for n in nodes]
    assert max(per_node) - min(per_node) <= 1


def test_new_replicas_spread_around_existing_ones() -> None:
    nodes = [
        NodeCapacity("n1", 4000, 4096, group_counts={"web": 2}),
        NodeCapacity("n2", 4000, 4096),
    ]
    requests = [PlacementRequest(f"r{i}", "web", 100, 64) for i in range(2)]
    assert place(requests, nodes).assignments == {"r0": "n2", "r1": "n2"}


def test_two_replicas_land_on_two_nodes() -> None:
    nodes = [NodeCapacity("n1", 4000, 4096), NodeCapacity("n2", 4000, 4096)]
    requests = [PlacementRequest("a", "svc", 500, 256), PlacementRequest("b", "svc", 500, 256)]
    assert sorted(place(requests, nodes).assignments.values()) == ["n1", "n2"]


def test_unplaceable_request_says_which_resource_is_short() -> None:
    nodes = [NodeCapacity("n1", 1000, 512), NodeCapacity("n2", 2000, 256)]
    result = place([PlacementRequest("big", "svc", 500, 1024)], nodes)
    assert result.assignments == {}
    assert "memory: needs 1024 MiB, most free on a node is 512 MiB" in result.unplaced["big"]


def test_unmatched_constraint_is_named() -> None:
    nodes = [NodeCapacity("n1", 1000, 512, labels={"zone": "a"})]
    result = place([PlacementRequest("x", "svc", 1, 1, constraints={"zone": "b"})], nodes)
    assert result.unplaced == {"x": "no ready node has the labels zone=b"}


def test_gpu_work_goes_to_gpu_nodes_and_other_work_avoids_them() -> None:
    nodes = [NodeCapacity("gpu", 8000, 8192, gpus=1), NodeCapacity("cpu", 8000, 8192)]
    result = place(
        [PlacementRequest("train", "ml", 1000, 1024, gpus=1), PlacementRequest("w", "web", 1, 1)],
        nodes,
    )
    assert result.assignments == {"train": "gpu", "w": "cpu"}


def test_nodes_not_ready_get_nothing() -> None:
    nodes = [NodeCapacity("down", 8000, 8192, ready=False)]
    result = place([PlacementRequest("x", "svc", 1, 1)], nodes)
    assert "x" in result.unplaced


def test_negative_request_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        place([PlacementRequest("x", "svc", -1, 1)], [NodeCapacity("n", 1, 1)])
