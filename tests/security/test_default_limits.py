"""Defaults a tenant gets without asking (#17 item 8): what a tenant that never sets a limit
can make a node do. Through the REST API as the tenant would, and through a real agent
for what only the node enforces: processes, the writable layer, block I/O, job logs, job
arrays and networks are all bounded by the tenant's plan, and a refusal is the API's
quota error (which quota, its limit, the current use, the request)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from billing.models import Plan
from tenants.choices import Scope
from tenants.models import QuotaUsage, Tenant, User
from workloads.choices import DeploymentState
from workloads.models import BatchJob, Container, Deployment, JobRun, Network
from workloads.services import jobs

pytestmark = pytest.mark.django_db


@pytest.fixture
def hostile(
    make_tenant: Callable[..., tuple[Tenant, User]],
    make_token: Callable[..., str],
    client_for: Callable[[str | None], APIClient],
) -> tuple[Tenant, APIClient]:
    """A tenant on the Free plan (the cheapest one to abuse) and its admin API client."""
    tenant, owner = make_tenant("mallory", plan="free", seats=1)
    return tenant, client_for(make_token(tenant, owner, Scope.ADMIN))


def assert_quota_error(response: Any, quota: str, limit: int, used: int, requested: int) -> None:
    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert error["details"] == {
        "quota": quota,
        "limit": limit,
        "used": used,
        "requested": requested,
    }


# --------------------------------------------------------------------------- job arrays


def test_job_array_larger_than_the_plan_allows_is_refused(
    hostile: tuple[Tenant, APIClient],
) -> None:
    tenant, client = hostile
    cap = Plan.objects.get(code="free").array_size
    base = {"image": "busybox", "command": ["true"], "cpu_millicores": 100, "memory_mib": 16}
    for size in (cap + 1, 10_000):
        refused = client.post(
            f"/api/v1/tenants/{tenant.slug}/jobs/", {**base, "array_size": size}, format="json"
        )
        assert_quota_error(refused, "array_size", cap, 0, size)
    assert not BatchJob.objects.filter(tenant=tenant).exists()
    assert not JobRun.objects.filter(job__tenant=tenant).exists()
    accepted = client.post(
        f"/api/v1/tenants/{tenant.slug}/jobs/", {**base, "array_size": cap}, format="json"
    )
    assert accepted.status_code == 201, accepted.content
    assert JobRun.objects.filter(job__tenant=tenant).count() == cap


# --------------------------------------------------------------------------- networks


def test_networks_per_tenant_are_bounded_and_given_back(hostile: tuple[Tenant, APIClient]) -> None:
    tenant, client = hostile
    cap = tenant.quota_limits()["networks"]
    url = f"/api/v1/tenants/{tenant.slug}/networks/"
    for i in range(cap):
        assert client.post(url, {"name": f"n{i}"}, format="json").status_code == 201
    refused = client.post(url, {"name": "one-more"}, format="json")
    assert_quota_error(refused, "networks", cap, cap, 1)
    assert Network.objects.filter(tenant=tenant).count() == cap
    # A duplicate name is a conflict, not a quota use.
    assert client.post(url, {"name": "n0"}, format="json").status_code == 409
    # Deleting one gives its quota back exactly once.
    assert client.delete(f"{url}n0/").status_code == 204
    assert QuotaUsage.objects.get(tenant=tenant, quota="networks").used == cap - 1
    assert client.post(url, {"name": "again"}, format="json").status_code == 201
    assert_quota_error(client.post(url, {"name": "x"}, format="json"), "networks", cap, cap, 1)


def test_a_container_cannot_join_more_networks_than_the_plan_allows(
    make_tenant: Callable[..., tuple[Tenant, User]],
    make_token: Callable[..., str],
    client_for: Callable[[str | None], APIClient],
) -> None:
    tenant, owner = make_tenant("joiner", plan="team", seats=5)
    client = client_for(make_token(tenant, owner, Scope.ADMIN))
    cap = tenant.quota_limits()["networks_per_container"]
    assert cap == 12  # the Team plan's: the 13th is the one refused
    names = [f"net{i}" for i in range(cap + 1)]
    for name in names:
        created = client.post(
            f"/api/v1/tenants/{tenant.slug}/networks/", {"name": name}, format="json"
        )
        assert created.status_code == 201, created.content
    service = {"name": "web", "image": "busybox", "cpu_millicores": 100, "memory_mib": 16}
    services = f"/api/v1/tenants/{tenant.slug}/services/"
    refused = client.post(services, {**service, "networks": names}, format="json")
    assert_quota_error(refused, "networks_per_container", cap, 0, cap + 1)
    assert not Container.objects.filter(tenant=tenant).exists()
    # The same through a deploy of an existing service, and with duplicates (one each).
    allowed = client.post(services, {**service, "networks": names[:cap]}, format="json")
    assert allowed.status_code == 201, allowed.content
    # (as if its first deployment had finished on a node: a deploy in progress is a conflict)
    Deployment.objects.filter(service__tenant=tenant).update(state=DeploymentState.SUCCEEDED)
    patched = client.patch(f"{services}web/", {"networks": names}, format="json")
    assert_quota_error(patched, "networks_per_container", cap, 0, cap + 1)
    doubled = client.post(
        services, {**service, "name": "dup", "networks": names[:cap] * 2}, format="json"
    )
    assert doubled.status_code == 201, doubled.content


# --------------------------------------------------------------------------- container specs


def test_containers_get_the_plans_block_io_and_pids_caps_by_default(
    hostile: tuple[Tenant, APIClient],
) -> None:
    tenant, client = hostile
    plan = Plan.objects.get(code="free")
    created = client.post(
        f"/api/v1/tenants/{tenant.slug}/services/",
        {"name": "web", "image": "busybox", "cpu_millicores": 100, "memory_mib": 16},
        format="json",
    )
    assert created.status_code == 201, created.content
    job = client.post(
        f"/api/v1/tenants/{tenant.slug}/jobs/",
        {"image": "busybox", "command": ["true"], "cpu_millicores": 100, "memory_mib": 16},
        format="json",
    )
    assert job.status_code == 201, job.content
    jobs.dispatch_runs()
    containers = list(Container.objects.filter(tenant=tenant))
    assert {bool(c.service_id) for c in containers} == {True, False}  # a replica and a run
    for container in containers:
        limits = container.spec["limits"]
        assert limits["device_read_bps"] == limits["device_write_bps"] == plan.blkio_bps
        assert limits["pids"] == plan.pids
    # Asking for less block I/O is honoured; asking for more is the quota error.
    lower = client.post(
        f"/api/v1/tenants/{tenant.slug}/services/",
        {"name": "slow", "image": "busybox", "memory_mib": 16, "blkio_bps": 1 << 20},
        format="json",
    )
    assert lower.status_code == 201, lower.content
    slow = Container.objects.get(tenant=tenant, service__name="slow")
    assert slow.spec["limits"]["device_write_bps"] == 1 << 20
    higher = client.post(
        f"/api/v1/tenants/{tenant.slug}/services/",
        {"name": "fast", "image": "busybox", "memory_mib": 16, "blkio_bps": plan.blkio_bps + 1},
        format="json",
    )
    assert_quota_error(higher, "blkio_bps", plan.blkio_bps, 0, plan.blkio_bps + 1)


# --------------------------------------------------------------------------- job logs


def test_a_huge_run_log_is_stored_capped_with_a_marker(hostile: tuple[Tenant, APIClient]) -> None:
    tenant, _client = hostile
    job = BatchJob.objects.create(tenant=tenant, name="loud", image="busybox")
    run = JobRun.objects.create(job=job, index=0)
    # 1000 lines of 5 KB: within the line cap, 5 MB in all; multi-byte characters at the cut.
    lines = [f"{i:04d} " + "é" * 2500 + "\n" for i in range(1000)]
    stored = jobs.keep_run_log(run.pk, lines)
    run.refresh_from_db()
    assert run.log == stored
    assert len(stored.encode()) <= jobs.LOG_BYTES_KEPT
    assert stored.startswith("[berth: log truncated, ")
    assert stored.endswith(lines[-1])  # the end of the output is what is kept
    short = jobs.keep_run_log(run.pk, ["done\n"])
    assert short == "done\n"
