"""Defaults a tenant gets without asking (#17 item 8): what a tenant that never sets a limit
can make a node do. Through the REST API as the tenant would, and through a real agent
for what only the node enforces: processes, the writable layer, block I/O, job logs, job
arrays and networks are all bounded by the tenant's plan, and a refusal is the API's
quota error (which quota, its limit, the current use, the request)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from billing.models import Plan
from runtime_agent.agent import Agent
from runtime_agent.config import AgentConfig
from runtime_agent.errors import ResourceExhausted
from runtime_agent.images.bootstrap import bootstrap_busybox
from runtime_agent.protocol import Limits
from tenants.choices import Scope
from tenants.models import QuotaUsage, Tenant, User
from tenants.services import Actor, create_api_token, create_tenant
from tests.agent.test_runtime_fixtures import cleanup_agent, spec, until
from workloads.choices import DeploymentState
from workloads.models import BatchJob, Container, Deployment, JobRun, Network
from workloads.services import jobs


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


@pytest.mark.django_db
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


@pytest.mark.django_db
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


@pytest.mark.django_db
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


@pytest.mark.django_db
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


@pytest.mark.django_db
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


# --------------------------------------------------------------------------- the node itself

MiB = 1 << 20
#: Small node defaults, so the tests hit them quickly.
CONTAINER_PIDS, TENANT_PIDS, TENANT_LAYER = 100, 150, 64 * MiB


@pytest.fixture
def node(agent_config: AgentConfig) -> Iterator[Agent]:
    """A real agent (runc, cgroups, overlayfs) with small defaults for tenants."""
    agent = Agent(
        dataclasses.replace(
            agent_config,
            container_pids_max=CONTAINER_PIDS,
            tenant_pids_max=TENANT_PIDS,
            tenant_layer_bytes=TENANT_LAYER,
        )
    )
    bootstrap_busybox(agent)
    try:
        yield agent
    finally:
        cleanup_agent(agent)


def _disk_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _output(agent: Agent, tenant: str, ref: str) -> str:
    return "\n".join(e.line.decode(errors="replace") for e in agent.containers.logs(tenant, ref))


#: Fork until the kernel refuses, keeping every process; then hold on without forking.
HOLDER = "sh -c 'while :; do sleep 300 & done'; exec sleep 300"
CLASSIC = "bomb() { bomb | bomb & }; bomb; exec sleep 300"


@pytest.mark.privileged
@pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")
def test_fork_bombs_that_ask_for_no_limit_stop_at_the_node_defaults(node: Agent) -> None:
    containers = node.containers
    # Two shapes of bomb: one that keeps every process it made (busybox sh dies at its
    # first failed fork; pid 1 then execs, needing no fork, so the container lives on and
    # holds the cap full), and the classic cascade of short-lived shells. Limits that name
    # no pids (only a CPU share, to spare the machine) still get the default.
    gentle = Limits(cpus=0.25)
    first = containers.run(spec(HOLDER, tenant="bomber", limits=gentle))
    until(lambda: containers.stats("bomber", first.id).pids >= CONTAINER_PIDS - 1, timeout=60)
    second = containers.run(spec(HOLDER, tenant="bomber", limits=gentle))  # the tenant's rest
    until(lambda: containers.cgroups.stats("bomber").pids >= TENANT_PIDS - 1, timeout=60)
    third = containers.run(spec(CLASSIC, tenant="bomber2", limits=gentle))
    peak = 0
    for _ in range(40):
        peak = max(peak, containers.stats("bomber2", third.id).pids)
        time.sleep(0.05)
    assert 1 < peak <= CONTAINER_PIDS
    assert containers.stats("bomber2", third.id).pids_limit == CONTAINER_PIDS
    for info in (first, second):
        stats = containers.stats("bomber", info.id)
        assert stats.pids_limit == CONTAINER_PIDS
        assert stats.pids <= CONTAINER_PIDS
    # Both together: never more than the tenant's parent cgroup allows.
    tenant = containers.cgroups.stats("bomber")
    assert tenant.pids_limit == TENANT_PIDS
    assert tenant.pids <= TENANT_PIDS
    # The node and other tenants go on: a process starts at once, a container runs.
    started = time.monotonic()
    subprocess.run(["true"], check=True)
    assert time.monotonic() - started < 2.0
    other = containers.run(spec("echo alive", tenant="bystander"))
    assert containers.wait("bystander", other.id, timeout=60) == 0
    # A cap the operator set on the tenant is kept, not reset to the default.
    containers.set_tenant_limits("bystander", Limits(pids=40))
    containers.run(spec("true", tenant="bystander"))
    assert containers.cgroups.stats("bystander").pids_limit == 40


@pytest.mark.privileged
@pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")
@pytest.mark.parametrize(
    "writer",
    [
        "dd if=/dev/zero of=/big bs=1M count=300",  # one big file at the root
        "dd if=/dev/zero of=/tmp/big bs=1M count=300",  # /tmp is the writable layer too
        "fallocate -l 300M /var/big",  # allocated, never written
        "(i=0; while [ $i -lt 300 ]; do dd if=/dev/zero of=/f$i bs=1M count=1 || exit 1;"
        " i=$((i+1)); done)",  # many files
    ],
    ids=["dd-root", "dd-tmp", "fallocate", "many-files"],
)
def test_writes_past_the_tenant_layer_cap_fail_with_enospc(node: Agent, writer: str) -> None:
    containers = node.containers
    before = _disk_used(node.config.root)
    info = containers.run(spec(f"{writer}; echo exit=$?", tenant="filler"))
    assert containers.wait("filler", info.id, timeout=120) == 0
    output = _output(node, "filler", info.id)
    assert "No space left on device" in output, output
    assert "exit=0" not in output, output
    # The node's disk took at most the tenant's cap (plus metadata), not 300 MB.
    grown = _disk_used(node.config.root) - before
    assert grown < TENANT_LAYER + 16 * MiB, grown
    # The cap is the tenant's: its next container finds it full, another tenant doesn't.
    try:
        again = containers.run(spec("dd if=/dev/zero of=/more bs=1M count=8", tenant="filler"))
        assert containers.wait("filler", again.id, timeout=60) != 0
        containers.remove("filler", again.id)
    except ResourceExhausted as exc:  # too full even for its upper directory
        assert exc.details["limit"] == TENANT_LAYER
    bystander = containers.run(spec("dd if=/dev/zero of=/data bs=1M count=8", tenant="calm"))
    assert containers.wait("calm", bystander.id, timeout=60) == 0
    # Removing the container gives its space back to the tenant, and to the node.
    upper = node.snapshots.upper_dir(info.id)
    image = node.config.snapshots_dir / "tenants" / "filler" / "disk.img"
    held = image.stat().st_blocks * 512  # what was written (fallocate writes nothing)
    containers.remove("filler", info.id)
    assert not upper.exists()
    until(lambda: image.stat().st_blocks * 512 <= min(held, TENANT_LAYER / 4), timeout=30)
    after = containers.run(spec("dd if=/dev/zero of=/more bs=1M count=8", tenant="filler"))
    assert containers.wait("filler", after.id, timeout=60) == 0


# --------------------------------------------------------------------------- end to end

LOUD_JOB = (  # 1000 lines of 5000 characters: 5 MB of output
    'awk \'BEGIN { s = sprintf("%5000s", ""); gsub(/ /, "x", s);'
    " for (i = 0; i < 1000; i++) print i, s }'"
)


@pytest.fixture
def capped_cluster(
    monkeypatch: pytest.MonkeyPatch, transactional_db: None, request: pytest.FixtureRequest
) -> Any:
    """The e2e cluster (live control plane, two real agents) whose nodes give each tenant
    a 64 MiB writable-layer filesystem."""
    monkeypatch.setenv("BERTH_TENANT_LAYER_BYTES", str(TENANT_LAYER))
    return request.getfixturevalue("cluster")


@pytest.mark.privileged
@pytest.mark.timeout(600)
@pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")
def test_a_dispatched_tenant_gets_the_defaults_without_asking(capped_cluster: Any) -> None:
    from tests.e2e.conftest import STATE, agent_api, wait_for

    tenant, owner = create_tenant(
        slug="mallory",
        owner_email="owner@mallory.example",
        plan_code="free",
        seats=1,
        actor=Actor.for_system("test"),
    )
    _, secret = create_api_token(
        tenant, owner, name="ci", scope=Scope.WRITE, actor=Actor.for_system("test")
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    plan = Plan.objects.get(code="free")
    disk_before = _disk_used(STATE)
    base = f"/api/v1/tenants/{tenant.slug}"
    created = {}
    for kind, name, command, memory in (
        ("services", "bomb", HOLDER, 64),
        ("services", "filler", "dd if=/dev/zero of=/big bs=1M count=300; echo dd-exit=$?; "
         "exec sleep 3600", 64),
        ("jobs", "loud", LOUD_JOB, 16),
    ):  # fmt: skip
        created[name] = client.post(
            f"{base}/{kind}/",
            {
                "name": name,
                "image": "busybox",
                "command": ["sh", "-c", command],
                "cpu_millicores": 100,
                "memory_mib": memory,
            },
            format="json",
        )
        assert created[name].status_code == 201, created[name].content
    job = created["loud"]

    def both_running() -> bool:
        bodies = [client.get(f"{base}/services/{n}/").json() for n in ("bomb", "filler")]
        return all(any(c["state"] == "running" for c in b["containers"]) for b in bodies)

    try:
        wait_for(both_running, timeout=120, what="both services running")
    except AssertionError:
        services = [client.get(f"{base}/services/{n}/").json() for n in ("bomb", "filler")]
        raise AssertionError(f"not running: {services}") from None
    on_nodes = {
        info.name.split("-")[0]: (agent, info)
        for agent in capped_cluster.agents
        for info in agent_api(agent).containers.list_all()
        if info.tenant == tenant.slug and info.name.split("-")[0] in ("bomb", "filler")
    }

    # The fork bomb stops at the plan's pids cap; the node answers at once.
    agent, bomb = on_nodes["bomb"]
    api = agent_api(agent)
    wait_for(
        lambda: api.containers.stats(tenant.slug, bomb.id).pids >= plan.pids - 1,
        timeout=60,
        what="the fork bomb to reach its cap",
    )
    stats = api.containers.stats(tenant.slug, bomb.id)
    assert stats.pids_limit == plan.pids and stats.pids <= plan.pids
    assert api.containers.cgroups.stats(tenant.slug).pids_limit is not None  # tenant parent
    started = time.monotonic()
    subprocess.run(["true"], check=True)
    assert time.monotonic() - started < 2.0

    # Block I/O: the plan's cap, in the container's OCI config and its cgroup.
    config = json.loads(
        (api.config.containers_dir / tenant.slug / bomb.id / "config.json").read_text()
    )
    throttles = config["linux"]["resources"]["blockIO"]
    layers = api.snapshots.devices(bomb.id)  # its writable layer's and the image's disks
    for key in ("throttleReadBpsDevice", "throttleWriteBpsDevice"):
        assert [(f"{t['major']}:{t['minor']}", t["rate"]) for t in throttles[key]] == [
            (device, plan.blkio_bps) for device in layers
        ]

    # The 300 MB write fails inside the container; the node's disk is not its dump.
    logs = wait_for(
        lambda: (
            "dd-exit=" in str(client.get(f"{base}/services/filler/logs/").json())
            and client.get(f"{base}/services/filler/logs/").json()["lines"]
        ),
        timeout=120,
        what="the writer to finish",
    )
    text = "".join(line["line"] for line in logs)
    assert "No space left on device" in text and "dd-exit=0" not in text, text
    assert _disk_used(STATE) - disk_before < TENANT_LAYER + 48 * MiB

    # The 5 MB job log is stored capped, with its marker.
    job_id = job.json()["id"]
    wait_for(
        lambda: client.get(f"{base}/jobs/{job_id}/").json()["state"] == "succeeded",
        timeout=120,
        what="the loud job to finish",
    )
    log = wait_for(
        lambda: client.get(f"{base}/jobs/{job_id}/logs/?index=0").json().get("log"),
        timeout=60,
        what="the run's log to be kept",
    )
    assert len(log.encode()) <= jobs.LOG_BYTES_KEPT
    assert log.startswith("[berth: log truncated, ")
    assert log.rstrip("\n").endswith("999 " + "x" * 5000)


@pytest.mark.privileged
@pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")
def test_a_build_step_writing_past_the_cap_fails_with_enospc(node: Agent, tmp_path: Path) -> None:
    from runtime_agent.build.events import BuildFailed
    from runtime_agent.build.steps import BuildLimits
    from tests.agent.dockerfiles.support import build, make_base, write_context

    make_base(node, "builder", tmp_path)
    before = _disk_used(node.config.root)
    context = write_context(
        tmp_path / "ctx",
        {"Dockerfile": "FROM busybox\nRUN dd if=/dev/zero of=/big bs=1M count=300\n"},
    )
    with pytest.raises(BuildFailed) as failed:
        build(
            node, "builder", context, tag="big", limits=BuildLimits(network=None, step_timeout=120)
        )
    assert "No space left on device" in failed.value.output, failed.value.output
    assert _disk_used(node.config.root) - before < TENANT_LAYER + 16 * MiB
