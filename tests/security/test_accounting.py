"""Accounting a hostile tenant tries to bypass (#17 item 9, #27 item 1): registry events
and storage with the real docker-registry process and the real control plane as its
token server and notification endpoint; build minutes, concurrent builds and the spend
cap through the REST API.

Pushes here are made the way a tenant's own client can make them: a bearer token from
the token endpoint (Basic auth with the tenant's API token), then the distribution API
with manifests the tenant writes itself — sizes included.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from django.db import connection
from django.utils import timezone

from billing import services as billing_services
from registry import services, tasks
from registry.errors import RegistryDenied
from registry.models import Blob, Manifest, RegistryEvent, RegistryUsage, Repository, Tag
from runtime_agent import protocol
from tenants import services as tenant_services
from tenants.choices import Scope
from tenants.models import QuotaUsage, Tenant, User
from tests.control.conftest import SYSTEM
from tests.control.test_registry_e2e import (
    _basic,
    layout,
    reg,
    registry_process,
    skopeo_push,
    tenant_with_token,
    wait_for,
)
from tests.control.test_volumes_networks_builds import broker, context_tar
from tests.control.test_workloads import make_node, queued, used
from tests.registry_process import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    RegistryProcess,
    needs_registry,
)
from workloads.models import Build, Volume
from workloads.services import builds

__all__ = ["broker", "reg", "registry_process", "tenant_with_token"]


def on_the_registry(test: Callable[..., None]) -> Callable[..., None]:
    """A test against the real registry process and the live control plane."""
    return pytest.mark.django_db(transaction=True)(needs_registry(test))


MIB = 1024 * 1024


# --------------------------------------------------------------------------- pushing by hand


def ask_token(live_server: Any, api_token: str, repository: str, actions: str) -> Any:
    """The token endpoint's answer to a tenant's client (Basic auth with its API token)."""
    return requests.get(
        f"{live_server.url}/registry/token",
        params={"service": "berth-registry", "scope": f"repository:{repository}:{actions}"},
        headers=_basic("x", api_token),
        timeout=10,
    )


def push_token(live_server: Any, api_token: str, repository: str, actions: str) -> dict[str, str]:
    """The bearer header a tenant's client gets from the token endpoint."""
    response = ask_token(live_server, api_token, repository, actions)
    assert response.status_code == 200, response.text
    claims = response.json()["token"].split(".")[1]
    assert "push" in json.dumps(json.loads(_b64(claims)))  # granted, not left out
    return {"Authorization": f"Bearer {response.json()['token']}"}


