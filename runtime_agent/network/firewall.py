"""nftables rules for Berth's networks, in one table per agent, rebuilt as a whole.

The table (``ip <config.name>``) is generated from the state and replaced in a single
``nft -f`` transaction, so applying it twice gives the same ruleset and a half-applied
ruleset never exists. It does four things:

* egress: container traffic leaving through a non-Berth interface is masqueraded, and
  only to the internet: destinations in ``PRIVATE_IPV4`` (RFC 1918, CGNAT, link-local with
  cloud metadata, loopback, multicast, reserved) and on any subnet of the node's own
  interfaces (docker0 and other bridges, the LAN: where a fleet's Redis and Postgres live)
  are refused, unless the operator allow-listed them (``AgentConfig.egress_allow``);
  replies (established/related) and published ports (DNAT) are unaffected;
* isolation: nothing is forwarded between two different Berth bridges (so never between
  tenants, and not between two networks of one tenant either, as with docker networks),
  nothing enters a bridge from outside unless it was DNATed to a published port, and
  link-local destinations (169.254.0.0/16, cloud metadata) are dropped;
* host protection: from a Berth bridge, the node itself only answers DNS on that
  network's own gateway address; every other host address and port (agent, Redis,
  Postgres, SSH, dockerd, ...) is dropped; IPv6 from and to the bridges is dropped
  altogether (an ``ip6`` table of the same name; the bridges also have IPv6 disabled);
* anti-spoofing: a packet from a bridge whose source isn't in that bridge's subnet is
  dropped;
* publishing: DNAT from host addresses to containers (loopback is served by the helper
  daemon's userspace proxy instead; route_localnet stays off, CVE-2020-8558).

Docker coexistence: Docker's ``ip filter FORWARD`` chain has policy drop, and an accept
in our table cannot override a drop in another table's base chain. Our chains run first
(priority filter - 10) and drop what must be dropped; two ACCEPT rules in DOCKER-USER
(matching our bridge-name prefix, tagged with a comment naming this agent) then let the
rest through Docker's chain.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from runtime_agent.errors import AgentError


class FirewallError(AgentError):
    """nft or iptables refused a change."""

    code = "firewall"


#: Destinations that are never "the internet": a tenant container's traffic to them is
#: refused (ICMP admin-prohibited) unless allow-listed. The node's own interface subnets
#: are added at each rebuild (``local_subnets``).
PRIVATE_IPV4: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # RFC 1918
    "100.64.0.0/10",  # carrier-grade NAT (RFC 6598)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
    "172.16.0.0/12",  # RFC 1918 (docker0's 172.17.0.0/16 and docker's default pools)
    "192.0.0.0/24",  # IETF protocol assignments
    "192.168.0.0/16",  # RFC 1918
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, broadcast
)


def egress_sets(
    local: Iterable[str], allowed: Iterable[str]
) -> tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv4Network]]:
    """(refused, allowed) destination prefixes, each merged into non-overlapping ones (an
    nft interval set refuses overlapping elements). ``local``: the node's own interface
    subnets; ``allowed``: the operator's allow-list, which wins over the refusals."""

    def merged(items: Iterable[str]) -> list[ipaddress.IPv4Network]:
        nets = [ipaddress.IPv4Network(item, strict=False) for item in items]
        return list(ipaddress.collapse_addresses(nets))

    return merged([*PRIVATE_IPV4, *local]), merged(allowed)


@dataclass(frozen=True)
class BridgeRule:
    bridge: str
    subnet: str
    gateway: str
    internal: bool = False


@dataclass(frozen=True)
class DnatRule:
    host_ip: str  # "" = every local address
    host_port: int
    protocol: str
    target: str
    container_port: int


