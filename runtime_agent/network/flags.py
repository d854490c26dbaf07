"""docker's ``-p/--publish``, ``--network`` and ``--network-alias`` flags, as specs.

-p 80                      container port 80 on an ephemeral host port, every address
-p 8080:80                 host port 8080
-p 127.0.0.1:8080:80       only on one host address
-p 127.0.0.1::80           one address, ephemeral port
-p 8000-8001:80-81/udp     ranges of equal length, udp
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Literal

from runtime_agent.errors import InvalidArgument
from runtime_agent.protocol import NetworkAttachment, PortMapping

MODES = ("bridge", "none", "host")


def _port_range(text: str, what: str, spec: str) -> list[int]:
    first, sep, last = text.partition("-")
    try:
        low = int(first)
        high = int(last) if sep else low
    except ValueError:
        raise InvalidArgument(f"invalid {what} {text!r} in -p {spec!r}") from None
    if not (1 <= low <= 65535 and 1 <= high <= 65535) or high < low:
        raise InvalidArgument(f"invalid {what} {text!r} in -p {spec!r}: ports are 1-65535")
    return list(range(low, high + 1))


def parse_publish(spec: str) -> list[PortMapping]:
    """One ``-p`` value as port mappings (several for a range)."""
    body, _, proto = spec.partition("/")
    protocol = proto or "tcp"
    if protocol not in ("tcp", "udp"):
        raise InvalidArgument(f"invalid protocol {protocol!r} in -p {spec!r} (tcp or udp)")
    if body.startswith("["):
        raise InvalidArgument(f"IPv6 host addresses are not supported: -p {spec!r}")
    parts = body.split(":")
    if len(parts) == 1:
        host_ip, host_text, container_text = "", "", parts[0]
    elif len(parts) == 2:
        host_ip, (host_text, container_text) = "", parts
    elif len(parts) == 3:
        host_ip, host_text, container_text = parts
    else:
        raise InvalidArgument(f"invalid -p {spec!r}: use [ip:][hostport:]containerport[/proto]")
    if host_ip:
        try:
            ipaddress.IPv4Address(host_ip)
        except ValueError:
            raise InvalidArgument(f"invalid host address {host_ip!r} in -p {spec!r}") from None
    containers = _port_range(container_text, "container port", spec)
    hosts = _port_range(host_text, "host port", spec) if host_text else [0] * len(containers)
    if len(hosts) != len(containers):
        raise InvalidArgument(f"invalid -p {spec!r}: host and container ranges differ in size")
    kind: Literal["tcp", "udp"] = "udp" if protocol == "udp" else "tcp"
    return [
        PortMapping(container_port=c, host_port=h, host_ip=host_ip, protocol=kind)
        for h, c in zip(hosts, containers, strict=True)
    ]


def parse_publish_flags(values: Sequence[str] | None) -> tuple[PortMapping, ...]:
    ports: list[PortMapping] = []
    for value in values or []:
        ports += parse_publish(value)
    return tuple(ports)


def network_flags(
    network: str | None, aliases: Sequence[str] | None
) -> tuple[str, tuple[NetworkAttachment, ...]]:
    """(network_mode, attachments) for ``--network`` and ``--network-alias``."""
    aliases = tuple(aliases or ())
    if network in (None, "", "bridge", "default"):
        # the tenant's default network; aliases need it named explicitly
        if aliases or network == "default":
            return "bridge", (NetworkAttachment(network="default", aliases=aliases),)
        return "bridge", ()
    if network in ("none", "host"):
        if aliases:
            raise InvalidArgument(f"--network-alias makes no sense with --network {network}")
        return network, ()
    return "bridge", (NetworkAttachment(network=network, aliases=aliases),)