def _b64(part: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _absolute(reg: RegistryProcess, location: str) -> str:
    return location if location.startswith("http") else f"{reg.url}{location}"


def upload_blob(reg: RegistryProcess, repository: str, bearer: dict[str, str], data: bytes) -> str:
    """Upload a blob (POST, then one PUT with its digest); returns the digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = requests.post(f"{reg.url}/v2/{repository}/blobs/uploads/", headers=bearer, timeout=10)
    assert start.status_code == 202, start.text
    put = requests.put(
        _absolute(reg, start.headers["Location"]),
        params={"digest": digest},
        data=data,
        headers={**bearer, "Content-Type": "application/octet-stream"},
        timeout=60,
    )
    assert put.status_code == 201, put.text
    return digest


DOCKER_TYPES = {
    OCI_MANIFEST: "application/vnd.docker.distribution.manifest.v2+json",
    OCI_CONFIG: "application/vnd.docker.container.image.v1+json",
    OCI_LAYER_GZIP: "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def put_manifest(
    reg: RegistryProcess, repository: str, bearer: dict[str, str], tag: str, body: bytes
) -> str:
    """PUT a manifest the tenant wrote; returns its digest (the registry accepted it)."""
    put = requests.put(
        f"{reg.url}/v2/{repository}/manifests/{tag}",
        data=body,
        headers={**bearer, "Content-Type": json.loads(body)["mediaType"]},
        timeout=10,
    )
    assert put.status_code == 201, put.text  # the registry itself takes the manifest
    return "sha256:" + hashlib.sha256(body).hexdigest()


def push_manifest(
    reg: RegistryProcess,
    repository: str,
    bearer: dict[str, str],
    tag: str,
    layers: list[tuple[bytes, Any]],
    *,
    config_size: Any = None,
    docker: bool = False,
) -> str:
    """Upload ``layers`` (data, declared size) and a config, then PUT a manifest (OCI, or
    docker schema 2) that declares those sizes; returns the manifest digest."""
    kind = DOCKER_TYPES.get if docker else (lambda media_type: media_type)
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": secrets.token_hex(8)})
    config_digest = upload_blob(reg, repository, bearer, config.encode())
    descriptors = [
        {
            "mediaType": kind(OCI_LAYER_GZIP),
            "digest": upload_blob(reg, repository, bearer, data),
            "size": size,
        }
        for data, size in layers
    ]
    body = {
        "schemaVersion": 2,
        "mediaType": kind(OCI_MANIFEST),
        "config": {
            "mediaType": kind(OCI_CONFIG),
            "digest": config_digest,
            "size": len(config) if config_size is None else config_size,
        },
        "layers": descriptors,
    }
    return put_manifest(reg, repository, bearer, tag, json.dumps(body).encode())


def manifest_status(reg: RegistryProcess, repository: str, ref: str, bearer: dict[str, str]) -> int:
    return requests.get(
        f"{reg.url}/v2/{repository}/manifests/{ref}",
        headers={**bearer, "Accept": OCI_MANIFEST},
        timeout=10,
    ).status_code


def event_of(repository: str, digest: str) -> RegistryEvent:
    return wait_for(
        lambda: (
            RegistryEvent.objects.filter(repository=repository, digest=digest, action="push")
            .exclude(outcome="")
            .first()
        ),
        f"the push event of {repository}@{digest}",
    )


def ordinary_push_is_recorded(
    reg: RegistryProcess, tenant_with_token: Callable[..., tuple[Tenant, str]], tmp_path: Path
) -> None:
    """Another tenant's plain skopeo push afterwards: its tag and storage are recorded
    (the registry's queue of events is not stuck behind the attacker's)."""
    tenant, token = tenant_with_token()
    src, digest = layout(tmp_path, f"ordinary-{secrets.token_hex(3)}")
    pushed = skopeo_push(src, f"{reg.host}/{tenant.slug}/web:1", f"x:{token}")
    assert pushed.returncode == 0, pushed.stderr
    tag = wait_for(lambda: Tag.objects.filter(repository__tenant=tenant, name="1").first(), "tag")
    assert tag.manifest.digest == digest
    blob_sizes = sum(p.stat().st_size for p in (src / "blobs/sha256").iterdir())
    assert RegistryUsage.objects.get(tenant=tenant).bytes_used == blob_sizes


# --------------------------------------------------------------------------- #27.1 and sizes


@pytest.mark.parametrize(
    ("layer_size", "config_size"),
    [(-1, None), (None, -5), (0, None), (-(2**62), None)],
    ids=["negative-layer", "negative-config", "zero-for-a-real-layer", "huge-negative"],
)
@on_the_registry
def test_a_lying_size_is_refused_and_the_next_tenants_push_is_still_recorded(
    reg: RegistryProcess,
    live_server: Any,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    tmp_path: Path,
    layer_size: Any,
    config_size: Any,
) -> None:
    attacker, token = tenant_with_token()
    repository = f"{attacker.slug}/evil"
    bearer = push_token(live_server, token, repository, "pull,push")
    layer = os.urandom(4096)
    declared = len(layer) if layer_size is None else layer_size
    digest = push_manifest(
        reg, repository, bearer, "1", [(layer, declared)], config_size=config_size
    )

    event = event_of(repository, digest)
    assert event.error and event.outcome.startswith("refused: "), event.outcome
    assert "declared as" in event.outcome
    assert not Manifest.objects.filter(digest=digest).exists()
    assert not Tag.objects.filter(repository__tenant=attacker).exists()
    assert manifest_status(reg, repository, digest, bearer) == 404  # not servable
    assert manifest_status(reg, repository, "1", bearer) == 404
    # Storage counts what the registry holds: the layer and config it stored.
    usage = RegistryUsage.objects.get(tenant=attacker)
    assert usage.bytes_used >= len(layer)
    assert not Blob.objects.filter(size__lt=0).exists()

    ordinary_push_is_recorded(reg, tenant_with_token, tmp_path)


@on_the_registry
def test_a_manifest_with_thousands_of_references_is_refused_before_asking_about_each(
    reg: RegistryProcess,
    live_server: Any,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    tmp_path: Path,
) -> None:
    """Each reference costs a HEAD on the registry inside the delivery; 1001 of them
    would hold every tenant's events behind this one."""
    from registry.services import MAX_MANIFEST_REFERENCES

    attacker, token = tenant_with_token()
    repository = f"{attacker.slug}/wide"
    bearer = push_token(live_server, token, repository, "pull,push")
    layer = os.urandom(512)
    layer_digest = upload_blob(reg, repository, bearer, layer)
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    descriptor = {"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": len(layer)}
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": upload_blob(reg, repository, bearer, config),
            "size": len(config),
        },
        "layers": [descriptor] * MAX_MANIFEST_REFERENCES,
    }
    digest = put_manifest(reg, repository, bearer, "1", json.dumps(body).encode())
    event = event_of(repository, digest)
    assert event.error and f"at most {MAX_MANIFEST_REFERENCES}" in event.outcome, event.outcome
    assert manifest_status(reg, repository, digest, bearer) == 404
    ordinary_push_is_recorded(reg, tenant_with_token, tmp_path)


