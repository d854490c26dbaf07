"""Host-side fetches a tenant can cause (#17 item 4): ``ADD <url>`` in a build and an image
reference naming a registry. A hostile tenant aims them at the node itself (the control
plane's admin on :8000, the registry on :5000, anything bound to loopback or the node's
addresses) in every spelling of an address, through redirects and DNS names, and tries to
exhaust the node with endless or slow bodies.

Traffic stays on this machine: the victims are servers on loopback and on the node's own
address; the "public" server a build may fetch from lives in a network namespace these
tests create, at an address the test allows as operator configuration (BERTH_FETCH_ALLOW),
since every real public address is outside this machine. Addresses that are not on this
machine (cloud metadata, RFC 1918) are judged by the policy alone, before any connection.
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from runtime_agent.agent import Agent
from runtime_agent.config import AgentConfig
from runtime_agent.distribution.ensure import ensure_image
from runtime_agent.errors import AgentError, InvalidArgument, ResourceExhausted
from runtime_agent.fetch import policy_for_node, resolve_checked
from runtime_agent.netpolicy import FetchPolicy, FetchRefused
from tenants.choices import Scope
from tenants.models import Tenant, User
from tests.agent.dockerfiles.support import build, image_tree, write_context
from tests.security.fetch_server import Server, serve_in_thread
from workloads.choices import DeploymentState

T = "fetcher"
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.privileged


def agent_with(config: AgentConfig, **settings: Any) -> Agent:
    """The test's node with operator settings (what BERTH_FETCH_* would set)."""
    return Agent(dataclasses.replace(config, **settings))


def add(agent: Agent, tmp_path: Path, url: str) -> dict[str, Any]:
    """Build ``FROM scratch`` + ``ADD <url> /fetched`` as tenant T; the image's tree."""
    ctx = write_context(
        tmp_path / f"ctx-{secrets.token_hex(3)}",
        {"Dockerfile": f"FROM scratch\nADD {url} /fetched\n"},
    )
    build(agent, T, ctx, tag="fetched")
    return image_tree(agent, T, "fetched")


@dataclasses.dataclass
class Victim:
    """Servers on 127.0.0.1 and ::1 (same port) standing in for the node's services."""

    port: int
    servers: list[Server]

    @property
    def seen(self) -> list[str]:
        return [path for server in self.servers for path in server.seen]


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Victim]:
    v4 = serve_in_thread("127.0.0.1", tmp_path / "victim.log")
    v6 = serve_in_thread("::1", tmp_path / "victim.log", v4.server_port)
    yield Victim(v4.server_port, [v4, v6])
    for server in (v4, v6):
        server.shutdown()
        server.server_close()


