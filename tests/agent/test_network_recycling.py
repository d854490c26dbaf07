"""Recycled network namespaces: a removed container's netns and veth pair serve the next
container of the same tenant network, and only when nothing of the old one is left in it.

Observed from outside, as in test_network.py: netns files, ``ip -o link``, addresses,
routes and real traffic from busybox processes in the namespaces.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from runtime_agent.config import AgentConfig
from runtime_agent.network import NetworkManager
from runtime_agent.network import manager as manager_module
from runtime_agent.network.netns import delete_netns, run_in_netns
from runtime_agent.protocol import NetworkAttachment, PortMapping
from tests.agent import test_network
from tests.agent.test_network import (
    POOL,
    WWW,
    Procs,
    cid,
    fetch,
    httpd,
    in_container,
    ip_of,
    owned_links,
    veths,
)
from tests.agent.test_runtime_fixtures import until

pytestmark = pytest.mark.privileged

WEB = [NetworkAttachment("web")]


# the fixtures of test_network.py (a NetworkManager torn down after the test, busybox
# servers killed after it, a web root)
net = test_network.net
procs = test_network.procs
www = test_network.www


def links_on(bridge: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True, check=True
    ).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def inside(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["nsenter", f"--net={netns}", *argv], capture_output=True, text=True, check=True
    ).stdout


def netns_files(net: NetworkManager) -> list[str]:
    directory = net.config.netns_dir
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_the_next_container_gets_the_namespace_veth_and_address(
    net: NetworkManager, procs: Procs, www: Path
) -> None:
    web = net.create("acme", "web")
    server = net.attach("acme", cid(), "s", WEB, name="server")
    httpd(procs, server.netns_path, www)
    first = net.attach("acme", cid(), "a", WEB, name="first")
    # Fills first's neighbour table, and leaves no socket behind (a TCP client that
    # closes first would leave TIME_WAIT, and such a namespace is not recycled: see
    # test_sockets_left_in_the_namespace_prevent_recycling).
    ping = in_container(first, f"busybox ping -c 1 -W 5 {server.addresses['web'].split('/')[0]}")
    assert ping.returncode == 0, ping.stderr
    pair = set(links_on(web.bridge))
    net.detach("acme", _id(net, "first"))
    # kept: the netns file, the veth on the bridge, eth0's address and default route
    assert first.netns_path is not None and Path(first.netns_path).exists()
    assert set(links_on(web.bridge)) == pair
    assert net.inspect("acme", "web").containers[0].name == "server"  # no DNS name left

    second = net.attach("acme", cid(), "b", WEB, name="second")
    assert second.netns_path == first.netns_path
    assert second.addresses == first.addresses
    assert set(links_on(web.bridge)) == pair  # no new veth
    assert f"inet {second.addresses['web']}" in inside(first.netns_path, "ip", "-o", "addr")
    assert f"default via {web.gateway} dev eth0" in inside(first.netns_path, "ip", "route")
    assert fetch(second, "http://server/") == WWW  # DNS on the gateway, then the server
    # and the server reaches the new owner by its name
    net.detach("acme", _id(net, "server"))
    procs.stop()
    httpd(procs, second.netns_path, www)
    third = net.attach("acme", cid(), "c", WEB, name="third")
    assert fetch(third, "http://second/") == WWW


def _id(net: NetworkManager, name: str) -> str:
    return next(e.container_id for e in net.endpoints("acme") if e.name == name)


def _time_wait(address: str) -> None:
    """Leave a TIME_WAIT socket in this thread's namespace (the client closes first)."""
    with socket.socket() as listener:
        listener.bind((address, 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        client.close()
        server.recv(1)  # the FIN
        server.close()


def test_sockets_left_in_the_namespace_prevent_recycling(net: NetworkManager) -> None:
    web = net.create("acme", "web")
    waiting = net.attach("acme", cid(), "w", WEB, name="waiting")
    assert waiting.netns_path is not None
    run_in_netns(Path(waiting.netns_path), lambda: _time_wait(ip_of(waiting, "web")))
    assert " tw 1" in inside(waiting.netns_path, "cat", "/proc/net/sockstat")
    listening = net.attach("acme", cid(), "l", WEB, name="listening")
    assert listening.netns_path is not None

    def listen() -> socket.socket:
        sock = socket.socket()
        sock.bind(("0.0.0.0", 8080))  # noqa: S104 - inside the namespace
        sock.listen()
        return sock

    held = run_in_netns(Path(listening.netns_path), listen)
    try:
        net.detach("acme", _id(net, "waiting"))
        net.detach("acme", _id(net, "listening"))
        assert netns_files(net) == []
    finally:
        held.close()
    until(lambda: links_on(web.bridge) == [], timeout=5)
    fresh = net.attach("acme", cid(), "f", WEB, name="fresh")
    assert fresh.netns_path not in (waiting.netns_path, listening.netns_path)


def test_published_ports_and_bandwidth_limits_are_not_recycled(net: NetworkManager) -> None:
    net.create("acme", "web")
    net.attach("acme", cid(), "p", WEB, [PortMapping(80)], name="published")
    net.attach("acme", cid(), "l", WEB, name="limited", egress_bps=1_000_000)
    net.attach("acme", cid(), "i", WEB, name="ingress", ingress_bps=1_000_000)
    for name in ("published", "limited", "ingress"):
        net.detach("acme", _id(net, name))
    assert netns_files(net) == []
    until(lambda: veths(net) == [], timeout=5)


def test_another_tenant_never_gets_the_namespace(net: NetworkManager) -> None:
    net.create("acme", "web")
    net.create("other", "web")
    mine = net.attach("acme", cid(), "a", WEB, name="a")
    net.detach("acme", _id(net, "a"))
    theirs = net.attach("other", cid(), "b", WEB, name="b")
    assert theirs.netns_path != mine.netns_path
    assert theirs.addresses != mine.addresses
    assert mine.netns_path is not None and Path(mine.netns_path).exists()  # still idle
    # the same tenant's other network doesn't take it either
    net.create("acme", "db")
    elsewhere = net.attach("acme", cid(), "c", [NetworkAttachment("db")], name="c")
    assert elsewhere.netns_path != mine.netns_path


def test_pool_size_and_idle_expiry(
    agent_config: AgentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BERTH_NETNS_POOL", "2")
    net = NetworkManager(agent_config, pool=POOL, dns_upstreams=[])
    try:
        web = net.create("acme", "web")
        setups = [net.attach("acme", cid(), "h", WEB, name=f"c{n}") for n in range(3)]
        for n in range(3):
            net.detach("acme", _id(net, f"c{n}"))
        kept = [s.netns_path for s in setups if s.netns_path and Path(s.netns_path).exists()]
        assert len(kept) == 2 and len(netns_files(net)) == 2
        until(lambda: len(links_on(web.bridge)) == 2, timeout=5)
        # idle too long: the next operation destroys them
        monkeypatch.setattr(manager_module, "IDLE_TTL", 0.0)
        net.create("acme", "db")
        fresh = net.attach("acme", cid(), "d", [NetworkAttachment("db")], name="d")
        assert netns_files(net) == [Path(str(fresh.netns_path)).name]
        until(lambda: links_on(web.bridge) == [], timeout=5)
    finally:
        net.teardown()


def test_pool_size_zero_disables_recycling(
    agent_config: AgentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BERTH_NETNS_POOL", "0")
    net = NetworkManager(agent_config, pool=POOL, dns_upstreams=[])
    try:
        net.create("acme", "web")
        first = net.attach("acme", cid(), "a", WEB, name="a")
        net.detach("acme", _id(net, "a"))
        assert netns_files(net) == []
        second = net.attach("acme", cid(), "b", WEB, name="b")
        assert second.netns_path != first.netns_path
    finally:
        net.teardown()


def test_a_failed_attach_destroys_the_claimed_namespace(
    net: NetworkManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    web = net.create("acme", "web")
    first = net.attach("acme", cid(), "a", WEB, name="a")
    net.detach("acme", _id(net, "a"))

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("daemon down")

    with monkeypatch.context() as patch:
        patch.setattr(net, "_sync_daemon", broken)
        with pytest.raises(OSError, match="daemon down"):
            net.attach("acme", cid(), "b", WEB, name="b")
    assert netns_files(net) == []
    assert links_on(web.bridge) == []
    assert net.store.load().idle == []
    again = net.attach("acme", cid(), "c", WEB, name="c")
    assert again.netns_path != first.netns_path
    assert again.addresses == first.addresses  # the address was released


def test_a_container_coming_back_does_not_take_its_old_namespace_from_another(
    net: NetworkManager,
) -> None:
    """Recycled namespaces keep their names: the container they were made for can be
    attached again (a restart) without touching the container that has it now."""
    net.create("acme", "web")
    old = cid()
    first = net.attach("acme", old, "a", WEB, name="a")
    net.detach("acme", old)
    other = net.attach("acme", cid(), "b", WEB, name="b")
    assert other.netns_path == first.netns_path
    back = net.attach("acme", old, "a", WEB, name="a")
    assert back.netns_path != other.netns_path
    assert len(set(veths(net))) == 2
    net.detach("acme", old)
    net.detach("acme", old)  # idempotent, and never deletes b's namespace
    assert other.netns_path is not None and Path(other.netns_path).exists()
    assert f"inet {ip_of(other, 'web')}" in inside(other.netns_path, "ip", "-o", "addr")


def test_remove_recover_and_teardown_destroy_idle_namespaces(net: NetworkManager) -> None:
    web = net.create("acme", "web")
    net.attach("acme", cid(), "a", WEB, name="a")
    net.detach("acme", _id(net, "a"))
    net.remove("acme", "web")  # only idle namespaces: the network is unused
    assert netns_files(net) == [] and owned_links(net.prefix) == []
    assert not any(web.bridge in line for line in links_on_all())

    # recover: an idle namespace that vanished (a reboot) is forgotten, its address freed
    net.create("acme", "web")
    gone = net.attach("acme", cid(), "g", WEB, name="g")
    kept = net.attach("acme", cid(), "k", WEB, name="k")
    net.detach("acme", _id(net, "g"))
    net.detach("acme", _id(net, "k"))
    assert gone.netns_path is not None
    delete_netns(Path(gone.netns_path))
    net.recover(live_container_ids=[])
    assert netns_files(net) == [Path(str(kept.netns_path)).name]
    assert len(veths(net)) == 1
    state = net.store.load()
    assert [e.address for e in state.idle] == [ip_of(kept, "web")]
    assert ip_of(gone, "web") not in next(iter(state.networks.values())).allocated

    net.teardown()
    assert netns_files(net) == [] and owned_links(net.prefix) == []
    assert net.store.load().idle == []


def links_on_all() -> list[str]:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()
