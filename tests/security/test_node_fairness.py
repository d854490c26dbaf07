"""Hostile tenants against a node's shared capacity (issue #17 item 5), through the REST
API against a live control plane and a real agent worker (``cluster``).

Before: one node-wide lock held every operation, builds included, so a tenant's
``RUN sleep 60`` delayed another tenant's container start by 57 s, the reconciler called
the replica "disappeared" and the deployment failed; and a few long ``exec``s filled the
worker's threads so another tenant's exec timed out. Now:

- a tenant's long build runs while another tenant's service starts and its deployment
  succeeds (variants: a build whose RUN prints nothing, several queued builds);
- a tenant past its interactive cap gets a clear ``resource_exhausted`` refusal at once,
  for exec, logs and stats, while another tenant's exec answers promptly.
"""

from __future__ import annotations

import functools
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from runtime_agent.oplog import OperationLog
from runtime_agent.worker import INTERACTIVE_PER_TENANT
from tests.e2e.conftest import Cluster, agent_api, wait_for
from tests.e2e.test_builds import _tar, contexts
from tests.e2e.test_dispatch import _client, _running_nodes, _service
from workloads.choices import BuildState, DeploymentState, NodeState
from workloads.models import Build, Deployment, Node

__all__ = ["contexts"]

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(600)]

BUILD_SECONDS = 40


def _one_node(cluster: Cluster) -> None:
    """Everything lands on n1, as it would on a busy fleet's one node with room."""
    wait_for(lambda: Node.objects.filter(state=NodeState.READY).count() == 2, timeout=60,
             what="both nodes ready")  # fmt: skip
    Node.objects.filter(name="n2").update(state=NodeState.CORDONED)


def _start_build(client: APIClient, slug: str, dockerfile: bytes, tag: str) -> str:
    created = client.generic(
        "POST",
        f"/api/v1/tenants/{slug}/builds/?tag={tag}",
        _tar({"Dockerfile": dockerfile}),  # type: ignore[arg-type]
        content_type="application/x-tar",
    )
    assert created.status_code == 201, created.content
    return str(created.json()["id"])


def _drain_builds(cluster: Cluster, client: APIClient, slug: str, build_ids: list[str]) -> None:
    """Cancel the builds and wait until the node has ended each one (its operation is
    recorded), so no build step is left running when the cluster goes."""
    for build_id in build_ids:
        client.post(f"/api/v1/tenants/{slug}/builds/{build_id}/cancel/")
    oplog = OperationLog(Path(cluster.agent_named("n1").env["BERTH_ROOT"]) / "ops.sqlite")
    wait_for(lambda: all(oplog.get(f"build:{b}") for b in build_ids), timeout=BUILD_SECONDS + 60,
             what="the node to end the builds")  # fmt: skip


def _create_service(client: APIClient, slug: str, name: str, *, memory_mib: int = 32) -> None:
    response = client.post(
        f"/api/v1/tenants/{slug}/services/",
        {
            "name": name,
            "image": "busybox",
            "command": ["sleep", "100000"],
            "replicas": 1,
            "memory_mib": memory_mib,
        },
        format="json",
    )
    assert response.status_code == 201, response.content


@pytest.mark.parametrize(
    "dockerfile",
    [
        # Each build differs (its number), so none is a cache hit.
        pytest.param(b"FROM busybox\nRUN echo %(n)d; sleep %(seconds)d\n", id="run-sleep"),
        pytest.param(
            b"FROM busybox\nRUN sleep %(seconds)d >/dev/null 2>&1; true %(n)d\n", id="silent-run"
        ),
    ],
)
def test_a_long_build_does_not_delay_another_tenants_start(
    cluster: Cluster, contexts: Path, dockerfile: bytes
) -> None:
    _one_node(cluster)
    attacker = _client("fairatk")
    victim = _client("fairvic")
    build_ids: list[str] = []
    try:
        # As many as the control plane lets a tenant have at once: one runs, one waits in
        # the tenant's own queue on the node.
        for n in range(2):
            text = dockerfile % {b"seconds": BUILD_SECONDS, b"n": n}
            build_ids.append(_start_build(attacker, "fairatk", text, f"slow:{n}"))
        _victim_starts_during_the_build(cluster, victim, build_ids)
    finally:
        _drain_builds(cluster, attacker, "fairatk", build_ids)


def _build_step_running(cluster: Cluster) -> bool:
    """Whether a build's RUN step is executing on n1 right now (runc lists its container)."""
    config = agent_api(cluster.agent_named("n1")).config
    listed = subprocess.run([config.runc, "--root", str(config.runc_root), "list", "-q"],
                            capture_output=True, text=True, check=False).stdout.split()  # fmt: skip
    return any(name.startswith(f"{config.name}-build-") for name in listed)


