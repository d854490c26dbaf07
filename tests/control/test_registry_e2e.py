"""The registry end to end: a real docker-registry process whose token realm and
notification endpoint are this Django control plane (``live_server``), driven by skopeo,
docker (when an engine runs) and the node agent's distribution client."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from django.utils import timezone

from registry import services
from registry.models import Manifest, RegistryEvent, RegistryUsage, Repository, Tag
from registry.tokens import Access, issue_token
from runtime_agent.agent import Agent
from runtime_agent.config import AgentConfig
from runtime_agent.distribution import BearerToken, Credentials, pull, push
from runtime_agent.distribution.errors import RegistryDenied as AgentDenied
from runtime_agent.distribution.errors import RegistryError, RegistryUnauthorized
from tenants import services as tenant_services
from tenants.choices import Role, Scope
from tenants.models import APIToken, Tenant, User
from tests.control.conftest import SYSTEM
from tests.registry_process import (
    RegistryProcess,
    busybox_layers,
    make_layer,
    needs_registry,
    skopeo,
    start_registry,
    write_oci_layout,
)

pytestmark = [pytest.mark.django_db(transaction=True), needs_registry]


@pytest.fixture(scope="module")
def registry_process(
    live_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryProcess]:
    process = start_registry(
        tmp_path_factory.mktemp("registry"),
        realm=f"{live_server.url}/registry/token",
        notify_url=f"{live_server.url}/registry/events/",
    )
    yield process
    process.stop()


@pytest.fixture
def reg(registry_process: RegistryProcess, settings: Any) -> Iterator[RegistryProcess]:
    settings.BERTH_REGISTRY_DIR = registry_process.directory
    settings.BERTH_REGISTRY_URL = registry_process.url
    settings.BERTH_REGISTRY_HOST = registry_process.host
    yield registry_process
    # Let the registry's notifications of this test land before the tables are flushed,
    # so the flush never races an event being recorded.
    last, stable_since = -1, time.monotonic()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        count = RegistryEvent.objects.count()
        if count != last:
            last, stable_since = count, time.monotonic()
        elif time.monotonic() - stable_since > 0.5:
            break
        time.sleep(0.1)


@pytest.fixture
def tenant_with_token(
    make_tenant: Callable[..., tuple[Tenant, User]], make_token: Callable[..., str]
) -> Callable[..., tuple[Tenant, str]]:
    """A fresh tenant (unique slug: late notifications of other tests never match it)."""

    def make(scope: str = Scope.WRITE) -> tuple[Tenant, str]:
        tenant, owner = make_tenant(f"t{secrets.token_hex(4)}")
        return tenant, make_token(tenant, owner, scope)

    return make


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return Agent(AgentConfig(root=tmp_path / "agent", run_root=tmp_path / "run", name="btreg"))


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def layout(tmp_path: Path, name: str = "img", **extra: bytes) -> tuple[Path, str]:
    path = tmp_path / name
    digest = write_oci_layout(path, busybox_layers({"app/id": os.urandom(64), **extra}))
    return path, digest


def skopeo_push(src: Path, dest: str, creds: str | None) -> subprocess.CompletedProcess[str]:
    args = ["copy", "--dest-tls-verify=false"]
    args += [f"--dest-creds={creds}"] if creds else ["--dest-no-creds"]
    return skopeo(*args, f"oci:{src}", f"docker://{dest}")


def skopeo_pull(src: str, dest: Path, creds: str | None) -> subprocess.CompletedProcess[str]:
    args = ["copy", "--src-tls-verify=false"]
    args += [f"--src-creds={creds}"] if creds else ["--src-no-creds"]
    return skopeo(*args, f"docker://{src}", f"oci:{dest}")


def test_tenant_token_pushes_and_pulls_and_notifications_are_recorded(
    reg: RegistryProcess, tenant_with_token: Callable[..., tuple[Tenant, str]], tmp_path: Path
) -> None:
    tenant, token = tenant_with_token()
    src, digest = layout(tmp_path)
    name = f"{reg.host}/{tenant.slug}/web:1"

    pushed = skopeo_push(src, name, f"anyone:{token}")
    assert pushed.returncode == 0, pushed.stderr

    tag = wait_for(
        lambda: Tag.objects.filter(repository__tenant=tenant, name="1").first(), "tag record"
    )
    manifest = tag.manifest
    assert manifest.digest == digest
    assert manifest.media_type == "application/vnd.oci.image.manifest.v1+json"
    blob_sizes = sum(p.stat().st_size for p in (src / "blobs/sha256").iterdir())
    assert manifest.total_size == blob_sizes  # manifest + config + layers
    assert Repository.objects.get(tenant=tenant).full_name == f"{tenant.slug}/web"
    usage = wait_for(lambda: RegistryUsage.objects.filter(tenant=tenant).first(), "usage")
    assert usage.bytes_used == blob_sizes and usage.reserved_gib == 1

    out = tmp_path / "back"
    pulled = skopeo_pull(name, out, f"anyone:{token}")
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads((out / "index.json").read_text())["manifests"][0]["digest"] == digest
    # The registry only notifies what changes records (manifest pushes, deletes).
    time.sleep(1)
    actions = set(
        RegistryEvent.objects.filter(repository__startswith=tenant.slug).values_list(
            "action", "media_type"
        )
    )
    assert actions == {("push", "application/vnd.oci.image.manifest.v1+json")}


def test_another_tenants_token_is_refused_both_ways(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    tmp_path: Path,
    agent: Agent,
) -> None:
    owner, owner_token = tenant_with_token()
    intruder, intruder_token = tenant_with_token()
    src, _ = layout(tmp_path)
    name = f"{reg.host}/{owner.slug}/private:1"
    assert skopeo_push(src, name, f"x:{owner_token}").returncode == 0

    refused_pull = skopeo_pull(name, tmp_path / "stolen", f"x:{intruder_token}")
    assert refused_pull.returncode != 0
    assert "unauthorized" in refused_pull.stderr.lower() or "denied" in refused_pull.stderr.lower()
    refused_push = skopeo_push(src, f"{reg.host}/{owner.slug}/planted:1", f"x:{intruder_token}")
    assert refused_push.returncode != 0
    with pytest.raises((RegistryUnauthorized, AgentDenied)):
        pull(agent, "intruder", name, Credentials("x", intruder_token))
    assert not Repository.objects.filter(name="planted").exists()
    assert not Repository.objects.filter(tenant=intruder).exists()


def test_read_scope_pulls_but_cannot_push(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    make_token: Callable[..., str],
    tmp_path: Path,
) -> None:
    tenant, write_token = tenant_with_token()
    owner = User.objects.get(memberships__tenant=tenant)
    read_token = make_token(tenant, owner, Scope.READ)
    src, _ = layout(tmp_path)
    assert skopeo_push(src, f"{reg.host}/{tenant.slug}/app:1", f"x:{write_token}").returncode == 0

    assert (
        skopeo_pull(f"{reg.host}/{tenant.slug}/app:1", tmp_path / "o", f"x:{read_token}").returncode
        == 0
    )
    refused = skopeo_push(src, f"{reg.host}/{tenant.slug}/app:2", f"x:{read_token}")
    assert refused.returncode != 0
    time.sleep(1)
    assert not Tag.objects.filter(repository__tenant=tenant, name="2").exists()


def test_viewer_role_cannot_push_even_with_a_write_scope_token(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    add_member: Callable[..., User],
    tmp_path: Path,
) -> None:
    tenant, _ = tenant_with_token()
    viewer = add_member(tenant, Role.VIEWER)
    _, secret = tenant_services.create_api_token(
        tenant, viewer, name="viewer", scope=Scope.READ, actor=SYSTEM
    )
    src, _ = layout(tmp_path)
    assert skopeo_push(src, f"{reg.host}/{tenant.slug}/v:1", f"x:{secret}").returncode != 0


def test_push_over_storage_quota_is_refused_naming_the_quota(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    live_server: Any,
    tmp_path: Path,
    agent: Agent,
) -> None:
    tenant, token = tenant_with_token()
    src, _ = layout(tmp_path)
    name = f"{reg.host}/{tenant.slug}/big:1"
    assert skopeo_push(src, name, f"x:{token}").returncode == 0
    wait_for(lambda: RegistryUsage.objects.filter(tenant=tenant, bytes_used__gt=0).exists(), "use")
    limit_gib = tenant.quota_limits()["storage_gib"]
    tenant_services.set_quota_override(tenant, "storage_gib", -limit_gib, actor=SYSTEM)

    # The token server refuses push scope with a message naming the quota; docker and the
    # agent print it (skopeo 1.9 only shows the 403).
    refused = skopeo_push(src, f"{reg.host}/{tenant.slug}/big:2", f"x:{token}")
    assert refused.returncode != 0 and "403" in refused.stderr
    response = requests.get(
        f"{live_server.url}/registry/token",
        params={"service": "berth-registry", "scope": f"repository:{tenant.slug}/big:pull,push"},
        headers=_basic("x", token),
        timeout=10,
    )
    assert response.status_code == 403
    error = response.json()["errors"][0]
    assert error["code"] == "DENIED"
    assert error["message"].startswith("quota storage_gib exceeded: limit 0 GiB, in use ")
    pull(agent, tenant.slug, name, Credentials("x", token))
    agent.images.tag(tenant.slug, name, f"{reg.host}/{tenant.slug}/big:3")
    with pytest.raises(AgentDenied, match="quota storage_gib exceeded"):
        push(agent, tenant.slug, f"{reg.host}/{tenant.slug}/big:3", Credentials("x", token))
    # Pulling still works over quota.
    assert skopeo_pull(name, tmp_path / "out", f"x:{token}").returncode == 0
    assert not Tag.objects.filter(repository__tenant=tenant, name__in=["2", "3"]).exists()


def test_public_repository_allows_anonymous_pull_only(
    reg: RegistryProcess, tenant_with_token: Callable[..., tuple[Tenant, str]], tmp_path: Path
) -> None:
    tenant, token = tenant_with_token()
    src, _ = layout(tmp_path)
    name = f"{reg.host}/{tenant.slug}/pub:1"
    assert skopeo_push(src, name, f"x:{token}").returncode == 0
    assert skopeo_pull(name, tmp_path / "a", None).returncode != 0

    repo = wait_for(lambda: Repository.objects.filter(tenant=tenant, name="pub").first(), "repo")
    services.set_public(repo, True, actor=SYSTEM)

    assert skopeo_pull(name, tmp_path / "b", None).returncode == 0
    assert skopeo_push(src, f"{reg.host}/{tenant.slug}/pub:2", None).returncode != 0


NODE_SECRET = "bnc_test-node-credential"


def _place(tenant: Tenant, node_name: str, image: str) -> str:
    """A container of ``tenant`` using ``image``, placed on the node ``node_name``; returns
    the node's id (its credential is ``NODE_SECRET``)."""
    from tenants.models import hash_secret
    from workloads.models import Container, Node

    node, _ = Node.objects.get_or_create(
        name=node_name, defaults={"credential_hash": hash_secret(NODE_SECRET)}
    )
    Container.objects.create(
        tenant=tenant,
        name=f"svc{secrets.token_hex(3)}",
        node=node,
        state="scheduled",
        spec={"image": image},
    )
    return str(node.pk)


