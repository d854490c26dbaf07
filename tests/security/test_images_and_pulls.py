"""Shared image names and pulls (#17 items 2 and 3), attacked as a hostile tenant would.

Item 2: a tenant named like a node-wide namespace (``library``: every tenant's base images
on a node; ``default``: the agent CLI's own objects; registry and site paths) would write
where other tenants read. Every way a tenant comes to exist refuses such names, in every
spelling the slug rule lets through and in lookalikes it must not.

Item 3: a node pulls a tenant's image with that tenant's rights only. Tenant B names
tenant A's private image (in a service, in a job that reaches a node, in a pull-token
request as the node would send it) and gets nothing of A's; B serves a manifest naming
A's layer digest, which the node already holds, and cannot read it. A still pulls and
runs its own image, and both use the shared ``busybox``. Real registry, real control
plane (``live_server``), the agent's real distribution client.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import Client
from rest_framework.test import APIClient

from registry import services as registry_services
from registry.models import Repository
from runtime_agent import protocol
from runtime_agent.agent import Agent
from runtime_agent.distribution import BearerToken, Credentials, CredentialStore, pull
from runtime_agent.distribution.media import node_platform
from runtime_agent.errors import AgentError
from runtime_agent.images.reference import SHARED_NAMESPACE
from runtime_agent.names import CLI_NAMESPACE, is_reserved_name
from tenants import services as tenant_services
from tenants.choices import Scope
from tenants.errors import InvalidInput
from tenants.models import Tenant
from tests.control.conftest import SYSTEM
from tests.control.test_registry_e2e import (
    NODE_SECRET,
    layout,
    reg,
    registry_process,
    skopeo_push,
    tenant_with_token,
)
from tests.control.test_registry_e2e import _place as place_container
from tests.e2e.conftest import Cluster, agent_api, wait_for
from tests.registry_process import RegistryProcess, needs_registry
from tests.security.test_accounting import upload_blob
from tests.security.test_userns_and_egress import worker_for

__all__ = ["reg", "registry_process", "tenant_with_token"]

# --------------------------------------------------------------------------- item 2

RESERVED = [
    SHARED_NAMESPACE,  # the node's shared base images
    CLI_NAMESPACE,  # the agent CLI's own namespace
    "v2",  # the registry's API root
    "registry",
    "token",
    "docker",
    "admin",
    "api",
    "api-auth",
    "static",
    "t",  # dashboard tenant pages live under /t/<slug>/
    "signup",
    "berth",
    "berth-ops",
    "berthd",
    "node-1",  # node credentials log in to the registry as node-<name>
    "system",
    "shared",
]
#: Spellings a hostile signup tries: case, whitespace, Unicode lookalikes and
#: compatibility forms of ``library``/``default`` (Cyrillic і and а, fullwidth letters,
#: a combining dot, a zero-width space).
LOOKALIKES = [
    "Library",
    "LIBRARY",
    "library ",
    " default",
    "l\u0456brary",
    "def\u0430ult",
    "\uff4c\uff49\uff42\uff52\uff41\uff52\uff59",
    "library\u0307",
    "lib\u200brary",
]


def _signup(slug: str) -> Any:
    client = Client()
    idem = client.get("/signup/").context["form"].initial["idem"]
    return client.post(
        "/signup/",
        {
            "email": f"owner-{secrets.token_hex(3)}@example.com",
            "password": "a-Long-test-passw0rd",
            "organisation": "Hostile",
            "slug": slug,
            "idem": idem,
        },
    )


@pytest.mark.django_db
@pytest.mark.parametrize("slug", RESERVED + LOOKALIKES)
def test_signup_under_a_platform_name_is_refused(slug: str) -> None:
    response = _signup(slug)
    assert response.status_code == 400
    assert not Tenant.objects.exists()
    if slug in RESERVED:
        assert "reserved for the platform" in response.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("slug", RESERVED + LOOKALIKES)
def test_tenant_creation_under_a_platform_name_is_refused(slug: str) -> None:
    """The service every path goes through (API, admin tools, bootstrap) and the
    operator's ``create_tenant`` command."""
    with pytest.raises(InvalidInput) as refused:
        tenant_services.create_tenant(slug=slug, owner_email="o@example.com", actor=SYSTEM)
    assert refused.value.details["field"] == "slug"
    with pytest.raises(CommandError):
        call_command("create_tenant", slug, owner="o@example.com")
    assert not Tenant.objects.exists()