@on_the_registry
def test_docker_manifests_and_indexes_lying_about_sizes_are_refused_too(
    reg: RegistryProcess,
    live_server: Any,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
) -> None:
    tenant, token = tenant_with_token()
    repository = f"{tenant.slug}/multi"
    bearer = push_token(live_server, token, repository, "pull,push")
    layer = os.urandom(8192)
    docker = push_manifest(reg, repository, bearer, "docker", [(layer, 1)], docker=True)
    assert event_of(repository, docker).error
    assert manifest_status(reg, repository, "docker", bearer) == 404

    child = push_manifest(reg, repository, bearer, "child", [(layer, len(layer))])
    assert not event_of(repository, child).error
    child_size = int(
        requests.head(
            f"{reg.url}/v2/{repository}/manifests/{child}",
            headers={**bearer, "Accept": OCI_MANIFEST},
            timeout=10,
        ).headers["Content-Length"]
    )
    platform = {"architecture": "amd64", "os": "linux"}
    for declared in (child_size + 1, -child_size):
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": child,
                        "size": declared,
                        "platform": platform,
                    }
                ],
            }
        ).encode()
        digest = put_manifest(reg, repository, bearer, "index", index)
        event = event_of(repository, digest)
        assert event.error and "declared as" in event.outcome
        assert not Manifest.objects.filter(digest=digest).exists()
    # The honest child is untouched.
    assert Tag.objects.get(repository__tenant=tenant, name="child").manifest.digest == child
    assert manifest_status(reg, repository, "child", bearer) == 200


@on_the_registry
def test_a_30mb_layer_declared_as_one_byte_is_unpullable_and_counted_at_its_real_size(
    reg: RegistryProcess,
    live_server: Any,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    tmp_path: Path,
) -> None:
    tenant, token = tenant_with_token()
    repository = f"{tenant.slug}/small"
    bearer = push_token(live_server, token, repository, "pull,push")
    big = os.urandom(30 * MIB)
    digest = push_manifest(reg, repository, bearer, "v1", [(big, 1)])

    event = event_of(repository, digest)
    assert event.error and "declared as 1 bytes" in event.outcome
    assert str(len(big)) in event.outcome
    assert manifest_status(reg, repository, "v1", bearer) == 404
    usage = RegistryUsage.objects.get(tenant=tenant)
    assert usage.bytes_used >= len(big)
    big_digest = "sha256:" + hashlib.sha256(big).hexdigest()
    assert Blob.objects.get(tenant=tenant, digest=big_digest).size == len(big)

    # The other direction: a 1-byte layer declared as 30 MB (an inflated bill for a
    # pull-through, or a quota check fooled the other way) is refused the same way.
    digest = push_manifest(reg, repository, bearer, "v2", [(b"x", 30 * MIB)])
    assert event_of(repository, digest).error
    assert manifest_status(reg, repository, "v2", bearer) == 404

    # An honest manifest of the same 30 MB layer is kept and counted once.
    digest = push_manifest(reg, repository, bearer, "v3", [(big, len(big))])
    assert not event_of(repository, digest).error
    assert Tag.objects.get(repository__tenant=tenant, name="v3").manifest.digest == digest
    assert manifest_status(reg, repository, "v3", bearer) == 200
    assert len(big) <= RegistryUsage.objects.get(tenant=tenant).bytes_used < len(big) + MIB


