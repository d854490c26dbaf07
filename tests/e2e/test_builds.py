"""A build through the REST API on a real agent, then a service running the image: kept on
the build node without a registry, pushed to a real registry and pulled by another node
with one (the service names the build's tag, resolved to the pushed digest)."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings
from rest_framework.test import APIClient

from tests.e2e.conftest import Cluster, agent_api, wait_for
from tests.e2e.test_dispatch import _client, _running_nodes, _service
from tests.registry_process import needs_registry
from workloads.models import Build

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(600)]

DOCKERFILE = b"""FROM busybox
ARG GREETING=unset
RUN echo "built with $GREETING" > /built.txt
COPY hello.txt /srv/hello.txt
CMD ["sh", "-c", "cat /srv/hello.txt /built.txt; exec sleep 100000"]
"""


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def contexts(tmp_path: Path) -> Iterator[Path]:
    with override_settings(BERTH_BUILD_CONTEXT_DIR=tmp_path / "ctx"):
        yield tmp_path / "ctx"


def _follow(client: APIClient, slug: str, build_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/tenants/{slug}/builds/{build_id}/logs/?follow=1&seconds=240")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-ndjson"
    body = b"".join(response.streaming_content)  # type: ignore[attr-defined]
    return [json.loads(line) for line in body.splitlines()]


def _run_app(client: APIClient, slug: str, image: str) -> list[str]:
    """Run ``image`` as service ``app``; the nodes its replica runs on."""
    response = client.post(
        f"/api/v1/tenants/{slug}/services/",
        {"name": "app", "image": image, "replicas": 1, "memory_mib": 32},
        format="json",
    )
    assert response.status_code == 201, response.content
    try:
        nodes = wait_for(lambda: _running_nodes(client, slug, "app"), timeout=90, what="app")
    except AssertionError:
        raise AssertionError(f"not running: {_service(client, slug, 'app')}") from None
    return list(nodes)


def _app_output(client: APIClient, slug: str) -> str:
    """Service ``app``'s output, once the image's CMD printed what the build wrote."""

    def output() -> str | None:
        lines = client.get(f"/api/v1/tenants/{slug}/services/app/logs/").json()["lines"]
        text = "".join(line["line"] for line in lines)
        return text if "built with berth" in text else None

    return str(wait_for(output, timeout=30, what="the service's output"))


def test_build_on_an_agent_then_run_the_image(cluster: Cluster, contexts: Path) -> None:
    client = _client("e2eb")
    context = _tar({"Dockerfile": DOCKERFILE, "hello.txt": b"hello from the context\n"})
    created = client.generic(
        "POST",
        "/api/v1/tenants/e2eb/builds/?tag=app:v1&build_arg=GREETING=berth",
        context,  # type: ignore[arg-type]
        content_type="application/x-tar",
    )
    assert created.status_code == 201, created.content
    build_id = created.json()["id"]

    lines = _follow(client, "e2eb", build_id)
    log = "".join(line.get("log", "") for line in lines)
    build = client.get(f"/api/v1/tenants/e2eb/builds/{build_id}/").json()
    assert lines[-1]["state"] == "succeeded", (build, log)
    assert "Step 1/5 : FROM busybox" in log
    assert "Step 3/5 : RUN" in log
    assert "Successfully tagged app:v1" in log
    assert build["image_digest"].startswith("sha256:")
    assert build["node"] in ("n1", "n2")
    assert (build["pushed"], build["image_reference"]) == (False, "app:v1")  # no registry
    assert build["duration_seconds"] > 0
    kept = client.get(f"/api/v1/tenants/e2eb/builds/{build_id}/logs/").json()
    assert "Successfully built" in kept["log"]
    assert not list(contexts.iterdir())  # the context is gone once the build ended

    # A service of the image runs on the node that built it.
    assert _run_app(client, "e2eb", "app:v1") == [build["node"]]
    assert "hello from the context" in _app_output(client, "e2eb")


def test_cancelled_and_failing_builds_on_an_agent(cluster: Cluster, contexts: Path) -> None:
    client = _client("e2ec")
    context = _tar({"Dockerfile": b"FROM busybox\nRUN echo started; sleep 8\nRUN echo never-ran\n"})
    created = client.generic(
        "POST",
        "/api/v1/tenants/e2ec/builds/?tag=slow",
        context,  # type: ignore[arg-type]
        content_type="application/x-tar",
    )
    assert created.status_code == 201, created.content
    build_id = created.json()["id"]
    wait_for(lambda: "Step 2/3" in Build.objects.get(pk=build_id).log, timeout=60, what="step 2")
    cancelled = client.post(f"/api/v1/tenants/e2ec/builds/{build_id}/cancel/")
    assert cancelled.status_code == 200, (cancelled.json(), Build.objects.get(pk=build_id).log)
    assert cancelled.json()["state"] == "cancelled"
    # The agent stops the build at the next step boundary (the builder can't interrupt a
    # running step) and says so; nothing is tagged, the build stays cancelled.
    wait_for(
        lambda: "cancelled" in Build.objects.get(pk=build_id).log,
        timeout=60,
        what="the agent's cancellation",
    )
    build = Build.objects.get(pk=build_id)
    assert build.state == "cancelled"
    assert build.node is not None
    references = agent_api(cluster.agent_named(build.node.name)).images.references("e2ec")
    assert not any(ref.startswith("slow") for ref in references), references

    # A failing step fails the build with the step's exit code, leaves no tag behind and
    # still counts its minute.
    failing = client.generic(
        "POST",
        "/api/v1/tenants/e2ec/builds/?tag=broken",
        _tar({"Dockerfile": b"FROM busybox\nRUN echo about to fail; exit 3\n"}),  # type: ignore[arg-type]
        content_type="application/x-tar",
    )
    assert failing.status_code == 201, failing.content
    lines = _follow(client, "e2ec", failing.json()["id"])
    assert lines[-1]["state"] == "failed", lines
    assert "3" in lines[-1]["reason"]
    log = "".join(line.get("log", "") for line in lines)
    assert "about to fail" in log
    from tenants.models import QuotaUsage

    used = QuotaUsage.objects.get(tenant__slug="e2ec", quota="build_minutes_month").used
    assert used == 2  # the cancelled build's minute and the failed one's
    assert not list(contexts.iterdir())


def _post_build(client: APIClient, slug: str, query: str, context: bytes) -> str:
    created = client.generic(
        "POST",
        f"/api/v1/tenants/{slug}/builds/?{query}",
        context,  # type: ignore[arg-type]
        content_type="application/x-tar",
    )
    assert created.status_code == 201, created.content
    return str(created.json()["id"])


@needs_registry
def test_a_build_is_pushed_and_runs_on_another_node_from_the_registry(
    registry_cluster: Cluster, contexts: Path
) -> None:
    from django.test import override_settings

    from registry.models import Tag
    from tenants.services import Actor
    from workloads.models import Node
    from workloads.services.nodes import set_node_state

    cluster = registry_cluster
    assert cluster.registry is not None
    host = cluster.registry.host
    client = _client("e2er")
    context = _tar({"Dockerfile": DOCKERFILE, "hello.txt": b"hello from the registry\n"})
    build_id = _post_build(client, "e2er", "tag=app:v1&build_arg=GREETING=berth", context)
    lines = _follow(client, "e2er", build_id)
    log = "".join(line.get("log", "") for line in lines)
    build = client.get(f"/api/v1/tenants/e2er/builds/{build_id}/").json()
    assert lines[-1]["state"] == "succeeded", (build, log)
    assert f"Pushing {host}/e2er/app:v1" in log
    assert build["pushed"] is True
    repository, _, manifest = build["image_reference"].partition("@")
    assert repository == f"{host}/e2er/app" and manifest.startswith("sha256:")
    # The registry told the control plane about the push (its notification).
    tag = wait_for(
        lambda: Tag.objects.filter(repository__tenant__slug="e2er", name="v1").first(),
        timeout=30,
        what="the registry's record of the pushed tag",
    )
    assert tag.manifest.digest == manifest

    # The build node can take no more work: a service naming the bare tag resolves it to
    # the pushed digest and runs on the other node, which pulls the image from the
    # registry with its own (pull-only) login.
    built_on = build["node"]
    other = next(a.name for a in cluster.agents if a.name != built_on)
    set_node_state(Node.objects.get(name=built_on), "cordoned", actor=Actor.for_system("e2e"))
    assert _run_app(client, "e2er", "app:v1") == [other]
    service = _service(client, "e2er", "app")
    assert (service["image"], service["resolved_image"]) == ("app:v1", build["image_reference"])
    pulled = agent_api(cluster.agent_named(other)).images.references("e2er")
    assert pulled and all(ref.startswith(f"{host}/e2er/app") for ref in pulled), pulled
    assert set(pulled.values()) == {manifest}
    assert "hello from the registry" in _app_output(client, "e2er")

    # A push the registry refuses (a token it cannot trust: signed for another issuer by
    # the live server when the node asks for it, right before pushing) fails the build,
    # which says why; its tag on the node is back where it was.
    before = agent_api(cluster.agent_named(other)).images.references("e2er").get("app:v1")
    with override_settings(BERTH_REGISTRY_ISSUER="not-berth"):
        failing_id = _post_build(
            client,
            "e2er",
            "tag=app:v1&build_arg=GREETING=again",
            _tar({"Dockerfile": DOCKERFILE, "hello.txt": b"x\n"}),
        )
        lines = _follow(client, "e2er", failing_id)
    failing = client.get(f"/api/v1/tenants/e2er/builds/{failing_id}/").json()
    assert lines[-1]["state"] == "failed", failing
    assert failing["node"] == other
    assert f"pushing {host}/e2er/app:v1 failed" in failing["reason"]
    assert "refused the pre-issued token (UNAUTHORIZED" in failing["reason"]
    assert (failing["pushed"], failing["image_reference"]) == (False, "")
    after = agent_api(cluster.agent_named(other)).images.references("e2er").get("app:v1")
    assert after == before
    assert Tag.objects.get(repository__tenant__slug="e2er", name="v1").manifest.digest == manifest

    # The control plane refuses the token when the tenant may no longer push (its storage
    # quota filled up while the build ran): the build fails with the quota's message.
    from tenants.models import QuotaUsage

    refused_id = _post_build(
        client,
        "e2er",
        "tag=app:v1&build_arg=GREETING=full",
        _tar({"Dockerfile": DOCKERFILE, "hello.txt": b"y\n"}),
    )
    storage = QuotaUsage.objects.get(tenant__slug="e2er", quota="storage_gib")
    limit = storage.tenant.quota_limits()["storage_gib"]
    QuotaUsage.objects.filter(pk=storage.pk).update(used=limit + storage.used)
    try:
        lines = _follow(client, "e2er", refused_id)
    finally:
        QuotaUsage.objects.filter(pk=storage.pk).update(used=storage.used)
    refused = client.get(f"/api/v1/tenants/e2er/builds/{refused_id}/").json()
    assert lines[-1]["state"] == "failed", refused
    assert refused["reason"].startswith(
        f"cannot push {host}/e2er/app:v1: the control plane refused a push token (403): "
        "quota storage_gib exceeded"
    ), refused["reason"]
    assert f"Pushing {host}" not in Build.objects.get(pk=refused_id).log
    assert agent_api(cluster.agent_named(other)).images.references("e2er").get("app:v1") == before

    # No registry token reached a log: the agents', the control worker's or the builds'.
    logs = [a.log.read_text(errors="replace") for a in cluster.agents]
    logs += [Build.objects.get(pk=pk).log for pk in (build_id, failing_id, refused_id)]
    assert not [text for text in logs if "eyJ" in text]