def _victim_starts_during_the_build(
    cluster: Cluster, victim: APIClient, build_ids: list[str]
) -> None:
    wait_for(lambda: _build_step_running(cluster), timeout=120, what="the attacker's RUN step")
    step_began = time.monotonic()
    began = time.monotonic()
    _create_service(victim, "fairvic", "web")
    nodes = wait_for(lambda: _running_nodes(victim, "fairvic", "web"), timeout=BUILD_SECONDS - 15,
                     what="the victim's replica running")  # fmt: skip
    took = time.monotonic() - began
    assert nodes == ["n1"]
    assert Build.objects.get(pk=build_ids[0]).state == BuildState.RUNNING, (
        f"the attacker's build ended before the victim's start ({took:.0f}s after its RUN "
        f"began {time.monotonic() - step_began:.0f}s ago): the test proves nothing"
    )

    deployment = wait_for(
        lambda: Deployment.objects.filter(
            service__tenant__slug="fairvic", service__name="web", state=DeploymentState.SUCCEEDED
        ).first(),
        timeout=30,
        what="the victim's deployment to succeed",
    )
    assert deployment.reason == ""
    (container,) = _service(victim, "fairvic", "web")["containers"]
    assert container["restart_count"] == 0, container
    assert took < BUILD_SECONDS - 15, f"the victim's start took {took:.0f}s"


def _exec(client: APIClient, slug: str, argv: list[str], timeout: int) -> tuple[int, Any]:
    response = client.post(
        f"/api/v1/tenants/{slug}/services/app/exec/",
        {"argv": argv, "timeout": timeout},
        format="json",
    )
    return response.status_code, response.json()


def test_a_tenant_flooding_exec_is_capped_and_another_tenants_exec_answers(
    cluster: Cluster,
) -> None:
    _one_node(cluster)
    attacker = _client("fairexa")
    victim = _client("fairexv")
    for client, slug in ((attacker, "fairexa"), (victim, "fairexv")):
        # Room for a few concurrent runc execs (each runc init joins the container's cgroup).
        _create_service(client, slug, "app", memory_mib=256)
    for client, slug in ((attacker, "fairexa"), (victim, "fairexv")):
        wait_for(functools.partial(_running_nodes, client, slug, "app"), timeout=90,
                 what=f"{slug}'s app running")  # fmt: skip

    results: list[tuple[int, Any]] = []

    def long_exec() -> None:
        results.append(_exec(attacker, "fairexa", ["sleep", "300"], 20))

    # Two more long execs than the attacker may run: those two are refused at once, and
    # the others hold all of the attacker's slots for 20 s.
    flood = [
        threading.Thread(target=long_exec, daemon=True) for _ in range(INTERACTIVE_PER_TENANT + 2)
    ]
    began = time.monotonic()
    for thread in flood:
        thread.start()
    wait_for(lambda: len(results) >= 2, timeout=15, what="the execs over the cap refused")
    assert time.monotonic() - began < 15
    for status, body in results[:2]:
        assert status == 409, body
        assert body["error"]["details"]["code"] == "resource_exhausted", body
        assert f"at most {INTERACTIVE_PER_TENANT}" in body["error"]["message"]
    assert sum(thread.is_alive() for thread in flood) == INTERACTIVE_PER_TENANT

    # One more exec, and its logs and stats (other spellings of interactive work), are
    # refused too.
    status, body = _exec(attacker, "fairexa", ["true"], 5)
    assert status == 409 and body["error"]["details"]["code"] == "resource_exhausted", body
    for path in ("logs", "stats"):
        response = attacker.get(f"/api/v1/tenants/fairexa/services/app/{path}/")
        assert response.status_code == 409, (path, response.content)
        assert response.json()["error"]["details"]["code"] == "resource_exhausted"

    # The victim's exec answers promptly while the attacker's execs still run.
    began = time.monotonic()
    status, body = _exec(victim, "fairexv", ["echo", "still here"], 5)
    assert (status, body.get("output")) == (200, "still here\n"), body
    assert time.monotonic() - began < 5
    assert sum(thread.is_alive() for thread in flood) == INTERACTIVE_PER_TENANT

    for thread in flood:
        thread.join(60)
    held = results[2:]
    assert [status for status, _ in held] == [200] * INTERACTIVE_PER_TENANT, held
    assert {body["exit_code"] for _, body in held} == {124}
