"""Hostile tenant, issue #17 items 7 and 11 (network): container root must not be host
root, and a tenant container must not reach the node, its other bridges or its LAN.

Containers here are dispatched the way the control plane dispatches them: a
``ContainerSpec`` payload handed to the node's real ``NodeWorker.apply_container`` (the
Celery task body), builds through ``build_job.run_build`` with the context served over
HTTP on 127.0.0.1, all on a real agent (runc, conmon, cgroups, overlayfs, netns,
nftables). Payloads are the hostile part: they say ``user_namespace: false`` and
``privileged_caller: true``, which the node must ignore.

Every network target lives in a namespace this test makes on this machine (a veth pair
from the node into it, with "LAN", "docker bridge", CGNAT, link-local, RFC 1918 and
"internet" addresses); nothing is sent anywhere else.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import secrets
import shutil
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from runtime_agent import protocol
from runtime_agent.agent import Agent
from runtime_agent.config import AgentConfig
from runtime_agent.errors import InvalidArgument
from runtime_agent.images.bootstrap import bootstrap_busybox
from runtime_agent.network import firewall
from runtime_agent.network.netns import create_netns, delete_netns, run_in_netns
from runtime_agent.node import NodeIdentity
from runtime_agent.protocol import ContainerSpec, MountSpec, PortMapping
from runtime_agent.runtime.seccomp import host_kernel
from runtime_agent.runtime.security import tenant_id_range
from runtime_agent.worker import NodeWorker
from tests.agent.test_network import veth_into
from tests.agent.test_runtime_fixtures import until
from tests.agent.test_security_containers import run_script

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc"),
    pytest.mark.skipif(host_kernel() < (5, 19), reason="overlayfs on idmapped layers: 5.19"),
]

TENANT = "mallory"
PORT = 7171


def worker_for(agent: Agent) -> NodeWorker:
    """The node's real task handlers, without a Celery consumer (messages it sends go to
    this test's own Redis database)."""
    identity = NodeIdentity(
        node_id="node-h6",
        credential="not-a-real-credential",
        broker_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/6"),
        control_url="http://127.0.0.1:1/",
        queue="node.h6",
    )
    return NodeWorker(agent, identity)


def hostile_spec(name: str, script: str, **fields: Any) -> dict[str, Any]:
    """A payload as the control plane sends it, tampered to ask for host root."""
    spec = ContainerSpec(
        tenant=TENANT,
        image="busybox",
        name=name,
        command=("sh", "-c", script),
        labels={protocol.CONTAINER_UID_LABEL: secrets.token_hex(8)},
        **fields,
    )
    payload = protocol.to_dict(spec)
    payload.update(user_namespace=False, privileged_caller=True)
    return payload


def dispatch(worker: NodeWorker, payload: dict[str, Any]) -> str:
    result = worker.apply_container(op_id=secrets.token_hex(8), spec=payload)
    assert "error" not in result, result
    return str(result["id"])


def sh(agent: Agent, container_id: str, script: str, timeout: float = 30) -> str:
    code, out = agent.containers.exec_capture(
        TENANT, container_id, ["sh", "-c", script], timeout=timeout
    )
    assert code == 0, out
    return out.decode()


@pytest.fixture
def node(agent: Agent) -> Agent:
    bootstrap_busybox(agent)
    return agent


# ---- item 7: user namespaces by default for what the control plane dispatches --------


