"""Placement and exposure (#17 item 10), as a hostile tenant tries them through the API:

- a scheduling constraint on a platform label (``berth.node.id`` and other spellings)
  would put the attacker's container on the victim's node: refused, in every spelling, on
  create and on deploy, and a spec stored before the rule is never placed by it;
- publishing a privileged host port or one of the node's own service ports: refused;
- two replicas (any tenants') that need the same host port never share a node: the one
  that does not fit stays pending with the reason in the API, and a second node takes it;
- a host port the node cannot give (a process holds it) fails the start on a real agent,
  and the agent's error becomes the container's reason in the API (not "disappeared").
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tenants.choices import Scope
from workloads.models import Container, Node, Service
from workloads.scheduling import NodeCapacity, PlacementRequest, place
from workloads.services import nodes, placement

V1 = "/api/v1/tenants"


def make_node(name: str) -> tuple[Node, str]:
    from tests.control.conftest import SYSTEM

    _, token = nodes.create_join_token(actor=SYSTEM)
    return nodes.join_node(
        token,
        name=name,
        capacity={"cpu_millicores": 8000, "memory_mib": 16384, "disk_gib": 10, "gpus": 0},
        labels={"zone": "eu"},
    )


@pytest.fixture
def tenants(
    make_tenant: Callable[..., Any], make_token: Callable[..., str], client_for: Callable[..., Any]
) -> dict[str, Any]:
    """Two tenants' write clients: the attacker and the victim."""
    clients = {}
    for slug in ("attacker", "victim"):
        tenant, owner = make_tenant(slug)
        clients[slug] = client_for(make_token(tenant, owner, Scope.WRITE))
    return clients