@on_the_registry
def test_a_suspended_tenants_push_and_delete_events_are_acknowledged_and_later_events_flow(
    reg: RegistryProcess,
    live_server: Any,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    tmp_path: Path,
) -> None:
    tenant, token = tenant_with_token()
    repository = f"{tenant.slug}/app"
    bearer = push_token(live_server, token, repository, "pull,push,delete")
    kept = push_manifest(reg, repository, bearer, "1", [(os.urandom(2048), 2048)])
    assert not event_of(repository, kept).error
    tenant_services.suspend_tenant(tenant, reason="non-payment", actor=SYSTEM)

    # The token was minted before the suspension: the push reaches the registry.
    digest = push_manifest(reg, repository, bearer, "2", [(os.urandom(2048), 2048)])
    event = event_of(repository, digest)
    assert event.error and "suspended" in event.outcome
    assert manifest_status(reg, repository, "2", bearer) == 404
    assert not Tag.objects.filter(repository__tenant=tenant, name="2").exists()

    # A storage-changing delete by the suspended tenant: recorded, no 500.
    deleted = requests.delete(
        f"{reg.url}/v2/{repository}/manifests/{kept}", headers=bearer, timeout=10
    )
    assert deleted.status_code == 202
    wait_for(lambda: not Manifest.objects.filter(digest=kept).exists(), "the delete recorded")
    assert RegistryEvent.objects.filter(repository=repository, action="delete").exists()

    ordinary_push_is_recorded(reg, tenant_with_token, tmp_path)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"events": "nope"}', b"[1, 2]", b'{"events": [{"id": 5, "target": 7}]}'],
    ids=["not-json", "events-not-a-list", "not-an-object", "target-not-an-object"],
)
@on_the_registry
def test_an_authenticated_delivery_is_acknowledged_whatever_it_holds(
    reg: RegistryProcess, live_server: Any, body: bytes
) -> None:
    secret = (reg.directory / "notify.secret").read_text().strip()
    response = requests.post(
        f"{live_server.url}/registry/events/",
        data=body,
        headers={
            "Authorization": f"Bearer {secret}",
            "Content-Type": "application/vnd.docker.distribution.events.v1+json",
        },
        timeout=10,
    )
    assert response.status_code == 200
    assert response.json()["failed"] + response.json()["recorded"] >= 1
    assert RegistryEvent.objects.exclude(outcome="").exists()  # kept, for the admin to see
    forged = requests.post(
        f"{live_server.url}/registry/events/",
        data=body,
        headers={"Authorization": "Bearer wrong", "Content-Type": "application/json"},
        timeout=10,
    )
    assert forged.status_code == 401


# --------------------------------------------------------------------------- #17.9 storage


@on_the_registry
def test_blobs_uploaded_without_a_manifest_count_until_collected(
    reg: RegistryProcess,
    live_server: Any,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
) -> None:
    tenant, token = tenant_with_token()
    repository = f"{tenant.slug}/stash/deep"
    bearer = push_token(live_server, token, repository, "pull,push")
    hidden = os.urandom(2 * MIB)
    digest = upload_blob(reg, repository, bearer, hidden)
    # And an upload left unfinished: bytes on the registry's disk all the same.
    start = requests.post(f"{reg.url}/v2/{repository}/blobs/uploads/", headers=bearer, timeout=10)
    partial = requests.patch(
        _absolute(reg, start.headers["Location"]),
        data=os.urandom(MIB),
        headers={**bearer, "Content-Type": "application/octet-stream"},
        timeout=10,
    )
    assert partial.status_code == 202
    assert not Repository.objects.filter(tenant=tenant).exists()  # no notification came

    counted = tasks.scan_storage_task()
    assert counted[tenant.slug] == len(hidden) + MIB
    usage = RegistryUsage.objects.get(tenant=tenant)
    assert (usage.bytes_used, usage.upload_bytes, usage.reserved_gib) == (3 * MIB, MIB, 1)
    assert Blob.objects.get(tenant=tenant, digest=digest).orphaned_at is not None

    # GC frees the blob; the recount after it stops counting it.
    assert services.run_garbage_collection(actor=SYSTEM).succeeded
    usage.refresh_from_db()
    assert usage.bytes_used == MIB  # the unfinished upload stays until the registry purges it
    assert not Blob.objects.filter(tenant=tenant, digest=digest).exists()