def test_dispatched_container_is_user_namespaced_whatever_the_payload_says(
    node: Agent,
) -> None:
    worker = worker_for(node)
    cid = dispatch(
        worker,
        hostile_spec("probe", "exec sleep 600", network_mode="none"),
    )
    ids = tenant_id_range(node.config, TENANT)
    uid_map = sh(node, cid, "cat /proc/self/uid_map").split()
    assert uid_map == ["0", str(ids.start), "65536"]  # not "0 0 4294967295"
    assert sh(node, cid, "cat /proc/self/gid_map").split() == uid_map
    assert sh(node, cid, "id -u").strip() == "0"  # root inside, nobody outside
    pid = node.containers.inspect(TENANT, cid)["State"]["Pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(ids.start)] * 4  # as the host sees the process
    # The same payload spelled the old way (no field at all) gets the same.
    bare = hostile_spec("bare", "exec sleep 600", network_mode="none")
    del bare["user_namespace"], bare["privileged_caller"]
    other = dispatch(worker, bare)
    assert sh(node, other, "cat /proc/self/uid_map").split() == uid_map


def test_payload_cannot_claim_privileged_caller_rights(node: Agent, tmp_path: Path) -> None:
    worker = worker_for(node)
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    for payload in (
        hostile_spec("binder", "true", mounts=(MountSpec("bind", "/host", source=str(host_dir)),)),
        hostile_spec("etc", "true", mounts=(MountSpec("bind", "/host", source="/etc"),)),
        hostile_spec("hostnet", "true", network_mode="host"),
    ):
        result = worker.apply_container(op_id=secrets.token_hex(8), spec=payload)
        assert "error" in result, result
    assert node.containers.list(TENANT, all=True) == []


def _bind_attack(node: Agent, host_dir: Path, *, user_namespace: bool) -> str:
    """Root in a container with an operator-given bind of a root-owned host directory
    tries to use host root's rights on it; returns what worked."""
    script = (
        "cat /host/secret >/dev/null 2>&1 && echo read-secret;"
        " { echo pwned >> /host/root-file; } 2>/dev/null && echo wrote-root-file;"
        " touch /host/new 2>/dev/null && echo created-file;"
        " chown 0:0 /host/owned-by-nobody 2>/dev/null && echo chowned;"
        " chmod 4777 /host/root-file 2>/dev/null && echo chmodded;"
        " true"
    )
    code, out, _err, container_id = run_script(
        node,
        TENANT,
        script,
        mounts=(MountSpec("bind", "/host", source=str(host_dir)),),
        privileged_caller=True,  # the operator gave this bind
        user_namespace=user_namespace,
    )
    assert code == 0
    node.containers.remove(TENANT, container_id)
    return out


def test_root_escaping_through_an_operator_bind_has_no_host_root_rights(
    node: Agent, tmp_path: Path
) -> None:
    host_dir = node.config.root / "operator-bind"
    host_dir.mkdir(parents=True)
    host_dir.chmod(0o755)
    (host_dir / "secret").write_text("host root only\n")
    (host_dir / "secret").chmod(0o600)
    (host_dir / "root-file").write_text("original\n")
    (host_dir / "root-file").chmod(0o644)
    (host_dir / "owned-by-nobody").write_text("")
    os.chown(host_dir / "owned-by-nobody", 65534, 65534)
    # The control: without a user namespace, container root IS host root on the bind.
    assert set(_bind_attack(node, host_dir, user_namespace=False).split()) == {
        "read-secret",
        "wrote-root-file",
        "created-file",
        "chowned",
        "chmodded",
    }
    (host_dir / "root-file").write_text("original\n")
    (host_dir / "root-file").chmod(0o644)
    (host_dir / "new").unlink()
    os.chown(host_dir / "owned-by-nobody", 65534, 65534)
    # In the tenant's user namespace (the default for what is dispatched) none of it.
    assert _bind_attack(node, host_dir, user_namespace=True).split() == []
    assert (host_dir / "root-file").read_text() == "original\n"
    assert (host_dir / "root-file").stat().st_mode & 0o7777 == 0o644
    assert not (host_dir / "new").exists()
    assert (host_dir / "owned-by-nobody").stat().st_uid == 65534


class _Context(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def _context_tar(dockerfile: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = dockerfile.encode()
        member = tarfile.TarInfo("Dockerfile")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def test_dispatched_build_runs_its_steps_in_the_tenant_user_namespace(node: Agent) -> None:
    from runtime_agent.build_job import run_build

    dockerfile = (
        "FROM busybox\n"
        "RUN cat /proc/self/uid_map > /uid_map && id -u > /uid"
        " && (echo x > /proc/sysrq-trigger 2>/dev/null; echo $? > /sysrq)\n"
    )
    handler = type("Handler", (_Context,), {"body": _context_tar(dockerfile)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    worker = worker_for(node)
    worker.identity = replace(worker.identity, control_url=f"http://127.0.0.1:{server.server_port}")
    try:
        result = run_build(
            worker,
            protocol.BuildRequest(
                build_id=secrets.token_hex(4), tenant=TENANT, context_url="/ctx", tag="probe:1"
            ),
            threading.Event(),
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result["state"] == "succeeded", result
    # What the RUN step saw, read back from the built image by a plain container.
    info = node.containers.run(
        ContainerSpec(
            tenant=TENANT, image="probe:1", command=("cat", "/uid_map", "/uid", "/sysrq")
        ),
        watch_exit=False,
    )
    assert node.containers.wait(TENANT, info.id, timeout=60) == 0
    out = [entry.line.decode() for entry in node.containers.logs(TENANT, info.id)]
    ids = tenant_id_range(node.config, TENANT)
    assert out[0].split() == ["0", str(ids.start), "65536"]
    assert out[1:] == ["0", "1"]  # root in the step, but not the host's


def test_operator_can_opt_out_but_no_payload_can(agent_config: AgentConfig) -> None:
    from runtime_agent.runtime.security import tenant_container_spec

    spec = ContainerSpec(tenant=TENANT, image="busybox", user_namespace=False)
    assert tenant_container_spec(agent_config, spec).user_namespace is True
    hostile = replace(spec, privileged_caller=True)
    assert tenant_container_spec(agent_config, hostile).privileged_caller is False
    opted_out = replace(agent_config, tenant_userns=False)  # BERTH_TENANT_USERNS=0
    assert tenant_container_spec(opted_out, replace(spec, user_namespace=True)).user_namespace is (
        False
    )


def _simulate_reboot(agent: Agent, container_id: str) -> None:
    """What a node reboot leaves of a stopped container: its files, none of its mounts
    (rootfs overlay, idmapped volume views, the sized volume's loop mount)."""
    roots = (str(agent.config.root), str(agent.config.run_root))
    mounts = [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(roots)
    ]
    for mountpoint in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=True)
    assert container_id  # nothing of it is mounted now


def test_volume_files_stay_usable_across_agent_restart_and_reboot(
    agent_config: AgentConfig,
) -> None:
    first = Agent(agent_config)
    bootstrap_busybox(first)
    volume = (MountSpec("volume", "/data", source="keep", size_bytes=16 * 1024 * 1024),)
    script = (
        "[ -e /data/f ] || { echo root-data > /data/f && mkdir /data/app"
        " && echo app-data > /data/app/g && chown -R 1000:1000 /data/app; }; exec sleep 600"
    )
    # No network: a bridge endpoint's netns doesn't survive a reboot (networks.recover).
    writer = dispatch(
        worker_for(first), hostile_spec("writer", script, mounts=volume, network_mode="none")
    )
    until(lambda: sh(first, writer, "cat /data/app/g 2>/dev/null || true") == "app-data\n")
    range_before = sh(first, writer, "cat /proc/self/uid_map").split()
    first.containers.stop(TENANT, writer, timeout=1)
    _simulate_reboot(first, writer)

    # A new agent process on the same state: the tenant's range and the volume's owners
    # are what they were.
    second = Agent(agent_config)
    assert tenant_id_range(second.config, TENANT) == tenant_id_range(first.config, TENANT)
    second.containers.start(TENANT, writer)  # restart policy / docker start after reboot
    assert sh(second, writer, "cat /data/f /data/app/g") == "root-data\napp-data\n"
    assert sh(second, writer, "stat -c '%u:%g' /data/f /data/app/g") == "0:0\n1000:1000\n"
    assert sh(second, writer, "cat /proc/self/uid_map").split() == range_before
    sh(second, writer, "echo more >> /data/f")
    second.containers.remove(TENANT, writer, force=True)
    # A new container on the volume, also as the unprivileged user owning its files.
    reader = dispatch(
        worker_for(second), hostile_spec("reader", "exec sleep 600", mounts=volume, user="1000")
    )
    assert sh(
        second, reader, "id -u; cat /data/f; echo by-1000 >> /data/app/g && cat /data/app/g"
    ) == ("1000\nroot-data\nmore\napp-data\nby-1000\n")
    assert "Permission denied" in _failing(second, reader, "echo x >> /data/f")


def _failing(agent: Agent, container_id: str, script: str) -> str:
    code, out = agent.containers.exec_capture(TENANT, container_id, ["sh", "-c", script])
    assert code != 0, out
    return out.decode()


# ---- item 11: tenant egress reaches the internet only --------------------------------


@dataclass
class Targets:
    """Listeners in a namespace this test owns, behind a veth from the node."""

    netns: Path
    host_link: str
    lan_host: str  # the node's own address on the "LAN" (a public /24, like eth0's)
    lan: str  # a LAN neighbour: the node's interface subnet
    bridge_host: str  # the node's address on a "docker bridge" (172.x)
    bridge: str  # a container on that other bridge
    allowed: str  # RFC 1918, in the operator's allow-list
    routed_private: dict[str, str]  # CGNAT, link-local, 192.168, 10.x: routed, not local
    internet: str  # a public address routed through the namespace


@pytest.fixture
def targets(agent_config: AgentConfig) -> Iterator[Targets]:
    octet = secrets.randbelow(200) + 20
    host_link = f"{agent_config.name[:8]}e0"
    netns = agent_config.run_root / "targets"
    netns.parent.mkdir(parents=True, exist_ok=True)
    lan_host, lan = "198.51.100.1", "198.51.100.2"
    bridge_host, bridge = f"172.29.{octet}.1", f"172.29.{octet}.2"
    allowed_host, allowed = f"10.214.{octet}.1", f"10.214.{octet}.2"
    routed = {
        "cgnat": f"100.64.{octet}.2",
        "link-local": f"169.254.{octet}.2",
        "metadata": "169.254.169.254",
        "rfc1918-192": f"192.168.{octet}.2",
        "rfc1918-10": f"10.215.{octet}.2",
    }
    internet = f"203.0.113.{octet}"
    inside = create_netns(netns)
    ipr = IPRoute()
    listener: socket.socket | None = None
    try:
        index, peer = veth_into(ipr, inside, netns, host_link, "t0")
        for address in (lan_host, bridge_host, allowed_host):
            ipr.addr("add", index=index, address=address, prefixlen=24)
        for address in (lan, bridge, allowed):
            inside.addr("add", index=peer, address=address, prefixlen=24)
        for address in [*routed.values(), internet]:
            inside.addr("add", index=peer, address=address, prefixlen=32)
            ipr.route("add", dst=f"{address}/32", gateway=lan)
        # No route back to the containers' subnets: replies arrive only when masqueraded.

        def bind() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", PORT))  # noqa: S104 - inside the test's own namespace
            s.listen(64)
            return s

        listener = run_in_netns(netns, bind)
        threading.Thread(target=_serve, args=(listener,), daemon=True).start()
        yield Targets(
            netns, host_link, lan_host, lan, bridge_host, bridge, allowed, routed, internet
        )
    finally:
        if listener is not None:
            listener.close()
        inside.close()
        with contextlib.suppress(Exception):
            ipr.link("del", ifname=host_link)  # its addresses and routes go with it
        ipr.close()
        delete_netns(netns)


def _serve(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"pong\n")


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A TCP service on every address of the node (what Redis/Postgres/agent ports are)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 0))  # noqa: S104 - host-wide on purpose
    s.listen(64)
    threading.Thread(target=_serve, args=(s,), daemon=True).start()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def probe(agent: Agent, container_id: str, addresses: dict[str, str], port: int) -> dict[str, bool]:
    """Which of ``addresses`` the container reaches over TCP (probed in parallel)."""
    lines = " ".join(
        f"(echo | nc -w 2 {address} {port} 2>/dev/null | grep -q pong"
        f" && echo {label}=yes || echo {label}=no) &"
        for label, address in addresses.items()
    )
    out = sh(agent, container_id, f"{lines} wait")
    answers = (line.split("=") for line in out.split() if "=" in line)
    return {label: answer == "yes" for label, answer in answers}


def host_reaches(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=3) as s:
        return s.recv(5) == b"pong\n"
    return False


def node_addresses() -> dict[str, str]:
    """The node's own IPv4 addresses on its real interfaces (eth0, docker0, ...)."""
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return {
            f"host-{names[a['index']]}-{i}": a.get_attr("IFA_ADDRESS")
            for i, a in enumerate(ipr.get_addr(family=socket.AF_INET))
            if names[a["index"]] != "lo"
        }


@pytest.fixture
def egress_node(agent_config: AgentConfig, targets: Targets) -> Iterator[Agent]:
    config = replace(agent_config, egress_allow=(f"{targets.allowed}/32",))
    agent = Agent(config)
    bootstrap_busybox(agent)
    yield agent
    for info in agent.containers.list_all():
        with contextlib.suppress(Exception):
            agent.containers.remove(info.tenant, info.id, force=True)
    agent.networks.teardown()


def test_tenant_container_reaches_the_internet_only(
    egress_node: Agent, targets: Targets, host_listener: int
) -> None:
    node = egress_node
    cid = dispatch(worker_for(node), hostile_spec("egress", "exec sleep 600"))
    # Positive controls: the node reaches every target, the allow-listed private address
    # and the internet are reached from the container (the latter only through NAT).
    private = {
        "lan": targets.lan,
        "other-bridge": targets.bridge,
        **targets.routed_private,
    }
    for address in [*private.values(), targets.allowed, targets.internet]:
        if address != "169.254.169.254":
            assert host_reaches(address, PORT), address
    reached = probe(
        node, cid, {**private, "allowed": targets.allowed, "internet": targets.internet}, PORT
    )
    assert reached == {**dict.fromkeys(private, False), "allowed": True, "internet": True}
    # The node itself, on every address it has (not only the container's gateway): the
    # LAN and bridge addresses made here, eth0's, docker0's when Docker runs, loopback's.
    own = {
        "lan-host": targets.lan_host,
        "bridge-host": targets.bridge_host,
        "loopback": "127.0.0.1",
        "gateway": sh(node, cid, "ip route | awk '/default/ {print $3}'").strip(),
        **node_addresses(),
    }
    for address in own.values():
        assert host_reaches(address, host_listener), address
    assert probe(node, cid, own, host_listener) == dict.fromkeys(own, False)
    # No IPv6 way around it (ULA, link-local fe80::, anything): eth0 has no IPv6 address
    # and the node drops IPv6 from and to the bridges.
    assert "inet6" not in sh(node, cid, "ip -6 addr show dev eth0")
    ruleset = subprocess.run(
        ["nft", "list", "table", "ip6", node.networks.table], capture_output=True, text=True
    ).stdout
    assert "iifname @bridges drop" in ruleset and "oifname @bridges drop" in ruleset


def test_docker0_is_out_of_reach(egress_node: Agent, host_listener: int) -> None:
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="docker0")
        addresses = (
            [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET, index=index[0])]
            if index
            else []
        )
    if not addresses:
        pytest.skip("no docker0 on this machine (dockerd not running)")
    cid = dispatch(worker_for(egress_node), hostile_spec("docker", "exec sleep 600"))
    assert host_reaches(addresses[0], host_listener)
    assert probe(egress_node, cid, {"docker0": addresses[0]}, host_listener) == {"docker0": False}


def test_published_ports_and_replies_still_work(egress_node: Agent, targets: Targets) -> None:
    node = egress_node
    port = _free_port()
    dispatch(
        worker_for(node),
        hostile_spec(
            "web",
            f"while true; do echo pong | nc -l -p {PORT}; done",
            ports=(PortMapping(container_port=PORT, host_port=port),),
        ),
    )
    assert until(lambda: host_reaches("127.0.0.1", port))

    # From the "LAN" (the test's namespace, through the node's LAN address): DNAT in,
    # replies out, although the LAN is a refused destination for the container.
    def from_lan() -> bool:
        def connect() -> socket.socket:
            return socket.create_connection((targets.lan_host, port), timeout=3)

        with contextlib.suppress(OSError), run_in_netns(targets.netns, connect) as s:
            return s.recv(5) == b"pong\n"
        return False

    assert until(from_lan)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_egress_sets_and_allow_list_validation(agent_config: AgentConfig) -> None:
    refused, allowed = firewall.egress_sets(["10.200.3.0/24", "198.51.100.0/24"], ["10.9.9.9"])
    text = [str(n) for n in refused]
    for cidr in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "198.51.100.0/24",
    ):
        assert cidr in text
    assert "10.200.3.0/24" not in text  # merged into 10/8: nft refuses overlaps
    assert [str(n) for n in allowed] == ["10.9.9.9/32"]
    script = firewall.render(
        "bx",
        [firewall.BridgeRule("bxb1", "10.1.0.0/24", "10.1.0.1")],
        [],
        egress_allow=["10.9.9.9"],
    )
    assert script.index("@egress_allowed accept") < script.index("@egress_refused reject")
    from runtime_agent.network import NetworkManager

    for bad in ("nonsense", "fd00::/8", "10.0.0.0/33"):
        with pytest.raises(InvalidArgument):
            NetworkManager(replace(agent_config, egress_allow=(bad,)))