@dataclasses.dataclass
class PublicSide:
    """A namespace with a server at ``server`` (``http://<ip>:8080``), reached over a veth
    whose node end ``node_ip`` is one of the node's own addresses."""

    network: str
    node_ip: str
    server_ip: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.server_ip}:8080"

    def requests(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def public_side(tmp_path: Path) -> Iterator[PublicSide]:
    token = secrets.token_hex(3)
    netns, host_if, peer_if = f"bf{token}", f"bfh{token}", f"bfp{token}"
    third, fourth = secrets.randbelow(256), secrets.randbelow(64) * 4
    network = f"198.18.{third}.{fourth}/30"
    node_ip, server_ip = f"198.18.{third}.{fourth + 1}", f"198.18.{third}.{fourth + 2}"
    log = tmp_path / "public.log"
    process = None

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("netns", "add", netns)
        ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        ip("link", "set", peer_if, "netns", netns)
        ip("addr", "add", f"{node_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", netns, "addr", "add", f"{server_ip}/30", "dev", peer_if)
        ip("-n", netns, "link", "set", peer_if, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        server = [sys.executable, "-m", "tests.security.fetch_server", server_ip, "8080", str(log)]
        process = subprocess.Popen(["ip", "netns", "exec", netns, *server], cwd=REPO)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection((server_ip, 8080), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        yield PublicSide(network, node_ip, server_ip, log)
    finally:
        if process is not None:
            process.kill()
            process.wait()
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)


# ---------------------------------------------------------------- ADD <url> in a build

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "2130706433",  # decimal
    "0177.0.0.1",  # octal
    "0x7f.1",  # hex, short
    "0x7f000001",
    "127.1",  # short
    "127.0.1",
    "0177.1",
    "0",  # 0.0.0.0 reaches the node
    "0.0.0.0",  # noqa: S104 - a URL host here, nothing binds it
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
    "[::ffff:127.0.0.1]",  # IPv4-mapped
    "[::ffff:7f00:1]",
    "[::]",
    "[::1%25lo]",  # zone id
    "localhost",  # a DNS name that resolves to loopback
]
#: What the operator would have to allow for each spelling to reach the victim: the control
#: run proves every spelling really lands on the victim (so the refusal is what stops it).
LOOPBACK_ALLOW = ("127.0.0.1", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1", "localhost")  # noqa: S104


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_add_from_the_node_is_refused_in_every_notation(
    agent_config: AgentConfig, tmp_path: Path, victim: Victim, host: str
) -> None:
    url = f"http://{host}:{victim.port}/secret"
    with pytest.raises(FetchRefused, match=r"refused to fetch from .*(loopback|unspecified)"):
        add(agent_with(agent_config), tmp_path, url)
    assert victim.seen == []
    # Control: an operator allowing the node's loopback makes the very same URL reach it.
    tree = add(agent_with(agent_config, fetch_allow=LOOPBACK_ALLOW), tmp_path, url)
    assert tree["/fetched"][4] == "served /secret"
    assert victim.seen == ["/secret"]


def test_add_of_a_name_that_resolves_to_loopback_is_refused(
    agent_config: AgentConfig, tmp_path: Path, victim: Victim
) -> None:
    """``localhost`` is covered above; ``ip6-localhost`` is refused too: by the policy where
    it resolves (to ::1), as unresolvable where this machine's hosts file lacks it."""
    url = f"http://ip6-localhost:{victim.port}/secret"
    try:
        resolvable = bool(socket.getaddrinfo("ip6-localhost", victim.port))
    except OSError:
        resolvable = False
    expected = FetchRefused if resolvable else InvalidArgument
    with pytest.raises(expected, match="loopback" if resolvable else "cannot resolve"):
        add(agent_with(agent_config), tmp_path, url)
    assert victim.seen == []


def test_public_fetch_works_and_the_node_end_is_refused(
    agent_config: AgentConfig, tmp_path: Path, public_side: PublicSide
) -> None:
    """With the namespace's /30 allowed (an operator's internal mirror), its server is
    fetched; the node's own address in that same network is still refused."""
    node_victim = serve_in_thread(public_side.node_ip, tmp_path / "node.log")
    try:
        agent = agent_with(agent_config, fetch_allow=(public_side.network,))
        tree = add(agent, tmp_path, f"{public_side.url}/pkg.txt")
        assert tree["/fetched"][:2] == ("file", 0o600)
        assert tree["/fetched"][4] == "served /pkg.txt"
        assert public_side.requests() == ["/pkg.txt"]
        node_url = f"http://{public_side.node_ip}:{node_victim.server_port}/secret"
        with pytest.raises(FetchRefused, match="private address of this node or of the control"):
            add(agent, tmp_path, node_url)
        assert node_victim.seen == []
        # Not allowed at all: the private server is refused like any private address.
        with pytest.raises(FetchRefused, match="private address"):
            add(agent_with(agent_config), tmp_path, f"{public_side.url}/pkg.txt")
        assert public_side.requests() == ["/pkg.txt"]
    finally:
        node_victim.shutdown()
        node_victim.server_close()


def test_redirects_to_the_node_are_refused(
    agent_config: AgentConfig, tmp_path: Path, public_side: PublicSide, victim: Victim
) -> None:
    agent = agent_with(agent_config, fetch_allow=(public_side.network,))
    port = victim.port
    targets = [
        f"http://127.0.0.1:{port}/secret",
        f"http://2130706433:{port}/secret",
        f"http://0x7f.1:{port}/secret",
        f"http://[::1]:{port}/secret",
        f"http://[::ffff:7f00:1]:{port}/secret",
        f"http://localhost:{port}/secret",
        f"http://{public_side.node_ip}:{port}/secret",
        # a relative redirect to a second redirect that leaves for loopback
        f"/redirect?to=http://127.0.0.1:{port}/secret",
    ]
    for target in targets:
        with pytest.raises(FetchRefused):
            add(agent, tmp_path, f"{public_side.url}/redirect?to={target}")
    with pytest.raises(InvalidArgument, match="only http:// and https://"):
        add(agent, tmp_path, f"{public_side.url}/redirect?to=file:///etc/shadow")
    assert victim.seen == []
    assert len(public_side.requests()) == len(targets) + 2  # each first hop was served
    # Control: a redirect that stays on the allowed server is followed.
    tree = add(agent, tmp_path, f"{public_side.url}/redirect?to=/final")
    assert tree["/fetched"][4] == "served /final"


def test_size_cap_stops_an_endless_body(
    agent_config: AgentConfig, tmp_path: Path, public_side: PublicSide
) -> None:
    agent = agent_with(agent_config, fetch_allow=(public_side.network,), fetch_max_bytes=1 << 20)
    started = time.monotonic()
    for path in ("/big", "/huge"):  # streamed without a length / declaring 1 GiB
        with pytest.raises(ResourceExhausted, match=r"larger than the 1048576 byte limit"):
            add(agent, tmp_path, f"{public_side.url}{path}")
    assert time.monotonic() - started < 30


def test_time_cap_stops_a_slow_body(
    agent_config: AgentConfig, tmp_path: Path, public_side: PublicSide
) -> None:
    agent = agent_with(agent_config, fetch_allow=(public_side.network,), fetch_timeout_seconds=1.5)
    started = time.monotonic()
    with pytest.raises(ResourceExhausted, match=r"longer than the 1.5 s limit"):
        add(agent, tmp_path, f"{public_side.url}/slow")
    assert time.monotonic() - started < 6


# ---------------------------------------------------------------- the policy itself

#: Addresses that are not on this machine: judged without any connection being made.
OFF_NODE = {
    "169.254.169.254": "link-local",  # cloud metadata
    "2852039166": "link-local",  # the same, decimal
    "0xa9fea9fe": "link-local",
    "0251.0376.0251.0376": "link-local",
    "[::ffff:169.254.169.254]": "link-local",
    "[2002:a9fe:a9fe::1]": "link-local",  # 6to4
    "[64:ff9b::a9fe:a9fe]": "link-local",  # NAT64
    "[fe80::1%25eth0]": "link-local",
    "10.0.0.1": "private",
    "172.16.5.4": "private",
    "192.168.1.1": "private",
    "[fc00::1]": "private",
    "100.64.0.1": "not globally routable",  # shared address space (CGNAT)
    "224.0.0.251": "multicast",
    "[ff02::1]": "multicast",
    "240.0.0.1": "private",  # reserved (Python files 240/4 under private)
    "255.255.255.255": "private",
}


@pytest.mark.parametrize("host", sorted(OFF_NODE))
def test_policy_refuses_non_public_addresses_before_connecting(host: str) -> None:
    with pytest.raises(FetchRefused, match=OFF_NODE[host]):
        resolve_checked(host.strip("[]"), 80, FetchPolicy())


def test_policy_allows_public_addresses_and_only_what_the_operator_lists(
    agent_config: AgentConfig,
) -> None:
    for host in ("8.8.8.8", "2001:4860:4860::8888"):
        assert str(resolve_checked(host, 80, FetchPolicy())) == host  # no connection made
    policy = policy_for_node(dataclasses.replace(agent_config, fetch_allow=("10.1.0.0/16",)))
    assert str(resolve_checked("10.1.2.3", 80, policy)) == "10.1.2.3"
    with pytest.raises(FetchRefused):
        resolve_checked("10.2.0.1", 80, policy)
    # The node's own addresses are platform addresses, refused even when public.
    assert policy.refusal(next(iter(policy.platform))) is not None
    with pytest.raises(ValueError, match="neither an address"):
        FetchPolicy.from_config(["0x7f.1"])


# ---------------------------------------------------------------- image references


def test_the_node_refuses_to_pull_from_a_registry_not_allowed(
    agent_config: AgentConfig, victim: Victim
) -> None:
    """Defense in depth: a container spec naming the node's own port is refused by the
    agent before any request, even if it got past the control plane."""
    for ref in (
        f"127.0.0.1:{victim.port}/x/y:1",
        f"localhost:{victim.port}/x/y:1",
        f"[::1]:{victim.port}/x/y:1",
    ):
        with pytest.raises(FetchRefused, match="not one this platform pulls from"):
            ensure_image(agent_with(agent_config), T, ref)
    assert victim.seen == []
    # Control: a registry the operator allows is contacted (the victim is no registry).
    allowed = agent_with(agent_config, allowed_registries=(f"127.0.0.1:{victim.port}",))
    with pytest.raises(AgentError):
        ensure_image(allowed, T, f"127.0.0.1:{victim.port}/x/y:1")
    assert victim.seen and victim.seen[0].startswith("/v2/")


def api_client(
    client_for: Callable[..., Any], make_token: Callable[..., str], tenant: Tenant, user: User
) -> Any:
    return client_for(make_token(tenant, user, Scope.WRITE))


@pytest.mark.django_db
@override_settings(BERTH_REGISTRY_HOST="127.0.0.1:5000", BERTH_ALLOWED_REGISTRIES=[])
def test_api_refuses_images_from_registries_not_allowed(
    acme: tuple[Tenant, User], make_token: Callable[..., str], client_for: Callable[..., Any]
) -> None:
    tenant, owner = acme
    client = api_client(client_for, make_token, tenant, owner)
    for image in (
        "127.0.0.1:8000/x/y:1",  # the control plane's own port
        "127.0.0.1:6379/x/y:1",
        "localhost:5000/acme/web:1",  # the platform registry, spelled otherwise
        "[::1]:5000/acme/web:1",
        "2130706433:5000/acme/web:1",
        "0x7f.1:5000/acme/web:1",
        "127.1:5000/acme/web:1",
        "[::ffff:127.0.0.1]:5000/acme/web:1",
        "169.254.169.254/latest/meta:1",
        "registry.example.com/acme/web:1",
    ):
        response = client.post(
            "/api/v1/tenants/acme/services/", {"name": "s", "image": image}, format="json"
        )
        assert response.status_code == 400, (image, response.content)
        error = response.json()["error"]
        assert error["code"] == "registry_not_allowed", error
        assert "not one this platform pulls from" in error["message"]
        assert error["details"]["allowed_registries"] == ["127.0.0.1:5000"]
        job = client.post("/api/v1/tenants/acme/jobs/", {"image": image}, format="json")
        assert job.status_code == 400 and job.json()["error"]["code"] == "registry_not_allowed"
    assert not tenant.services.exists()
    # The platform's own registry and local names are fine.
    for name, image in (("p", "127.0.0.1:5000/acme/web:1"), ("l", "busybox")):
        response = client.post(
            "/api/v1/tenants/acme/services/", {"name": name, "image": image}, format="json"
        )
        assert response.status_code == 201, response.content
    # Changing a service's image is checked the same way (once its first rollout is done).
    tenant.services.get(name="p").deployments.update(state=DeploymentState.SUCCEEDED)
    patched = client.patch(
        "/api/v1/tenants/acme/services/p/", {"image": "127.0.0.1:8000/x/y:1"}, format="json"
    )
    assert patched.status_code == 400
    assert patched.json()["error"]["code"] == "registry_not_allowed"


@pytest.mark.django_db
@override_settings(
    BERTH_REGISTRY_HOST="127.0.0.1:5000", BERTH_ALLOWED_REGISTRIES=["Mirror.Example.com:5000"]
)
def test_operator_allowed_registries_are_accepted(
    acme: tuple[Tenant, User], make_token: Callable[..., str], client_for: Callable[..., Any]
) -> None:
    tenant, owner = acme
    client = api_client(client_for, make_token, tenant, owner)
    ok = client.post(
        "/api/v1/tenants/acme/services/",
        {"name": "m", "image": "mirror.example.com:5000/team/app:2"},
        format="json",
    )
    assert ok.status_code == 201, ok.content
    other_port = client.post(
        "/api/v1/tenants/acme/services/",
        {"name": "n", "image": "mirror.example.com/team/app:2"},
        format="json",
    )
    assert other_port.status_code == 400
