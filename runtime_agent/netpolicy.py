"""What a tenant may make the platform fetch: the one place that decides.

A tenant causes fetches on its behalf in two ways: ``ADD http(s)://…`` in a Dockerfile (the
node downloads it) and an image reference naming a registry (the node pulls from it). Both
run outside the tenant's containers, with the node's network position, so each is checked
here before anything is sent:

- **addresses** (:class:`FetchPolicy`): a URL may only reach globally routable unicast
  addresses. Loopback, link-local (cloud metadata), private, shared (CGNAT), multicast,
  reserved and unspecified addresses are refused, IPv4 addresses embedded in IPv6 ones
  (mapped, compatible, 6to4, Teredo, NAT64) are judged as the IPv4 address they carry, and
  the node's own and the control plane's addresses are refused even when public. Host
  names are judged by the addresses they resolve to; :mod:`runtime_agent.fetch` then
  connects to that checked address (no second lookup for DNS rebinding to change) and
  judges every redirect the same way.
- **registries** (:func:`registry_refusal`): an image reference may name only a registry
  on the operator's list (the platform's own registry is always on it). The control plane
  applies it when a service or job is submitted, the agent again before it pulls.

The operator can open holes for internal mirrors (``BERTH_FETCH_ALLOW``): an address or
network (CIDR) entry makes those addresses fetchable even though they are private; an
entry names a node or control-plane address only if it names exactly that address (a
``/32`` or ``/128``), so allowing ``10.0.0.0/8`` for a mirror does not open the node
itself. A host-name entry trusts that name whatever it resolves to (the operator's DNS).

Everything here is pure (no sockets, no DNS): the control plane imports it to validate
image references with the same rules and the same wording as the agent.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from runtime_agent.errors import AgentError
from runtime_agent.images.reference import is_registry_host

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HOST_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_-]{1,63})*$")
# One part of an IPv4 address as inet_aton(3) reads it: hex (0x…), octal (0…) or decimal.
_INET_ATON_PART = re.compile(r"^(?:0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*)$")
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


PLATFORM = "an address of this node or of the control plane"


class FetchRefused(AgentError):
    """A fetch a tenant asked for would reach something it must not: a node-local,
    private or platform address, or a registry the operator has not allowed."""

    code = "fetch_refused"


def parse_ip(host: str) -> IPAddress | None:
    """The address ``host`` denotes when it is an IP literal in any notation, else None.

    Accepts what resolvers accept as literals, so no spelling slips past as a "name":
    IPv4 the way inet_aton(3) reads it (``2130706433``, ``0177.0.0.1``, ``0x7f.1``,
    ``127.1``), IPv6 with or without brackets and with a zone id (``fe80::1%eth0``, or
    ``%25eth0`` as URLs write it; the zone is dropped, the address judged).
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.partition("%")[0])
        except ValueError:
            return None
    return _parse_ipv4(text)


def _parse_ipv4(text: str) -> ipaddress.IPv4Address | None:
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_INET_ATON_PART.match(p) for p in parts):
        return None
    values = []
    for part in parts:
        if part[:2].lower() == "0x":
            values.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part.startswith("0"):
            values.append(int(part, 8))
        else:
            values.append(int(part))
    *head, last = values
    # inet_aton: leading parts are single bytes; the last fills the bytes that remain.
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = 0
    for value in head:
        number = number << 8 | value
    return ipaddress.IPv4Address(number << (8 * (4 - len(head))) | last)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (and routes to), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # IPv4-compatible ::a.b.c.d (deprecated)
        return ipaddress.IPv4Address(int(ip))
    return None