# ---- the whole path: REST API -> control plane -> Celery -> a node's worker -------------


@pytest.mark.timeout(600)
def test_a_service_created_through_the_api_runs_as_nobody_on_the_host(
    cluster: Any, host_listener: int
) -> None:
    """A tenant's service, created and exec'd into only through the REST API: its root is
    the tenant's unprivileged range on the node, exec works (runc enters the userns and
    the netns it owns), and from inside it the node's own address is unreachable."""
    from tests.e2e.conftest import agent_api, wait_for
    from tests.e2e.test_dispatch import _client

    client = _client(TENANT)  # a tenant and its API token, nothing else
    base = f"/api/v1/tenants/{TENANT}/services"
    created = client.post(
        f"{base}/",
        {"name": "probe", "image": "busybox", "command": ["sleep", "3600"], "memory_mib": 32},
        format="json",
    )
    assert created.status_code == 201, created.content

    def running() -> bool:
        containers = client.get(f"{base}/probe/").json()["containers"]
        return any(c["state"] == "running" for c in containers)

    wait_for(running, timeout=120, what="the service running")

    def run(*argv: str) -> str:
        reply = client.post(f"{base}/probe/exec/", {"argv": list(argv)}, format="json")
        assert reply.status_code == 200, reply.content
        body = reply.json()
        assert body.get("exit_code") == 0, body
        return str(body["output"])

    uid_map = run("cat", "/proc/self/uid_map").split()
    assert uid_map[0] == "0" and uid_map[2] == "65536" and int(uid_map[1]) >= 1_000_000
    assert run("id", "-u").strip() == "0"
    (node,) = [a for a in cluster.agents if agent_api(a).containers.list(TENANT)]
    api = agent_api(node)
    assert int(uid_map[1]) == tenant_id_range(api.config, TENANT).start
    (info,) = api.containers.list(TENANT)
    pid = api.containers.inspect(TENANT, info.id)["State"]["Pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    assert (
        next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1]
        == (uid_map[1])
    )
    own = node_addresses()
    assert own and all(host_reaches(address, host_listener) for address in own.values())
    probes = " ".join(
        f"(echo | nc -w 2 {address} {host_listener} 2>/dev/null | grep -q pong"
        f" && echo reached {address}) &"
        for address in own.values()
    )
    assert "reached" not in run("sh", "-c", f"{probes} wait")