def test_node_credential_pulls_only_public_images_tenants_pull_with_their_own_tokens(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    tmp_path: Path,
    agent: Agent,
) -> None:
    from tenants.errors import PermissionDenied
    from workloads.services.nodes import issue_pull_token

    a, token_a = tenant_with_token()
    b, token_b = tenant_with_token()
    src_a, digest_a = layout(tmp_path, "a")
    src_b, digest_b = layout(tmp_path, "b")
    image_a = f"{reg.host}/{a.slug}/svc:1"
    assert skopeo_push(src_a, image_a, f"x:{token_a}").returncode == 0
    assert skopeo_push(src_b, f"{reg.host}/{b.slug}/svc:1", f"x:{token_b}").returncode == 0
    _, secret = services.create_node_credential("node-1", actor=SYSTEM)
    node = Credentials("node-node-1", secret)

    # A container of a on node-1 runs a's image: the node's own login still pulls nothing
    # private; the token minted for a pulls it.
    node_id = _place(a, "node-1", image_a)
    with pytest.raises((RegistryUnauthorized, AgentDenied)):
        pull(agent, a.slug, image_a, node)
    issued = issue_pull_token(node_id, NODE_SECRET, a.slug, image_a)
    assert issued is not None
    assert pull(agent, a.slug, image_a, BearerToken(issued.token)).digest == digest_a
    # That token reaches a's one repository: not b's.
    with pytest.raises((RegistryUnauthorized, AgentDenied)):
        pull(agent, a.slug, f"{reg.host}/{b.slug}/svc:1", BearerToken(issued.token))
    # b places a container naming a's image on the same node: no token for b.
    _place(b, "node-1", image_a)
    with pytest.raises(services.RegistryDenied, match="not public"):
        issue_pull_token(node_id, NODE_SECRET, b.slug, image_a)
    # Nor for an image no container of that tenant here runs, nor with a wrong credential.
    with pytest.raises(PermissionDenied):
        issue_pull_token(node_id, NODE_SECRET, b.slug, f"{reg.host}/{b.slug}/svc@{digest_b}")
    with pytest.raises(PermissionDenied):
        issue_pull_token(node_id, "bnc_wrong", a.slug, image_a)

    # Public: anyone pulls it, the node's login too.
    # Recorded from the registry's notification, which may still be on its way.
    repo_b = wait_for(
        lambda: Repository.objects.filter(tenant=b, name="svc").first(), "b's repository"
    )
    services.set_public(repo_b, True, actor=SYSTEM)
    assert pull(agent, a.slug, f"{reg.host}/{b.slug}/svc:1", node).digest == digest_b
    agent.images.tag(a.slug, image_a, f"{reg.host}/{a.slug}/svc:2")
    with pytest.raises((RegistryUnauthorized, AgentDenied)):
        push(agent, a.slug, f"{reg.host}/{a.slug}/svc:2", node)
    with pytest.raises(RegistryUnauthorized):
        pull(agent, a.slug, image_a, Credentials("node-node-2", secret))

    services.revoke_node_credential("node-1", actor=SYSTEM)
    with pytest.raises(RegistryUnauthorized):
        pull(agent, a.slug, image_a, node)