def service(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": "busybox", "command": ["sleep", "1000"], **extra}


def create(client: Any, tenant: str, body: dict[str, Any]) -> Any:
    return client.post(f"{V1}/{tenant}/services/", body, format="json")


def containers(client: Any, tenant: str, name: str) -> list[dict[str, Any]]:
    response = client.get(f"{V1}/{tenant}/services/{name}/")
    assert response.status_code == 200, response.content
    return list(response.json()["containers"])


# --------------------------------------------------------------------------- constraints

PLATFORM_SPELLINGS = [
    "berth.node.id",
    "BERTH.node.id",
    "Berth.Node.Id",
    " berth.node.id",
    "berth.node.id ",
    "berth.hostname",
    "berth.",
]


@pytest.mark.django_db
def test_constraints_on_platform_labels_are_refused(tenants: dict[str, Any]) -> None:
    attacker = tenants["attacker"]
    victim_node, _ = make_node("victim-node")
    for label in PLATFORM_SPELLINGS:
        body = service("near-victim", constraints={label: str(victim_node.pk)})
        response = create(attacker, "attacker", body)
        assert response.status_code == 400, (label, response.content)
        error = response.json()["error"]
        assert "platform labels" in error["message"] and error["details"]["labels"] == [label]
    assert not Service.objects.filter(name="near-victim").exists()
    assert not Container.objects.exists()

    # Positive control: an operator's label is a fine constraint ...
    ok = create(attacker, "attacker", service("web", constraints={"zone": "eu"}))
    assert ok.status_code == 201, ok.content
    # ... and a deploy cannot add a platform label afterwards.
    for label in ("berth.node.id", "BERTH.NODE.ID"):
        deploy = attacker.patch(
            f"{V1}/attacker/services/web/",
            {"constraints": {label: str(victim_node.pk)}},
            format="json",
        )
        assert deploy.status_code == 400, deploy.content
    assert Service.objects.get(name="web").constraints == {"zone": "eu"}


@pytest.mark.django_db
def test_a_stored_platform_constraint_is_never_placed_by(tenants: dict[str, Any]) -> None:
    """A spec saved before the rule (or by any other path) keeps its container pending."""
    attacker = tenants["attacker"]
    victim_node, _ = make_node("victim-node")
    assert create(attacker, "attacker", service("legacy")).status_code == 201
    container = Container.objects.get(service__name="legacy")
    container.spec = {**container.spec, "constraints": {"berth.node.id": str(victim_node.pk)}}
    container.save(update_fields=["spec"])

    assert placement.schedule_pending() == 0
    (shown,) = containers(attacker, "attacker", "legacy")
    assert shown["state"] == "pending" and shown["node"] is None
    assert "berth.node.id" in shown["pending_reason"]


# --------------------------------------------------------------------------- host ports

REFUSED_PORTS = [
    (1, "tcp"),
    (22, "tcp"),  # SSH
    (53, "udp"),
    (80, "tcp"),
    (443, "tcp"),
    (1023, "tcp"),
    (2019, "tcp"),  # the edge's admin API
    (5000, "tcp"),  # the registry
    (5432, "tcp"),  # Postgres
    (6379, "tcp"),  # Redis
    (8000, "tcp"),  # the control plane
    (8443, "udp"),  # the edge, any protocol
]


@pytest.mark.django_db
def test_privileged_and_node_service_ports_cannot_be_published(tenants: dict[str, Any]) -> None:
    attacker = tenants["attacker"]
    for port, proto in REFUSED_PORTS:
        ports = [{"container_port": 80, "host_port": port, "protocol": proto}]
        response = create(attacker, "attacker", service("grab", ports=ports))
        assert response.status_code == 400, (port, response.content)
        error = response.json()["error"]
        assert error["code"] == "host_port_not_allowed", (port, error)
        assert error["details"]["host_port"] == port
    twice = [{"container_port": 80, "host_port": 18080}, {"container_port": 81, "host_port": 18080}]
    assert create(attacker, "attacker", service("grab", ports=twice)).status_code == 400
    assert not Service.objects.filter(name="grab").exists()

    # Positive controls: an unprivileged free port, an ephemeral one, and the same number
    # on tcp and udp.
    fine = [
        {"container_port": 80, "host_port": 18080},
        {"container_port": 80, "host_port": 18080, "protocol": "udp"},
        {"container_port": 81, "host_port": 0},
    ]
    assert create(attacker, "attacker", service("web", ports=fine)).status_code == 201
    # A deploy cannot move to a refused port either.
    deploy = attacker.patch(
        f"{V1}/attacker/services/web/",
        {"ports": [{"container_port": 80, "host_port": 22}]},
        format="json",
    )
    assert deploy.status_code == 400
    assert deploy.json()["error"]["code"] == "host_port_not_allowed"


@pytest.mark.django_db
def test_replicas_needing_one_host_port_never_share_a_node(tenants: dict[str, Any]) -> None:
    """Issue #20's scenario: 2 replicas publishing 18080 on a one-node cluster."""
    attacker, victim = tenants["attacker"], tenants["victim"]
    make_node("n1")
    ports = [{"container_port": 8080, "host_port": 18080}]
    assert create(victim, "victim", service("web", replicas=2, ports=ports)).status_code == 201
    assert placement.schedule_pending() == 1
    waiting, placed = sorted(containers(victim, "victim", "web"), key=lambda c: c["state"])
    assert (placed["state"], placed["node"]) == ("scheduled", "n1")
    assert waiting["state"] == "pending" and waiting["node"] is None
    assert "host port 18080/tcp is already published" in waiting["pending_reason"]

    # Another tenant asking for the same host port waits too (ports are per node) ...
    assert create(attacker, "attacker", service("squat", ports=ports)).status_code == 201
    # ... while another port, or the same number over udp, is placed (positive control).
    udp = [{"container_port": 8080, "host_port": 18080, "protocol": "udp"}]
    assert create(attacker, "attacker", service("other", ports=udp)).status_code == 201
    assert placement.schedule_pending() == 1
    (squat,) = containers(attacker, "attacker", "squat")
    assert squat["state"] == "pending" and "18080/tcp" in squat["pending_reason"]
    assert containers(attacker, "attacker", "other")[0]["node"] == "n1"

    # A second node: one of the waiting replicas goes there, never next to a holder.
    make_node("n2")
    assert placement.schedule_pending() == 1
    by_node: dict[str, list[str]] = {}
    for container in Container.objects.filter(service__name__in=["web", "squat"]):
        node = container.node.name if container.node else "(pending)"
        by_node.setdefault(node, []).append(container.service.name)  # type: ignore[union-attr]
    assert sorted(by_node) == ["(pending)", "n1", "n2"]
    assert len(by_node["n1"]) == len(by_node["n2"]) == len(by_node["(pending)"]) == 1


@hypothesis_settings(max_examples=200, deadline=None)
@given(
    used=st.lists(
        st.frozensets(st.sampled_from([(1, "tcp"), (2, "tcp"), (2, "udp")])),
        min_size=1,
        max_size=4,
    ),
    groups=st.lists(
        st.tuples(
            st.integers(1, 4),
            st.frozensets(st.sampled_from([(1, "tcp"), (2, "tcp"), (2, "udp"), (3, "tcp")])),
        ),
        max_size=5,
    ),
)
def test_the_scheduler_never_gives_one_host_port_twice_on_a_node(
    used: list[frozenset[tuple[int, str]]], groups: list[tuple[int, frozenset[tuple[int, str]]]]
) -> None:
    nodes_ = [
        NodeCapacity(id=f"n{i}", cpu_millicores=10_000, memory_mib=10_000, host_ports=ports)
        for i, ports in enumerate(used)
    ]
    requests = [
        PlacementRequest(f"g{g}-r{r}", f"g{g}", 10, 10, host_ports=ports)
        for g, (count, ports) in enumerate(groups)
        for r in range(count)
    ]
    result = place(requests, nodes_)
    by_key = {r.key: r for r in requests}
    taken = {n.id: set(n.host_ports) for n in nodes_}
    for key, node_id in result.assignments.items():
        wanted = by_key[key].host_ports
        assert taken[node_id].isdisjoint(wanted), (key, node_id)
        taken[node_id] |= wanted
    assert set(result.assignments) | set(result.unplaced) == set(by_key)
    for key, reason in result.unplaced.items():
        # Resources are ample: only a port can keep a request out, and that is said.
        assert "host port" in reason, reason
        assert all(not taken[n.id].isdisjoint(by_key[key].host_ports) for n in nodes_)


# --------------------------------------------------------------------------- the agent


@pytest.fixture
def held_port() -> Iterator[int]:
    """A free unprivileged host port that some other process on the node holds."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", 0))  # noqa: S104 - held on every address, as a daemon would
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.mark.privileged
@pytest.mark.django_db
def test_a_port_the_node_cannot_give_is_the_containers_reason(
    tenants: dict[str, Any], agent: Any, held_port: int
) -> None:
    from config.celery import app as control_app
    from runtime_agent.images.bootstrap import bootstrap_busybox
    from runtime_agent.node import NodeIdentity
    from runtime_agent.worker import NodeWorker
    from workloads.services import reports

    victim = tenants["victim"]
    node, credential = make_node("n1")
    ports = [{"container_port": 8080, "host_port": held_port}]
    assert create(victim, "victim", service("web", ports=ports)).status_code == 201
    assert placement.schedule_pending() == 1
    container = Container.objects.get(service__name="web")

    bootstrap_busybox(agent)
    identity = NodeIdentity(
        node_id=str(node.pk),
        credential=credential,
        broker_url=settings.REDIS_URL,
        control_url="http://127.0.0.1:1",
        queue=node.queue,
    )
    worker = NodeWorker(agent, identity)
    # Its Celery app made itself the current one: give that back to the control plane's
    # (its tasks would be sent to this node's app otherwise, in later tests too).
    control_app.set_current()
    # What the control plane sends, run as the node's task runs it.
    task = worker.app.tasks["berth.agent.apply_container"]
    result = task(op_id=placement.apply_op_id(container), spec=placement.agent_spec(container))
    assert "error" in result, result
    reports.handle_node_report(worker.build_report())
    (shown,) = containers(victim, "victim", "web")
    assert shown["state"] == "failed", shown
    assert f"port {held_port}/tcp is already in use" in shown["pending_reason"]
    assert "disappeared" not in shown["pending_reason"]
    # The next report still says why (the failure is kept until a retry or removal).
    reports.handle_node_report(worker.build_report())
    assert "already in use" in containers(victim, "victim", "web")[0]["pending_reason"]