@pytest.mark.django_db
def test_names_near_the_reserved_ones_stay_available() -> None:
    """The positive control: only the platform's own names are kept."""
    for slug in ("libraries", "my-library", "defaults", "acme", "node1", "be-rth"):
        tenant, _ = tenant_services.create_tenant(
            slug=slug, owner_email=f"o@{slug}.example", actor=SYSTEM
        )
        assert tenant.slug == slug


def test_the_agents_own_namespaces_are_on_the_one_list() -> None:
    """What the node uses for itself is what the control plane refuses: the image
    store's shared namespace and the CLI's default tenant, read from the agent."""
    from runtime_agent.cli.main import build_parser

    cli_default = build_parser(["ps"]).parse_args(["ps"]).tenant
    for name in (SHARED_NAMESPACE, cli_default):
        assert is_reserved_name(name), name


@pytest.mark.parametrize("tenant", [SHARED_NAMESPACE, CLI_NAMESPACE, "berth-ops"])
def test_a_node_acts_for_no_tenant_named_like_its_own_namespaces(agent: Agent, tenant: str) -> None:
    """A tenant created before its name was reserved (or any payload naming one): the
    node's worker refuses every task for it, so no build tags into ``library`` and no
    container lands among the CLI's own; its operator still uses those names."""
    tasks = worker_for(agent).app.tasks
    spec = protocol.to_dict(protocol.ContainerSpec(tenant=tenant, image="busybox", name="x"))
    build = protocol.to_dict(
        protocol.BuildRequest(
            build_id="b1", tenant=tenant, context_url="/ctx", tag="busybox:latest"
        )
    )
    for name, kwargs in (
        (protocol.AGENT_APPLY_CONTAINER, {"op_id": "o1", "spec": spec}),
        (protocol.AGENT_BUILD, {"op_id": "o2", "request": build}),
        (protocol.AGENT_REMOVE_CONTAINER, {"op_id": "o3", "tenant": tenant, "name": "x"}),
        (protocol.AGENT_REMOVE_VOLUME, {"op_id": "o4", "tenant": tenant, "name": "v"}),
        (protocol.AGENT_EXEC, {"tenant": tenant, "name": "x", "argv": ["true"]}),
    ):
        answer = tasks[name](**kwargs)
        assert answer["error"]["code"] == "invalid_argument", (name, answer)
        assert "reserved for the platform" in answer["error"]["message"]
    assert agent.containers.list(tenant, all=True) == []


# --------------------------------------------------------------------------- item 3


