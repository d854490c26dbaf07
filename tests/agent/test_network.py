"""Tenant networks with real traffic: netns, veth, bridges, nftables, DNS, published ports.

"Containers" here are network namespaces made by the manager with busybox processes in
them (``nsenter --net``); a private mount namespace bind-mounts the container's
resolv.conf so lookups go through the network's DNS responder, as in a real container.
Every address used lives in a namespace or bridge the test made (pool 10.213.0.0/16,
an "outside" host at 198.19.x.x routed through an uplink veth, a link-local listener inside
that namespace). Docker is running on the machine during all of this.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from runtime_agent.config import AgentConfig
from runtime_agent.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from runtime_agent.network import NetworkManager, NetworkSetup, firewall
from runtime_agent.network import manager as manager_module
from runtime_agent.network.daemon import is_running
from runtime_agent.network.netns import create_netns, delete_netns, run_in_netns
from runtime_agent.protocol import NetworkAttachment, PortMapping
from tests.agent.test_runtime_fixtures import until

pytestmark = pytest.mark.privileged

POOL = "10.213.0.0/16"
WWW = "hello from berth\n"
ANY = "0.0.0.0"  # noqa: S104 - tests bind host-wide on purpose


def cid() -> str:
    return secrets.token_hex(32)


@pytest.fixture
def net(agent_config: AgentConfig) -> Iterator[NetworkManager]:
    manager = NetworkManager(agent_config, pool=POOL, dns_upstreams=[])
    try:
        yield manager
    finally:
        manager.teardown()


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text(WWW)
    return root


class Procs:
    """Background busybox servers, killed at the end of the test whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.stop()


def httpd(procs: Procs, netns: str | None, root: Path, bind: str = "80") -> None:
    prefix = ["nsenter", f"--net={netns}"] if netns else []
    procs.start([*prefix, "busybox", "httpd", "-f", "-p", bind, "-h", str(root)])
    _host, _, port = bind.rpartition(":")
    wait_listening(netns, int(port))


def wait_listening(netns: str | None, port: int, timeout: float = 5.0) -> None:
    prefix = ["nsenter", f"--net={netns}"] if netns else []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([*prefix, "ss", "-Hltn"], capture_output=True, text=True).stdout
        if f":{port} " in out:
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on port {port}")