def render(
    table: str,
    bridges: Iterable[BridgeRule],
    dnats: Iterable[DnatRule],
    *,
    local_subnets: Iterable[str] = (),
    egress_allow: Iterable[str] = (),
) -> str:
    """The nft script that replaces ``table`` with the rules for these bridges and ports.

    ``local_subnets`` (the node's interface subnets) and ``PRIVATE_IPV4`` are refused to
    containers' outbound traffic, except ``egress_allow`` (operator's CIDRs)."""
    refused, allowed = egress_sets(local_subnets, egress_allow)
    refused_text = ", ".join(map(str, refused))
    allowed_text = ", ".join(map(str, allowed))
    refuse = "reject with icmp type admin-prohibited"  # fails at once, not after a timeout
    bridges = sorted(bridges, key=lambda b: b.bridge)
    dnats = sorted(dnats, key=lambda d: (d.protocol, d.host_port, d.host_ip))
    names = ", ".join(f'"{b.bridge}"' for b in bridges)
    same = ", ".join(f'"{b.bridge}" . "{b.bridge}"' for b in bridges)
    dns = ", ".join(f'"{b.bridge}" . {b.gateway}' for b in bridges)
    subnets = ", ".join(b.subnet for b in bridges)
    bridge_subnets = ", ".join(f'"{b.bridge}" . {b.subnet}' for b in bridges)
    internal = ", ".join(f'"{b.bridge}"' for b in bridges if b.internal)

    def elements(text: str) -> str:
        return f"elements = {{ {text} }}" if text else ""

    publish: list[str] = []
    for d in dnats:
        match = f"ip daddr {d.host_ip} " if d.host_ip else ""
        publish.append(
            f"        {match}{d.protocol} dport {d.host_port} dnat to {d.target}:{d.container_port}"
        )
    publish_body = "\n".join(publish)
    return f"""table ip {table}
delete table ip {table}
table ip {table} {{
    set bridges {{ type ifname; {elements(names)} }}
    set internal {{ type ifname; {elements(internal)} }}
    set same_bridge {{ type ifname . ifname; {elements(same)} }}
    set dns_ok {{ type ifname . ipv4_addr; {elements(dns)} }}
    set subnets {{ type ipv4_addr; flags interval; {elements(subnets)} }}
    set bridge_subnets {{ type ifname . ipv4_addr; flags interval; {elements(bridge_subnets)} }}
    set egress_refused {{ type ipv4_addr; flags interval; {elements(refused_text)} }}
    set egress_allowed {{ type ipv4_addr; flags interval; {elements(allowed_text)} }}

    chain publish {{
{publish_body}
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat - 1; policy accept;
        fib daddr type local jump publish
    }}
    chain output {{
        type nat hook output priority -101; policy accept;
        ip daddr != 127.0.0.0/8 fib daddr type local jump publish
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat - 1; policy accept;
        ip saddr @subnets oifname != @bridges masquerade
        ct status dnat oifname @bridges ip saddr @subnets masquerade
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname @bridges iifname . ip saddr != @bridge_subnets drop
        iifname @bridges ip daddr 169.254.0.0/16 drop
        oifname @bridges ct state established,related accept
        iifname @bridges ct state established,related accept
        iifname . oifname @same_bridge accept
        oifname @bridges ct status dnat accept
        iifname @internal drop
        iifname @bridges oifname != @bridges ip daddr @egress_allowed accept
        iifname @bridges oifname != @bridges ip daddr @egress_refused {refuse}
        iifname @bridges oifname != @bridges accept
        iifname @bridges drop
        oifname @bridges drop
    }}
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname != @bridges accept
        iifname . ip saddr != @bridge_subnets drop
        ct state established,related accept
        meta l4proto {{ tcp, udp }} th dport 53 iifname . ip daddr @dns_ok accept
        drop
    }}
}}
table ip6 {table}
delete table ip6 {table}
table ip6 {table} {{
    set bridges {{ type ifname; {elements(names)} }}
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname @bridges drop
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname @bridges drop
        oifname @bridges drop
    }}
}}
"""


def apply(
    table: str,
    bridges: Iterable[BridgeRule],
    dnats: Iterable[DnatRule],
    *,
    local_subnets: Iterable[str] = (),
    egress_allow: Iterable[str] = (),
) -> None:
    """Replace the table atomically (one nft transaction); see ``render``."""
    script = render(table, bridges, dnats, local_subnets=local_subnets, egress_allow=egress_allow)
    proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FirewallError(f"nft refused Berth's ruleset: {proc.stderr.strip()}")


def delete_table(table: str) -> None:
    """Remove the table if present (idempotent)."""
    subprocess.run(
        ["nft", "-f", "-"],
        input=(
            f"table ip {table}\ndelete table ip {table}\n"
            f"table ip6 {table}\ndelete table ip6 {table}\n"
        ),
        capture_output=True,
        text=True,
        check=False,
    )


def table_exists(table: str, family: str = "ip") -> bool:
    proc = subprocess.run(["nft", "list", "table", family, table], capture_output=True, check=False)
    return proc.returncode == 0


# ---- Docker coexistence ---------------------------------------------------------------


def _iptables() -> str | None:
    return shutil.which("iptables")


def docker_user_present() -> bool:
    exe = _iptables()
    if exe is None:
        return False
    proc = subprocess.run(
        [exe, "-w", "-t", "filter", "-S", "DOCKER-USER"], capture_output=True, check=False
    )
    return proc.returncode == 0


def _docker_rules(prefix: str, tag: str) -> list[list[str]]:
    comment = ["-m", "comment", "--comment", tag]
    return [
        ["-i", f"{prefix}+", *comment, "-j", "ACCEPT"],
        ["-o", f"{prefix}+", *comment, "-j", "ACCEPT"],
    ]


def ensure_docker_user(prefix: str, tag: str) -> bool:
    """Let Berth's bridges through Docker's FORWARD drop policy; True if Docker is there.

    Idempotent: each rule is inserted only when ``iptables -C`` doesn't find it.
    """
    exe = _iptables()
    if exe is None or not docker_user_present():
        return False
    for rule in _docker_rules(prefix, tag):
        check = subprocess.run(
            [exe, "-w", "-t", "filter", "-C", "DOCKER-USER", *rule], capture_output=True
        )
        if check.returncode == 0:
            continue
        proc = subprocess.run(
            [exe, "-w", "-t", "filter", "-I", "DOCKER-USER", "1", *rule],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise FirewallError(f"could not add a DOCKER-USER rule: {proc.stderr.strip()}")
    return True


def remove_docker_user(prefix: str, tag: str) -> None:
    """Delete our DOCKER-USER rules (every copy of them); idempotent."""
    exe = _iptables()
    if exe is None or not docker_user_present():
        return
    for rule in _docker_rules(prefix, tag):
        for _ in range(10):
            proc = subprocess.run(
                [exe, "-w", "-t", "filter", "-D", "DOCKER-USER", *rule], capture_output=True
            )
            if proc.returncode != 0:
                break


def is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True