def address_refusal(ip: IPAddress) -> str | None:
    """Why no tenant fetch may reach ``ip`` (a phrase naming its kind), or None when it is
    a globally routable unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = address_refusal(inner)
            return f"{reason} ({inner} inside {ip})" if reason else None
    for kind, hit in (
        ("an unspecified address (it reaches the node itself)", ip.is_unspecified),
        ("a loopback address", ip.is_loopback),
        ("a link-local address (cloud metadata services live there)", ip.is_link_local),
        ("a multicast address", ip.is_multicast),
        ("a private address", ip.is_private),
        ("a reserved address", ip.is_reserved),
        ("a site-local address", getattr(ip, "is_site_local", False)),
        ("an address that is not globally routable", not ip.is_global),
    ):
        if hit:
            return kind
    return None


def split_host_port(netloc: str) -> tuple[str, int | None]:
    """``host[:port]`` or ``[v6][:port]`` -> (host without brackets, port or None)."""
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif netloc.count(":") == 1:
        host, _, port = netloc.partition(":")
    else:
        host, port = netloc, ""
    return host, int(port) if port.isdigit() else None


@dataclass(frozen=True)
class FetchPolicy:
    """Which addresses a tenant-caused fetch may connect to.

    ``platform`` holds the node's own and the control plane's addresses (refused even when
    public); ``allow_networks`` and ``allow_hosts`` are the operator's explicit holes.
    """

    allow_networks: tuple[IPNetwork, ...] = ()
    allow_hosts: frozenset[str] = frozenset()
    platform: frozenset[IPAddress] = frozenset()

    @classmethod
    def from_config(cls, allow: Iterable[str], platform: Iterable[IPAddress] = ()) -> FetchPolicy:
        """Parse the operator's allow list: addresses/CIDRs (canonical notation) and host
        names. A malformed entry raises ``ValueError`` naming it."""
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for raw in allow:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if not _HOST_NAME.match(entry) or parse_ip(entry) is not None:
                raise ValueError(
                    f"fetch allow-list entry {raw!r} is neither an address, a network "
                    "(CIDR, canonical notation) nor a host name"
                )
            hosts.add(entry)
        return cls(tuple(networks), frozenset(hosts), frozenset(platform))

    def host_allowed(self, host: str) -> bool:
        """Whether the operator allowed this host name outright."""
        return host.lower().rstrip(".") in self.allow_hosts

    def refusal(self, ip: IPAddress) -> str | None:
        """Why a tenant fetch may not connect to ``ip``, or None when it may."""
        ip = _unzoned(ip)
        # ::ffff:<node address> reaches the node as surely as the address itself.
        inner = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
        forms: set[IPAddress] = {ip} if inner is None else {ip, inner}
        allowed = [net for net in self.allow_networks for form in forms if form in net]
        if forms & self.platform:
            if any(net.num_addresses == 1 for net in allowed):
                return None
            kind = address_refusal(ip)
            return f"{kind} of this node or of the control plane" if kind else PLATFORM
        if allowed:
            return None
        return address_refusal(ip)

    def check(self, host: str, ip: IPAddress) -> None:
        """Raise :class:`FetchRefused` unless a fetch to ``host`` may connect to ``ip``."""
        if self.host_allowed(host):
            return
        reason = self.refusal(ip)
        if reason is not None:
            shown = host if host == str(ip) else f"{host} ({ip})"
            raise FetchRefused(
                f"refused to fetch from {shown}: {reason}; builds and pulls may only reach "
                "public addresses (an operator can allow internal mirrors with "
                "BERTH_FETCH_ALLOW)",
                host=host,
                address=str(ip),
            )


def _unzoned(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return ipaddress.IPv6Address(str(ip).partition("%")[0])
    return ip


# ---------------------------------------------------------------------- registries


def normalize_registry(registry: str) -> str:
    """The form registries are compared in: lowercased, no trailing dot on the name."""
    host, port = split_host_port(registry.strip().lower())
    host = host.rstrip(".")
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port is not None else shown


def registry_of(image: str) -> str | None:
    """The registry host an image reference names (docker's rule), or None for a local
    name (``busybox``, ``acme/app:1``)."""
    first, slash, _ = image.strip().partition("/")
    return first if slash and is_registry_host(first) else None


def registry_refusal(image: str, allowed: Collection[str]) -> str | None:
    """Why a tenant may not use ``image`` (its registry is not on ``allowed``), or None.

    Registries compare as written (after :func:`normalize_registry`): ``localhost:5000``
    or ``[::1]:5000`` is not the registry ``127.0.0.1:5000``, whatever it reaches.
    """
    registry = registry_of(image)
    if registry is None:
        return None
    wanted = {normalize_registry(r) for r in allowed if r.strip()}
    if normalize_registry(registry) in wanted:
        return None
    host, _ = split_host_port(registry)
    ip = parse_ip(host)
    why = ""
    if ip is not None or host.lower() in ("localhost", "ip6-localhost", "ip6-loopback"):
        kind = address_refusal(ip) if ip is not None else "a loopback address"
        why = f" ({host} is {kind})" if kind else ""
    return (
        f"image {image!r} names registry {registry!r}{why}, which is not one this platform "
        f"pulls from; allowed registries: {', '.join(sorted(wanted)) or 'none'}"
    )


def check_registry(image: str, allowed: Collection[str], **details: object) -> None:
    """Raise :class:`FetchRefused` when ``image`` names a registry not on ``allowed``."""
    reason = registry_refusal(image, allowed)
    if reason is not None:
        raise FetchRefused(reason, image=image, registry=registry_of(image), **details)