@on_the_registry
def test_a_push_token_minted_under_quota_cannot_push_past_it(
    reg: RegistryProcess,
    live_server: Any,
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    client_for: Callable[..., Any],
) -> None:
    tenant, token = tenant_with_token()
    repository = f"{tenant.slug}/late"
    bearer = push_token(live_server, token, repository, "pull,push")
    # Meanwhile the rest of the storage quota is taken (a volume, say).
    limit = tenant.quota_limits()["storage_gib"]
    tenant_services.reserve(tenant, {"storage_gib": limit}, actor=SYSTEM, reason="a volume")

    digest = push_manifest(reg, repository, bearer, "1", [(os.urandom(MIB), MIB)])
    event = event_of(repository, digest)
    assert event.error and "quota storage_gib exceeded" in event.outcome, event.outcome
    assert manifest_status(reg, repository, "1", bearer) == 404
    assert not Tag.objects.filter(repository__tenant=tenant).exists()
    usage = RegistryUsage.objects.get(tenant=tenant)
    assert usage.quota_refusal.startswith("quota storage_gib exceeded")
    assert usage.bytes_used >= MIB  # what it uploaded counts until GC

    refused = ask_token(live_server, token, repository, "pull,push")
    assert refused.status_code == 403
    assert refused.json()["errors"][0]["message"].startswith("quota storage_gib exceeded")
    # What the tenant sees in the API: the bytes and why its push was refused.
    seen = client_for(token).get(f"/api/v1/tenants/{tenant.slug}/registry/usage/").json()
    assert seen["bytes_used"] >= MIB
    assert seen["quota_refusal"].startswith("quota storage_gib exceeded")


# --------------------------------------------------------------------------- builds


@pytest.fixture
def build_api(
    make_tenant: Callable[..., tuple[Tenant, User]],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
    settings: Any,
    tmp_path: Path,
) -> tuple[Tenant, Any]:
    """A fresh tenant's write-token API client; builds go to nodes, not to a registry."""
    settings.BERTH_REGISTRY_DIR = tmp_path / "no-registry"
    settings.BERTH_BUILD_CONTEXT_DIR = tmp_path / "contexts"
    tenant, owner = make_tenant(f"b{secrets.token_hex(4)}")
    return tenant, client_for(make_token(tenant, owner, Scope.WRITE))


def post_build(client: Any, tenant: Tenant, tag: str = "app") -> Any:
    return client.generic(
        "POST",
        f"/api/v1/tenants/{tenant.slug}/builds/?tag={tag}",
        context_tar(),
        content_type="application/x-tar",
    )


def set_minutes_used(tenant: Tenant, minutes: int) -> None:
    QuotaUsage.objects.update_or_create(
        tenant=tenant, quota="build_minutes_month", defaults={"used": minutes}
    )


@pytest.mark.django_db(transaction=True)
def test_build_minutes_cannot_overshoot_the_month(
    build_api: tuple[Tenant, Any], broker: redis.Redis
) -> None:
    tenant, client = build_api
    node, credential = make_node(f"n{secrets.token_hex(3)}")
    limit = tenant.quota_limits()["build_minutes_month"]
    set_minutes_used(tenant, limit - 1)  # 99 of 100

    first = post_build(client, tenant)
    assert first.status_code == 201, first.content
    (op,) = queued(broker, node)
    request = protocol.from_dict(protocol.BuildRequest, op["kwargs"]["request"])
    assert request.timeout_seconds == 60  # the node stops it after the one minute left
    assert used(tenant, "build_minutes_month") == limit

    refused = post_build(client, tenant)
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert (error["code"], error["details"]["quota"]) == ("quota_exceeded", "build_minutes_month")
    assert (error["details"]["limit"], error["details"]["used"]) == (limit, limit)

    # The node says it ran three minutes: the month still ends at its limit, not 102/100.
    now = timezone.now()
    builds.handle_build_report(
        protocol.BuildReport(
            build_id=first.json()["id"],
            node_id=str(node.pk),
            credential=credential,
            seq=1,
            log="",
            log_size=0,
            state="failed",
            error="timed out",
            started_at=(now - timedelta(minutes=3)).isoformat(),
            finished_at=now.isoformat(),
        )
    )
    assert used(tenant, "build_minutes_month") == limit

    # A node that never answers: the reconciler fails the build at its own deadline.
    set_minutes_used(tenant, limit - 1)
    silent = post_build(client, tenant)
    assert silent.status_code == 201
    Build.objects.filter(pk=silent.json()["id"]).update(
        started_at=timezone.now() - timedelta(seconds=60 + 121)
    )
    assert builds.reconcile_builds() == 1
    build = Build.objects.get(pk=silent.json()["id"])
    assert (build.state, build.reason) == ("failed", "no result within 60s")
    assert used(tenant, "build_minutes_month") == limit