def test_agent_pulls_with_token_and_pushes_an_image_skopeo_copies_back_byte_equal(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    tmp_path: Path,
    agent: Agent,
) -> None:
    tenant, token = tenant_with_token()
    creds = Credentials("agent", token)
    src, digest = layout(tmp_path)
    assert skopeo_push(src, f"{reg.host}/{tenant.slug}/base:1", f"x:{token}").returncode == 0

    result = pull(agent, tenant.slug, f"{reg.host}/{tenant.slug}/base:1", creds)
    assert result.digest == digest
    base = agent.images.resolve(tenant.slug, f"{reg.host}/{tenant.slug}/base:1")

    # "Build" on top: one new layer over the pulled ones, committed by the image store.
    blob, _ = make_layer({"app/built": os.urandom(50_000)})
    new_layer = agent.content.write_bytes(blob)
    layers = [*base.layers, {"mediaType": base.layers[0]["mediaType"], "digest": new_layer}]
    built = agent.images.commit(
        tenant.slug, f"{reg.host}/{tenant.slug}/app:1", {"config": {"Cmd": ["/bin/sh"]}}, layers
    )
    pushed = push(agent, tenant.slug, f"{reg.host}/{tenant.slug}/app:1", creds)
    assert pushed.digest == built.manifest_digest
    # The base layers are mounted from the repository they were pulled from, not re-sent.
    assert set(pushed.mounted) == {d["digest"] for d in base.layers}
    assert pushed.uploaded and set(pushed.uploaded) == {built.config_digest, new_layer}

    out = tmp_path / "copied"
    assert skopeo_pull(f"{reg.host}/{tenant.slug}/app:1", out, f"x:{token}").returncode == 0
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == built.manifest_digest
    for digest_ in [built.manifest_digest, built.config_digest, new_layer]:
        hex_ = digest_.split(":")[1]
        assert (out / "blobs/sha256" / hex_).read_bytes() == agent.content.read_bytes(digest_)
    wait_for(
        lambda: Tag.objects.filter(repository__name="app", repository__tenant=tenant).exists(),
        "tag of the agent's push",
    )


