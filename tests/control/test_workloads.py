"""Workloads on the control plane with real Postgres and Redis (no agents here: what the
nodes would receive is read from their real Redis queues; what they report is fed in as
the reports they send). End-to-end runs with real agents live in tests/e2e."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from runtime_agent import protocol
from tenants.choices import Role, Scope
from tenants.errors import Conflict
from tenants.models import QuotaUsage, Tenant, User
from tenants.services import Actor
from workloads.choices import ContainerState, DeploymentState, RunState
from workloads.models import BatchJob, Container, JobRun, Node
from workloads.services import deploy, jobs, nodes, placement, reconcile, reports

SYSTEM = Actor.for_system("tests")


@pytest.fixture
def broker() -> redis.Redis:
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    return client


def queued(broker: redis.Redis, node: Node) -> list[dict[str, Any]]:
    """The operations waiting in a node's real Celery queue (kombu's Redis layout)."""
    messages = []
    for raw in broker.lrange(node.queue, 0, -1):
        envelope = json.loads(raw)
        body = json.loads(__import__("base64").b64decode(envelope["body"]))
        messages.append({"task": envelope["headers"]["task"], "kwargs": body[1]})
    return messages


def make_node(name: str, *, cpu: int = 4000, memory: int = 8192) -> tuple[Node, str]:
    _, token = nodes.create_join_token(actor=SYSTEM)
    return nodes.join_node(
        token,
        name=name,
        capacity={"cpu_millicores": cpu, "memory_mib": memory, "disk_gib": 10, "gpus": 0},
        labels={},
    )


def report(node: Node, credential: str, *items: protocol.ContainerReport) -> None:
    reports.handle_node_report(
        protocol.NodeReport(
            node_id=str(node.pk),
            credential=credential,
            sent_at=timezone.now().isoformat(),
            containers=tuple(items),
        )
    )


def running(container: Container) -> protocol.ContainerReport:
    return protocol.ContainerReport(
        uid=str(container.pk),
        tenant=container.tenant.slug,
        name=container.agent_name,
        state="running",
        started_at=timezone.now().isoformat(),
    )


def exited(container: Container, code: int, *, oom: bool = False) -> protocol.ContainerReport:
    return protocol.ContainerReport(
        uid=str(container.pk),
        tenant=container.tenant.slug,
        name=container.agent_name,
        state="stopped",
        exit_code=code,
        oom_killed=oom,
        finished_at=timezone.now().isoformat(),
    )


def used(tenant: Tenant, quota: str) -> int:
    row = QuotaUsage.objects.filter(tenant=tenant, quota=quota).first()
    return row.used if row else 0


@pytest.mark.django_db(transaction=True)
def test_two_replicas_land_on_two_nodes_with_their_limits(
    acme: tuple[Tenant, User], broker: redis.Redis
) -> None:
    tenant, _ = acme
    n1, _ = make_node("n1")
    n2, _ = make_node("n2")
    service = deploy.create_service(
        tenant,
        name="web",
        data={
            "image": "busybox",
            "command": ["httpd", "-f"],
            "cpu_millicores": 500,
            "memory_mib": 64,
            "secrets": {"API_KEY": "s3cret"},
        },
        replicas=2,
        actor=SYSTEM,
    )
    assert used(tenant, "containers") == 2
    assert used(tenant, "cpu_millicores") == 1000
    assert placement.schedule_pending() == 2
    containers = list(service.containers.select_related("node"))
    assert {c.node and c.node.name for c in containers} == {"n1", "n2"}
    for node in (n1, n2):
        (op,) = queued(broker, node)
        assert op["task"] == protocol.AGENT_APPLY_CONTAINER
        spec = protocol.from_dict(protocol.ContainerSpec, op["kwargs"]["spec"])
        assert spec.tenant == "acme" and spec.image == "busybox"
        assert spec.limits.cpus == 0.5 and spec.limits.memory_bytes == 64 * 1024 * 1024
        # Secrets stay out of the broker: the node fetches them by container id over HTTP.
        assert "API_KEY" not in spec.env and "s3cret" not in json.dumps(op)
        assert spec.secrets_from in {str(c.pk) for c in containers if c.node == node}
    # ...and never stored in clear text.
    assert "s3cret" not in json.dumps([c.spec for c in containers])
    assert "s3cret" not in service.secrets_encrypted


@pytest.mark.django_db(transaction=True)
def test_over_quota_service_is_refused_naming_the_quota_and_creates_nothing(
    make_tenant: Callable[..., tuple[Tenant, User]],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
) -> None:
    tenant, owner = make_tenant("tiny", plan="free", seats=1)
    client = client_for(make_token(tenant, owner, Scope.WRITE))
    limit = tenant.quota_limits()["memory_mib"]
    response = client.post(
        "/api/v1/tenants/tiny/services/",
        {"name": "big", "image": "busybox", "memory_mib": limit, "replicas": 2},
        format="json",
    )
    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert error["details"]["quota"] == "memory_mib"
    assert error["details"]["limit"] == limit
    assert error["details"]["requested"] == 2 * limit
    assert error["details"]["used"] == 0
    assert not tenant.services.exists()
    assert used(tenant, "memory_mib") == 0


@pytest.mark.django_db(transaction=True)
def test_reports_drive_state_restart_policy_and_orphan_removal(
    acme: tuple[Tenant, User], broker: redis.Redis
) -> None:
    tenant, _ = acme
    node, credential = make_node("n1")
    service = deploy.create_service(
        tenant,
        name="api",
        data={"image": "busybox", "restart_policy": "on-failure"},
        replicas=1,
        actor=SYSTEM,
    )
    placement.schedule_pending()
    container = service.containers.get()
    report(node, credential, running(container))
    container.refresh_from_db()
    assert container.state == ContainerState.RUNNING

    report(node, credential, exited(container, 3))
    container.refresh_from_db()
    assert container.state == ContainerState.EXITED and container.exit_code == 3
    assert container.next_restart_at is not None
    broker.delete(node.queue)
    assert reconcile.restart_exited(now=timezone.now() + timedelta(seconds=5)) == 1
    container.refresh_from_db()
    assert container.restart_count == 1
    (op,) = queued(broker, node)
    assert op["kwargs"]["op_id"].endswith(":1")  # a new operation, not a replay

    # A container the control plane never asked for is removed from the node.
    broker.delete(node.queue)
    report(
        node,
        credential,
        protocol.ContainerReport(
            uid="00000000-0000-0000-0000-000000000000", tenant="acme", name="stray", state="running"
        ),
    )
    (op,) = queued(broker, node)
    assert op["task"] == protocol.AGENT_REMOVE_CONTAINER and op["kwargs"]["name"] == "stray"


@pytest.mark.django_db(transaction=True)
def test_forged_report_is_refused(acme: tuple[Tenant, User]) -> None:
    node, _ = make_node("n1")
    with pytest.raises(Exception, match="wrong node credential"):
        report(node, "bnc_forged")


@pytest.mark.django_db(transaction=True)
def test_silent_node_gets_its_replica_rescheduled_and_quota_kept_once(
    acme: tuple[Tenant, User], broker: redis.Redis
) -> None:
    tenant, _ = acme
    n1, c1 = make_node("n1")
    n2, c2 = make_node("n2")
    service = deploy.create_service(
        tenant, name="web", data={"image": "busybox"}, replicas=2, actor=SYSTEM
    )
    placement.schedule_pending()
    for node, cred in ((n1, c1), (n2, c2)):
        report(node, cred, *(running(c) for c in service.containers.filter(node=node)))
    # n2 keeps reporting; n1 falls silent past the timeout.
    Node.objects.filter(pk=n1.pk).update(last_heartbeat_at=timezone.now() - timedelta(minutes=5))
    down = reconcile.mark_down_stale_nodes()
    assert [n.name for n in down] == ["n1"]
    placement.schedule_pending()
    live = service.containers.exclude(state__in=["lost", "removed"]).select_related("node")
    assert [c.node and c.node.name for c in live] == ["n2", "n2"]
    assert service.containers.filter(state="lost").count() == 1
    assert used(tenant, "containers") == 2  # moved, not double-counted nor released
    # Each copy carries its own identity to the node, never the lost one's.
    for container in live:
        assert container.spec["name"] == container.agent_name
        assert container.spec["labels"][protocol.CONTAINER_UID_LABEL] == str(container.pk)


@pytest.mark.django_db(transaction=True)
def test_job_array_never_runs_more_than_its_parallelism(
    acme: tuple[Tenant, User], broker: redis.Redis
) -> None:
    tenant, _ = acme
    node, credential = make_node("n1", cpu=64000, memory=65536)
    job = jobs.submit_job(
        tenant,
        {
            "name": "arr",
            "image": "busybox",
            "command": ["sh", "-c", "echo $BERTH_JOB_INDEX"],
            "array_size": 10,
            "parallelism": 3,
            "cpu_millicores": 100,
            "memory_mib": 16,
        },
        actor=SYSTEM,
    )
    seen_max = 0
    for _ in range(20):
        jobs.dispatch_runs()
        placement.schedule_pending()
        live = JobRun.objects.filter(job=job, state=RunState.RUNNING).count()
        seen_max = max(seen_max, live)
        assert live <= 3
        for container in Container.objects.filter(job_run__job=job, state="scheduled"):
            report(node, credential, running(container))
            report(node, credential, exited(container, 0))
        job.refresh_from_db()
        if job.state == "succeeded":
            break
    assert job.state == "succeeded"
    assert seen_max == 3
    indices = {
        int(c.spec["env"]["BERTH_JOB_INDEX"]) for c in Container.objects.filter(job_run__job=job)
    }
    assert indices == set(range(10))
    assert used(tenant, "concurrent_jobs") == 0


@pytest.mark.django_db(transaction=True)
def test_failed_run_retries_with_backoff_then_fails_the_job(
    acme: tuple[Tenant, User], broker: redis.Redis
) -> None:
    tenant, _ = acme
    node, credential = make_node("n1")
    job = jobs.submit_job(
        tenant,
        {"name": "flaky", "image": "busybox", "max_retries": 1, "backoff_seconds": 30},
        actor=SYSTEM,
    )
    jobs.dispatch_runs()
    placement.schedule_pending()
    first = Container.objects.get(job_run__job=job)
    report(node, credential, exited(first, 2))
    retry = JobRun.objects.get(job=job, attempt=2)
    assert retry.not_before > timezone.now() + timedelta(seconds=25)
    assert jobs.dispatch_runs() == 0  # still backing off
    assert jobs.dispatch_runs(now=timezone.now() + timedelta(seconds=31)) == 1
    placement.schedule_pending()
    second = Container.objects.get(job_run=retry)
    report(node, credential, exited(second, 2))
    job.refresh_from_db()
    assert job.state == "failed"
    assert list(job.runs.values_list("attempt", "exit_code")) == [(1, 2), (2, 2)]


@pytest.mark.django_db(transaction=True)
def test_one_tenants_backlog_does_not_starve_another(
    make_tenant: Callable[..., tuple[Tenant, User]], broker: redis.Redis
) -> None:
    big, _ = make_tenant("big")
    small, _ = make_tenant("small")
    make_node("n1", cpu=64000, memory=65536)
    jobs.submit_job(
        big,
        {
            "name": "flood",
            "image": "busybox",
            "array_size": 500,
            "parallelism": 500,
            "cpu_millicores": 10,
            "memory_mib": 6,
        },
        actor=SYSTEM,
    )
    jobs.submit_job(
        small,
        {"name": "one", "image": "busybox", "cpu_millicores": 10, "memory_mib": 6},
        actor=SYSTEM,
    )
    jobs.dispatch_runs()
    assert JobRun.objects.filter(job__tenant=small, state=RunState.RUNNING).count() == 1
    big_running = JobRun.objects.filter(job__tenant=big, state=RunState.RUNNING).count()
    assert 0 < big_running <= big.quota_limits()["concurrent_jobs"]


@pytest.mark.django_db(transaction=True)
def test_deploy_whose_new_replica_dies_rolls_back(
    acme: tuple[Tenant, User], broker: redis.Redis
) -> None:
    tenant, _ = acme
    node, credential = make_node("n1")
    service = deploy.create_service(
        tenant, name="web", data={"image": "busybox:1"}, replicas=1, actor=SYSTEM
    )
    placement.schedule_pending()
    old = service.containers.get()
    report(node, credential, running(old))
    reconcile.advance_deployments()
    assert service.deployments.get(generation=1).state == DeploymentState.SUCCEEDED

    deployment = deploy.deploy_service(service, {"image": "busybox:broken"}, actor=SYSTEM)
    placement.schedule_pending()
    new = service.containers.get(generation=deployment.generation)
    report(node, credential, running(old), exited(new, 1))
    reconcile.advance_deployments()
    deployment.refresh_from_db()
    service.refresh_from_db()
    assert deployment.state == DeploymentState.ROLLED_BACK
    assert "exit code 1" in deployment.reason
    assert service.image == "busybox:1" and service.generation == 1
    old.refresh_from_db()
    assert old.desired_state == "running"  # the old replica never stopped serving


@pytest.mark.django_db(transaction=True)
def test_deploy_gated_on_health_retires_old_generation_when_healthy(
    acme: tuple[Tenant, User], broker: redis.Redis
) -> None:
    tenant, _ = acme
    node, credential = make_node("n1")
    service = deploy.create_service(
        tenant, name="web", data={"image": "busybox:1"}, replicas=1, actor=SYSTEM
    )
    placement.schedule_pending()
    old = service.containers.get()
    report(node, credential, running(old))
    # A second deploy while the first is still rolling out is refused, not interleaved.
    with pytest.raises(Conflict, match="already in progress"):
        deploy.deploy_service(service, {"image": "busybox:2"}, actor=SYSTEM)
    reconcile.advance_deployments()
    deployment = deploy.deploy_service(
        service, {"image": "busybox:2", "health_check": {"test": ["true"]}}, actor=SYSTEM
    )
    placement.schedule_pending()
    new = service.containers.get(generation=deployment.generation)
    report(node, credential, running(old), running(new))
    assert reconcile.advance_deployments() == [str(new.pk)]  # health check requested
    Container.objects.filter(pk=new.pk).update(healthy=True)
    reconcile.advance_deployments()
    deployment.refresh_from_db()
    old.refresh_from_db()
    assert deployment.state == DeploymentState.SUCCEEDED
    assert old.desired_state == "removed"


@pytest.mark.django_db(transaction=True)
def test_api_roles_and_tenant_isolation(
    acme: tuple[Tenant, User],
    make_tenant: Callable[..., tuple[Tenant, User]],
    add_member: Callable[..., User],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
    broker: redis.Redis,
) -> None:
    tenant, owner = acme
    dev = client_for(make_token(tenant, owner, Scope.WRITE))
    created = dev.post(
        "/api/v1/tenants/acme/services/",
        {"name": "web", "image": "busybox", "replicas": 1, "secrets": {"TOKEN": "x"}},
        format="json",
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["secret_names"] == ["TOKEN"] and "secrets" not in body
    assert (
        dev.post(
            "/api/v1/tenants/acme/services/", {"name": "web", "image": "busybox"}, format="json"
        ).status_code
        == 409
    )

    viewer = add_member(tenant, Role.VIEWER)
    as_viewer = client_for(make_token(tenant, viewer, Scope.READ))
    assert as_viewer.get("/api/v1/tenants/acme/services/web/").status_code == 200
    assert (
        as_viewer.post(
            "/api/v1/tenants/acme/services/web/scale/", {"replicas": 3}, format="json"
        ).status_code
        == 403
    )

    other, other_owner = make_tenant("globex")
    outsider = client_for(make_token(other, other_owner, Scope.ADMIN))
    assert outsider.get("/api/v1/tenants/acme/services/web/").status_code == 404
    assert outsider.get("/api/v1/tenants/globex/services/").json()["results"] == []

    bad = dev.post(
        "/api/v1/tenants/acme/services/",
        {"name": "x", "image": "busybox", "replicas": -1},
        format="json",
    )
    assert bad.status_code == 400
    bad = dev.post(
        "/api/v1/tenants/acme/services/",
        {"name": "y", "image": "busybox", "ports": [{"container_port": 70000}]},
        format="json",
    )
    assert bad.status_code == 400 and "container_port" in json.dumps(bad.json())


@pytest.mark.django_db(transaction=True)
def test_join_token_is_single_use(client_for: Callable[..., Any], plans: None) -> None:
    _, token = nodes.create_join_token(actor=SYSTEM)
    client = client_for()
    body = {"token": token, "name": "n1", "capacity": {"cpu_millicores": 2000, "memory_mib": 1024}}
    first = client.post("/api/v1/nodes/join/", body, format="json")
    assert first.status_code == 201, first.content
    assert first.json()["queue"] == f"node.{first.json()['node_id']}"
    registry = first.json()["registry"]  # the node's pull-only registry login, shown once
    assert registry["username"] == "node-n1" and registry["password"].startswith("brn_")
    again = client.post("/api/v1/nodes/join/", body, format="json")
    assert again.status_code == 403
    assert BatchJob.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_report_readings_are_metered_once(acme: tuple[Tenant, User], broker: redis.Redis) -> None:
    from billing.models import UsageReading

    tenant, _ = acme
    node, credential = make_node("n1")
    service = deploy.create_service(
        tenant, name="web", data={"image": "busybox"}, replicas=1, actor=SYSTEM
    )
    placement.schedule_pending()
    container = service.containers.get()
    reading = protocol.ContainerReport(
        uid=str(container.pk),
        tenant="acme",
        name=container.agent_name,
        state="running",
        cpu_seconds=12.5,
        memory_bytes=32 * 1024 * 1024,
    )
    sent_at = timezone.now().isoformat()
    for _ in range(2):  # the same report delivered twice
        reports.handle_node_report(
            protocol.NodeReport(
                node_id=str(node.pk), credential=credential, sent_at=sent_at, containers=(reading,)
            )
        )
    (row,) = UsageReading.objects.filter(tenant=tenant)
    assert row.cpu_usage_ns == 12_500_000_000
    assert row.memory_bytes == 32 * 1024 * 1024


@pytest.mark.django_db(transaction=True)
def test_spend_cap_refuses_new_work_but_not_scaling_down(
    acme: tuple[Tenant, User], broker: redis.Redis
) -> None:
    from billing.services import SpendCapReached, set_spend_cap

    tenant, _ = acme
    service = deploy.create_service(
        tenant, name="web", data={"image": "busybox"}, replicas=2, actor=SYSTEM
    )
    # The lowest cap allowed is the seats' own price: the month's bill has reached it.
    set_spend_cap(tenant, tenant.plan.seat_price_cents * tenant.seats, actor=SYSTEM)
    with pytest.raises(SpendCapReached, match="spend cap"):
        deploy.create_service(
            tenant, name="api", data={"image": "busybox"}, replicas=1, actor=SYSTEM
        )
    with pytest.raises(SpendCapReached):
        deploy.scale_service(service, 3, actor=SYSTEM)
    with pytest.raises(SpendCapReached):
        jobs.submit_job(tenant, {"image": "busybox"}, actor=SYSTEM)
    deploy.scale_service(service, 1, actor=SYSTEM)  # shrinking is always allowed
    assert deploy.live_containers(service).count() == 1