@pytest.mark.django_db(transaction=True)
def test_concurrent_builds_are_capped_even_when_asked_for_at_once(
    build_api: tuple[Tenant, Any], settings: Any
) -> None:
    tenant, client = build_api
    settings.BERTH_BUILD_CONCURRENCY = 2
    barrier = threading.Barrier(5)

    def attempt(_: int) -> int:
        try:
            barrier.wait()
            return int(post_build(client, tenant).status_code)
        finally:
            connection.close()

    with ThreadPoolExecutor(5) as pool:
        codes = sorted(pool.map(attempt, range(5)))
    assert codes == [201, 201, 429, 429, 429]
    assert Build.objects.filter(tenant=tenant).count() == 2
    refused = post_build(client, tenant)
    assert refused.json()["error"]["code"] == "too_many_builds"
    assert refused.json()["error"]["details"] == {"limit": 2, "active": 2}
    # Ending one frees a slot.
    oldest = Build.objects.filter(tenant=tenant).earliest("created_at")
    client.post(f"/api/v1/tenants/{tenant.slug}/builds/{oldest.pk}/cancel/")
    assert post_build(client, tenant).status_code == 201


# --------------------------------------------------------------------------- spend cap


@on_the_registry
def test_the_spend_cap_refuses_builds_volumes_and_pushes(
    reg: RegistryProcess,
    live_server: Any,
    make_tenant: Callable[..., tuple[Tenant, User]],
    make_token: Callable[..., str],
    client_for: Callable[..., Any],
    settings: Any,
    tmp_path: Path,
) -> None:
    settings.BERTH_BUILD_CONTEXT_DIR = tmp_path / "contexts"
    tenant, owner = make_tenant(f"s{secrets.token_hex(4)}", plan="pro", seats=1)
    token = make_token(tenant, owner, Scope.WRITE)
    client = client_for(token)
    repository = f"{tenant.slug}/app"
    assert ask_token(live_server, token, repository, "pull,push").status_code == 200
    billing_services.set_spend_cap(tenant, 1000, actor=billing_services.BILLING_ACTOR)
    end = timezone.now() - timedelta(minutes=5)
    billing_services.record_build(
        tenant, "spent", started_at=end - timedelta(minutes=1200), finished_at=end
    )
    billing_services.aggregate_hour(tenant.pk, end)
    assert billing_services.estimate(tenant)["spend_cap"]["state"] == "reached"

    build = post_build(client, tenant)
    assert (build.status_code, build.json()["error"]["code"]) == (402, "spend_cap_reached")
    volume = client.post(
        f"/api/v1/tenants/{tenant.slug}/volumes/", {"name": "data", "size_gib": 1}, format="json"
    )
    assert (volume.status_code, volume.json()["error"]["code"]) == (402, "spend_cap_reached")
    push = ask_token(live_server, token, repository, "pull,push")
    assert push.status_code == 403
    assert "spend cap" in push.json()["errors"][0]["message"]
    pull = ask_token(live_server, token, repository, "pull")
    assert pull.status_code == 200  # reading what it has is not new usage
    with pytest.raises(RegistryDenied, match="spend cap"):
        services.check_push_allowed(tenant)  # a build's push token is refused the same way
    assert not Build.objects.filter(tenant=tenant).exists()
    assert not Volume.objects.filter(tenant=tenant).exists()
