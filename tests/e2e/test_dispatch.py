"""From the REST API to running containers on two real agents, and back."""

from __future__ import annotations

import time
from typing import Any

import pytest
from rest_framework.test import APIClient

from tenants.choices import Scope
from tenants.services import Actor, create_api_token, create_tenant
from tests.e2e.conftest import Cluster, agent_api, wait_for
from workloads.models import Container, JobRun

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(600)]


def _client(slug: str, *, plan: str = "team", seats: int = 5) -> APIClient:
    tenant, owner = create_tenant(
        slug=slug,
        owner_email=f"owner@{slug}.example",
        plan_code=plan,
        seats=seats,
        actor=Actor.for_system("e2e"),
    )
    _, secret = create_api_token(
        tenant, owner, name="ci", scope=Scope.WRITE, actor=Actor.for_system("e2e")
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def _service(client: APIClient, slug: str, name: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/tenants/{slug}/services/{name}/")
    assert response.status_code == 200, response.content
    return response.json()


def _running_nodes(client: APIClient, slug: str, name: str) -> list[str] | None:
    body = _service(client, slug, name)
    live = [c for c in body["containers"] if c["desired_state"] == "running"]
    if len(live) == body["replicas"] and all(c["state"] == "running" for c in live):
        return sorted(c["node"] for c in live)
    return None


def test_service_jobs_failover_and_rollback_across_two_agents(cluster: Cluster) -> None:
    client = _client("e2e")
    created = client.post(
        "/api/v1/tenants/e2e/services/",
        {
            "name": "web",
            "image": "busybox",
            "command": ["sh", "-c", "echo hello from $HOSTNAME; exec sleep 100000"],
            "replicas": 2,
            "cpu_millicores": 500,
            "memory_mib": 48,
            "restart_policy": "always",
        },
        format="json",
    )
    assert created.status_code == 201, created.content

    # Two replicas, one on each node, running.
    try:
        nodes = wait_for(
            lambda: _running_nodes(client, "e2e", "web"), timeout=60, what="2 replicas"
        )
    except AssertionError:
        raise AssertionError(f"replicas not running: {_service(client, 'e2e', 'web')}") from None
    assert nodes == ["n1", "n2"]

    # Running with the requested limits: the node's cgroup says so.
    stats = client.get("/api/v1/tenants/e2e/services/web/stats/").json()["containers"]
    assert len(stats) == 2
    for entry in stats:
        assert entry["memory_limit_bytes"] == 48 * 1024 * 1024

    # Logs come back through the API.
    logs = wait_for(
        lambda: [
            line
            for line in client.get("/api/v1/tenants/e2e/services/web/logs/").json()["lines"]
            if "hello from web" in line["line"]
        ],
        timeout=20,
        what="the service's logs",
    )
    assert len(logs) == 2

    # Over quota: refused with the reason, nothing created.
    refused = client.post(
        "/api/v1/tenants/e2e/services/",
        {"name": "huge", "image": "busybox", "replicas": 100, "memory_mib": 4096},
        format="json",
    )
    assert refused.status_code == 409
    assert refused.json()["error"]["details"]["quota"] in ("memory_mib", "containers")

    # A job array of 10 with parallelism 3: never more than 3 at once, all 10 finish.
    submitted = client.post(
        "/api/v1/tenants/e2e/jobs/",
        {
            "name": "arr",
            "image": "busybox",
            "command": ["sh", "-c", "sleep 1; echo $BERTH_JOB_INDEX"],
            "array_size": 10,
            "parallelism": 3,
            "cpu_millicores": 100,
            "memory_mib": 16,
        },
        format="json",
    )
    assert submitted.status_code == 201, submitted.content
    job_id = submitted.json()["id"]
    peak = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        peak = max(peak, JobRun.objects.filter(job_id=job_id, state="running").count())
        assert peak <= 3
        state = client.get(f"/api/v1/tenants/e2e/jobs/{job_id}/").json()["state"]
        if state in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert state == "succeeded"
    runs = client.get(f"/api/v1/tenants/e2e/jobs/{job_id}/runs/").json()
    assert sorted(r["index"] for r in runs) == list(range(10))
    assert all(r["exit_code"] == 0 for r in runs)
    # Each run sleeps 1 s. The node stamps the start once `runc start` has returned, which
    # on a loaded machine can be a few hundred milliseconds after the process began.
    odd = [r for r in runs if not r["duration_seconds"] or not 0.5 < r["duration_seconds"] < 30]
    assert not odd, [(r["started_at"], r["finished_at"], r["duration_seconds"]) for r in odd]
    # Measured overlap of the runs' real start/end times never exceeded the parallelism.
    events = sorted(
        [(r["started_at"], 1) for r in runs] + [(r["finished_at"], -1) for r in runs],
        key=lambda e: (e[0], e[1]),
    )
    overlap = max_overlap = 0
    for _, delta in events:
        overlap += delta
        max_overlap = max(max_overlap, overlap)
    assert max_overlap <= 3
    log = wait_for(
        lambda: client.get(f"/api/v1/tenants/e2e/jobs/{job_id}/logs/?index=7").json().get("log"),
        timeout=20,
        what="run 7's log",
    )
    assert log.strip() == "7"

    # A deploy whose health check fails rolls back; the old replicas keep serving.
    deploy = client.patch(
        "/api/v1/tenants/e2e/services/web/",
        {"image": "busybox", "health_check": {"test": ["false"], "retries": 1}},
        format="json",
    )
    assert deploy.status_code == 202, deploy.content
    latest = wait_for(
        lambda: (
            (d := _service(client, "e2e", "web")["latest_deployment"])["state"] != "in_progress"
            and d
        ),
        timeout=90,
        what="the deployment to finish",
    )
    assert latest["state"] == "rolled_back", latest
    assert "health check" in latest["reason"]
    assert _service(client, "e2e", "web")["generation"] == 1
    wait_for(
        lambda: _running_nodes(client, "e2e", "web") == ["n1", "n2"],
        timeout=60,
        what="the old generation to be the only one left",
    )

    # Kill one agent: its replica moves to the other node within the timeout.
    cluster.agent_named("n1").kill()
    started = time.monotonic()
    try:
        nodes = wait_for(
            lambda: _running_nodes(client, "e2e", "web") == ["n2", "n2"] and ["n2", "n2"],
            timeout=60,
            what="the replica of the dead node to run on n2",
        )
    except AssertionError:
        raise AssertionError(f"not moved: {_service(client, 'e2e', 'web')}") from None
    assert nodes == ["n2", "n2"]
    assert time.monotonic() - started < 30
    # The moved replica really runs on n2's agent.
    on_n2 = [
        c
        for c in agent_api(cluster.agent_named("n2")).containers.list_all()
        if c.tenant == "e2e" and c.name.startswith("web-")
    ]
    assert len([c for c in on_n2 if c.state == "running"]) == 2
    lost = Container.objects.filter(tenant__slug="e2e", state="lost").select_related("node")
    assert lost and {c.node and c.node.name for c in lost} == {"n1"}
