"""Volumes, networks and builds on the control plane, with real Postgres and Redis (what
nodes receive is read from their real queues; what they send back is fed in as their
reports). A build through a real agent is in tests/e2e/test_builds.py."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from django.test import override_settings
from django.utils import timezone

from billing.models import BuildUsage
from runtime_agent import protocol
from tenants.choices import Scope
from tenants.models import Tenant, User
from tests.control.test_workloads import SYSTEM, make_node, queued, used
from workloads.models import Build, Node, Volume
from workloads.services import builds, deploy, placement, reports, storage

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def broker() -> redis.Redis:
    from django.conf import settings

    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    return client


@pytest.fixture(autouse=True)
def no_registry(tmp_path: Path, settings: Any) -> None:
    """No registry unless a test sets one up (whatever var/registry holds on this machine)."""
    settings.BERTH_REGISTRY_DIR = tmp_path / "no-registry"


@pytest.fixture
def registry_key(tmp_path: Path, settings: Any) -> Path:
    """A registry set up as far as the control plane is concerned: its token signing key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    directory = tmp_path / "registry"
    directory.mkdir()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (directory / "token.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    settings.BERTH_REGISTRY_DIR = directory
    settings.BERTH_REGISTRY_HOST = "registry.test:5000"
    return directory


@pytest.fixture
def contexts(tmp_path: Path) -> Any:
    with override_settings(BERTH_BUILD_CONTEXT_DIR=tmp_path / "ctx"):
        yield tmp_path / "ctx"


def context_tar(files: dict[str, bytes] | None = None) -> bytes:
    files = files or {"Dockerfile": b"FROM busybox\nRUN echo hi\n"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def api(
    client_for: Callable[..., Any], make_token: Callable[..., str], tenant: Tenant, user: User
) -> Any:
    return client_for(make_token(tenant, user, Scope.WRITE))


# --------------------------------------------------------------------------- volumes


def test_volume_lifecycle_reserves_and_releases_storage(
    acme: tuple[Tenant, User],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
    broker: redis.Redis,
) -> None:
    tenant, owner = acme
    client = api(client_for, make_token, tenant, owner)
    response = client.post(
        "/api/v1/tenants/acme/volumes/", {"name": "data", "size_gib": 2}, format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["node"] is None
    assert used(tenant, "storage_gib") == 2
    again = client.post("/api/v1/tenants/acme/volumes/", {"name": "data"}, format="json")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"
    bad = client.post("/api/v1/tenants/acme/volumes/", {"name": "Bad_Name"}, format="json")
    assert bad.status_code == 400
    listed = client.get("/api/v1/tenants/acme/volumes/").json()
    names = [v["name"] for v in listed.get("results", listed)]
    assert names == ["data"]

    node, credential = make_node("n1")
    service = deploy.create_service(
        tenant,
        name="db",
        data={"image": "busybox", "volumes": [{"name": "data", "target": "/var/lib/db"}]},
        replicas=1,
        actor=SYSTEM,
    )
    refused = client.delete("/api/v1/tenants/acme/volumes/data/")
    assert refused.status_code == 409
    assert refused.json()["error"]["details"]["services"] == ["db"]
    assert placement.schedule_pending() == 1
    (op,) = queued(broker, node)
    mounts = op["kwargs"]["spec"]["mounts"]
    assert mounts == [
        {
            "kind": "volume",
            "source": "data",
            "target": "/var/lib/db",
            "read_only": False,
            "size_bytes": 2 * 1024**3,
        }
    ]
    assert client.get("/api/v1/tenants/acme/volumes/data/").json()["node"] == "n1"

    deploy.delete_service(service, actor=SYSTEM)
    # The container is still being removed on the node: still refused.
    assert client.delete("/api/v1/tenants/acme/volumes/data/").status_code == 409
    container = service.containers.get()
    reports.handle_node_report(
        protocol.NodeReport(
            node_id=str(node.pk),
            credential=credential,
            sent_at=timezone.now().isoformat(),
            containers=(
                protocol.ContainerReport(
                    uid=str(container.pk), tenant="acme", name=container.agent_name, state="missing"
                ),
            ),
        )
    )
    broker.delete(node.queue)
    assert client.delete("/api/v1/tenants/acme/volumes/data/").status_code == 204
    assert used(tenant, "storage_gib") == 0
    (op,) = queued(broker, node)
    assert op["task"] == protocol.AGENT_REMOVE_VOLUME
    assert op["kwargs"]["name"] == "data"
    assert not Volume.objects.filter(tenant=tenant).exists()


def test_volume_over_storage_quota_is_refused_and_creates_nothing(
    acme: tuple[Tenant, User], make_token: Callable[..., str], client_for: Callable[..., Any]
) -> None:
    tenant, owner = acme
    client = api(client_for, make_token, tenant, owner)
    limit = tenant.quota_limits()["storage_gib"]
    response = client.post(
        "/api/v1/tenants/acme/volumes/", {"name": "huge", "size_gib": limit + 1}, format="json"
    )
    assert response.status_code == 409, response.content
    details = response.json()["error"]["details"]
    assert (details["quota"], details["limit"], details["requested"]) == (
        "storage_gib",
        limit,
        limit + 1,
    )
    assert not Volume.objects.exists()
    assert used(tenant, "storage_gib") == 0


def test_a_volume_pins_every_container_mounting_it_to_one_node(
    acme: tuple[Tenant, User], broker: redis.Redis
) -> None:
    tenant, _ = acme
    make_node("n1")
    make_node("n2")
    storage.create_volume(tenant, name="shared", actor=SYSTEM)
    mount = [{"name": "shared", "target": "/data"}]
    # Two replicas would spread over two nodes; the volume keeps them together.
    web = deploy.create_service(
        tenant, name="web", data={"image": "busybox", "volumes": mount}, replicas=2, actor=SYSTEM
    )
    assert placement.schedule_pending() == 1  # the second waits for the volume's node
    waiting = web.containers.get(state="pending")
    assert "waiting for another container to place volume shared" in waiting.pending_reason
    assert placement.schedule_pending() == 1
    volume = Volume.objects.get(name="shared")
    assert {c.node_id for c in web.containers.all()} == {volume.node_id}
    # A later service mounting it read-only lands there too, though the other node is empty.
    other = deploy.create_service(
        tenant,
        name="reader",
        data={"image": "busybox", "volumes": [{**mount[0], "read_only": True}]},
        replicas=1,
        actor=SYSTEM,
    )
    assert placement.schedule_pending() == 1
    assert other.containers.get().node_id == volume.node_id
    # When that node is gone, the work waits for it instead of starting with empty data.
    assert volume.node_id is not None
    Node.objects.filter(pk=volume.node_id).update(state="cordoned")
    third = deploy.create_service(
        tenant, name="third", data={"image": "busybox", "volumes": mount}, replicas=1, actor=SYSTEM
    )
    assert placement.schedule_pending() == 0
    node_name = Node.objects.get(pk=volume.node_id).name
    assert third.containers.get().pending_reason == (
        f"pinned to node {node_name} by its volume shared: node {node_name} is cordoned"
    )


def test_service_referencing_unknown_volume_or_network_is_refused(
    acme: tuple[Tenant, User], make_token: Callable[..., str], client_for: Callable[..., Any]
) -> None:
    tenant, owner = acme
    client = api(client_for, make_token, tenant, owner)
    for extra, word in (
        ({"volumes": [{"name": "nope", "target": "/d"}]}, "volume"),
        ({"networks": ["nope"]}, "network"),
    ):
        response = client.post(
            "/api/v1/tenants/acme/services/",
            {"name": "s", "image": "busybox", **extra},
            format="json",
        )
        assert response.status_code == 404, response.content
        assert f"no {word} named 'nope'" in response.json()["error"]["message"]
    bad_target = client.post(
        "/api/v1/tenants/acme/services/",
        {"name": "s", "image": "busybox", "volumes": [{"name": "x", "target": "rel"}]},
        format="json",
    )
    assert bad_target.status_code == 400
    assert not tenant.services.exists()


# --------------------------------------------------------------------------- networks


def test_networks_attach_services_and_are_not_deleted_while_used(
    acme: tuple[Tenant, User],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
    broker: redis.Redis,
) -> None:
    tenant, owner = acme
    client = api(client_for, make_token, tenant, owner)
    node, _ = make_node("n1")
    assert (
        client.post(
            "/api/v1/tenants/acme/networks/", {"name": "backend"}, format="json"
        ).status_code
        == 201
    )
    assert (
        client.post(
            "/api/v1/tenants/acme/networks/", {"name": "default"}, format="json"
        ).status_code
        == 400
    )
    response = client.post(
        "/api/v1/tenants/acme/services/",
        {"name": "api", "image": "busybox", "networks": ["backend"]},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response.json()["networks"] == ["backend"]
    placement.schedule_pending()
    (op,) = queued(broker, node)
    assert op["kwargs"]["spec"]["networks"] == [
        {"network": "backend", "aliases": ["api"], "ipv4_address": None}
    ]
    refused = client.delete("/api/v1/tenants/acme/networks/backend/")
    assert refused.status_code == 409
    assert "in use by service(s) api" in refused.json()["error"]["message"]
    assert client.get("/api/v1/tenants/acme/networks/backend/").json()["services"] == ["api"]
    assert client.delete("/api/v1/tenants/acme/services/api/").status_code == 204
    broker.delete(node.queue)
    assert client.delete("/api/v1/tenants/acme/networks/backend/").status_code == 204
    ops = queued(broker, node)
    assert [o["task"] for o in ops] == [protocol.AGENT_REMOVE_NETWORK]


def test_other_tenants_cannot_see_or_touch_volumes_networks_builds(
    acme: tuple[Tenant, User],
    make_tenant: Callable[..., tuple[Tenant, User]],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
    contexts: Path,
) -> None:
    tenant, _ = acme
    storage.create_volume(tenant, name="data", actor=SYSTEM)
    storage.create_network(tenant, name="net", actor=SYSTEM)
    build = builds.create_build(
        tenant, context=builds.store_context([context_tar()]), tag="app", actor=SYSTEM
    )
    other, other_owner = make_tenant("other")
    outsider = client_for(make_token(other, other_owner, Scope.ADMIN))
    for url in (
        "/api/v1/tenants/acme/volumes/data/",
        "/api/v1/tenants/acme/networks/net/",
        f"/api/v1/tenants/acme/builds/{build.pk}/",
        f"/api/v1/tenants/acme/builds/{build.pk}/logs/",
    ):
        assert outsider.get(url).status_code == 404, url
    for url in ("/api/v1/tenants/acme/volumes/data/", "/api/v1/tenants/acme/networks/net/"):
        assert outsider.delete(url).status_code == 404, url
    assert outsider.post(f"/api/v1/tenants/acme/builds/{build.pk}/cancel/").status_code == 404
    # Their own collections don't show acme's objects either.
    for kind in ("volumes", "networks", "builds"):
        body = outsider.get(f"/api/v1/tenants/other/{kind}/").json()
        assert body.get("results", body) == []


# --------------------------------------------------------------------------- builds


def test_build_upload_dispatch_context_fetch_and_report(
    acme: tuple[Tenant, User],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
    broker: redis.Redis,
    contexts: Path,
) -> None:
    tenant, owner = acme
    client = api(client_for, make_token, tenant, owner)
    node, credential = make_node("n1")
    other_node, other_credential = make_node("n2")
    tar = context_tar()
    response = client.generic(
        "POST",
        "/api/v1/tenants/acme/builds/?tag=app:v1&build_arg=GREETING=hi&no_cache=1",
        tar,
        content_type="application/x-tar",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["state"], body["tag"], body["context_size"]) == ("running", "app:v1", len(tar))
    assert body["build_args"] == {"GREETING": "hi"}
    # Its allowance is held while it runs: the minutes left, at most the build timeout.
    assert used(tenant, "build_minutes_month") == 60
    build = Build.objects.get(pk=body["id"])
    assert Path(build.context_path).read_bytes() == tar
    assert Path(build.context_path).parent == contexts
    ops = [*queued(broker, node), *queued(broker, other_node)]
    (op,) = ops
    assert op["task"] == protocol.AGENT_BUILD
    request = protocol.from_dict(protocol.BuildRequest, op["kwargs"]["request"])
    assert (request.tenant, request.tag, request.no_cache) == ("acme", "app:v1", True)
    build_node, build_credential = (
        (node, credential) if build.node_id == node.pk else (other_node, other_credential)
    )
    wrong_node, wrong_credential = (
        (other_node, other_credential) if build_node == node else (node, credential)
    )

    anonymous = client_for(None)
    fetched = anonymous.get(
        request.context_url,
        HTTP_X_BERTH_NODE=str(build_node.pk),
        HTTP_X_BERTH_NODE_CREDENTIAL=build_credential,
    )
    assert fetched.status_code == 200
    assert b"".join(fetched.streaming_content) == tar
    for headers in (
        {"HTTP_X_BERTH_NODE": str(wrong_node.pk), "HTTP_X_BERTH_NODE_CREDENTIAL": wrong_credential},
        {"HTTP_X_BERTH_NODE": str(build_node.pk), "HTTP_X_BERTH_NODE_CREDENTIAL": "bnc_wrong"},
        {},
    ):
        assert anonymous.get(request.context_url, **headers).status_code == 403

    def send(seq: int, log: str, size: int, **result: Any) -> None:
        builds.handle_build_report(
            protocol.BuildReport(
                build_id=str(build.pk),
                node_id=str(build_node.pk),
                credential=build_credential,
                seq=seq,
                log=log,
                log_size=size,
                **result,
            )
        )

    send(2, "Step 1/2 : FROM busybox\nStep 2/2 : RUN echo hi\n", 46)
    send(1, "Step 1/2", 8)  # late, older: ignored
    assert (
        client.get(f"/api/v1/tenants/acme/builds/{build.pk}/logs/")
        .json()["log"]
        .endswith("RUN echo hi\n")
    )
    started = timezone.now() - timedelta(seconds=90)
    send(
        3,
        "…hi\nSuccessfully built sha256:abc\n",
        80,
        state="succeeded",
        digest="sha256:abc",
        reference="app:v1",
        started_at=started.isoformat(),
        finished_at=timezone.now().isoformat(),
    )
    build.refresh_from_db()
    assert (build.state, build.image_digest, build.image_reference) == (
        "succeeded",
        "sha256:abc",
        "app:v1",
    )
    assert not Path(build.context_path).exists()
    assert used(tenant, "build_minutes_month") == 2  # 90 s rounds up to two minutes
    assert BuildUsage.objects.get(build_id=str(build.pk)).minutes > 1
    # A redelivered result changes nothing.
    send(3, "x", 80, state="failed", error="late", started_at=started.isoformat())
    build.refresh_from_db()
    assert build.state == "succeeded"
    assert used(tenant, "build_minutes_month") == 2
    follow = client.get(f"/api/v1/tenants/acme/builds/{build.pk}/logs/?follow=1")
    lines = [json.loads(line) for line in b"".join(follow.streaming_content).splitlines()]
    assert lines[-1]["state"] == "succeeded"
    assert "Successfully built" in lines[0]["log"]

    # A service using the image goes to the node holding it (the image was not pushed:
    # there is no registry reference to resolve the tag to).
    for _ in range(3):
        service = deploy.create_service(
            tenant, name=f"app{_}", data={"image": "app:v1"}, replicas=1, actor=SYSTEM
        )
        assert service.resolved_image == ""
        placement.schedule_pending()
        container = service.containers.get()
        assert (container.node_id, container.spec["image"]) == (build_node.pk, "app:v1")


def _rows_containing(text: str) -> list[str]:
    """Tables with a row whose text form contains ``text`` (every column, JSON included)."""
    from django.db import connection

    found = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(
                f'SELECT 1 FROM "{table}" t WHERE t::text LIKE %s LIMIT 1',  # noqa: S608
                [f"%{text}%"],
            )
            if cursor.fetchone():
                found.append(table)
    return found


def _ask_push_token(client: Any, build: Build, node: Node | None, credential: str) -> Any:
    """The node's request for a build's push token (as runtime_agent.build_job sends it)."""
    headers = {"HTTP_X_BERTH_NODE_CREDENTIAL": credential}
    if node is not None:
        headers["HTTP_X_BERTH_NODE"] = str(node.pk)
    return client.post(protocol.BUILD_PUSH_TOKEN_PATH.format(build_id=build.pk), **headers)


def test_build_with_a_registry_gets_a_push_token_for_its_repository_alone_when_it_pushes(
    acme: tuple[Tenant, User],
    client_for: Callable[..., Any],
    broker: redis.Redis,
    contexts: Path,
    registry_key: Path,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import jwt
    from django.urls import reverse

    from registry import services as registry_services
    from registry.tokens import load_signing_key

    minted: list[str] = []
    issue_token = registry_services.issue_token

    def counting_issue_token(**kwargs: Any) -> Any:
        minted.append(kwargs["subject"])
        return issue_token(**kwargs)

    monkeypatch.setattr(registry_services, "issue_token", counting_issue_token)
    tenant, _ = acme
    node, credential = make_node("n1")
    build = builds.create_build(
        tenant, context=builds.store_context([context_tar()]), tag="team/app:v1", actor=SYSTEM
    )
    # The task message names the target and holds no registry credential at all.
    (op,) = queued(broker, node)
    assert "push_token" not in op["kwargs"]["request"]
    request = protocol.from_dict(protocol.BuildRequest, op["kwargs"]["request"])
    assert request.push_to == "registry.test:5000/acme/team/app:v1"
    assert "eyJ" not in json.dumps(op)  # no JWT (a base64url-encoded '{"') anywhere
    assert minted == []
    with pytest.raises(ValueError, match="push_token"):  # what an agent does with an old one
        protocol.from_dict(
            protocol.BuildRequest, {**op["kwargs"]["request"], "push_token": "eyJ.x.y"}
        )

    # Right before its push, the node running the build gets a token with its credential.
    path = protocol.BUILD_PUSH_TOKEN_PATH.format(build_id=build.pk)
    assert reverse("build-push-token", kwargs={"build_id": build.pk}) == path
    anonymous = client_for(None)
    response = _ask_push_token(anonymous, build, node, credential)
    assert response.status_code == 200, response.content
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    assert body["expires_in"] == settings.BERTH_REGISTRY_TOKEN_TTL == 300
    key, _ = load_signing_key(str(registry_key / "token.key"))
    claims = jwt.decode(
        body["token"],
        key.public_key(),
        algorithms=["RS256"],
        audience=settings.BERTH_REGISTRY_SERVICE,
        issuer=settings.BERTH_REGISTRY_ISSUER,
    )
    assert claims["access"] == [
        {"type": "repository", "name": "acme/team/app", "actions": ["pull", "push"]}
    ]
    assert claims["exp"] - claims["iat"] == settings.BERTH_REGISTRY_TOKEN_TTL
    assert claims["sub"] == f"build {build.pk} on node n1"
    assert minted == [claims["sub"]]
    # The token goes back in the response only: nothing in the database holds it.
    assert _rows_containing(body["token"].rsplit(".", 1)[-1]) == []

    # Anyone else is refused, and nothing is minted: another node (with its own valid
    # credential), a wrong credential, no credential, an unknown build.
    other, other_credential = make_node("n2")
    for client_node, client_credential in (
        (other, other_credential),
        (node, "bnc_wrong"),
        (node, other_credential),
        (None, credential),
    ):
        refused = _ask_push_token(anonymous, build, client_node, client_credential)
        assert refused.status_code == 403, refused.content
        assert "token" not in refused.json()
    unknown = anonymous.post(
        protocol.BUILD_PUSH_TOKEN_PATH.format(build_id="00000000-0000-0000-0000-000000000000"),
        HTTP_X_BERTH_NODE=str(node.pk),
        HTTP_X_BERTH_NODE_CREDENTIAL=credential,
    )
    assert unknown.status_code == 403
    assert anonymous.get(path).status_code == 405
    assert minted == [claims["sub"]]

    # A tenant that may not push now gets the registry's refusal, which the agent reports.
    from tenants.models import QuotaUsage

    limit = tenant.quota_limits()["storage_gib"]
    QuotaUsage.objects.update_or_create(
        tenant=tenant, quota="storage_gib", defaults={"used": limit}
    )
    full = _ask_push_token(anonymous, build, node, credential)
    assert full.status_code == 403
    assert full.json()["error"]["message"].startswith("quota storage_gib exceeded")
    QuotaUsage.objects.filter(tenant=tenant, quota="storage_gib").update(used=0)
    Tenant.objects.filter(pk=tenant.pk).update(status="suspended")
    suspended = _ask_push_token(anonymous, build, node, credential)
    assert suspended.status_code == 403
    assert "suspended" in suspended.json()["error"]["message"]
    Tenant.objects.filter(pk=tenant.pk).update(status="active")
    assert minted == [claims["sub"]]

    manifest = "sha256:" + "a" * 64

    def finish(target: Build, **result: Any) -> Build:
        builds.handle_build_report(
            protocol.BuildReport(
                build_id=str(target.pk),
                node_id=str(node.pk),
                credential=credential,
                seq=1,
                log="Pushed\n",
                log_size=7,
                state="succeeded",
                digest="sha256:cfg",
                reference="team/app:v1",
                manifest_digest=manifest,
                **result,
            )
        )
        target.refresh_from_db()
        return target

    build = finish(build, pushed_reference=request.push_to)
    assert (build.state, build.pushed, build.image_reference) == (
        "succeeded",
        True,
        f"registry.test:5000/acme/team/app@{manifest}",
    )
    # A finished build gets no more tokens.
    assert _ask_push_token(anonymous, build, node, credential).status_code == 403
    # The registry reference runs on any node (spread over both), and so does the bare
    # tag: the service resolves it to that reference when it is created.
    pulled = deploy.create_service(
        tenant, name="pulled", data={"image": build.image_reference}, replicas=2, actor=SYSTEM
    )
    tagged = deploy.create_service(
        tenant, name="tagged", data={"image": "team/app:v1"}, replicas=2, actor=SYSTEM
    )
    assert (tagged.image, tagged.resolved_image) == ("team/app:v1", build.image_reference)
    placement.schedule_pending()
    for service in (pulled, tagged):
        assert {c.node_id for c in service.containers.all()} == {node.pk, other.pk}
        assert {c.spec["image"] for c in service.containers.all()} == {build.image_reference}

    # A node claiming a push somewhere else fails the build.
    stray = builds.create_build(
        tenant, context=builds.store_context([context_tar()]), tag="team/app:v2", actor=SYSTEM
    )
    Build.objects.filter(pk=stray.pk).update(node=node)
    stray = finish(stray, pushed_reference="registry.test:5000/acme/elsewhere:v2")
    assert (stray.state, stray.pushed, stray.image_reference) == ("failed", False, "")
    assert "not to registry.test:5000/acme/team/app:v2" in stray.reason

    # A cancelled build gets none either: the node asking after the cancellation is
    # refused, so the push it was about to make never happens.
    cancelled = builds.create_build(
        tenant, context=builds.store_context([context_tar()]), tag="team/app:v3", actor=SYSTEM
    )
    cancelled.refresh_from_db()
    cancelled_node = other if cancelled.node_id == other.pk else node
    cancelled_credential = other_credential if cancelled_node == other else credential
    granted = _ask_push_token(anonymous, cancelled, cancelled_node, cancelled_credential)
    assert granted.status_code == 200
    builds.cancel_build(cancelled, actor=SYSTEM)
    after = _ask_push_token(anonymous, cancelled, cancelled_node, cancelled_credential)
    assert after.status_code == 403
    assert after.json()["error"]["message"] == "this node has no running build with that id"
    assert len(minted) == 2


def _pushed_build(tenant: Tenant, tag: str, credentials: dict[Any, str], manifest: str) -> Build:
    """A build of ``tag`` that its node reports built and pushed as ``manifest``."""
    build = builds.create_build(
        tenant, context=builds.store_context([context_tar()]), tag=tag, actor=SYSTEM
    )
    build.refresh_from_db()
    builds.handle_build_report(
        protocol.BuildReport(
            build_id=str(build.pk),
            node_id=str(build.node_id),
            credential=credentials[build.node_id],
            seq=1,
            log="Pushed\n",
            log_size=7,
            state="succeeded",
            digest="sha256:cfg",
            reference=tag,
            manifest_digest=manifest,
            pushed_reference=builds.push_target(build),
        )
    )
    build.refresh_from_db()
    assert (build.state, build.pushed) == ("succeeded", True), build.reason
    return build


def test_a_pushed_builds_tag_resolves_to_its_digest_when_deployed(
    acme: tuple[Tenant, User],
    make_tenant: Callable[..., tuple[Tenant, User]],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
    broker: redis.Redis,
    contexts: Path,
    registry_key: Path,
) -> None:
    """Swarm's way: a bare tag of a pushed build is resolved to the build's registry
    digest when a service is created or deployed (a job submitted); every replica runs
    that digest on any node until the next deploy resolves the tag again."""
    from tenants.models import AuditLog
    from tests.control.test_workloads import exited, report, running
    from workloads.models import Container, Service
    from workloads.services import jobs, reconcile

    tenant, owner = acme
    client = api(client_for, make_token, tenant, owner)
    n1, c1 = make_node("n1")
    n2, c2 = make_node("n2")
    credentials = {n1.pk: c1, n2.pk: c2}
    first = _pushed_build(tenant, "app:v1", credentials, "sha256:" + "1" * 64)
    first_ref = f"registry.test:5000/acme/app@sha256:{'1' * 64}"
    assert first.image_reference == first_ref

    # Created with the bare tag: the API shows what was written and what it resolved to;
    # the replicas carry the digest reference, are not pinned and spread over both nodes.
    created = client.post(
        "/api/v1/tenants/acme/services/",
        {"name": "web", "image": "app:v1", "replicas": 3},
        format="json",
    )
    assert created.status_code == 201, created.content
    assert (created.json()["image"], created.json()["resolved_image"]) == ("app:v1", first_ref)
    placement.schedule_pending()
    web = Service.objects.get(tenant=tenant, name="web")
    containers = list(web.containers.all())
    assert {c.spec["image"] for c in containers} == {first_ref}
    assert storage.pin_constraints(containers).constraints == {}
    assert {c.node_id for c in containers} == {n1.pk, n2.pk}
    sent = [
        op["kwargs"]["spec"]["image"]
        for node in (n1, n2)
        for op in queued(broker, node)
        if op["task"] == protocol.AGENT_APPLY_CONTAINER
    ]
    assert sent == [first_ref] * 3  # what the nodes are told to run (and pull)
    shown = client.get("/api/v1/tenants/acme/services/web/").json()
    assert (shown["image"], shown["resolved_image"]) == ("app:v1", first_ref)
    for node, credential in ((n1, c1), (n2, c2)):
        report(node, credential, *(running(c) for c in web.containers.filter(node=node)))
    reconcile.advance_deployments()

    # A second build of app:v1 changes nothing that runs: not the service, not a scale-up,
    # not a replica moved off a dead node.
    second = _pushed_build(tenant, "app:v1", credentials, "sha256:" + "2" * 64)
    second_ref = f"registry.test:5000/acme/app@sha256:{'2' * 64}"
    assert second.image_reference == second_ref
    deploy.scale_service(web, 4, actor=SYSTEM)
    Node.objects.filter(pk=n1.pk).update(last_heartbeat_at=timezone.now() - timedelta(minutes=5))
    reconcile.mark_down_stale_nodes()
    placement.schedule_pending()
    web.refresh_from_db()
    live = web.containers.exclude(state__in=["lost", "removed"])
    assert live.count() == 4 and web.resolved_image == first_ref
    assert {c.spec["image"] for c in live} == {first_ref}
    Node.objects.filter(pk=n1.pk).update(state="ready", last_heartbeat_at=timezone.now())

    # Deploying the same tag resolves it again: the new digest is the change rolled out,
    # start-first beside the old replicas. A new replica that dies rolls back to the old
    # digest; the next deploy rolls the new one out for good.
    patched = client.patch(
        "/api/v1/tenants/acme/services/web/", {"env": {"RELEASE": "2"}}, format="json"
    )
    assert patched.status_code == 202, patched.content
    assert (patched.json()["image"], patched.json()["resolved_image"]) == ("app:v1", second_ref)
    deployment = web.deployments.get(generation=patched.json()["generation"])
    entry = AuditLog.objects.filter(tenant=tenant, action="service.deploy").latest("id")
    assert entry.details["changed"] == ["env", "resolved_image"]
    placement.schedule_pending()
    new = list(web.containers.filter(generation=deployment.generation))
    assert len(new) == 4 and {c.spec["image"] for c in new} == {second_ref}
    assert {c.spec["image"] for c in deploy.live_containers(web).filter(generation=1)} == {
        first_ref
    }
    report(n2, c2, *(running(c) for c in web.containers.filter(node=n2, generation=1)))
    dying = new[0]
    assert dying.node is not None
    report(dying.node, credentials[dying.node.pk], exited(dying, 1))
    reconcile.advance_deployments()
    web.refresh_from_db()
    deployment.refresh_from_db()
    assert (deployment.state, web.resolved_image, web.image) == ("rolled_back", first_ref, "app:v1")
    rolled = deploy.deploy_service(web, {"image": "app:v1"}, actor=SYSTEM)
    web.refresh_from_db()
    assert web.resolved_image == second_ref
    placement.schedule_pending()
    for node, credential in ((n1, c1), (n2, c2)):
        report(
            node, credential, *(running(c) for c in deploy.live_containers(web).filter(node=node))
        )
    reconcile.advance_deployments()
    rolled.refresh_from_db()
    assert rolled.state == "succeeded"
    assert {c.spec["image"] for c in deploy.live_containers(web)} == {second_ref}

    # A batch job naming the tag runs the digest it resolved to at submission.
    submitted = client.post(
        "/api/v1/tenants/acme/jobs/", {"name": "batch", "image": "app:v1"}, format="json"
    )
    assert submitted.status_code == 201, submitted.content
    assert (submitted.json()["image"], submitted.json()["resolved_image"]) == ("app:v1", second_ref)
    jobs.dispatch_runs()
    (run,) = Container.objects.filter(tenant=tenant, job_run__job__name="batch")
    assert run.spec["image"] == second_ref

    # Anything else runs as written: an image of no build, an explicit registry reference,
    # a tag no build of this tenant has (another tenant's build of it never counts).
    globex, globex_owner = make_tenant("globex")
    for target, name, image in (
        (tenant, "plain", "busybox"),
        (tenant, "explicit", first_ref),
        (tenant, "v2", "app:v2"),
        (globex, "web", "app:v1"),
    ):
        service = deploy.create_service(
            target, name=name, data={"image": image}, replicas=1, actor=SYSTEM
        )
        assert service.resolved_image == ""
        assert service.containers.get().spec["image"] == image
    assert jobs.submit_job(globex, {"image": "app:v1"}, actor=SYSTEM).resolved_image == ""
    other_client = api(client_for, make_token, globex, globex_owner)
    assert other_client.get("/api/v1/tenants/globex/services/web/").json()["resolved_image"] is None
    assert builds.resolve_image(globex, "app:v1") == ""
    assert builds.resolve_image(tenant, "app") == ""  # app:latest: never built
    assert builds.resolve_image(tenant, "registry.test:5000/app:v1") == ""


def test_build_is_refused_when_its_push_would_be(
    acme: tuple[Tenant, User],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
    broker: redis.Redis,
    contexts: Path,
    registry_key: Path,
) -> None:
    from tenants.models import QuotaUsage

    tenant, owner = acme
    client = api(client_for, make_token, tenant, owner)
    queued_build = builds.create_build(
        tenant, context=builds.store_context([context_tar()]), tag="app", actor=SYSTEM
    )
    assert queued_build.state == "queued"  # no node yet
    make_node("n1")
    limit = tenant.quota_limits()["storage_gib"]
    QuotaUsage.objects.update_or_create(
        tenant=tenant, quota="storage_gib", defaults={"used": limit}
    )
    refused = client.generic(
        "POST",
        "/api/v1/tenants/acme/builds/?tag=app",
        context_tar(),
        content_type="application/x-tar",
    )
    assert refused.status_code == 403, refused.content
    assert "quota storage_gib exceeded" in refused.json()["error"]["message"]
    assert Build.objects.filter(tenant=tenant).count() == 1
    assert [p.name for p in contexts.iterdir()] == [Path(queued_build.context_path).name]
    # The queued build meets the same refusal when a node turns up: failed, minute released.
    assert builds.reconcile_builds() == 1
    queued_build.refresh_from_db()
    assert queued_build.state == "failed"
    assert queued_build.reason.startswith("cannot push the image: quota storage_gib exceeded")
    assert used(tenant, "build_minutes_month") == 0


def test_build_bad_input_leaves_nothing_behind(
    make_tenant: Callable[..., tuple[Tenant, User]],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
    contexts: Path,
) -> None:
    tenant, owner = make_tenant("tiny", plan="free", seats=1)
    client = api(client_for, make_token, tenant, owner)
    url = "/api/v1/tenants/tiny/builds/"

    def post(data: bytes, query: str = "?tag=app") -> Any:
        return client.generic("POST", url + query, data, content_type="application/x-tar")

    not_tar = post(b"this is not a tar archive" * 100)
    assert not_tar.status_code == 400
    assert "not a readable tar" in not_tar.json()["error"]["message"]
    assert post(context_tar(), "?tag=Bad:Tag!").status_code == 400
    assert post(context_tar(), "?tag=evil.example.com:5000/x/y").status_code == 400
    with override_settings(BERTH_BUILD_CONTEXT_MAX_BYTES=4096):
        big = post(context_tar({"Dockerfile": b"FROM busybox\n", "blob": b"x" * 10_000}))
        assert big.status_code == 413
        assert big.json()["error"]["code"] == "context_too_large"
    multipart = client.post(
        url,
        {"context": io.BytesIO(context_tar()), "tag": "app:1", "build_args": '{"A": "b"}'},
        format="multipart",
    )
    assert multipart.status_code == 201, multipart.content
    assert multipart.json()["state"] == "queued"  # no node yet
    assert multipart.json()["reason"] == "waiting for a ready node"
    # Out of build minutes: refused with the quota's figures.
    limit = tenant.quota_limits()["build_minutes_month"]
    from tenants.models import QuotaUsage

    QuotaUsage.objects.filter(tenant=tenant, quota="build_minutes_month").update(used=limit)
    refused = post(context_tar())
    assert refused.status_code == 409
    details = refused.json()["error"]["details"]
    assert (details["quota"], details["limit"], details["used"]) == (
        "build_minutes_month",
        limit,
        limit,
    )
    assert Build.objects.count() == 1
    assert sorted(p.name for p in contexts.iterdir()) == [f"{multipart.json()['id']}.tar"]
    # Cancelling the queued build gives its held minute back and removes its context.
    cancelled = client.post(f"{url}{multipart.json()['id']}/cancel/")
    assert cancelled.json()["state"] == "cancelled"
    assert used(tenant, "build_minutes_month") == limit - 60  # its allowance came back
    assert list(contexts.iterdir()) == []
    assert client.post(f"{url}{multipart.json()['id']}/cancel/").status_code == 409


def test_running_build_cancel_reaches_its_node_and_node_loss_fails_it(
    acme: tuple[Tenant, User], broker: redis.Redis, contexts: Path
) -> None:
    tenant, _ = acme
    node, _ = make_node("n1")
    first = builds.create_build(
        tenant, context=builds.store_context([context_tar()]), tag="a", actor=SYSTEM
    )
    second = builds.create_build(
        tenant, context=builds.store_context([context_tar()]), tag="b", actor=SYSTEM
    )
    broker.delete(node.queue)
    builds.cancel_build(first, actor=SYSTEM)
    (op,) = queued(broker, node)
    assert (op["task"], op["kwargs"]) == (protocol.AGENT_CANCEL_BUILD, {"build_id": str(first.pk)})
    Node.objects.filter(pk=node.pk).update(state="down")
    assert builds.reconcile_builds() == 1
    second.refresh_from_db()
    assert (second.state, second.reason) == ("failed", "the build's node went down")
    assert used(tenant, "build_minutes_month") == 2  # a minute each, counted once