def in_container(
    setup: NetworkSetup, script: str, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a shell script in the container's netns with its resolv.conf in place."""
    assert setup.netns_path is not None
    resolv = Path(setup.netns_path + ".resolv")
    resolv.write_text(setup.resolv_conf)
    try:
        return subprocess.run(
            [
                "nsenter",
                f"--net={setup.netns_path}",
                "unshare",
                "--mount",
                "sh",
                "-c",
                f"mount --bind {resolv} /etc/resolv.conf && {script}",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        resolv.unlink()


def fetch(setup: NetworkSetup, url: str, seconds: int = 10) -> str | None:
    """Body of url as seen from the container, or None if it couldn't be fetched.

    Checks expected to fail pass a short ``seconds``: a dropped packet only times out.
    """
    proc = in_container(setup, f"timeout {seconds} busybox wget -q -O- {url}")
    return proc.stdout if proc.returncode == 0 else None


def host_fetch(url: str, seconds: int = 10) -> str | None:
    proc = subprocess.run(
        ["timeout", str(seconds), "busybox", "wget", "-q", "-O-", url],
        capture_output=True,
        text=True,
    )
    return proc.stdout if proc.returncode == 0 else None


def tcp_connects(setup: NetworkSetup, host: str, port: int) -> bool:
    proc = in_container(setup, f"echo | timeout 3 busybox nc -w 2 {host} {port}")
    return proc.returncode == 0


def host_addresses() -> list[str]:
    """The node's stable IPv4 addresses: its uplink's (default route) and docker0's.

    Other agents' bridges come and go while tests run side by side, so they are left out.
    """
    with IPRoute() as ipr:
        indexes = {r.get("oif") for r in ipr.get_default_routes(family=socket.AF_INET)}
        indexes |= set(ipr.link_lookup(ifname="docker0"))
        return [
            str(a.get("address"))
            for a in ipr.get_addr(family=socket.AF_INET)
            if a["index"] in indexes
        ]


def ip_of(setup: NetworkSetup, network: str) -> str:
    return setup.addresses[network].split("/")[0]


def owned_links(prefix: str) -> list[str]:
    with IPRoute() as ipr:
        return [
            str(link.get("ifname"))
            for link in ipr.get_links()
            if str(link.get("ifname")).startswith(prefix)
        ]


def veths(net: NetworkManager) -> list[str]:
    return [name for name in owned_links(net.prefix) if name[len(net.prefix)] == "v"]


def mounts_under(path: Path) -> list[str]:
    return [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(str(path))
    ]


@dataclass
class Outside:
    """A host "on the internet": its own netns behind an uplink veth from the node."""

    netns: Path
    host_side: str
    address: str  # the outside host's address, routed (not on the uplink's subnet)
    uplink: str  # the node's address on the uplink (what masquerade rewrites to)
    link_local: str  # a listener address in 169.254/16, routed to this netns only


def veth_into(
    ipr: IPRoute, inside: IPRoute, netns: Path, host_side: str, peer_name: str
) -> tuple[int, int]:
    """A veth pair from the node into a namespace the test made, both ends up; returns
    (host end's index, peer's index inside)."""
    fd = os.open(netns, os.O_RDONLY)
    try:
        ipr.link(
            "add",
            ifname=host_side,
            kind="veth",
            state="up",
            peer={"ifname": peer_name, "net_ns_fd": fd},
        )
    finally:
        os.close(fd)
    peer = inside.link_lookup(ifname=peer_name)[0]
    inside.link("set", index=peer, state="up")
    return ipr.link_lookup(ifname=host_side)[0], peer


@pytest.fixture
def outside(agent_config: AgentConfig, tmp_path: Path) -> Iterator[Outside]:
    octet = secrets.randbelow(250) + 1
    host_side = f"{agent_config.name[:8]}u0"
    netns = agent_config.run_root / "outside"
    netns.parent.mkdir(parents=True, exist_ok=True)
    # The uplink /30 is one of the node's own subnets, which containers may not reach
    # (like a LAN); the outside host is behind the router at its other end.
    uplink, router, address = f"198.18.{octet}.1", f"198.18.{octet}.2", f"198.19.{octet}.2"
    link_local = f"169.254.213.{octet}"
    inside = create_netns(netns)
    ipr = IPRoute()
    try:
        index, peer = veth_into(ipr, inside, netns, host_side, "uplink")
        ipr.addr("add", index=index, address=uplink, prefixlen=30)
        ipr.route("add", dst=f"{link_local}/32", gateway=router)
        ipr.route("add", dst=f"{address}/32", gateway=router)
        inside.addr("add", index=peer, address=router, prefixlen=30)
        inside.addr("add", index=peer, address=address, prefixlen=32)
        inside.addr("add", index=peer, address=link_local, prefixlen=32)
        # Deliberately no route back to the container subnets: replies only find their
        # way if the node masqueraded the traffic to its uplink address.
        yield Outside(netns, host_side, address, uplink, link_local)
    finally:
        inside.close()
        with contextlib.suppress(Exception):
            ipr.link("del", ifname=host_side)
        ipr.close()
        delete_netns(netns)


# ---- networks ----------------------------------------------------------------------


def test_networks_are_tenant_objects_with_their_own_bridge_and_subnet(
    net: NetworkManager,
) -> None:
    web = net.create("acme", "web")
    db = net.create("acme", "db", subnet="10.213.77.0/24")
    other = net.create("globex", "web")
    assert db.subnet == "10.213.77.0/24" and db.gateway == "10.213.77.1"
    assert len({web.subnet, db.subnet, other.subnet}) == 3
    assert [n.name for n in net.list("acme")] == ["db", "web"]
    assert [n.name for n in net.list("globex")] == ["web"]
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=web.bridge)[0]
        addrs = {a.get("address") for a in ipr.get_addr(index=index)}
    assert web.gateway in addrs
    assert web.bridge.startswith(net.prefix) and len(web.bridge) <= 15
    with pytest.raises(NotFound):
        net.inspect("globex", "db")  # other tenants' networks don't exist for you
    net.remove("acme", "db")
    assert owned_links(db.bridge) == []
    assert [n.name for n in net.list("acme")] == ["web"]


def test_bad_network_requests_are_refused_without_partial_state(
    net: NetworkManager, outside: Outside
) -> None:
    net.create("acme", "web", subnet="10.213.10.0/24")
    before = owned_links(net.prefix)
    with pytest.raises(AlreadyExists):
        net.create("acme", "web")
    with pytest.raises(AlreadyExists, match="overlaps network 'web'"):
        net.create("acme", "web2", subnet="10.213.10.128/25")
    routed = outside.uplink.rsplit(".", 1)[0] + ".0/24"  # the uplink's /30 is inside it
    with pytest.raises(FailedPrecondition, match="already routed"):
        net.create("acme", "clash", subnet=routed)
    with pytest.raises(InvalidArgument):
        net.create("acme", "bad", subnet="10.213.11.1/24")
    with pytest.raises(InvalidArgument):
        net.create("acme", "host")
    with pytest.raises(InvalidArgument):
        net.create("ACME!", "x")
    assert owned_links(net.prefix) == before
    assert [n.name for n in net.list("acme")] == ["web"]


def test_removing_a_network_in_use_is_refused(net: NetworkManager) -> None:
    net.create("acme", "web")
    net.attach("acme", cid(), "a", [NetworkAttachment("web")], name="app")
    with pytest.raises(FailedPrecondition, match="app"):
        net.remove("acme", "web")


# ---- traffic -----------------------------------------------------------------------


def test_same_network_reaches_containers_by_name_and_alias(
    net: NetworkManager, procs: Procs, www: Path
) -> None:
    net.create("acme", "web")
    server = net.attach(
        "acme", cid(), "srv", [NetworkAttachment("web", aliases=("api",))], name="server"
    )
    client = net.attach("acme", cid(), "cli", [NetworkAttachment("web")], name="client")
    httpd(procs, server.netns_path, www)
    assert fetch(client, "http://server/") == WWW
    assert fetch(client, "http://api/") == WWW
    assert fetch(client, f"http://{ip_of(server, 'web')}/") == WWW
    lookup = in_container(client, "busybox nslookup server")
    assert ip_of(server, "web") in lookup.stdout
    assert server.resolv_conf.startswith(f"nameserver {net.inspect('acme', 'web').gateway}")
    assert "srv" in server.hosts and ip_of(server, "web") in server.hosts


def test_tenants_cannot_reach_each_other_either_way(
    net: NetworkManager, procs: Procs, www: Path
) -> None:
    net.create("acme", "web")
    net.create("globex", "web")
    a_srv = net.attach("acme", cid(), "a", [NetworkAttachment("web")], name="a-server")
    b_srv = net.attach("globex", cid(), "b", [NetworkAttachment("web")], name="b-server")
    a_cli = net.attach("acme", cid(), "ac", [NetworkAttachment("web")], name="a-client")
    b_cli = net.attach("globex", cid(), "bc", [NetworkAttachment("web")], name="b-client")
    httpd(procs, a_srv.netns_path, www)
    httpd(procs, b_srv.netns_path, www)
    # the control: each tenant reaches its own server
    assert fetch(a_cli, "http://a-server/") == WWW
    assert fetch(b_cli, "http://b-server/") == WWW
    # across tenants: neither by address nor by name, in both directions
    assert fetch(a_cli, f"http://{ip_of(b_srv, 'web')}/", seconds=3) is None
    assert fetch(b_cli, f"http://{ip_of(a_srv, 'web')}/", seconds=3) is None
    assert "NXDOMAIN" in in_container(a_cli, "busybox nslookup b-server").stdout
    assert "NXDOMAIN" in in_container(b_cli, "busybox nslookup a-server").stdout
    # nor the other tenant's bridge (gateway) address
    b_gateway = net.inspect("globex", "web").gateway
    assert not tcp_connects(a_cli, b_gateway, 53)


def test_two_networks_of_one_tenant_are_isolated_until_connected(
    net: NetworkManager, procs: Procs, www: Path
) -> None:
    net.create("acme", "front")
    net.create("acme", "back")
    db = net.attach("acme", cid(), "db", [NetworkAttachment("back")], name="db")
    app_id = cid()
    app = net.attach("acme", app_id, "app", [NetworkAttachment("front")], name="app")
    httpd(procs, db.netns_path, www)
    assert fetch(app, f"http://{ip_of(db, 'back')}/", seconds=3) is None
    endpoint = net.connect("acme", "back", app_id, aliases=("backend",))
    assert set(endpoint.addresses) == {"front", "back"}
    assert fetch(app, "http://db/") == WWW  # names of the second network resolve too
    links = in_container(app, "ip -br link").stdout
    assert "eth0" in links and "eth1" in links
    assert "backend" in [a for c in net.inspect("acme", "back").containers for a in c.aliases]
    net.disconnect("acme", "back", app_id)
    assert fetch(app, f"http://{ip_of(db, 'back')}/", seconds=3) is None
    assert "eth1" not in in_container(app, "ip -br link").stdout
    with pytest.raises(NotFound):
        net.connect("globex", "back", app_id)  # another tenant's view of the container
    # leaving the first network moves the default route to the remaining one
    net.connect("acme", "back", app_id)
    net.disconnect("acme", "front", app_id)
    routes = in_container(app, "ip route").stdout
    assert f"default via {net.inspect('acme', 'back').gateway}" in routes
    assert fetch(app, f"http://{ip_of(db, 'back')}/") == WWW


def test_connecting_to_another_tenants_network_is_refused(net: NetworkManager) -> None:
    net.create("acme", "web")
    net.create("globex", "secret")
    container = cid()
    net.attach("acme", container, "a", [NetworkAttachment("web")], name="a")
    with pytest.raises(NotFound, match="secret"):
        net.connect("acme", "secret", container)


def test_containers_cannot_reach_node_services_or_link_local(
    net: NetworkManager, procs: Procs, www: Path, outside: Outside
) -> None:
    # A service on every host address, as the agent, Redis or SSH could be.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((ANY, 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        web = net.create("acme", "web")
        app = net.attach("acme", cid(), "app", [NetworkAttachment("web")], name="app")
        targets = [web.gateway, *host_addresses()]
        for address in targets:
            with socket.create_connection((address, port), timeout=2):
                pass  # the control: the service is up on that address
            assert not tcp_connects(app, address, port), f"reached the node at {address}"
        for well_known in (22, 5432, 6379, 2375):
            assert not tcp_connects(app, web.gateway, well_known)
        # no IPv6 path to the node either: the bridge has no IPv6 address at all
        with IPRoute() as ipr:
            bridge = ipr.link_lookup(ifname=web.bridge)[0]
            assert ipr.get_addr(index=bridge, family=socket.AF_INET6) == ()
        assert firewall.table_exists(net.table, "ip6")
        # Link-local (metadata-style) addresses: a listener in our own "outside" netns.
        httpd(procs, str(outside.netns), www, bind=f"{outside.link_local}:80")
        assert host_fetch(f"http://{outside.link_local}/") == WWW  # routed from the node
        assert fetch(app, f"http://{outside.link_local}/", seconds=3) is None
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_egress_is_masqueraded_to_the_outside(
    net: NetworkManager, procs: Procs, www: Path, outside: Outside
) -> None:
    net.create("acme", "web")
    app = net.attach("acme", cid(), "app", [NetworkAttachment("web")], name="app")
    httpd(procs, str(outside.netns), www, bind=f"{outside.address}:80")
    # The outside host has no route to 10.213/16: the reply only arrives if the
    # connection left the node from the uplink address.
    assert fetch(app, f"http://{outside.address}/") == WWW
    # A container forging a source address from another tenant's subnet gets nowhere
    # (without the anti-spoofing rule this would be masqueraded and answered).
    other = net.create("globex", "web")
    assert app.netns_path is not None
    forged = other.subnet.replace(".0/24", ".200")
    subprocess.run(
        ["nsenter", f"--net={app.netns_path}", "ip", "addr", "add", f"{forged}/32", "dev", "eth0"],
        check=True,
    )

    def udp_listener() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((outside.address, 9999))
        return s

    def send_from(source: str) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((source, 0))
            s.sendto(source.encode(), (outside.address, 9999))

    def arrives(source: str) -> bool:
        run_in_netns(Path(str(app.netns_path)), lambda: send_from(source))
        try:
            return listener.recv(100) == source.encode()
        except TimeoutError:
            return False

    listener = run_in_netns(outside.netns, udp_listener)
    listener.settimeout(1)
    try:
        assert arrives(ip_of(app, "web"))  # the control: one-way datagrams get out
        assert not arrives(forged)
    finally:
        listener.close()
    internal = net.create("acme", "sealed", internal=True)
    sealed = net.attach("acme", cid(), "s", [NetworkAttachment("sealed")], name="s")
    assert internal.internal
    assert fetch(sealed, f"http://{outside.address}/", seconds=3) is None


def test_docker_forward_policy_does_not_drop_berth_traffic(
    net: NetworkManager, procs: Procs, www: Path
) -> None:
    if not firewall.docker_user_present():
        pytest.skip("no Docker engine on this machine")
    # dockerd sets FORWARD's policy to DROP when it turns on IP forwarding itself; when
    # forwarding was on before it started (Berth's agent ran first), it leaves ACCEPT.
    # Make docker's situation either way.
    policy = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True)
    restore = "-P FORWARD DROP" not in policy.stdout
    if restore:
        subprocess.run(["iptables", "-P", "FORWARD", "DROP"], check=True)
    try:
        net.create("acme", "web")
        rules = subprocess.run(["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True)
        assert f"berth:{net.config.name}" in rules.stdout
        server = net.attach("acme", cid(), "s", [NetworkAttachment("web")], name="server")
        client = net.attach("acme", cid(), "c", [NetworkAttachment("web")], name="client")
        httpd(procs, server.netns_path, www)
        assert fetch(client, "http://server/") == WWW
    finally:
        if restore:
            subprocess.run(["iptables", "-P", "FORWARD", "ACCEPT"], check=True)


# ---- published ports ---------------------------------------------------------------


def test_published_ports_work_from_loopback_and_host_addresses(
    net: NetworkManager, procs: Procs, www: Path
) -> None:
    net.create("acme", "web")
    port = free_port()
    server = net.attach(
        "acme",
        cid(),
        "srv",
        [NetworkAttachment("web")],
        [PortMapping(container_port=80, host_port=port), PortMapping(container_port=80)],
        name="server",
    )
    httpd(procs, server.netns_path, www)
    fixed, ephemeral = server.ports
    assert fixed.host_port == port and ephemeral.host_port > 0
    for published in (fixed.host_port, ephemeral.host_port):
        assert host_fetch(f"http://127.0.0.1:{published}/") == WWW
        for address in host_addresses():
            assert host_fetch(f"http://{address}:{published}/") == WWW
    # another container reaches it through the node's address too
    client = net.attach("acme", cid(), "cli", [NetworkAttachment("web")], name="client")
    assert fetch(client, f"http://{host_addresses()[0]}:{port}/") == WWW


def test_published_port_bound_to_one_address(net: NetworkManager, procs: Procs, www: Path) -> None:
    net.create("acme", "web")
    port = free_port()
    server = net.attach(
        "acme",
        cid(),
        "srv",
        [NetworkAttachment("web")],
        [PortMapping(container_port=80, host_port=port, host_ip="127.0.0.1")],
        name="server",
    )
    httpd(procs, server.netns_path, www)
    assert host_fetch(f"http://127.0.0.1:{port}/") == WWW
    for address in host_addresses():
        assert host_fetch(f"http://{address}:{port}/", seconds=2) is None


def test_port_conflicts_are_refused_and_roll_back(net: NetworkManager) -> None:
    net.create("acme", "web")
    port = free_port()
    first = cid()
    net.attach("acme", first, "a", [NetworkAttachment("web")], [PortMapping(80, port)], name="a")
    second = cid()
    with pytest.raises(ResourceExhausted, match=f"port {port}/tcp is already published"):
        net.attach(
            "acme", second, "b", [NetworkAttachment("web")], [PortMapping(80, port)], name="b"
        )
    # a host process holding a port
    holder = socket.socket()
    holder.bind((ANY, 0))
    holder.listen(1)
    taken = holder.getsockname()[1]
    try:
        with pytest.raises(ResourceExhausted, match="already in use"):
            net.attach(
                "acme", second, "b", [NetworkAttachment("web")], [PortMapping(80, taken)], name="b"
            )
    finally:
        holder.close()
    # the failed attempts left nothing: no netns, no address taken, no endpoint
    assert net.endpoint("acme", second) is None
    assert not net.netns_path(second).exists()
    assert len(net.inspect("acme", "web").containers) == 1
    # the udp side of the same number is a different port
    net.attach(
        "acme",
        second,
        "b",
        [NetworkAttachment("web")],
        [PortMapping(80, port, protocol="udp")],
        name="b",
    )
    # removing the container frees the port
    net.detach("acme", first)
    with socket.socket() as s:
        s.bind((ANY, port))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((ANY, 0))
        return int(s.getsockname()[1])


# ---- lifecycle ---------------------------------------------------------------------


def test_failed_attach_rolls_back_everything_it_created(net: NetworkManager) -> None:
    net.create("acme", "a")
    b = net.create("acme", "b")
    with IPRoute() as ipr:
        ipr.link("del", ifname=b.bridge)  # b's bridge vanishes: plugging into it fails
    container = cid()
    with pytest.raises(FailedPrecondition, match="missing"):
        net.attach(
            "acme", container, "x", [NetworkAttachment("a"), NetworkAttachment("b")], name="x"
        )
    assert net.endpoint("acme", container) is None
    assert not net.netns_path(container).exists()
    assert mounts_under(net.config.netns_dir) == [str(net.config.netns_dir)]
    assert veths(net) == []
    assert net.inspect("acme", "a").containers == ()
    # recovery re-creates the lost bridge and attaching works again
    net.recover()
    net.attach("acme", container, "x", [NetworkAttachment("a"), NetworkAttachment("b")], name="x")


def test_network_none_and_host_modes(net: NetworkManager) -> None:
    container = cid()
    setup = net.attach("acme", container, "iso", [], mode="none", name="iso")
    assert setup.addresses == {} and setup.resolv_conf == ""
    links = subprocess.run(
        ["nsenter", f"--net={setup.netns_path}", "ip", "-br", "link"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    assert [line.split()[0] for line in links if line] == ["lo"]
    with pytest.raises(InvalidArgument, match="privileged"):
        net.attach("acme", cid(), "h", [], mode="host")
    host = net.attach("acme", cid(), "h", [], mode="host", privileged_caller=True)
    assert host.netns_path is None


def test_nothing_is_left_after_removal(net: NetworkManager, procs: Procs, www: Path) -> None:
    net.create("acme", "web")
    ids = [cid() for _ in range(3)]
    setups = [
        net.attach(
            "acme",
            i,
            f"h{n}",
            [NetworkAttachment("web", aliases=(f"alias{n}",))],
            [PortMapping(80)],
            name=f"c{n}",
        )
        for n, i in enumerate(ids)
    ]
    assert is_running(net.run_dir / "netd.sock")
    assert firewall.table_exists(net.table)
    ruleset = subprocess.run(
        ["nft", "list", "table", "ip", net.table], capture_output=True, text=True
    ).stdout
    assert ip_of(setups[0], "web") in ruleset
    net.detach("acme", ids[0])
    net.detach("acme", ids[0])  # idempotent
    ruleset = subprocess.run(
        ["nft", "list", "table", "ip", net.table], capture_output=True, text=True
    ).stdout
    assert f"{ip_of(setups[0], 'web')}:80" not in ruleset
    # its DNS names are gone for the others
    out = in_container(setups[1], "busybox nslookup c0; busybox nslookup alias0").stdout
    assert out.count("NXDOMAIN") >= 2
    for i in ids[1:]:
        net.detach("acme", i)
    assert mounts_under(net.config.netns_dir) == []
    net.remove("acme", "web")
    assert owned_links(net.prefix) == []
    assert list(net.config.netns_dir.iterdir()) == []
    assert not firewall.table_exists(net.table)
    assert not firewall.table_exists(net.table, "ip6")
    rules = subprocess.run(["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True)
    assert f"berth:{net.config.name}" not in rules.stdout
    time.sleep(0.1)
    assert not is_running(net.run_dir / "netd.sock")
    with IPRoute() as ipr:
        addresses = {str(a.get("address")) for a in ipr.get_addr(family=socket.AF_INET)}
    assert not any(a.startswith("10.213.") for a in addresses)


def test_removed_containers_veths_go_with_their_netns(
    net: NetworkManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """detach deletes the netns only; the kernel removes the veth pair in the background,
    and a pair whose netns something still holds is deleted by a later operation."""
    net.netns_pool = 0  # the deleting path, not recycling (test_network_recycling.py)
    net.create("acme", "web")
    first, held, later = cid(), cid(), cid()
    for container in (first, held):
        net.attach("acme", container, "h", [NetworkAttachment("web")], name=container[:8])
    endpoints = net.store.load().endpoints
    first_veth = endpoints[first].interfaces[0].host_veth
    held_veth = endpoints[held].interfaces[0].host_veth
    net.detach("acme", first)
    assert not net.netns_path(first).exists()
    until(lambda: first_veth not in veths(net), timeout=5)  # no further call needed
    # A process inside the namespace keeps it (and the pair) alive past the detach ...
    keeper = subprocess.Popen(["nsenter", f"--net={net.netns_path(held)}", "sleep", "60"])
    try:
        until(lambda: _netns_of(keeper.pid) == _netns_of_path(net.netns_path(held)), timeout=5)
        net.detach("acme", held)
        time.sleep(0.2)
        assert held_veth in veths(net)
        assert held_veth in net.store.load().doomed
        # ... until the grace is over: the next operation deletes the host end itself.
        monkeypatch.setattr(manager_module, "DOOMED_GRACE", 0.0)
        net.attach("acme", later, "h", [NetworkAttachment("web")], name="later")
        assert held_veth not in veths(net)
        assert net.store.load().doomed == {}
    finally:
        keeper.kill()
        keeper.wait()
    net.detach("acme", later)
    net.remove("acme", "web")  # waits for the last pair instead of leaving it behind
    assert owned_links(net.prefix) == []


def _netns_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def _netns_of_path(path: Path) -> str:
    return f"net:[{os.stat(path).st_ino}]"


def test_recover_keeps_live_attachments_and_removes_orphans(
    net: NetworkManager, procs: Procs, www: Path
) -> None:
    net.create("acme", "web")
    live, dead, gone = cid(), cid(), cid()
    server = net.attach("acme", live, "s", [NetworkAttachment("web")], name="server")
    net.attach("acme", dead, "d", [NetworkAttachment("web")], name="dead")
    net.attach("acme", gone, "g", [NetworkAttachment("web")], name="gone")
    dead_ip = net.endpoint("acme", dead).addresses["web"]  # type: ignore[union-attr]
    # a reboot-like loss of one netns, a crash-orphaned veth, a stray netns file,
    # and the helper daemon killed
    delete_netns(net.netns_path(gone))
    with IPRoute() as ipr:
        ipr.link("add", ifname=f"{net.prefix}v0ddba1", kind="veth", peer=f"{net.prefix}c0ddba1")
    create_netns(net.config.netns_dir / ("f" * 64)).close()
    pid = int((net.run_dir / "netd.pid").read_text())
    os.kill(pid, 9)
    report = net.recover(live_container_ids=[live, gone])
    assert set(report["endpoints"]) == {dead, gone}
    assert f"{net.prefix}v0ddba1" in report["links"]
    assert "f" * 64 in report["netns"]
    assert net.endpoint("acme", dead) is None and net.endpoint("acme", gone) is None
    assert net.endpoint("acme", live) is not None
    assert is_running(net.run_dir / "netd.sock")
    # the live container still serves, and is still found by name
    client = net.attach("acme", cid(), "c", [NetworkAttachment("web")], name="client")
    httpd(procs, server.netns_path, www)
    assert fetch(client, "http://server/") == WWW
    # released addresses are handed out again, never twice at once
    addresses = [c.address for c in net.inspect("acme", "web").containers]
    assert len(addresses) == len(set(addresses))
    again = net.attach("acme", cid(), "n", [NetworkAttachment("web")], name="new")
    assert again.addresses["web"] in {dead_ip, *[]} or again.addresses["web"] not in addresses


def test_ipam_survives_a_restart_without_double_allocation(
    agent_config: AgentConfig, net: NetworkManager
) -> None:
    net.create("acme", "web")
    first = net.attach("acme", cid(), "a", [NetworkAttachment("web")], name="a")
    # a new manager (a restarted agent) sees the allocation
    restarted = NetworkManager(agent_config, pool=POOL, dns_upstreams=[])
    second = restarted.attach("acme", cid(), "b", [NetworkAttachment("web")], name="b")
    assert first.addresses["web"] != second.addresses["web"]
    assert restarted.create("acme", "db").subnet != net.inspect("acme", "web").subnet


def test_bandwidth_limits_are_tc_qdiscs(net: NetworkManager) -> None:
    net.create("acme", "web")
    setup = net.attach(
        "acme",
        cid(),
        "x",
        [NetworkAttachment("web")],
        name="x",
        ingress_bps=8_000_000,
        egress_bps=4_000_000,
    )
    inside = subprocess.run(
        ["nsenter", f"--net={setup.netns_path}", "tc", "qdisc", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
    ).stdout
    assert "tbf" in inside and "4Mbit" in inside
    veth = veths(net)[0]
    host = subprocess.run(
        ["tc", "qdisc", "show", "dev", veth], capture_output=True, text=True
    ).stdout
    assert "tbf" in host and "8Mbit" in host


def test_a_hundred_containers_on_one_network_reach_a_server(
    net: NetworkManager, procs: Procs, www: Path
) -> None:
    net.create("acme", "web")
    server = net.attach("acme", cid(), "srv", [NetworkAttachment("web")], name="server")
    httpd(procs, server.netns_path, www)
    clients = [
        net.attach("acme", cid(), f"c{n}", [NetworkAttachment("web")], name=f"client{n}")
        for n in range(100)
    ]
    assert len({c.addresses["web"] for c in clients}) == 100
    results: dict[int, str | None] = {}

    def worker(start: int) -> None:
        for n in range(start, 100, 10):
            results[n] = fetch(clients[n], "http://server/", seconds=10)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [n for n, body in results.items() if body != WWW]
    assert failed == []


def test_other_names_are_forwarded_to_the_upstream_resolver(
    agent_config: AgentConfig, outside: Outside
) -> None:
    # The upstream is a tiny resolver of our own in the "outside" namespace.
    from runtime_agent.network.dns import Records

    def bind() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((outside.address, 53))
        return s

    upstream = run_in_netns(outside.netns, bind)
    upstream.settimeout(0.2)
    records = Records({"shop.example.test": ["203.0.113.7"]})
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                packet, peer = upstream.recvfrom(4096)
            except TimeoutError:
                continue
            reply = records.answer(packet)
            if reply is not None:
                upstream.sendto(reply, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    manager = NetworkManager(agent_config, pool=POOL, dns_upstreams=[outside.address])
    try:
        manager.create("acme", "web")
        app = manager.attach("acme", cid(), "app", [NetworkAttachment("web")], name="app")
        out = in_container(app, "busybox nslookup shop.example.test").stdout
        assert "203.0.113.7" in out
        # container names still answered locally, unknown single labels never forwarded
        assert "NXDOMAIN" in in_container(app, "busybox nslookup not-here").stdout
    finally:
        manager.teardown()
        stop.set()
        thread.join()
        upstream.close()


def test_concurrent_attaches_never_share_an_address(net: NetworkManager) -> None:
    # The Celery worker runs tasks in threads: attach/detach must serialise correctly.
    net.create("acme", "web")
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for k in range(5):
                container = cid()
                setup = net.attach(
                    "acme", container, f"w{n}", [NetworkAttachment("web")], name=f"w{n}-{k}"
                )
                with lock:
                    results.append(setup.addresses["web"])
                if k % 2:
                    net.detach("acme", container)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    live = [c.address for c in net.inspect("acme", "web").containers]
    assert len(live) == 6 * 3
    assert len(set(live)) == len(live)
    assert len(veths(net)) == len(live)


def test_deleting_the_agent_state_makes_the_daemon_sweep_everything(
    net: NetworkManager,
) -> None:
    # Roots removed without teardown (a decommissioned node, a careless test): the
    # helper daemon notices and removes the bridges, veths, rules and itself.
    import shutil

    net.create("acme", "web")
    container = cid()
    net.attach("acme", container, "a", [NetworkAttachment("web")], [PortMapping(80)], name="a")
    pid = int((net.run_dir / "netd.pid").read_text())
    delete_netns(net.netns_path(container))
    shutil.rmtree(net.config.networks_dir)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (
        owned_links(net.prefix) or firewall.table_exists(net.table) or alive(pid)
    ):
        time.sleep(0.2)
    assert owned_links(net.prefix) == []
    assert not firewall.table_exists(net.table)
    assert not firewall.table_exists(net.table, "ip6")
    rules = subprocess.run(["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True)
    assert f"berth:{net.config.name}" not in rules.stdout
    assert not alive(pid)


def alive(pid: int) -> bool:
    """A running process (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_published_udp_port_answers_on_loopback_and_host_address(net: NetworkManager) -> None:
    net.create("acme", "web")
    container = cid()
    setup = net.attach(
        "acme",
        container,
        "dns",
        [NetworkAttachment("web")],
        [PortMapping(container_port=5353, protocol="udp")],
        name="dns",
    )
    assert setup.netns_path is not None

    def bind() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 5353))  # noqa: S104 - inside the container's netns
        return s

    server = run_in_netns(Path(setup.netns_path), bind)
    server.settimeout(0.2)
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(1500)
            except TimeoutError:
                continue
            server.sendto(b"echo:" + data, peer)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    try:
        port = setup.ports[0].host_port
        for address in ["127.0.0.1", *host_addresses()]:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(3)
                client.sendto(b"ping", (address, port))
                assert client.recvfrom(1500)[0] == b"echo:ping", address
    finally:
        stop.set()
        thread.join()
        server.close()


def test_bandwidth_limit_shapes_real_traffic(net: NetworkManager) -> None:
    net.create("acme", "web")
    sink = net.attach("acme", cid(), "sink", [NetworkAttachment("web")], name="sink")
    limited = net.attach(
        "acme", cid(), "slow", [NetworkAttachment("web")], name="slow", egress_bps=16_000_000
    )
    free = net.attach("acme", cid(), "fast", [NetworkAttachment("web")], name="fast")
    assert sink.netns_path and limited.netns_path and free.netns_path
    sink_ip = ip_of(sink, "web")
    payload = b"x" * (3 * 1024 * 1024)  # 25 Mbit: >= 1.5 s at 16 Mbit/s

    def listener() -> socket.socket:
        s = socket.socket()
        s.bind((sink_ip, 9000))
        s.listen(2)
        return s

    server = run_in_netns(Path(sink.netns_path), listener)

    def drain() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                while conn.recv(1 << 16):
                    pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()

    def send_from(setup: NetworkSetup) -> float:
        client = run_in_netns(Path(str(setup.netns_path)), socket.socket)
        with client:
            client.connect((sink_ip, 9000))
            start = time.monotonic()
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            client.recv(1)  # wait for the sink to close: everything arrived
            return time.monotonic() - start

    try:
        fast = send_from(free)
        slow = send_from(limited)
    finally:
        reader.join(timeout=30)
        server.close()
    assert slow >= 1.2, f"16 Mbit/s limit let 25 Mbit through in {slow:.2f}s"
    assert fast < slow / 2
