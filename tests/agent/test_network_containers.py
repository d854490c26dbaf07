"""Networking end to end through real containers (``agent.containers``: runc + conmon).

The same guarantees as test_network.py, seen from inside busybox containers that the
ContainerManager created: names resolve through the container's own /etc/resolv.conf,
other tenants stay unreachable, published ports answer on the node, and removing the
container removes its networking.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.protocol import ContainerSpec, NetworkAttachment, PortMapping
from tests.agent.test_network import host_addresses, veths

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc"),
    pytest.mark.skipif(shutil.which("conmon") is None, reason="needs conmon"),
    pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox-static"),
]

SERVE = "mkdir -p /www && echo hello-$HOSTNAME > /www/index.html && exec httpd -f -p 80 -h /www"


@pytest.fixture
def node(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    from runtime_agent.images.bootstrap import bootstrap_busybox

    monkeypatch.setenv("BERTH_NETWORK_POOL", "10.213.0.0/16")
    monkeypatch.setenv("BERTH_DNS_UPSTREAMS", "")
    bootstrap_busybox(agent)
    try:
        yield agent
    finally:
        try:
            for info in agent.containers.list_all():
                agent.containers.remove(info.tenant, info.id, force=True)
        finally:
            try:
                agent.networks.teardown()
            finally:
                agent.snapshots.remove_all_mounts()
                agent.containers.cgroups.remove_all()


def serve(agent: Agent, tenant: str, name: str, **spec: object) -> str:
    info = agent.containers.run(
        ContainerSpec(
            tenant=tenant,
            image="busybox",
            name=name,
            hostname=name,
            command=("sh", "-c", SERVE),
            **spec,  # type: ignore[arg-type]
        )
    )
    wait_for_port(agent, tenant, info.id, 80)
    return str(info.id)


def wait_for_port(agent: Agent, tenant: str, container_id: str, port: int) -> None:
    endpoint = agent.networks.endpoint(tenant, container_id)
    assert endpoint is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["nsenter", f"--net={endpoint.netns_path}", "ss", "-Hltn"],
            capture_output=True,
            text=True,
        ).stdout
        if f":{port} " in out:
            return
        time.sleep(0.05)
    raise AssertionError(f"container {container_id[:12]} never listened on {port}")


def run(agent: Agent, tenant: str, script: str, **spec: object) -> tuple[int, str]:
    info = agent.containers.run(
        ContainerSpec(
            tenant=tenant,
            image="busybox",
            command=("sh", "-c", script),
            **spec,  # type: ignore[arg-type]
        )
    )
    code = agent.containers.wait(tenant, info.id, timeout=60)
    out = "".join(
        e.line.decode(errors="replace") + "\n"
        for e in agent.containers.logs(tenant, info.id)
        if e.stream == "stdout"
    )
    return code, out


def host_fetch(url: str) -> str | None:
    proc = subprocess.run(
        ["timeout", "10", "busybox", "wget", "-q", "-O-", url], capture_output=True, text=True
    )
    return proc.stdout if proc.returncode == 0 else None


def test_containers_find_each_other_by_name_and_alias_only_within_their_tenant(
    node: Agent,
) -> None:
    node.networks.create("acme", "web")
    node.networks.create("globex", "web")
    serve(node, "acme", "server", networks=(NetworkAttachment("web", aliases=("api",)),))
    code, out = run(
        node,
        "acme",
        "timeout 10 wget -q -O- http://server/ && timeout 10 wget -q -O- http://api/",
        networks=(NetworkAttachment("web"),),
    )
    assert code == 0
    assert out.count("hello-server") == 2
    acme_ip = node.networks.inspect("acme", "web").containers[0].address.split("/")[0]
    code, out = run(
        node,
        "globex",
        f"nslookup server; timeout 5 wget -q -O- http://{acme_ip}/ || echo UNREACHABLE",
        networks=(NetworkAttachment("web"),),
    )
    assert "NXDOMAIN" in out or "can't find" in out
    assert "UNREACHABLE" in out and "hello-server" not in out


def test_default_network_published_ports_and_cleanup_on_remove(node: Agent) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    container = serve(node, "acme", "web1", ports=(PortMapping(80, port),))
    endpoint = node.networks.endpoint("acme", container)
    assert endpoint is not None and set(endpoint.addresses) == {"default"}
    assert host_fetch(f"http://127.0.0.1:{port}/") == "hello-web1\n"
    host_ip = host_addresses()[0]
    assert host_fetch(f"http://{host_ip}:{port}/") == "hello-web1\n"
    # inside, the container sees its own resolv.conf and hosts
    code, out = run(
        node,
        "acme",
        "cat /etc/resolv.conf; timeout 10 wget -q -O- http://web1/",
        networks=(NetworkAttachment("default"),),
    )
    assert code == 0 and "nameserver" in out and "hello-web1" in out
    node.containers.remove("acme", container, force=True)
    assert node.networks.endpoint("acme", container) is None
    assert not node.networks.netns_path(container).exists()
    assert host_fetch(f"http://127.0.0.1:{port}/") is None
    with socket.socket() as s:
        # free again: nothing listens (SO_REUSEADDR only tolerates TIME_WAIT leftovers)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))  # noqa: S104
        s.listen(1)


def test_network_none_has_only_loopback(node: Agent) -> None:
    code, out = run(node, "acme", "cat /proc/net/dev", network_mode="none")
    assert code == 0
    interfaces = [line.split(":")[0].strip() for line in out.splitlines() if ":" in line]
    assert interfaces == ["lo"]


def test_eth0_has_no_ipv6_so_forged_router_adverts_do_nothing(node: Agent) -> None:
    """Networks are IPv4 only: eth0 has IPv6 disabled (no SLAAC address or route from a
    router advertisement another container forges); loopback keeps ::1. The same holds
    in a recycled namespace (the second container)."""
    script = (
        "cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6 /proc/sys/net/ipv6/conf/lo/disable_ipv6;"
        " ip -6 addr show dev eth0 | wc -l; ip -6 addr show dev lo | grep -c ::1"
    )
    addresses = []
    for _ in range(2):
        code, out = run(node, "acme", script + "; ip -4 -o addr show dev eth0")
        assert code == 0
        lines = out.splitlines()
        assert lines[:4] == ["1", "0", "0", "1"]
        addresses.append(lines[4].split()[3])
        for info in node.containers.list("acme", all=True):
            node.containers.remove("acme", info.id)
    assert addresses[0] == addresses[1]  # the second one ran in the first one's namespace


def test_a_container_that_fails_to_be_created_leaves_no_networking(node: Agent) -> None:
    from runtime_agent.errors import AgentError

    node.networks.create("acme", "web")
    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))  # noqa: S104 - a host process holding a port
    holder.listen(1)
    try:
        failures = [
            # fails after the network was attached (an unknown CDI device)
            {"devices": ("example.com/gpu=none",)},
            # fails inside attach (the host port is taken)
            {"ports": (PortMapping(80, holder.getsockname()[1]),)},
        ]
        for extra in failures:
            with pytest.raises(AgentError):
                node.containers.create(
                    ContainerSpec(
                        tenant="acme",
                        image="busybox",
                        command=("true",),
                        networks=(NetworkAttachment("web"),),
                        **extra,  # type: ignore[arg-type]
                    )
                )
    finally:
        holder.close()
    assert node.containers.list_all() == []
    assert node.networks.endpoints("acme") == []
    assert node.networks.inspect("acme", "web").containers == ()
    # what the first (attached, then detached) container left is an idle namespace of
    # the network, kept for the next container there; it goes with the network
    node.networks.remove("acme", "web")
    netns_dir = node.config.netns_dir
    assert not netns_dir.exists() or list(netns_dir.iterdir()) == []


def test_bandwidth_limits_from_the_container_spec_reach_tc(node: Agent) -> None:
    from runtime_agent.cli.containers import parse_bits
    from runtime_agent.errors import InvalidArgument
    from runtime_agent.protocol import Limits

    info = node.containers.run(
        ContainerSpec(
            tenant="acme",
            image="busybox",
            name="shaped",
            command=("sleep", "60"),
            limits=Limits(
                network_ingress_bps=parse_bits("8mbit", "--network-ingress"),
                network_egress_bps=parse_bits("4mbit", "--network-egress"),
            ),
        )
    )
    endpoint = node.networks.endpoint("acme", info.id)
    assert endpoint is not None
    inside = subprocess.run(
        ["nsenter", f"--net={endpoint.netns_path}", "tc", "qdisc", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "tbf" in inside and "4Mbit" in inside  # egress: shaped where it leaves
    host = subprocess.run(
        ["tc", "qdisc", "show", "dev", veths(node.networks)[0]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "tbf" in host and "8Mbit" in host  # ingress: shaped on the way in
    with pytest.raises(InvalidArgument, match="network-egress"):
        parse_bits("fast", "--network-egress")