def test_notification_replay_is_idempotent(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    tmp_path: Path,
    client: Any,
) -> None:
    tenant, token = tenant_with_token()
    src, digest = layout(tmp_path)
    assert skopeo_push(src, f"{reg.host}/{tenant.slug}/r:1", f"x:{token}").returncode == 0
    wait_for(lambda: Tag.objects.filter(repository__tenant=tenant).exists(), "tag")
    event = RegistryEvent.objects.filter(repository=f"{tenant.slug}/r", tag="1").first()
    assert event is not None
    manifest = json.loads((src / "blobs/sha256" / digest.split(":")[1]).read_bytes())
    envelope = {
        "events": [
            {
                "id": event.event_id,
                "timestamp": timezone.now().isoformat(),
                "action": "push",
                "target": {
                    "mediaType": event.media_type,
                    "digest": digest,
                    "size": event.size,
                    "repository": f"{tenant.slug}/r",
                    "tag": "1",
                    "references": [manifest["config"], *manifest["layers"]],
                },
            },
            {
                "id": "fresh-" + secrets.token_hex(8),
                "timestamp": timezone.now().isoformat(),
                "action": "push",
                "target": {
                    "mediaType": event.media_type,
                    "digest": digest,
                    "size": event.size,
                    "repository": f"{tenant.slug}/r",
                    "tag": "1",
                    "references": [manifest["config"], *manifest["layers"]],
                },
            },
        ]
    }
    secret = (reg.directory / "notify.secret").read_text().strip()
    before = (
        Manifest.objects.filter(repository__tenant=tenant).count(),
        Tag.objects.filter(repository__tenant=tenant).count(),
        RegistryUsage.objects.get(tenant=tenant).bytes_used,
    )
    for expected in ({"recorded": 1, "duplicate": 1}, {"recorded": 0, "duplicate": 2}):
        response = client.post(
            "/registry/events/",
            data=json.dumps(envelope),
            content_type="application/vnd.docker.distribution.events.v1+json",
            HTTP_AUTHORIZATION=f"Bearer {secret}",
        )
        assert response.status_code == 200
        assert {k: response.json()[k] for k in expected} == expected
    after = (
        Manifest.objects.filter(repository__tenant=tenant).count(),
        Tag.objects.filter(repository__tenant=tenant).count(),
        RegistryUsage.objects.get(tenant=tenant).bytes_used,
    )
    assert after == before

    forged = client.post(
        "/registry/events/",
        data=json.dumps(envelope),
        content_type="application/vnd.docker.distribution.events.v1+json",
        HTTP_AUTHORIZATION="Bearer wrong",
    )
    assert forged.status_code == 401


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_bad_credentials_expired_tokens_and_bad_content_get_registry_errors(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    live_server: Any,
    tmp_path: Path,
) -> None:
    tenant, token = tenant_with_token()
    realm = f"{live_server.url}/registry/token"
    scope = {"service": "berth-registry", "scope": f"repository:{tenant.slug}/x:pull,push"}

    wrong = requests.get(realm, params=scope, headers=_basic("u", "brt_nope_nope"), timeout=10)
    assert wrong.status_code == 401
    assert wrong.json()["errors"][0]["code"] == "UNAUTHORIZED"
    not_a_token = requests.get(realm, params=scope, headers=_basic("u", "hunter2"), timeout=10)
    assert not_a_token.status_code == 401

    APIToken.objects.filter(tenant=tenant).update(expires_at=timezone.now() - timedelta(1))
    expired = requests.get(realm, params=scope, headers=_basic("u", token), timeout=10)
    assert expired.status_code == 401 and "expired" in expired.json()["errors"][0]["message"]
    APIToken.objects.filter(tenant=tenant).update(expires_at=None)

    # An expired registry JWT is refused by the registry itself.
    old = issue_token(
        key_path=str(reg.directory / "token.key"),
        issuer="berth",
        service="berth-registry",
        subject="t",
        access=[Access("repository", f"{tenant.slug}/x", ("pull", "push"))],
        lifetime=60,
        now=time.time() - 3600,
    )
    stale = requests.get(
        f"{reg.url}/v2/{tenant.slug}/x/tags/list",
        headers={"Authorization": f"Bearer {old.token}"},
        timeout=10,
    )
    assert stale.status_code == 401 and stale.json()["errors"][0]["code"] == "UNAUTHORIZED"

    granted = requests.get(realm, params=scope, headers=_basic("u", token), timeout=10)
    assert granted.status_code == 200
    body = granted.json()
    assert set(body) == {"token", "access_token", "expires_in", "issued_at"}
    bearer = {"Authorization": f"Bearer {body['token']}"}

    # A blob whose content does not match its digest: DIGEST_INVALID.
    start = requests.post(
        f"{reg.url}/v2/{tenant.slug}/x/blobs/uploads/", headers=bearer, timeout=10
    )
    assert start.status_code == 202
    location = start.headers["Location"]
    location = location if location.startswith("http") else f"{reg.url}{location}"
    bad = requests.put(
        location,
        params={"digest": "sha256:" + "0" * 64},
        data=b"not what the digest says",
        headers={**bearer, "Content-Type": "application/octet-stream"},
        timeout=10,
    )
    assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == "DIGEST_INVALID"

    # An upload abandoned half-way (a client killed mid-push) is never a blob.
    started = requests.post(
        f"{reg.url}/v2/{tenant.slug}/x/blobs/uploads/", headers=bearer, timeout=10
    )
    upload = started.headers["Location"]
    upload = upload if upload.startswith("http") else f"{reg.url}{upload}"
    partial = requests.patch(
        upload,
        data=b"x" * 10000,
        headers={**bearer, "Content-Type": "application/octet-stream"},
        timeout=10,
    )
    assert partial.status_code == 202
    half_digest = "sha256:" + hashlib.sha256(b"x" * 20000).hexdigest()
    head = requests.head(
        f"{reg.url}/v2/{tenant.slug}/x/blobs/{half_digest}", headers=bearer, timeout=10
    )
    assert head.status_code == 404

    # A manifest naming blobs the registry does not have: MANIFEST_BLOB_UNKNOWN.
    missing = "sha256:" + "1" * 64
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": missing,
            "size": 10,
        },
        "layers": [],
    }
    put = requests.put(
        f"{reg.url}/v2/{tenant.slug}/x/manifests/1",
        data=json.dumps(manifest),
        headers={**bearer, "Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        timeout=10,
    )
    assert put.status_code == 400 and put.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"

    # Names breaking the rules get no grant at all.
    bad_name = requests.get(
        realm,
        params={"service": "berth-registry", "scope": f"repository:{tenant.slug.upper()}/X:push"},
        headers=_basic("u", token),
        timeout=10,
    )
    assert bad_name.status_code == 200
    assert _claims(bad_name.json()["token"])["access"] == []

    time.sleep(1)
    assert not Repository.objects.filter(tenant=tenant).exists()
    assert not Manifest.objects.filter(repository__tenant=tenant).exists()


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _built_image(
    reg: RegistryProcess, agent: Agent, tenant: Tenant, token: str, tmp_path: Path, tag: str
) -> str:
    """An image in the agent's store under ``tag``, as a build leaves it (its base pushed
    to the tenant's registry first); its manifest digest."""
    src, digest = layout(tmp_path)
    assert skopeo_push(src, f"{reg.host}/{tenant.slug}/base:1", f"x:{token}").returncode == 0
    pull(agent, tenant.slug, f"{reg.host}/{tenant.slug}/base:1", Credentials("x", token))
    agent.images.tag(tenant.slug, f"{reg.host}/{tenant.slug}/base:1", tag)
    return digest


def test_a_builds_push_token_pushes_its_repository_and_nothing_else(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    tmp_path: Path,
    agent: Agent,
    settings: Any,
) -> None:
    """The token the control plane mints for a build (workloads.services.builds) against
    the real registry: its one repository, pull and push; every other push refused."""
    tenant, token = tenant_with_token()
    other, other_token = tenant_with_token()
    digest = _built_image(reg, agent, tenant, token, tmp_path, "app:v1")

    issued = services.repository_push_token(tenant, "app", subject="build b1 on node n1")
    assert issued.expires_in == settings.BERTH_REGISTRY_TOKEN_TTL
    bearer = BearerToken(issued.token)
    assert issued.token not in repr(bearer)
    pushed = push(agent, tenant.slug, f"{reg.host}/{tenant.slug}/app:v1", bearer, source="app:v1")
    assert pushed.digest == digest
    # The base layers could be mounted from base, but the token cannot read base: sent.
    assert pushed.mounted == [] and len(pushed.uploaded) == 3
    tag = wait_for(
        lambda: Tag.objects.filter(repository__tenant=tenant, repository__name="app").first(),
        "the pushed tag's record",
    )
    assert tag.manifest.digest == digest
    again = pull(agent, tenant.slug, f"{reg.host}/{tenant.slug}/app@{digest}", bearer)
    assert again.digest == digest

    for target in (
        f"{reg.host}/{other.slug}/app:v1",  # another tenant's repository of the same name
        f"{reg.host}/{tenant.slug}/base:2",  # another repository of the same tenant
    ):
        with pytest.raises((RegistryUnauthorized, AgentDenied)):
            push(agent, tenant.slug, target, bearer, source="app:v1")
    with pytest.raises((RegistryUnauthorized, AgentDenied)):
        pull(agent, tenant.slug, f"{reg.host}/{tenant.slug}/base:1", bearer)
    refused = skopeo_pull(f"{reg.host}/{other.slug}/app:v1", tmp_path / "o", f"x:{other_token}")
    assert refused.returncode != 0  # nothing reached the other tenant's namespace
    assert not Repository.objects.filter(tenant=other).exists()

    # A tenant that may not push gets no token: over its storage quota.
    from tenants.models import QuotaUsage

    limit = tenant.quota_limits()["storage_gib"]
    QuotaUsage.objects.filter(tenant=tenant, quota="storage_gib").update(used=limit + 1)
    with pytest.raises(services.RegistryDenied, match="quota storage_gib exceeded"):
        services.repository_push_token(tenant, "app", subject="build b2")


def test_a_push_outliving_its_short_token_goes_on_with_a_renewed_one(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    tmp_path: Path,
    agent: Agent,
    settings: Any,
) -> None:
    """Build push tokens live BERTH_REGISTRY_TOKEN_TTL seconds; the agent renews one that
    is about to expire, and retries once with a fresh one after the registry refuses it."""
    tenant, token = tenant_with_token()
    digest = _built_image(reg, agent, tenant, token, tmp_path, "app:v1")
    target = f"{reg.host}/{tenant.slug}/app:v1"
    minted: list[str] = []

    def renew() -> str:
        minted.append(services.repository_push_token(tenant, "app", subject="renewal").token)
        return minted[-1]

    # Refused by the registry (here: not a token at all): one renewal, then the push works.
    with pytest.raises(RegistryUnauthorized, match="refused the pre-issued token"):
        push(agent, tenant.slug, target, BearerToken("not-a-token"), source="app:v1")
    pushed = push(
        agent, tenant.slug, target, BearerToken("not-a-token", renew=renew), source="app:v1"
    )
    assert pushed.digest == digest and len(minted) == 1

    # About to expire (exp within RENEW_BEFORE): renewed before it is used, once.
    settings.BERTH_REGISTRY_TOKEN_TTL = 2
    short = services.repository_push_token(tenant, "app", subject="build b1").token
    settings.BERTH_REGISTRY_TOKEN_TTL = 300
    minted.clear()
    agent.images.tag(tenant.slug, f"{reg.host}/{tenant.slug}/base:1", "app:v2")
    again = push(
        agent,
        tenant.slug,
        f"{reg.host}/{tenant.slug}/app:v2",
        BearerToken(short, renew=renew),
        source="app:v2",
    )
    assert again.digest == digest and len(minted) == 1


def test_agent_errors_for_wrong_credentials(
    reg: RegistryProcess, tenant_with_token: Callable[..., tuple[Tenant, str]], agent: Agent
) -> None:
    tenant, _ = tenant_with_token()
    with pytest.raises(RegistryUnauthorized) as info:
        pull(agent, tenant.slug, f"{reg.host}/{tenant.slug}/x:1", Credentials("u", "brt_wrong"))
    assert info.value.registry_code == "UNAUTHORIZED"
    with pytest.raises(RegistryError):
        pull(agent, tenant.slug, f"{reg.host}/{tenant.slug}/x:1", None)


def test_api_deletes_retention_and_garbage_collection(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    client_for: Callable[[str | None], Any],
    tmp_path: Path,
) -> None:
    tenant, token = tenant_with_token(Scope.ADMIN)
    digests = {}
    for tag in ("1", "2", "3"):
        src, digests[tag] = layout(tmp_path, f"img{tag}", big=os.urandom(300_000))
        assert skopeo_push(src, f"{reg.host}/{tenant.slug}/web:{tag}", f"x:{token}").returncode == 0
    wait_for(lambda: Tag.objects.filter(repository__tenant=tenant).count() == 3, "three tags")
    repo = Repository.objects.get(tenant=tenant, name="web")
    api = client_for(token)
    base = f"/api/v1/tenants/{tenant.slug}/registry/repositories/{repo.pk}"
    full_usage = services.registry_bytes(tenant)

    assert api.delete(f"{base}/tags/1/").status_code == 204
    gone = skopeo_pull(f"{reg.host}/{tenant.slug}/web:1", tmp_path / "o1", f"x:{token}")
    assert gone.returncode != 0 and "manifest unknown" in gone.stderr.lower()
    by_digest = f"{reg.host}/{tenant.slug}/web@{digests['1']}"
    assert skopeo_pull(by_digest, tmp_path / "o1d", f"x:{token}").returncode == 0  # untagged

    assert api.delete(f"{base}/manifests/{digests['2']}/").status_code == 204
    assert not Tag.objects.filter(repository=repo, name="2").exists()
    pinned = f"{reg.host}/{tenant.slug}/web@{digests['2']}"
    assert skopeo_pull(pinned, tmp_path / "o2", f"x:{token}").returncode != 0
    assert services.registry_bytes(tenant) < full_usage

    policy = api.put(
        f"{base}/retention/",
        {"keep_last_tags": None, "delete_untagged_after_days": 0},
        format="json",
    )
    assert policy.status_code == 200
    applied = api.post(f"{base}/retention/apply/")
    assert applied.json() == {"tags": [], "manifests": [digests["1"]]}
    assert skopeo_pull(by_digest, tmp_path / "o1e", f"x:{token}").returncode != 0
    assert list(Manifest.objects.filter(repository=repo).values_list("digest", flat=True)) == [
        digests["3"]
    ]

    src, digests["4"] = layout(tmp_path, "img4")
    assert skopeo_push(src, f"{reg.host}/{tenant.slug}/web:4", f"x:{token}").returncode == 0
    wait_for(lambda: Tag.objects.filter(repository=repo, name="4").exists(), "tag 4")
    api.put(
        f"{base}/retention/",
        {"keep_last_tags": 1, "delete_untagged_after_days": None},
        format="json",
    )
    assert api.post(f"{base}/retention/apply/").json() == {"tags": ["3"], "manifests": []}

    run = services.run_garbage_collection(actor=SYSTEM)
    assert run.succeeded, run.output
    assert run.blobs_eligible and run.blobs_eligible >= 4  # two manifests, configs, layers
    assert run.bytes_freed and run.bytes_freed > 600_000
    assert (
        skopeo_pull(f"{reg.host}/{tenant.slug}/web:4", tmp_path / "o4", f"x:{token}").returncode
        == 0
    )


def test_retention_keeps_digests_that_workloads_run(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    client_for: Callable[[str | None], Any],
    tmp_path: Path,
) -> None:
    """A service deployed from a build's tag runs its digest; once a newer push moves the
    tag on, that manifest is untagged but still what replicas start from: retention of
    untagged manifests leaves it alone until nothing runs it any more."""
    from workloads.models import Service

    tenant, token = tenant_with_token(Scope.ADMIN)
    digests = {}
    for name in ("old", "new"):
        src, digests[name] = layout(tmp_path, f"img-{name}", big=os.urandom(100_000))
        assert skopeo_push(src, f"{reg.host}/{tenant.slug}/app:v1", f"x:{token}").returncode == 0
        digest = digests[name]

        def tagged(digest: str = digest) -> bool:
            return Tag.objects.filter(
                repository__tenant=tenant, name="v1", manifest__digest=digest
            ).exists()

        wait_for(tagged, f"v1 -> {name}")
    pinned = f"{reg.host}/{tenant.slug}/app@{digests['old']}"
    service = Service.objects.create(
        tenant=tenant, name="web", image="app:v1", resolved_image=pinned
    )
    repo = Repository.objects.get(tenant=tenant, name="app")
    assert services.digests_in_use(repo) == {digests["old"]}
    api = client_for(token)
    base = f"/api/v1/tenants/{tenant.slug}/registry/repositories/{repo.pk}"
    api.put(
        f"{base}/retention/",
        {"keep_last_tags": None, "delete_untagged_after_days": 0},
        format="json",
    )
    assert api.post(f"{base}/retention/apply/").json() == {"tags": [], "manifests": []}
    assert skopeo_pull(pinned, tmp_path / "still", f"x:{token}").returncode == 0

    service.state = "deleted"
    service.save(update_fields=["state"])
    assert services.digests_in_use(repo) == set()
    applied = api.post(f"{base}/retention/apply/").json()
    assert applied == {"tags": [], "manifests": [digests["old"]]}
    assert skopeo_pull(pinned, tmp_path / "gone", f"x:{token}").returncode != 0


def test_agent_cli_login_pull_push_logout(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from runtime_agent.cli.main import main

    tenant, token = tenant_with_token()
    src, digest = layout(tmp_path)
    name = f"{reg.host}/{tenant.slug}/cli:1"
    assert skopeo_push(src, name, f"x:{token}").returncode == 0
    monkeypatch.setenv("BERTH_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("BERTH_RUN_ROOT", str(tmp_path / "run"))

    assert main(["login", reg.host, "-u", "me", "-p", "brt_wrong_token"]) == 125
    assert "UNAUTHORIZED" in capsys.readouterr().err
    assert main(["login", reg.host, "-u", "me", "-p", token]) == 0
    auth_file = tmp_path / "root" / "registry-auth.json"
    assert oct(auth_file.stat().st_mode & 0o777) == "0o600"
    assert main(["pull", "--tenant", tenant.slug, name]) == 0
    out = capsys.readouterr().out
    assert f"Digest: {digest}" in out and "Pull complete" in out
    assert (
        main(["push", "--tenant", tenant.slug, "--source", name, f"{reg.host}/{tenant.slug}/cli:2"])
        == 0
    )
    assert f"digest: {digest}" in capsys.readouterr().out
    assert main(["logout", reg.host]) == 0
    assert main(["pull", "--tenant", tenant.slug, name]) == 125


@pytest.mark.docker
def test_docker_login_push_pull_with_a_tenant_token(
    reg: RegistryProcess,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    tmp_path: Path,
) -> None:
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no Docker engine")
    tenant, token = tenant_with_token()
    _, intruder_token = tenant_with_token()
    env = dict(os.environ, DOCKER_CONFIG=str(tmp_path / "docker-config"))

    def docker(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    rootfs = tmp_path / "rootfs.tar"
    import tarfile

    with tarfile.open(rootfs, "w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
    image = f"{reg.host}/{tenant.slug}/docker-app:1"
    assert docker("import", str(rootfs), image).returncode == 0
    try:
        assert (
            docker(
                "login", reg.host, "-u", "intruder", "--password-stdin", stdin=intruder_token
            ).returncode
            == 0
        )
        refused = docker("push", image)
        assert refused.returncode != 0
        bad = docker("login", reg.host, "-u", "x", "--password-stdin", stdin="brt_bad_token")
        assert bad.returncode != 0
        login = docker("login", reg.host, "-u", "anything", "--password-stdin", stdin=token)
        assert login.returncode == 0, login.stderr
        pushed = docker("push", image)
        assert pushed.returncode == 0, pushed.stderr
        wait_for(lambda: Tag.objects.filter(repository__tenant=tenant, name="1").exists(), "tag")
        assert docker("rmi", image).returncode == 0
        pulled = docker("pull", image)
        assert pulled.returncode == 0, pulled.stderr
        # Over quota, docker prints the token server's message naming the quota.
        limit = tenant.quota_limits()["storage_gib"]
        tenant_services.set_quota_override(tenant, "storage_gib", -limit, actor=SYSTEM)
        assert docker("tag", image, f"{reg.host}/{tenant.slug}/docker-app:2").returncode == 0
        over = docker("push", f"{reg.host}/{tenant.slug}/docker-app:2")
        assert over.returncode != 0
        assert "quota storage_gib exceeded" in over.stderr + over.stdout
    finally:
        docker("rmi", "-f", image, f"{reg.host}/{tenant.slug}/docker-app:2")
        docker("logout", reg.host)