def _api(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def _pull_token_request(node_id: str, tenant: str, image: str) -> Any:
    return APIClient().post(
        protocol.PULL_TOKEN_PATH,
        {"tenant": tenant, "image": image},
        format="json",
        HTTP_X_BERTH_NODE=node_id,
        HTTP_X_BERTH_NODE_CREDENTIAL=NODE_SECRET,
    )


def _registry_token(api_token: str, repository: str, actions: str) -> str:
    """A registry token from the token endpoint, as docker gets one with a tenant token."""
    response = Client().get(
        "/registry/token",
        {
            "service": settings.BERTH_REGISTRY_SERVICE,
            "scope": f"repository:{repository}:{actions}",
        },
        HTTP_AUTHORIZATION="Basic " + base64.b64encode(f"x:{api_token}".encode()).decode(),
    )
    assert response.status_code == 200, response.content
    return str(response.json()["token"])


@pytest.fixture
def victim(
    reg: RegistryProcess, tenant_with_token: Callable[..., tuple[Tenant, str]], tmp_path: Path
) -> dict[str, Any]:
    """Tenant A with a private image holding a secret."""
    tenant, token = tenant_with_token()
    src, digest = layout(tmp_path, "victim", **{"etc/secret": b"A's private key\n"})
    image = f"{reg.host}/{tenant.slug}/private:1"
    assert skopeo_push(src, image, f"x:{token}").returncode == 0
    return {"tenant": tenant, "token": token, "image": image, "digest": digest}


@pytest.mark.django_db(transaction=True)
@needs_registry
def test_a_service_naming_another_tenants_private_image_is_refused(
    victim: dict[str, Any], tenant_with_token: Callable[..., tuple[Tenant, str]]
) -> None:
    attacker, token = tenant_with_token()
    a = victim["tenant"]
    variants = [
        victim["image"],
        f"{victim['image'].rsplit(':', 1)[0]}@{victim['digest']}",
        victim["image"].rsplit(":", 1)[0],  # no tag
        f"{reg_host()}/{a.slug}/never-pushed:1",
    ]
    for image in variants:
        response = _api(token).post(
            f"/api/v1/tenants/{attacker.slug}/services/",
            {"name": f"s{secrets.token_hex(3)}", "image": image, "replicas": 0},
            format="json",
        )
        assert response.status_code == 403, (image, response.content)
        error = response.json()["error"]
        assert "not public" in error["message"] and a.slug in error["message"]
        job = _api(token).post(
            f"/api/v1/tenants/{attacker.slug}/jobs/",
            {"image": image, "command": ["cat", "/etc/secret"]},
            format="json",
        )
        assert job.status_code == 403, (image, job.content)
        assert "not public" in job.json()["error"]["message"]
    # The positive controls: A runs its own image; both name the shared busybox.
    for tenant, api_token, image in (
        (a, victim["token"], victim["image"]),
        (a, victim["token"], "busybox"),
        (attacker, token, "library/busybox"),
    ):
        response = _api(api_token).post(
            f"/api/v1/tenants/{tenant.slug}/services/",
            {"name": f"s{secrets.token_hex(3)}", "image": image, "replicas": 0},
            format="json",
        )
        assert response.status_code == 201, (image, response.content)
    # Made public by its owner, it may be run by anyone.
    registry_services.set_public(
        Repository.objects.get(tenant=a, name="private"), True, actor=SYSTEM
    )
    response = _api(token).post(
        f"/api/v1/tenants/{attacker.slug}/services/",
        {"name": "public", "image": victim["image"], "replicas": 0},
        format="json",
    )
    assert response.status_code == 201, response.content


def reg_host() -> str:
    return str(settings.BERTH_REGISTRY_HOST)


@pytest.mark.django_db(transaction=True)
@needs_registry
def test_a_node_gets_no_pull_token_for_another_tenants_private_image(
    victim: dict[str, Any],
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    agent: Agent,
) -> None:
    """Admission can be passed by (a job, an image made private later): the node asks
    the control plane for the pull, as the worker does, and B's container gets no token,
    even on a node where A's container runs the same image. The node's own login pulls
    nothing private either."""
    attacker, _ = tenant_with_token()
    a, image = victim["tenant"], victim["image"]
    node_id = place_container(a, "shared-node", image)
    place_container(attacker, "shared-node", image)

    refused = _pull_token_request(node_id, attacker.slug, image)
    assert refused.status_code == 403, refused.content
    assert "not public" in refused.json()["error"]["message"]
    # Another spelling of the registry host is not the platform's registry: no token,
    # and the pull it leads to is anonymous.
    for other in (f"localhost:{reg_host().rsplit(':', 1)[1]}/{a.slug}/private:1",):
        place_container(attacker, "shared-node", other)
        answer = _pull_token_request(node_id, attacker.slug, other)
        assert answer.status_code == 200 and answer.json() == {"token": None}
        with pytest.raises(AgentError):
            pull(agent, attacker.slug, other, None, use_node_login=False)
    # The node's own registry login, stored on the node as the join stores it.
    _, secret = registry_services.create_node_credential("shared-node", actor=SYSTEM)
    CredentialStore(agent.config.root / "registry-auth.json").set(
        reg_host(), Credentials("node-shared-node", secret)
    )
    with pytest.raises(AgentError):
        pull(agent, attacker.slug, image)
    assert agent.images.references(attacker.slug) == {}

    # A's own container gets a token for exactly its repository and pulls.
    granted = _pull_token_request(node_id, a.slug, image)
    assert granted.status_code == 200, granted.content
    assert granted["Cache-Control"] == "no-store"
    token = BearerToken(granted.json()["token"])
    assert pull(agent, a.slug, image, token, use_node_login=False).digest == victim["digest"]


class HostileRegistry(http.server.BaseHTTPRequestHandler):
    """A registry the attacker runs: it serves its own manifest and config, answers
    ``HEAD`` 200 for any blob (a lie), and has none of the layers it names."""

    protocol_version = "HTTP/1.1"
    blobs: dict[str, bytes] = {}
    manifest = b""
    seen: list[str] = []

    def _answer(self, status: int, body: bytes = b"", media_type: str = "") -> None:
        self.send_response(status)
        if media_type:
            self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.seen.append(f"HEAD {self.path}")
        self._answer(200)

    def do_GET(self) -> None:
        self.seen.append(f"GET {self.path}")
        if "/manifests/" in self.path:
            self._answer(200, self.manifest, DOCKER_MANIFEST)
        elif (digest := self.path.rsplit("/", 1)[-1]) in self.blobs:
            self._answer(200, self.blobs[digest], "application/octet-stream")
        else:
            self._answer(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}')

    def log_message(self, *args: object) -> None:
        pass


DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def _image_documents(layers: list[dict[str, Any]], diff_ids: list[str]) -> tuple[bytes, bytes]:
    """(config, manifest) of an image whose layers are ``layers`` as the attacker
    describes them, and whose command prints A's secret."""
    config = json.dumps(
        {
            "architecture": node_platform().architecture,
            "os": "linux",
            "config": {"Cmd": ["cat", "/etc/secret"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                "size": len(config),
            },
            "layers": layers,
        }
    ).encode()
    return config, manifest


@pytest.fixture
def hostile_registry() -> Iterator[tuple[str, type[HostileRegistry]]]:
    handler = type("Hostile", (HostileRegistry,), {"blobs": {}, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.django_db(transaction=True)
@needs_registry
@pytest.mark.parametrize("node_logged_in", [True, False], ids=["node-login", "no-login"])
def test_knowing_a_layer_digest_does_not_read_another_tenants_layer(
    reg: RegistryProcess,
    victim: dict[str, Any],
    tenant_with_token: Callable[..., tuple[Tenant, str]],
    agent: Agent,
    hostile_registry: tuple[str, type[HostileRegistry]],
    node_logged_in: bool,
) -> None:
    a, image = victim["tenant"], victim["image"]
    attacker, attacker_token = tenant_with_token()
    host = reg_host()
    node_id = place_container(a, "n-reuse", image)
    if node_logged_in:  # the node trusts HEAD answers only from the registry it logs in to
        _, secret = registry_services.create_node_credential("n-reuse", actor=SYSTEM)
        CredentialStore(agent.config.root / "registry-auth.json").set(
            host, Credentials("node-n-reuse", secret)
        )
    # The node runs A's image: A's layers are in its content store.
    token_a = _pull_token_request(node_id, a.slug, image).json()["token"]
    pull(agent, a.slug, image, BearerToken(token_a), use_node_login=False)
    pulled = agent.images.resolve(a.slug, image)
    secret_layer, secret_diff = pulled.layers[-1], pulled.diff_ids[-1]
    assert agent.content.has(secret_layer["digest"])
    named = {k: secret_layer[k] for k in ("mediaType", "digest", "size")}
    config, manifest = _image_documents([named], [secret_diff])

    # On the platform's registry B cannot store a manifest naming A's layer: its
    # repository has no such blob.
    repository = f"{attacker.slug}/evil"
    push_token = _registry_token(attacker_token, repository, "pull,push")
    upload_blob(reg, repository, {"Authorization": f"Bearer {push_token}"}, config)
    put = requests.put(
        f"http://{host}/v2/{repository}/manifests/1",
        data=manifest,
        headers={"Authorization": f"Bearer {push_token}", "Content-Type": DOCKER_MANIFEST},
        timeout=30,
    )
    assert put.status_code >= 400, put.text

    # So B serves the manifest itself, and its registry claims every blob. The node pulls
    # it for B: the layer B named is not reused from the store (B never showed it may
    # read it; a HEAD from B's registry proves nothing), B's registry cannot serve it, so
    # the pull fails and B has no image.
    address, hostile = hostile_registry
    hostile.manifest = manifest
    hostile.blobs["sha256:" + hashlib.sha256(config).hexdigest()] = config
    evil = f"{address}/{attacker.slug}/evil:1"
    with pytest.raises(AgentError) as failed:
        pull(agent, attacker.slug, evil, None, use_node_login=False)
    assert secret_layer["digest"] in str(failed.value)
    assert f"GET /v2/{attacker.slug}/evil/blobs/{secret_layer['digest']}" in hostile.seen
    assert agent.images.references(attacker.slug) == {}
    # Positive controls: A pulls its image again without downloading a blob it already
    # has; made public, a third tenant reuses the node's copies when the platform's
    # registry vouches for them (the node logged in to it), or downloads them.
    again = pull(agent, a.slug, image, BearerToken(token_a), use_node_login=False)
    assert again.fetched == [] and secret_layer["digest"] in again.skipped
    registry_services.set_public(
        Repository.objects.get(tenant=a, name="private"), True, actor=SYSTEM
    )
    third, _ = tenant_with_token()
    shared = pull(agent, third.slug, image, None, use_node_login=False)
    assert shared.digest == victim["digest"]
    if node_logged_in:
        assert secret_layer["digest"] in shared.skipped
    else:
        assert secret_layer["digest"] in shared.fetched


# --------------------------------------------------------------------------- the whole path


def _tenant_client(slug: str) -> tuple[APIClient, str]:
    tenant, owner = tenant_services.create_tenant(
        slug=slug, owner_email=f"owner@{slug}.example", plan_code="team", seats=5, actor=SYSTEM
    )
    _, secret = tenant_services.create_api_token(
        tenant, owner, name="ci", scope=Scope.WRITE, actor=SYSTEM
    )
    return _api(secret), secret


def _states(client: APIClient, slug: str, name: str) -> list[str]:
    body = client.get(f"/api/v1/tenants/{slug}/services/{name}/").json()
    return [c["state"] for c in body["containers"] if c["desired_state"] == "running"]


def _set_public(client: APIClient, slug: str, name: str, public: bool) -> None:
    listed = client.get(f"/api/v1/tenants/{slug}/registry/repositories/", {"name": name}).json()
    repo_id = listed["results"][0]["id"] if "results" in listed else listed[0]["id"]
    answer = client.patch(
        f"/api/v1/tenants/{slug}/registry/repositories/{repo_id}/",
        {"public": public},
        format="json",
    )
    assert answer.status_code == 200, answer.content


@pytest.mark.privileged
@pytest.mark.timeout(600)
def test_a_replica_of_another_tenants_image_made_private_never_runs(
    registry_cluster: Cluster, tmp_path: Path
) -> None:
    """The whole path: REST API, scheduler, two real agents, the real registry. B's
    service names A's image while A has it public (admitted); A makes it private; B's
    replica is placed on a node whose worker asks for a pull token for B, is refused, and
    runs nothing. A's own service of that image and B's busybox service run."""
    from workloads.models import Container

    assert registry_cluster.registry is not None
    host = registry_cluster.registry.host
    (owner, token_a), (attacker, _) = _tenant_client("e2eowner"), _tenant_client("e2ethief")
    src, _ = layout(tmp_path, "owner", **{"etc/secret": b"A's private key\n"})
    image = f"{host}/e2eowner/private:1"
    assert skopeo_push(src, image, f"x:{token_a}").returncode == 0
    wait_for(
        lambda: Repository.objects.filter(tenant__slug="e2eowner", name="private").exists(),
        timeout=30,
        what="the registry's record of A's repository",
    )

    def create(client: APIClient, slug: str, name: str, image: str, replicas: int) -> None:
        body = {"name": name, "image": image, "replicas": replicas, "memory_mib": 32}
        body["command"] = ["/bin/busybox", "sh", "-c", "exec /bin/busybox sleep 100000"]
        answer = client.post(f"/api/v1/tenants/{slug}/services/", body, format="json")
        assert answer.status_code == 201, answer.content

    # Positive controls: A runs its own private image; B runs the shared busybox.
    create(owner, "e2eowner", "own", image, 2)
    create(attacker, "e2ethief", "box", "busybox", 1)
    try:
        wait_for(lambda: _states(owner, "e2eowner", "own") == ["running"] * 2, timeout=90, what="A")
    except AssertionError:
        raise AssertionError(owner.get("/api/v1/tenants/e2eowner/services/own/").json()) from None
    wait_for(lambda: _states(attacker, "e2ethief", "box") == ["running"], timeout=60, what="B")

    _set_public(owner, "e2eowner", "private", True)
    create(attacker, "e2ethief", "steal", image, 0)
    _set_public(owner, "e2eowner", "private", False)
    scaled = attacker.post(
        "/api/v1/tenants/e2ethief/services/steal/scale/", {"replicas": 2}, format="json"
    )
    assert scaled.status_code == 200, scaled.content
    wait_for(
        lambda: Container.objects.filter(service__name="steal", node__isnull=False).count() >= 2,
        timeout=30,
        what="B's replicas placed",
    )
    # The tenant sees why: the refusal is the replicas' reason.
    refused = wait_for(
        lambda: [
            c
            for c in attacker.get("/api/v1/tenants/e2ethief/services/steal/").json()["containers"]
            if "not public" in (c.get("pending_reason") or "")
        ],
        timeout=60,
        what="the pull refusal as B's replicas' reason",
    )
    assert "e2eowner/private" in refused[0]["pending_reason"]
    time.sleep(5)  # and nothing starts later either (retries meet the same refusal)
    assert "running" not in _states(attacker, "e2ethief", "steal")
    for agent in registry_cluster.agents:
        node = agent_api(agent)
        assert node.images.references("e2ethief") == {}, agent.name
        assert all(
            info.tenant != "e2ethief" or info.name.startswith("box")
            for info in node.containers.list_all()
        )
