"""Registry API and records, fed with notification envelopes shaped like
docker-registry's, describing what a real registry process holds (recording checks every
size against it); the registry sends them itself in test_registry_e2e.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from django.conf import settings
from rest_framework.test import APIClient

from registry import services
from registry.models import Manifest, RegistryEvent, RegistryUsage, Repository, Tag
from tenants import services as tenant_services
from tenants.choices import Role, Scope
from tenants.models import QuotaUsage, Tenant, User
from tests.registry_process import RegistryProcess, needs_registry, start_registry

OCI = "application/vnd.oci.image.manifest.v1+json"
pytestmark = needs_registry


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def padded(label: str, size: int) -> bytes:
    return label.encode().ljust(size, b".")


def manifest_of(seed: str, layer_size: int = 1000) -> tuple[bytes, list[dict[str, Any]]]:
    """An 800-byte OCI manifest of a 100-byte config, a 5000-byte layer every seed shares
    and a ``layer_size``-byte layer of its own; and its references with their contents."""
    references: list[dict[str, Any]] = [
        {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "content": padded(f"config {seed}", 100),
        },
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "content": padded("shared layer", 5000),
        },
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "content": padded(f"layer {seed}", layer_size),
        },
    ]
    for ref in references:
        ref.update(digest=digest_of(ref["content"]), size=len(ref["content"]))
    described = [{k: ref[k] for k in ("mediaType", "digest", "size")} for ref in references]
    body = {"schemaVersion": 2, "mediaType": OCI, "config": described[0], "layers": described[1:]}
    unpadded = len(json.dumps({**body, "annotations": {"pad": ""}}).encode())
    body["annotations"] = {"pad": "x" * (800 - unpadded)}
    return json.dumps(body).encode(), references


def manifest_digest(seed: str) -> str:
    return digest_of(manifest_of(seed)[0])


def push_event(repo: str, tag: str, seed: str, layer_size: int = 1000) -> dict[str, Any]:
    """The event docker-registry sends for a push of :func:`manifest_of`, after storing
    the manifest and its blobs in the real registry (whose sizes recording checks)."""
    manifest, references = manifest_of(seed, layer_size)
    registry = settings.BERTH_REGISTRY_URL
    for ref in references:
        upload = requests.post(f"{registry}/v2/{repo}/blobs/uploads/", timeout=10)
        location = upload.headers["Location"]
        stored = requests.put(
            location if location.startswith("http") else f"{registry}{location}",
            params={"digest": ref["digest"]},
            data=ref["content"],
            headers={"Content-Type": "application/octet-stream"},
            timeout=10,
        )
        assert stored.status_code == 201, stored.text
    put = requests.put(
        f"{registry}/v2/{repo}/manifests/{tag}",
        data=manifest,
        headers={"Content-Type": OCI},
        timeout=10,
    )
    assert put.status_code == 201, put.text
    return {
        "id": f"ev-{repo}-{tag}-{seed}",
        "timestamp": "2026-01-01T00:00:00Z",
        "action": "push",
        "target": {
            "mediaType": OCI,
            "digest": digest_of(manifest),
            "size": len(manifest),
            "length": len(manifest),
            "repository": repo,
            "tag": tag,
            "references": [
                {k: ref[k] for k in ("mediaType", "digest", "size")} for ref in references
            ],
        },
        "actor": {"name": "someone"},
    }


@pytest.fixture(scope="module")
def registry_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """A real docker-registry (no auth, no notifications) holding what events describe."""
    process = start_registry(tmp_path_factory.mktemp("registry"), auth=False)
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def _registry(registry_store: RegistryProcess, settings: Any) -> None:
    settings.BERTH_REGISTRY_DIR = registry_store.directory
    settings.BERTH_REGISTRY_URL = registry_store.url


@pytest.fixture
def acme_repo(acme: tuple[Tenant, User]) -> Tenant:
    tenant, _ = acme
    services.record_events(
        {
            "events": [
                push_event("acme/web", "1", "a"),
                push_event("acme/web", "2", "b"),
                push_event("acme/api", "latest", "c"),
            ]
        }
    )
    return tenant


def test_events_create_repositories_tags_manifests_and_count_storage_once(
    acme_repo: Tenant,
) -> None:
    web = Repository.objects.get(tenant=acme_repo, name="web")
    assert sorted(web.tags.values_list("name", flat=True)) == ["1", "2"]
    manifest = Manifest.objects.get(repository=web, digest=manifest_digest("a"))
    assert manifest.media_type == OCI and manifest.total_size == 800 + 100 + 5000 + 1000
    # Three manifests, three configs, three own layers, one shared layer counted once.
    assert services.registry_bytes(acme_repo) == 3 * (800 + 100 + 1000) + 5000
    usage = RegistryUsage.objects.get(tenant=acme_repo)
    assert usage.bytes_used == 10700 and usage.reserved_gib == 1
    assert QuotaUsage.objects.get(tenant=acme_repo, quota="storage_gib").used == 1


def test_replayed_and_unknown_events(acme_repo: Tenant) -> None:
    before = (Manifest.objects.count(), Tag.objects.count(), services.registry_bytes(acme_repo))
    counts = services.record_events({"events": [push_event("acme/web", "1", "a")]})
    assert counts == {"recorded": 0, "duplicate": 1, "ignored": 0, "failed": 0}
    outside = services.record_events({"events": [push_event("nobody/web", "1", "z"), {}]})
    assert outside == {"recorded": 1, "duplicate": 0, "ignored": 1, "failed": 0}
    assert RegistryEvent.objects.get(event_id="ev-nobody/web-1-z").outcome.startswith("ignored")
    assert (
        Manifest.objects.count(),
        Tag.objects.count(),
        services.registry_bytes(acme_repo),
    ) == before


def test_retag_moves_the_tag_and_delete_event_frees_storage(acme_repo: Tenant) -> None:
    services.record_events({"events": [push_event("acme/web", "1", "b")]})
    tag = Tag.objects.get(repository__name="web", name="1")
    assert tag.manifest.digest == manifest_digest("b")
    delete = {
        "id": "del-1",
        "action": "delete",
        "target": {"repository": "acme/web", "digest": manifest_digest("a")},
    }
    services.record_events({"events": [delete]})
    assert not Manifest.objects.filter(digest=manifest_digest("a")).exists()
    assert services.registry_bytes(acme_repo) == 2 * 1900 + 5000


def test_api_lists_repositories_tags_and_manifests(
    acme_repo: Tenant, owner_token: str, client_for: Callable[[str | None], APIClient]
) -> None:
    client = client_for(owner_token)
    listing = client.get("/api/v1/tenants/acme/registry/repositories/")
    assert listing.status_code == 200, listing.content
    names = {r["full_name"]: r for r in listing.json()["results"]}
    assert set(names) == {"acme/web", "acme/api"}
    web = names["acme/web"]
    assert web["pull_name"].endswith("/acme/web") and web["public"] is False
    assert {t["name"]: t["size"] for t in web["tags"]} == {"1": 6900, "2": 6900}

    tags = client.get(f"/api/v1/tenants/acme/registry/repositories/{web['id']}/tags/").json()
    assert {t["name"]: t["digest"] for t in tags} == {
        "1": manifest_digest("a"),
        "2": manifest_digest("b"),
    }
    manifests = client.get(
        f"/api/v1/tenants/acme/registry/repositories/{web['id']}/manifests/"
    ).json()
    assert {m["digest"]: m["tags"] for m in manifests} == {
        manifest_digest("a"): ["1"],
        manifest_digest("b"): ["2"],
    }
    usage = client.get("/api/v1/tenants/acme/registry/usage/").json()
    assert usage["bytes_used"] == 10700 and usage["repositories"] == 2


def test_api_public_flag_and_retention_need_write(
    acme_repo: Tenant,
    make_token: Callable[..., str],
    client_for: Callable[[str | None], APIClient],
    owner_token: str,
) -> None:
    web = Repository.objects.get(tenant=acme_repo, name="web")
    owner = User.objects.get(email="owner@acme.example")
    reader = client_for(make_token(acme_repo, owner, Scope.READ))
    url = f"/api/v1/tenants/acme/registry/repositories/{web.pk}/"
    assert reader.patch(url, {"public": True}, format="json").status_code == 403
    writer = client_for(owner_token)
    response = writer.patch(url, {"public": True}, format="json")
    assert response.status_code == 200 and response.json()["public"] is True
    assert writer.patch(url, {"public": True, "name": "x"}, format="json").status_code == 400

    retention = writer.put(
        f"{url}retention/", {"keep_last_tags": 1, "delete_untagged_after_days": None}, format="json"
    )
    assert retention.status_code == 200, retention.content
    assert retention.json()["keep_last_tags"] == 1
    bad = writer.put(
        f"{url}retention/", {"keep_last_tags": 0, "delete_untagged_after_days": None}, format="json"
    )
    assert bad.status_code == 400


def test_other_tenant_sees_nothing(
    acme_repo: Tenant,
    make_tenant: Callable[..., tuple[Tenant, User]],
    make_token: Callable[..., str],
    client_for: Callable[[str | None], APIClient],
) -> None:
    other, other_owner = make_tenant("globex")
    client = client_for(make_token(other, other_owner, Scope.ADMIN))
    web = Repository.objects.get(tenant=acme_repo, name="web")
    assert client.get("/api/v1/tenants/acme/registry/repositories/").status_code == 404
    own = client.get("/api/v1/tenants/globex/registry/repositories/").json()
    assert own["results"] == []
    assert client.get(f"/api/v1/tenants/globex/registry/repositories/{web.pk}/").status_code == 404
    assert (
        client.delete(f"/api/v1/tenants/globex/registry/repositories/{web.pk}/tags/1/").status_code
        == 404
    )


def test_token_grants(
    acme_repo: Tenant, make_token: Callable[..., str], add_member: Callable[..., User]
) -> None:
    owner = User.objects.get(email="owner@acme.example")
    write = services.authenticate(("x", make_token(acme_repo, owner, Scope.WRITE)))
    read = services.authenticate(("x", make_token(acme_repo, owner, Scope.READ)))
    viewer = add_member(acme_repo, Role.VIEWER)
    viewer_read = services.authenticate(("x", make_token(acme_repo, viewer, Scope.READ)))
    scopes = [
        "repository:acme/web:pull,push",
        "repository:globex/web:pull",
        "registry:catalog:*",
        "repository:acme:pull",
        "repository:acme/web:*",
    ]
    assert [(a.name, a.actions) for a in services.grant(write, scopes)] == [
        ("acme/web", ("pull", "push")),
        ("acme/web", ("delete", "pull", "push")),
    ]
    assert [(a.name, a.actions) for a in services.grant(read, scopes)] == [
        ("acme/web", ("pull",)),
        ("acme/web", ("pull",)),
    ]
    assert [a.actions for a in services.grant(viewer_read, scopes[:1])] == [("pull",)]
    assert services.grant(services.ANONYMOUS, scopes) == []
    Repository.objects.filter(name="web").update(public=True)
    assert [a.actions for a in services.grant(services.ANONYMOUS, scopes[:1])] == [("pull",)]


def test_notification_endpoint_checks_secret_and_format(
    acme_repo: Tenant, client: Any, settings: Any, tmp_path: Any
) -> None:
    shutil.copy(settings.BERTH_REGISTRY_DIR / "token.key", tmp_path)
    settings.BERTH_REGISTRY_DIR = tmp_path
    (tmp_path / "notify.secret").write_text("s3cret\n")
    body = json.dumps({"events": [push_event("acme/new", "1", "n")]})
    media = "application/vnd.docker.distribution.events.v1+json"
    assert client.post("/registry/events/", body, content_type=media).status_code == 401
    # An authenticated delivery is never refused (the registry would retry it forever and
    # hold back every later event): what can't be read is kept as an error.
    for content, media_type in (("{nope", media), ('{"events": 1}', "text/plain")):
        kept = client.post(
            "/registry/events/",
            content,
            content_type=media_type,
            HTTP_AUTHORIZATION="Bearer s3cret",
        )
        assert kept.status_code == 200 and kept.json()["failed"] == 1
    assert RegistryEvent.objects.filter(action="invalid", error=True).count() == 2
    ok = client.post(
        "/registry/events/", body, content_type=media, HTTP_AUTHORIZATION="Bearer s3cret"
    )
    assert ok.status_code == 200 and ok.json()["recorded"] == 1
    assert Repository.objects.filter(tenant=acme_repo, name="new").exists()


def test_admin_pages_render(acme_repo: Tenant, admin_client: Any) -> None:
    repo = Repository.objects.get(tenant=acme_repo, name="web")
    manifest = Manifest.objects.filter(repository=repo).first()
    assert manifest is not None
    for url in (
        "/admin/registry/repository/",
        f"/admin/registry/repository/{repo.pk}/change/",
        "/admin/registry/manifest/",
        f"/admin/registry/manifest/{manifest.pk}/change/",
        "/admin/registry/tag/",
        "/admin/registry/registryusage/",
        "/admin/registry/registryevent/",
        "/admin/registry/nodecredential/",
        "/admin/registry/garbagecollectionrun/",
        "/admin/registry/blob/",
    ):
        response = admin_client.get(url)
        assert response.status_code == 200, url
    assert b"acme/web" in admin_client.get("/admin/registry/repository/").content


def test_node_credential_command_prints_a_secret_that_authenticates(
    plans: None, settings: Any
) -> None:
    import io

    from django.core.management import call_command

    from registry.errors import RegistryAuthError

    out = io.StringIO()
    call_command("registry_node_credential", "node-7", stdout=out)
    secret = out.getvalue().strip()
    assert secret.startswith("brn_")
    principal = services.authenticate(("node-node-7", secret))
    assert principal.kind == "node"
    # A node's own credential reads what anyone may: not a tenant's private repository,
    # even one a container placed on the node uses (that pull gets a token minted for the
    # container's tenant), and never pushes; a public repository, pull only.
    assert services.grant(principal, ["repository:any/thing:pull,push"]) == []
    tenant, _ = tenant_services.create_tenant(
        slug="any",
        owner_email="o@any.example",
        plan_code="team",
        seats=2,
        actor=tenant_services.Actor.for_system("tests"),
    )
    from workloads.models import Container, Node

    node = Node.objects.create(name="node-7", credential_hash="x" * 64)
    Container.objects.create(
        tenant=tenant,
        name="svc",
        node=node,
        spec={"image": f"{settings.BERTH_REGISTRY_HOST}/any/thing:1"},
    )
    assert services.grant(principal, ["repository:any/thing:pull,push"]) == []
    Repository.objects.create(tenant=tenant, name="thing", public=True)
    assert [a.actions for a in services.grant(principal, ["repository:any/thing:pull,push"])] == [
        ("pull",)
    ]
    call_command("registry_node_credential", "node-7", "--revoke", stderr=io.StringIO())
    with pytest.raises(RegistryAuthError):
        services.authenticate(("node-node-7", secret))


def test_token_endpoint_get_and_oauth_post(
    acme_repo: Tenant, make_token: Callable[..., str], client: Any, settings: Any, tmp_path: Any
) -> None:
    import base64
    import subprocess

    key = tmp_path / "token.key"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
    settings.BERTH_REGISTRY_DIR = tmp_path
    owner = User.objects.get(email="owner@acme.example")
    secret = make_token(acme_repo, owner, Scope.WRITE)
    basic = "Basic " + base64.b64encode(f"me:{secret}".encode()).decode()

    got = client.get(
        "/registry/token",
        {"service": "berth-registry", "scope": "repository:acme/web:pull,push"},
        HTTP_AUTHORIZATION=basic,
    )
    assert got.status_code == 200
    assert set(got.json()) == {"token", "access_token", "expires_in", "issued_at"}

    posted = client.post(
        "/registry/token",
        {
            "grant_type": "password",
            "username": "me",
            "password": secret,
            "service": "berth-registry",
            "scope": "repository:acme/web:pull repository:acme/x:push",
        },
    )
    assert posted.status_code == 200
    payload = posted.json()["access_token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert [(a["name"], a["actions"]) for a in claims["access"]] == [
        ("acme/web", ["pull"]),
        ("acme/x", ["push"]),
    ]
    assert claims["aud"] == "berth-registry" and claims["iss"] == "berth"

    refused = client.post(
        "/registry/token", {"grant_type": "password", "username": "me", "password": "brt_nope"}
    )
    assert refused.status_code == 401 and refused.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert client.post("/registry/token", {"grant_type": "refresh_token"}).status_code == 400
    assert client.get("/registry/token", {"service": "other"}).status_code == 400
