"""Tenant networks on one node: bridges, IPAM, container attachment, ports, clean-up.

``NetworkManager`` (``agent.networks``) is the only code that changes the node's network
configuration. Every operation takes the state lock, records its allocations first
(write-ahead, see ``state.py``), then makes kernel objects with pyroute2; a failure rolls
back whatever that operation created, kernel and state alike.

Kernel objects are named from a short prefix derived from ``config.name`` so several
agents (and tests) share a machine without touching each other's objects, and
``recover()`` can find leftovers:

  bridge     <prefix>b<n>        (one per network)
  host veth  <prefix>v<hash6>    (one per container interface; inside: eth0, eth1, ...)
  netns      <run_root>/netns/<container id>
  nft table  ip <config.name>

A recycled namespace keeps the name it was made with (after another container's id), so
the netns path and host veth of an endpoint are read from its record, never re-derived.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from runtime_agent.config import AgentConfig
from runtime_agent.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from runtime_agent.network import daemon, firewall
from runtime_agent.network.netns import (
    create_netns,
    delete_netns,
    ensure_netns_dir,
    is_netns,
    make_netns_socket,
    netns_iproute,
    open_netns,
    release_netns_dir,
    scrub_if_clean,
)
from runtime_agent.network.state import (
    IDLE_OWNER,
    EndpointRecord,
    IdleRecord,
    InterfaceRecord,
    NetworkRecord,
    PortRecord,
    State,
    StateStore,
)
from runtime_agent.protocol import NetworkAttachment, PortMapping

DEFAULT_NETWORK = "default"
RESERVED_NAMES = {"host", "none", "bridge"}
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
NETWORK_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
ALIAS_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,253}[a-zA-Z0-9])?$")
CONTAINER_ID_RE = re.compile(r"^[0-9a-f]{12,64}$")
SUBNET_LOCK = Path("/run/lock/berth-network-subnets.lock")
# How long the kernel gets to delete the veth pair of a deleted netns before a later
# operation deletes the host end itself (something still holds the netns).
DOOMED_GRACE = 5.0
# Idle namespaces kept per network for the next container (BERTH_NETNS_POOL, 0 = off),
# and how long one may stay idle before a later operation destroys it.
DEFAULT_NETNS_POOL = 4
IDLE_TTL = 60.0
LOCAL_RESOLV = "options ndots:0\n"


def kernel_prefix(name: str) -> str:
    """A prefix of at most 8 characters for interface names, derived from the agent name.

    Short, interface-safe names are used as they are ("berth", "bt1a2b3c"); others are
    cut to four characters plus four of their hash so distinct agents stay distinct.
    """
    if re.fullmatch(r"[a-z0-9]{1,8}", name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()
    head = re.sub(r"[^a-z0-9]", "", name.lower())[:4]
    return head + digest[: 8 - len(head)]


def mac_for(address: str) -> str:
    """The MAC of an interface with this IPv4 address: 02:42 and the address, as Docker does.

    Neighbour entries learnt for an address stay right when it moves to another
    container, which matters most in a recycled namespace: it keeps the entries its
    previous container learnt. (Subnets never overlap on a node, so no two interfaces
    share one.) Bridges get the MAC of their gateway address the same way, fixed, so
    it doesn't follow the lowest MAC of their ports as ports come and go.
    """
    return "02:42:" + ":".join(f"{byte:02x}" for byte in ipaddress.IPv4Address(address).packed)


@dataclass(frozen=True)
class NetworkContainer:
    container_id: str
    name: str
    address: str  # "10.200.0.2/24"
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class Network:
    """A tenant network as users see it (``network ls`` / ``network inspect``)."""

    id: str
    tenant: str
    name: str
    subnet: str
    gateway: str
    bridge: str
    mtu: int
    internal: bool
    created: str
    labels: dict[str, str]
    containers: tuple[NetworkContainer, ...] = ()


@dataclass(frozen=True)
class PublishedPort:
    host_ip: str
    host_port: int
    container_port: int
    protocol: str

    def __str__(self) -> str:
        host = self.host_ip or "0.0.0.0"  # noqa: S104 - display only
        return f"{host}:{self.host_port}->{self.container_port}/{self.protocol}"


@dataclass(frozen=True)
class NetworkSetup:
    """What the runtime needs to start a container on its networks.

    ``netns_path`` goes into the OCI config (``linux.namespaces`` network path; None for
    host networking), ``resolv_conf`` and ``hosts`` are the contents to bind-mount at
    /etc/resolv.conf and /etc/hosts. ``addresses`` maps network name to "ip/prefix".
    """

    netns_path: str | None
    addresses: dict[str, str]
    resolv_conf: str
    hosts: str
    ports: tuple[PublishedPort, ...] = ()


@dataclass(frozen=True)
class Endpoint:
    """A container's networking as ``inspect`` shows it."""

    container_id: str
    tenant: str
    name: str
    mode: str
    netns_path: str
    addresses: dict[str, str]
    aliases: dict[str, tuple[str, ...]]
    ports: tuple[PublishedPort, ...]
    gateway: str | None


class _Pending:
    """A netns being created in a thread of its own (see ``netns.make_netns_socket``).

    ``result()`` waits and returns the netlink socket inside it, wrapped for the calling
    thread; ``discard()`` deletes the namespace if nobody took it.
    """

    def __init__(self, path: Path, userns: Path) -> None:
        self.path = path
        self.userns = userns
        self._box: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name="berth-netns")
        self._thread.start()
        self._taken = False

    def _run(self) -> None:
        try:
            self._box["value"] = make_netns_socket(self.path, self.userns)
        except BaseException as exc:
            self._box["error"] = exc

    def result(self) -> IPRoute:
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        self._taken = True
        return netns_iproute(self.path, self._box["value"])

    def discard(self) -> None:
        self._thread.join()
        if self._taken or "value" not in self._box:
            return
        self._box["value"].close()
        delete_netns(self.path)


@dataclass
class _Undo:
    """Kernel objects made so far by one operation, removed again if it fails."""

    veths: list[str] = field(default_factory=list)
    netns: Path | None = None
    bridges: list[str] = field(default_factory=list)


class NetworkManager:
    """Per-tenant networks for one agent; see the module docstring."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        pool: str | None = None,
        subnet_prefix: int | None = None,
        dns_upstreams: Sequence[str] | None = None,
        netns_pool: int | None = None,
    ) -> None:
        self.config = config
        self.prefix = kernel_prefix(config.name)
        self.table = re.sub(r"[^A-Za-z0-9_-]", "_", config.name)
        self.store = StateStore(config.networks_dir)
        self.run_dir = config.run_root / "network"
        pool_text = pool or os.environ.get("BERTH_NETWORK_POOL", "10.200.0.0/16")
        try:
            self.pool = ipaddress.IPv4Network(pool_text)
        except ValueError as exc:
            raise InvalidArgument(f"bad network pool {pool_text!r}: {exc}") from exc
        self.egress_allow = _parse_egress_allow(config.egress_allow)
        self.subnet_prefix = subnet_prefix or int(
            os.environ.get("BERTH_NETWORK_SUBNET_PREFIX", "24")
        )
        if not self.pool.prefixlen <= self.subnet_prefix <= 29:
            raise InvalidArgument(
                f"subnet size /{self.subnet_prefix} does not fit the pool {self.pool}"
            )
        if dns_upstreams is None and "BERTH_DNS_UPSTREAMS" in os.environ:
            dns_upstreams = [u for u in os.environ["BERTH_DNS_UPSTREAMS"].split(",") if u]
        self.dns_upstreams = list(dns_upstreams) if dns_upstreams is not None else None
        if netns_pool is None:
            netns_pool = int(os.environ.get("BERTH_NETNS_POOL", DEFAULT_NETNS_POOL))
        if netns_pool < 0:
            raise InvalidArgument(f"BERTH_NETNS_POOL must be 0 or more, not {netns_pool}")
        self.netns_pool = netns_pool
        self._netns_dir_ready = False
        self._local = threading.local()

    @contextlib.contextmanager
    def _host(self) -> Iterator[IPRoute]:
        """This thread's netlink socket in the host namespace, kept open between calls."""
        ipr = getattr(self._local, "ipr", None)
        if ipr is None:
            ipr = self._local.ipr = IPRoute()
        try:
            yield ipr
        except BaseException:
            # after an error the socket may hold unread replies: start afresh next time
            self._local.ipr = None
            ipr.close()
            raise

    # ---- names ---------------------------------------------------------------------

    def _bridge_name(self, number: int) -> str:
        name = f"{self.prefix}b{number:x}"
        if len(name) > 15:
            raise ResourceExhausted("no bridge names left for this agent")
        return name

    def _host_veth_name(self, state: State, container_id: str, network_id: str) -> str:
        """``<prefix>v<hash6>`` of container and network, unlike any veth in the state.

        A recycled namespace keeps its veth (named after the container it was made for),
        so that container's next attachment must not reuse the name.
        """
        taken = {i.host_veth for e in state.endpoints.values() for i in e.interfaces}
        taken.update(entry.host_veth for entry in state.idle)
        key, attempt = f"{container_id}/{network_id}", 0
        while True:
            name = f"{self.prefix}v{hashlib.sha256(key.encode()).hexdigest()[:6]}"
            if name not in taken:
                return name
            attempt += 1
            key = f"{container_id}/{network_id}/{attempt}"

    def netns_path(self, container_id: str) -> Path:
        """Where a new namespace for the container goes (an endpoint's own is its record's)."""
        return self.config.netns_dir / container_id

    def _fresh_netns_path(self, state: State, container_id: str) -> Path:
        """``netns_path(container_id)``, or a variant when a recycled namespace has it."""
        path = self.netns_path(container_id)
        if self._netns_owned(state, path):
            path = path.with_name(f"{container_id}-{secrets.token_hex(4)}")
        return path

    @staticmethod
    def _netns_owned(state: State, path: Path) -> bool:
        text = str(path)
        return any(e.netns == text for e in state.endpoints.values()) or any(
            entry.netns == text for entry in state.idle
        )

    @property
    def _docker_tag(self) -> str:
        return f"berth:{self.config.name}"

    # ---- networks ------------------------------------------------------------------

    def create(
        self,
        tenant: str,
        name: str,
        subnet: str | None = None,
        *,
        mtu: int | None = None,
        internal: bool = False,
        labels: dict[str, str] | None = None,
    ) -> Network:
        """Create a bridge network for ``tenant``; ``subnet`` None = next free in the pool."""
        _check_tenant(tenant)
        _check_network_name(name)
        if mtu is not None and not 576 <= mtu <= 9000:
            raise InvalidArgument(f"MTU {mtu} is out of range (576-9000)")
        with self.store.locked() as state:
            record = self._create_locked(state, tenant, name, subnet, mtu, internal, labels)
        self._apply_firewall(self.store.load())
        self._sync_daemon()
        return self._network_view(self.store.load(), record)

    def ensure_default(self, tenant: str) -> Network:
        """The tenant's default network, created on first use."""
        _check_tenant(tenant)
        with self.store.locked() as state:
            record = state.network(tenant, DEFAULT_NETWORK)
            created = record is None
            if record is None:
                record = self._create_locked(state, tenant, DEFAULT_NETWORK, None, None, False, {})
        if created:
            self._apply_firewall(self.store.load())
            self._sync_daemon()
        return self._network_view(self.store.load(), record)

    def _create_locked(
        self,
        state: State,
        tenant: str,
        name: str,
        subnet: str | None,
        mtu: int | None,
        internal: bool,
        labels: dict[str, str] | None,
    ) -> NetworkRecord:
        if state.network(tenant, name) is not None:
            raise AlreadyExists(f"network {name!r} already exists for tenant {tenant!r}")
        requested = _parse_subnet(subnet) if subnet is not None else None
        bridge = self._bridge_name(state.next_bridge)
        state.next_bridge += 1
        mtu = mtu or _uplink_mtu()
        with _host_lock(), IPRoute() as ipr:
            taken = _host_subnets(ipr)
            for other in state.networks.values():
                taken.append(ipaddress.IPv4Network(other.subnet))
            if requested is not None:
                for other in state.networks.values():
                    if requested.overlaps(ipaddress.IPv4Network(other.subnet)):
                        raise AlreadyExists(
                            f"subnet {requested} overlaps network {other.name!r} ({other.subnet})"
                        )
                for net in taken:
                    if requested.overlaps(net):
                        raise FailedPrecondition(
                            f"subnet {requested} overlaps {net}, already routed on this node"
                        )
                chosen = requested
            else:
                chosen = self._next_free_subnet(taken)
            gateway = str(next(chosen.hosts()))
            record = NetworkRecord(
                id=secrets.token_hex(32),
                tenant=tenant,
                name=name,
                subnet=str(chosen),
                gateway=gateway,
                bridge=bridge,
                mtu=mtu,
                created=datetime.now(UTC).isoformat(),
                internal=internal,
                labels=dict(labels or {}),
            )
            state.networks[record.id] = record
            self.store.save(state)  # write-ahead: the subnet is ours before the bridge exists
            try:
                _ensure_bridge(ipr, bridge, gateway, chosen.prefixlen, mtu)
            except BaseException:
                with contextlib.suppress(NetlinkError):
                    _delete_link(ipr, bridge)
                del state.networks[record.id]
                self.store.save(state)
                raise
        _enable_forwarding()
        return record

    def _next_free_subnet(self, taken: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
        for candidate in self.pool.subnets(new_prefix=self.subnet_prefix):
            if not any(candidate.overlaps(t) for t in taken):
                return candidate
        raise ResourceExhausted(f"no free /{self.subnet_prefix} left in the pool {self.pool}")

    def list(self, tenant: str) -> list[Network]:
        _check_tenant(tenant)
        state = self.store.load()
        records = [r for r in state.networks.values() if r.tenant == tenant]
        return [self._network_view(state, r) for r in sorted(records, key=lambda r: r.name)]

    def inspect(self, tenant: str, name: str) -> Network:
        state = self.store.load()
        return self._network_view(state, self._get(state, tenant, name))

    def remove(self, tenant: str, name: str) -> None:
        """Remove a network; refused while containers are attached to it.

        Its idle namespaces (see ``detach``) don't count as users: they go with it.
        """
        with self.store.locked() as state:
            record = self._get(state, tenant, name)
            users = [
                e.name or e.container_id[:12]
                for e in state.endpoints.values()
                if any(i.network == record.id for i in e.interfaces)
            ]
            if users:
                raise FailedPrecondition(
                    f"network {name!r} has containers attached: {', '.join(sorted(users))}; "
                    "remove or disconnect them first"
                )
            self._destroy_idle(state, [e for e in state.idle if e.network == record.id])
            self._reap_doomed(state, wait=True)
            with self._host() as ipr:
                _delete_link(ipr, record.bridge)
            del state.networks[record.id]
            if not state.endpoints and not state.idle:
                self._release_netns_dir()
        state = self.store.load()
        self._apply_firewall(state)
        self._sync_daemon()

    def _get(self, state: State, tenant: str, name: str) -> NetworkRecord:
        _check_tenant(tenant)
        record = state.network(tenant, name)
        if record is None:
            raise NotFound(f"network {name!r} not found for tenant {tenant!r}")
        return record

    def _network_view(self, state: State, record: NetworkRecord) -> Network:
        containers = []
        prefixlen = ipaddress.IPv4Network(record.subnet).prefixlen
        for endpoint in state.endpoints.values():
            for iface in endpoint.interfaces:
                if iface.network == record.id:
                    containers.append(
                        NetworkContainer(
                            container_id=endpoint.container_id,
                            name=endpoint.name,
                            address=f"{iface.address}/{prefixlen}",
                            aliases=tuple(iface.aliases),
                        )
                    )
        return Network(
            id=record.id,
            tenant=record.tenant,
            name=record.name,
            subnet=record.subnet,
            gateway=record.gateway,
            bridge=record.bridge,
            mtu=record.mtu,
            internal=record.internal,
            created=record.created,
            labels=dict(record.labels),
            containers=tuple(sorted(containers, key=lambda c: c.name)),
        )

    # ---- containers ----------------------------------------------------------------

    def attach(
        self,
        tenant: str,
        container_id: str,
        hostname: str,
        attachments: Sequence[NetworkAttachment],
        ports: Sequence[PortMapping] = (),
        *,
        name: str = "",
        mode: str = "bridge",
        privileged_caller: bool = False,
        ingress_bps: int | None = None,
        egress_bps: int | None = None,
    ) -> NetworkSetup:
        """Give a container its network namespace, interfaces, published ports and DNS.

        mode "bridge": one interface per attachment (the tenant's default network when
        ``attachments`` is empty); "none": a namespace with loopback only; "host": no
        namespace at all, only for privileged callers. Everything made here is undone
        if any step fails.
        """
        _check_tenant(tenant)
        if not CONTAINER_ID_RE.match(container_id):
            raise InvalidArgument(f"bad container id {container_id!r}")
        if mode == "host":
            if not privileged_caller:
                raise InvalidArgument("host networking is only available to privileged callers")
            if attachments or ports:
                raise InvalidArgument("host networking takes no networks and no published ports")
            return NetworkSetup(
                netns_path=None,
                addresses={},
                resolv_conf=_host_file("/etc/resolv.conf"),
                hosts=_host_file("/etc/hosts"),
            )
        if mode not in ("bridge", "none"):
            raise InvalidArgument(f"unknown network mode {mode!r} (bridge, none or host)")
        if mode == "none" and (attachments or ports):
            raise InvalidArgument("--network none takes no other networks and no published ports")
        for rate in (ingress_bps, egress_bps):
            if rate is not None and rate < 8000:
                raise InvalidArgument("bandwidth limits start at 8000 bit/s")
        ports = [_check_port(p) for p in ports]
        # A look at the state without the lock: whether an idle namespace can be claimed
        # (then none is made) and which path a new one gets. Both are decided again
        # under the lock; this only saves making a namespace for nothing.
        peek = self.store.load()
        if mode == "bridge" and not attachments:
            if peek.network(tenant, DEFAULT_NETWORK) is None:
                self.ensure_default(tenant)
                peek = self.store.load()
            attachments = [NetworkAttachment(network=DEFAULT_NETWORK)]
        names = [a.network for a in attachments]
        if len(set(names)) != len(names):
            raise InvalidArgument("a container can be attached to each network only once")
        for attachment in attachments:
            for alias in attachment.aliases:
                _check_alias(alias)

        undo = _Undo()
        if not self._netns_dir_ready:
            ensure_netns_dir(self.config.netns_dir)
            self._netns_dir_ready = True
        # Unless an idle namespace can be claimed, a new one is made in the background
        # (the kernel work overlaps the state bookkeeping below); every path that doesn't
        # use it discards it.
        pending = None
        if self._idle_for(peek, tenant, mode, attachments) is None:
            pending = _Pending(self._fresh_netns_path(peek, container_id), self._userns(tenant))
        try:
            state, endpoint = self._attach_locked(
                tenant,
                container_id,
                hostname,
                attachments,
                ports,
                name,
                mode,
                ingress_bps,
                egress_bps,
                pending,
                undo,
            )
        finally:
            if pending is not None:
                pending.discard()
        return self._setup_view(state, endpoint)

    def _userns(self, tenant: str) -> Path:
        """The tenant's user namespace, which owns its containers' network namespaces (so
        ``runc exec`` can enter those of user-namespaced containers); host-userns
        containers join them as well (host root may enter any)."""
        from runtime_agent.runtime.security import tenant_userns

        return tenant_userns(self.config, tenant)

    def _idle_for(
        self, state: State, tenant: str, mode: str, attachments: Sequence[NetworkAttachment]
    ) -> IdleRecord | None:
        """The idle namespace a container with these attachments would claim, if any.

        Only a single attachment can claim one (the entry has exactly one interface), and
        only on the same network of the same tenant, at the address it asked for if any.
        The newest entry first: the older ones then expire when traffic drops.
        """
        if self.netns_pool == 0 or mode != "bridge" or len(attachments) != 1:
            return None
        network = state.network(tenant, attachments[0].network)
        if network is None:
            return None
        wanted = attachments[0].ipv4_address
        for entry in reversed(state.idle):
            if entry.network == network.id and (not wanted or wanted == entry.address):
                if self._owned_by_tenant(entry.netns, tenant):
                    return entry
        return None

    def _owned_by_tenant(self, netns: str, tenant: str) -> bool:
        """Whether the tenant's user namespace owns ``netns``. An idle one that predates
        it (made before the node kept user namespaces, or before a lost one was made
        again) is left to expire: a user-namespaced container couldn't enter it."""
        from runtime_agent.namespaces import owning_userns

        userns = os.stat(self._userns(tenant))
        return owning_userns(netns) == (userns.st_dev, userns.st_ino)

    def _attach_locked(
        self,
        tenant: str,
        container_id: str,
        hostname: str,
        attachments: Sequence[NetworkAttachment],
        ports: Sequence[PortMapping],
        name: str,
        mode: str,
        ingress_bps: int | None,
        egress_bps: int | None,
        pending: _Pending | None,
        undo: _Undo,
    ) -> tuple[State, EndpointRecord]:
        with self.store.locked(durable=False) as state:
            if container_id in state.endpoints:
                raise AlreadyExists(f"container {container_id[:12]} already has networking")
            self._reap_doomed(state)
            self._expire_idle(state)
            networks = [self._get(state, tenant, a.network) for a in attachments]
            endpoint = EndpointRecord(
                container_id=container_id,
                tenant=tenant,
                name=name,
                hostname=hostname,
                netns="",
                mode=mode,
                ingress_bps=ingress_bps,
                egress_bps=egress_bps,
            )
            # in the state from here on, so its veth names count as taken
            state.endpoints[container_id] = endpoint
            claimed = None
            if pending is None:
                claimed = self._claim_idle(state, tenant, mode, attachments)
            if claimed is not None:
                endpoint.netns = claimed.netns
                network = networks[0]
                network.allocated[claimed.address] = container_id
                endpoint.interfaces.append(
                    InterfaceRecord(
                        network=network.id,
                        ifname="eth0",
                        host_veth=claimed.host_veth,
                        address=claimed.address,
                        prefixlen=ipaddress.IPv4Network(network.subnet).prefixlen,
                        gateway=network.gateway,
                        mac=claimed.mac,
                        aliases=list(attachments[0].aliases),
                    )
                )
                # a failure from here on destroys the namespace rather than returning it
                undo.netns = Path(claimed.netns)
                undo.veths.append(claimed.host_veth)
            else:
                if pending is not None and not self._netns_owned(state, pending.path):
                    endpoint.netns = str(pending.path)
                else:
                    endpoint.netns = str(self._fresh_netns_path(state, container_id))
                for index, (attachment, network) in enumerate(
                    zip(attachments, networks, strict=True)
                ):
                    endpoint.interfaces.append(
                        self._allocate_interface(state, network, container_id, attachment, index)
                    )
            if endpoint.interfaces:
                first = endpoint.interfaces[0].address
                endpoint.ports = self._allocate_ports(state, ports, first)
            state.endpoints[container_id] = endpoint
            # write-ahead: addresses and ports are taken from here on
            self.store.save(state, durable=False)
            try:
                if claimed is None:
                    self._build_endpoint(state, endpoint, undo, pending)
                elif ingress_bps or egress_bps:
                    inside = open_netns(Path(endpoint.netns))
                    try:
                        with self._host() as ipr:
                            _limit_bandwidth(ipr, inside, endpoint.interfaces[0], endpoint)
                    finally:
                        inside.close()
                if endpoint.ports:
                    self._apply_firewall(state)
                self._sync_daemon(expect_ports=endpoint.ports)
            except BaseException:
                self._rollback_endpoint(state, endpoint, undo)
                raise
        return state, endpoint

    def _claim_idle(
        self, state: State, tenant: str, mode: str, attachments: Sequence[NetworkAttachment]
    ) -> IdleRecord | None:
        """Take an idle namespace for these attachments out of the pool (see ``_idle_for``).

        Entries whose namespace or veth vanished are destroyed on the way.
        """
        while (entry := self._idle_for(state, tenant, mode, attachments)) is not None:
            state.idle.remove(entry)
            if is_netns(Path(entry.netns)) and _link_exists(entry.host_veth):
                return entry
            self._destroy_idle(state, [entry])
        return None

    def _allocate_interface(
        self,
        state: State,
        network: NetworkRecord,
        container_id: str,
        attachment: NetworkAttachment,
        index: int,
    ) -> InterfaceRecord:
        subnet = ipaddress.IPv4Network(network.subnet)
        if attachment.ipv4_address:
            try:
                wanted = ipaddress.IPv4Address(attachment.ipv4_address)
            except ValueError as exc:
                raise InvalidArgument(f"bad IPv4 address {attachment.ipv4_address!r}") from exc
            if wanted not in subnet or wanted in (
                subnet.network_address,
                subnet.broadcast_address,
                ipaddress.IPv4Address(network.gateway),
            ):
                raise InvalidArgument(
                    f"{wanted} is not a usable address of network {network.name!r} ({subnet})"
                )
            if str(wanted) in network.allocated:
                raise AlreadyExists(f"address {wanted} is already in use on {network.name!r}")
            address = str(wanted)
        else:
            address = ""
            for host in subnet.hosts():
                text = str(host)
                if text != network.gateway and text not in network.allocated:
                    address = text
                    break
            if not address:
                raise ResourceExhausted(f"network {network.name!r} ({subnet}) has no free address")
        network.allocated[address] = container_id
        host_veth = self._host_veth_name(state, container_id, network.id)
        return InterfaceRecord(
            network=network.id,
            ifname=f"eth{index}",
            host_veth=host_veth,
            address=address,
            prefixlen=subnet.prefixlen,
            gateway=network.gateway,
            mac=mac_for(address),
            aliases=list(attachment.aliases),
        )

    def _allocate_ports(
        self, state: State, ports: Iterable[PortMapping], target: str
    ) -> builtins.list[PortRecord]:
        taken = [
            (p.protocol, p.host_ip, p.host_port) for e in state.endpoints.values() for p in e.ports
        ]
        records: list[PortRecord] = []
        for port in ports:
            host_port = port.host_port or _ephemeral_port(port.protocol, port.host_ip)
            for protocol, host_ip, used in taken:
                if (
                    protocol == port.protocol
                    and used == host_port
                    and (not host_ip or not port.host_ip or host_ip == port.host_ip)
                ):
                    where = host_ip or "0.0.0.0"  # noqa: S104 - message only
                    raise ResourceExhausted(
                        f"port {host_port}/{port.protocol} is already published on {where}"
                    )
            if port.host_port:
                _probe_port(port.protocol, port.host_ip, host_port)
            taken.append((port.protocol, port.host_ip, host_port))
            records.append(
                PortRecord(
                    host_ip=port.host_ip,
                    host_port=host_port,
                    container_port=port.container_port,
                    protocol=port.protocol,
                    target=target,
                )
            )
        return records

    def _build_endpoint(
        self, state: State, endpoint: EndpointRecord, undo: _Undo, pending: _Pending | None
    ) -> None:
        path = Path(endpoint.netns)
        if pending is None or pending.path != path:
            inside = create_netns(path, self._userns(endpoint.tenant))
        else:
            try:
                inside = pending.result()
            except FileExistsError:
                # A leftover of a crash between mount and state clean-up: nobody owns it
                # (no endpoint or idle entry has this path), so replace it.
                delete_netns(path)
                inside = create_netns(path, self._userns(endpoint.tenant))
        undo.netns = path
        try:
            with self._host() as ipr:
                for iface in endpoint.interfaces:
                    network = state.networks[iface.network]
                    self._plug(ipr, inside, path, network, iface, undo)
                    if iface is endpoint.interfaces[0]:
                        inside.route("add", dst="0.0.0.0/0", gateway=iface.gateway)
                    _limit_bandwidth(ipr, inside, iface, endpoint)
        finally:
            inside.close()

    def _plug(
        self,
        ipr: IPRoute,
        inside: IPRoute,
        netns: Path,
        network: NetworkRecord,
        iface: InterfaceRecord,
        undo: _Undo,
    ) -> None:
        """Make the veth pair for one interface, bridge one end, configure the other."""
        host_veth = iface.host_veth
        bridge = _link_index(ipr, network.bridge)
        if bridge is None:
            raise FailedPrecondition(
                f"bridge {network.bridge} of network {network.name!r} is missing; "
                "run the agent's network recovery"
            )
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # The container end is made inside the netns under its final name, and the
            # host end is bridged and up from the start: fewer netlink round trips.
            peer: dict[str, object] = {"ifname": iface.ifname, "net_ns_fd": fd, "mtu": network.mtu}
            if iface.mac:
                peer["address"] = iface.mac
            spec = {
                "ifname": host_veth,
                "kind": "veth",
                "mtu": network.mtu,
                "master": bridge,
                "state": "up",
                "peer": peer,
            }
            try:
                ipr.link("add", **spec)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
                _delete_link(ipr, host_veth)  # a leftover of an earlier crash
                ipr.link("add", **spec)
        finally:
            os.close(fd)
        undo.veths.append(host_veth)
        inner = inside.link_lookup(ifname=iface.ifname)[0]
        inside.link("set", index=inner, state="up")
        inside.addr("add", index=inner, address=iface.address, prefixlen=iface.prefixlen)

    def _rollback_endpoint(self, state: State, endpoint: EndpointRecord, undo: _Undo) -> None:
        with self._host() as ipr:
            for veth in undo.veths:
                with contextlib.suppress(NetlinkError):
                    _delete_link(ipr, veth)
        if undo.netns is not None:
            delete_netns(undo.netns)
        self._release(state, endpoint)
        state.endpoints.pop(endpoint.container_id, None)
        self.store.save(state, durable=False)
        with contextlib.suppress(Exception):
            if endpoint.ports:
                self._apply_firewall(state)
        with contextlib.suppress(Exception):
            self._sync_daemon()

    @staticmethod
    def _release(state: State, endpoint: EndpointRecord) -> None:
        for iface in endpoint.interfaces:
            network = state.networks.get(iface.network)
            if network is not None and network.allocated.get(iface.address) == (
                endpoint.container_id
            ):
                del network.allocated[iface.address]

    def detach(self, tenant: str, container_id: str) -> None:
        """Remove a container's interfaces, ports, DNS names and netns; idempotent.

        A plain endpoint (one interface, no published ports, no bandwidth limits) whose
        namespace holds no socket any more is kept instead, as an idle entry of its
        network, for the next container there (``attach`` claims it): its veth pair,
        address and default route stay, which saves that container the namespace and
        veth set-up and the kernel the asynchronous destruction of both.
        """
        with self.store.locked(durable=False) as state:
            endpoint = state.endpoints.get(container_id)
            if endpoint is not None and endpoint.tenant != tenant:
                raise NotFound(f"container {container_id[:12]} not found for tenant {tenant!r}")
            had_ports = bool(endpoint and endpoint.ports)
            self._reap_doomed(state)
            self._expire_idle(state)
            if endpoint is None or not self._keep_idle(state, endpoint):
                self._teardown_endpoint(state, container_id, endpoint, wait=False)
            if not state.endpoints and not state.idle:
                self._release_netns_dir()
        if endpoint is None:
            return
        if had_ports:
            self._apply_firewall(self.store.load())
        self._sync_daemon()

    def _release_netns_dir(self) -> None:
        """With no container left, drop the netns directory's own mount too."""
        release_netns_dir(self.config.netns_dir)
        self._netns_dir_ready = False

    def _teardown_endpoint(
        self,
        state: State,
        container_id: str,
        endpoint: EndpointRecord | None,
        *,
        wait: bool = True,
    ) -> None:
        """Delete a container's netns and host veths.

        Deleting a veth is synchronous and slow (an RCU grace period: ~15 ms each here).
        With ``wait=False`` (``detach``, on every container removal) only the netns is
        deleted: once nothing holds it, the kernel destroys it and the veth pairs in it
        in the background, and the host ends are noted as doomed. A later operation
        deletes any that outlived ``DOOMED_GRACE`` (a stray process keeping the netns
        alive), ``remove``/``teardown`` wait for them, ``recover`` deletes them.
        """
        if endpoint is None:
            # A repeated call, or a crash before the state had the endpoint. The path
            # may be a recycled namespace that another container or the pool owns now.
            path = self.netns_path(container_id)
            if not self._netns_owned(state, path):
                delete_netns(path)
            return
        path = Path(endpoint.netns)
        if wait:
            with self._host() as ipr:
                for iface in endpoint.interfaces:
                    with contextlib.suppress(NetlinkError):
                        _delete_link(ipr, iface.host_veth)
        else:
            delete_netns(path)
            now = time.time()
            for iface in endpoint.interfaces:
                state.doomed[iface.host_veth] = now
        self._release(state, endpoint)
        state.endpoints.pop(container_id, None)
        delete_netns(path)

    def _keep_idle(self, state: State, endpoint: EndpointRecord) -> bool:
        """Turn a detached endpoint into an idle entry of its network if it qualifies.

        Plain endpoints only: mode "bridge", just ``eth0`` (with the default route), no
        published ports, no tc qdisc (bandwidth limits), room in the network's pool, and
        a namespace left with no socket at all (``netns.scrub_if_clean``: a TIME_WAIT
        socket would make the next container's bind() fail).
        """
        if (
            self.netns_pool == 0
            or endpoint.mode != "bridge"
            or len(endpoint.interfaces) != 1
            or endpoint.interfaces[0].ifname != "eth0"
            or endpoint.ports
            or endpoint.ingress_bps
            or endpoint.egress_bps
        ):
            return False
        iface = endpoint.interfaces[0]
        network = state.networks.get(iface.network)
        if network is None or network.allocated.get(iface.address) != endpoint.container_id:
            return False
        if sum(entry.network == network.id for entry in state.idle) >= self.netns_pool:
            return False
        try:
            if not scrub_if_clean(Path(endpoint.netns)):
                return False
        except OSError:  # the namespace is gone or broken
            return False
        network.allocated[iface.address] = IDLE_OWNER
        state.idle.append(
            IdleRecord(
                netns=endpoint.netns,
                network=network.id,
                host_veth=iface.host_veth,
                address=iface.address,
                mac=iface.mac,
                since=time.time(),
            )
        )
        del state.endpoints[endpoint.container_id]
        return True

    def _expire_idle(self, state: State) -> None:
        """Destroy idle entries older than ``IDLE_TTL``, beyond the pool size or orphaned."""
        now = time.time()
        kept: dict[str, int] = {}
        expired = []
        for entry in reversed(state.idle):  # newest first
            count = kept.get(entry.network, 0)
            if (
                now - entry.since > IDLE_TTL
                or count >= self.netns_pool
                or entry.network not in state.networks
            ):
                expired.append(entry)
            else:
                kept[entry.network] = count + 1
        self._destroy_idle(state, expired)

    def _destroy_idle(self, state: State, entries: Iterable[IdleRecord]) -> None:
        """Delete idle namespaces (their veth pairs go with them, see ``_reap_doomed``)."""
        now = time.time()
        for entry in builtins.list(entries):
            delete_netns(Path(entry.netns))
            state.doomed[entry.host_veth] = now
            network = state.networks.get(entry.network)
            if network is not None and network.allocated.get(entry.address) == IDLE_OWNER:
                del network.allocated[entry.address]
            if entry in state.idle:
                state.idle.remove(entry)

    def _reap_doomed(self, state: State, *, wait: bool = False) -> None:
        """Forget doomed veths the kernel has deleted; delete those past their grace.

        ``wait=True`` gives the rest up to ``DOOMED_GRACE`` to go before deleting them
        (for operations that must leave no link behind, such as removing the bridge).
        """
        if wait:
            deadline = time.monotonic() + DOOMED_GRACE
            delay = 0.001
            while any(map(_link_exists, state.doomed)) and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        now = time.time()
        for name, since in list(state.doomed.items()):
            if _link_exists(name) and (wait or now - since > DOOMED_GRACE):
                with self._host() as ipr, contextlib.suppress(NetlinkError):
                    _delete_link(ipr, name)
            if wait or not _link_exists(name):
                del state.doomed[name]

    def connect(
        self,
        tenant: str,
        network: str,
        container_id: str,
        aliases: Sequence[str] = (),
        ipv4_address: str | None = None,
    ) -> Endpoint:
        """Attach a running container to one more network of its tenant."""
        for alias in aliases:
            _check_alias(alias)
        undo = _Undo()
        with self.store.locked(durable=False) as state:
            endpoint = self._endpoint_record(state, tenant, container_id)
            if endpoint.mode != "bridge":
                raise FailedPrecondition(
                    f"container {container_id[:12]} uses --network {endpoint.mode}"
                )
            record = self._get(state, tenant, network)
            if any(i.network == record.id for i in endpoint.interfaces):
                raise AlreadyExists(
                    f"container {container_id[:12]} is already connected to {network!r}"
                )
            used = {i.ifname for i in endpoint.interfaces}
            index = next(n for n in range(len(used) + 1) if f"eth{n}" not in used)
            iface = self._allocate_interface(
                state,
                record,
                container_id,
                NetworkAttachment(
                    network=network, aliases=tuple(aliases), ipv4_address=ipv4_address
                ),
                index,
            )
            endpoint.interfaces.append(iface)
            self.store.save(state, durable=False)
            try:
                path = Path(endpoint.netns)
                inside = open_netns(path)
                try:
                    with self._host() as ipr:
                        self._plug(ipr, inside, path, record, iface, undo)
                        if len(endpoint.interfaces) == 1:
                            inside.route("add", dst="0.0.0.0/0", gateway=iface.gateway)
                        _limit_bandwidth(ipr, inside, iface, endpoint)
                finally:
                    inside.close()
                self._sync_daemon()
            except BaseException:
                with self._host() as ipr:
                    for veth in undo.veths:
                        with contextlib.suppress(NetlinkError):
                            _delete_link(ipr, veth)
                endpoint.interfaces.remove(iface)
                record.allocated.pop(iface.address, None)
                self.store.save(state, durable=False)
                raise
        return self._endpoint_view(self.store.load(), endpoint)

    def disconnect(self, tenant: str, network: str, container_id: str) -> None:
        """Detach a running container from one network (its interface goes away)."""
        with self.store.locked(durable=False) as state:
            endpoint = self._endpoint_record(state, tenant, container_id)
            record = self._get(state, tenant, network)
            iface = next((i for i in endpoint.interfaces if i.network == record.id), None)
            if iface is None:
                raise NotFound(f"container {container_id[:12]} is not connected to {network!r}")
            if endpoint.ports and iface is endpoint.interfaces[0] and len(endpoint.interfaces) > 1:
                raise FailedPrecondition(
                    "the container's published ports go through this network; "
                    "it can't be disconnected while they exist"
                )
            was_first = iface is endpoint.interfaces[0]
            with self._host() as ipr, contextlib.suppress(NetlinkError):
                _delete_link(ipr, iface.host_veth)
            endpoint.interfaces.remove(iface)
            if record.allocated.get(iface.address) == container_id:
                del record.allocated[iface.address]
            if was_first and endpoint.interfaces:
                # the default route went with the interface: move it to the next one
                inside = open_netns(Path(endpoint.netns))
                try:
                    inside.route("replace", dst="0.0.0.0/0", gateway=endpoint.interfaces[0].gateway)
                finally:
                    inside.close()
            had_ports = bool(endpoint.ports) and not endpoint.interfaces
            if not endpoint.interfaces:
                endpoint.ports = []
        if had_ports:
            self._apply_firewall(self.store.load())
        self._sync_daemon()

    def endpoint(self, tenant: str, container_id: str) -> Endpoint | None:
        """The container's networking (addresses, ports), or None if it has none."""
        state = self.store.load()
        record = state.endpoints.get(container_id)
        if record is None or record.tenant != tenant:
            return None
        return self._endpoint_view(state, record)

    def endpoints(self, tenant: str) -> builtins.list[Endpoint]:
        state = self.store.load()
        return [
            self._endpoint_view(state, e) for e in state.endpoints.values() if e.tenant == tenant
        ]

    def _endpoint_record(self, state: State, tenant: str, container_id: str) -> EndpointRecord:
        endpoint = state.endpoints.get(container_id)
        if endpoint is None or endpoint.tenant != tenant:
            raise NotFound(f"container {container_id[:12]} has no networking on this node")
        return endpoint

    def _endpoint_view(self, state: State, endpoint: EndpointRecord) -> Endpoint:
        addresses: dict[str, str] = {}
        aliases: dict[str, tuple[str, ...]] = {}
        for iface in endpoint.interfaces:
            network = state.networks.get(iface.network)
            label = network.name if network else iface.network[:12]
            addresses[label] = f"{iface.address}/{iface.prefixlen}"
            aliases[label] = tuple(iface.aliases)
        return Endpoint(
            container_id=endpoint.container_id,
            tenant=endpoint.tenant,
            name=endpoint.name,
            mode=endpoint.mode,
            netns_path=endpoint.netns,
            addresses=addresses,
            aliases=aliases,
            ports=tuple(_published(p) for p in endpoint.ports),
            gateway=endpoint.interfaces[0].gateway if endpoint.interfaces else None,
        )

    def _setup_view(self, state: State, endpoint: EndpointRecord) -> NetworkSetup:
        view = self._endpoint_view(state, endpoint)
        if endpoint.interfaces:
            resolv = f"nameserver {endpoint.interfaces[0].gateway}\n{LOCAL_RESOLV}"
        else:
            resolv = ""
        hosts = [
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
        ]
        names = " ".join(dict.fromkeys(n for n in (endpoint.hostname, endpoint.name) if n))
        for iface in endpoint.interfaces:
            if names:
                hosts.append(f"{iface.address}\t{names}")
        if not endpoint.interfaces and names:
            hosts.append(f"127.0.1.1\t{names}")
        return NetworkSetup(
            netns_path=endpoint.netns,
            addresses=view.addresses,
            resolv_conf=resolv,
            hosts="\n".join(hosts) + "\n",
            ports=view.ports,
        )

    # ---- firewall and daemon -------------------------------------------------------

    def _apply_firewall(self, state: State) -> None:
        if not state.networks:
            firewall.delete_table(self.table)
            firewall.remove_docker_user(self.prefix, self._docker_tag)
            return
        bridges = [
            firewall.BridgeRule(
                bridge=n.bridge, subnet=n.subnet, gateway=n.gateway, internal=n.internal
            )
            for n in state.networks.values()
        ]
        dnats = [
            firewall.DnatRule(
                host_ip=p.host_ip if p.host_ip not in ("0.0.0.0",) else "",  # noqa: S104
                host_port=p.host_port,
                protocol=p.protocol,
                target=p.target,
                container_port=p.container_port,
            )
            for e in state.endpoints.values()
            for p in e.ports
            if p.host_ip != "127.0.0.1"
        ]
        with self._host() as ipr:
            local = _interface_subnets(ipr)
        firewall.apply(
            self.table, bridges, dnats, local_subnets=local, egress_allow=self.egress_allow
        )
        firewall.ensure_docker_user(self.prefix, self._docker_tag)

    def _sync_daemon(self, expect_ports: Sequence[PortRecord] = ()) -> None:
        """Tell the helper daemon to re-read the state; start it if needed.

        Bind failures for ``expect_ports`` (a port some host process holds) are raised.
        """
        sock = self.run_dir / "netd.sock"
        state = self.store.load()
        wanted = bool(state.networks)
        try:
            reply = daemon.request(sock, {"op": "sync"})
        except (OSError, daemon.DaemonError):
            if not wanted:
                return
            _wait_for_exit(self.run_dir)
            daemon.start(
                self.config.networks_dir, self.run_dir, self.dns_upstreams, self.config.name
            )
            reply = daemon.request(sock, {"op": "sync"})
        if not wanted:
            _wait_for_exit(self.run_dir)
        errors: dict[str, str] = reply.get("errors", {})
        for port in expect_ports:
            key = f"port:{port.protocol}:{port.host_ip}:{port.host_port}"
            if key in errors:
                raise ResourceExhausted(
                    f"port {port.host_port}/{port.protocol} is already in use on "
                    f"{port.host_ip or 'this node'}: {errors[key]}"
                )

    # ---- recovery ------------------------------------------------------------------

    def recover(self, live_container_ids: Iterable[str] | None = None) -> dict[str, Any]:
        """Reconcile kernel objects with the state after an agent restart or crash.

        Endpoints whose netns is gone (reboot) or whose container isn't live any more
        (when the runtime passes the live ids) are torn down and their addresses
        released; idle namespaces that are gone, expired or beyond the pool size are
        forgotten or destroyed (their addresses released); bridges are re-made; unknown
        interfaces and netns files carrying this agent's prefix are deleted; the nft
        table, DOCKER-USER rules and the helper daemon are restored. Returns what was
        done, for logs.
        """
        live = set(live_container_ids) if live_container_ids is not None else None
        report: dict[str, list[str]] = {"endpoints": [], "links": [], "netns": []}
        with self.store.locked() as state:
            for cid, endpoint in list(state.endpoints.items()):
                alive = is_netns(Path(endpoint.netns)) and (live is None or cid in live)
                if not alive:
                    self._teardown_endpoint(state, cid, endpoint)
                    report["endpoints"].append(cid)
            self._destroy_idle(state, [e for e in state.idle if not is_netns(Path(e.netns))])
            self._expire_idle(state)
            state.doomed.clear()  # deleted below with the other unknown links, if still there
            known_links = {n.bridge for n in state.networks.values()}
            known_links |= {i.host_veth for e in state.endpoints.values() for i in e.interfaces}
            known_links |= {entry.host_veth for entry in state.idle}
            with self._host() as ipr:
                for network in state.networks.values():
                    prefixlen = ipaddress.IPv4Network(network.subnet).prefixlen
                    _ensure_bridge(ipr, network.bridge, network.gateway, prefixlen, network.mtu)
                for link in ipr.get_links():
                    ifname = str(link.get("ifname") or "")
                    if _owned_link(ifname, self.prefix) and ifname not in known_links:
                        with contextlib.suppress(NetlinkError):
                            _delete_link(ipr, ifname)
                        report["links"].append(ifname)
            known_netns = {Path(e.netns).name for e in state.endpoints.values()}
            known_netns |= {Path(entry.netns).name for entry in state.idle}
            if self.config.netns_dir.exists():
                for entry in self.config.netns_dir.iterdir():
                    if entry.name not in known_netns:
                        delete_netns(entry)
                        report["netns"].append(entry.name)
            if not state.endpoints and not state.idle:
                self._release_netns_dir()
        state = self.store.load()
        if state.networks:
            _enable_forwarding()
        self._apply_firewall(state)
        self._sync_daemon()
        return report

    def teardown(self) -> None:
        """Remove every network object of this agent: endpoints, bridges, rules, daemon.

        For tests and for decommissioning a node; containers lose their networking.
        """
        with self.store.locked() as state:
            for cid, endpoint in list(state.endpoints.items()):
                self._teardown_endpoint(state, cid, endpoint)
            self._destroy_idle(state, state.idle)
            self._reap_doomed(state, wait=True)
            with self._host() as ipr:
                for network in list(state.networks.values()):
                    with contextlib.suppress(NetlinkError):
                        _delete_link(ipr, network.bridge)
                    del state.networks[network.id]
                for link in ipr.get_links():
                    ifname = str(link.get("ifname") or "")
                    if _owned_link(ifname, self.prefix):
                        with contextlib.suppress(NetlinkError):
                            _delete_link(ipr, ifname)
            if self.config.netns_dir.exists():
                for entry in self.config.netns_dir.iterdir():
                    delete_netns(entry)
        firewall.delete_table(self.table)
        firewall.remove_docker_user(self.prefix, self._docker_tag)
        with contextlib.suppress(OSError, daemon.DaemonError):
            daemon.request(self.run_dir / "netd.sock", {"op": "stop"})
        _wait_for_exit(self.run_dir)
        self._release_netns_dir()


def sweep_kernel_objects(agent_name: str, netns_dir: Path | None = None) -> None:
    """Remove every network object carrying this agent's names.

    Bridges and host veths (prefix), the nft tables, the DOCKER-USER rules and, given
    the agent's ``netns_dir``, every netns bind mount in it (idle namespaces kept for
    recycling included; a running container's namespace lives on as long as its
    processes). Used when the agent's state is gone and nothing else can tell which
    objects were its own.
    """
    prefix = kernel_prefix(agent_name)
    if netns_dir is not None and netns_dir.exists():
        for entry in netns_dir.iterdir():
            delete_netns(entry)
        release_netns_dir(netns_dir)
    with IPRoute() as ipr:
        for link in ipr.get_links():
            ifname = str(link.get("ifname") or "")
            if _owned_link(ifname, prefix):
                with contextlib.suppress(NetlinkError):
                    _delete_link(ipr, ifname)
    firewall.delete_table(re.sub(r"[^A-Za-z0-9_-]", "_", agent_name))
    firewall.remove_docker_user(prefix, f"berth:{agent_name}")


# ---- helpers ---------------------------------------------------------------------------


def _check_tenant(tenant: str) -> None:
    if not TENANT_RE.match(tenant):
        raise InvalidArgument(f"bad tenant name {tenant!r}")


def _check_network_name(name: str) -> None:
    if not NETWORK_RE.match(name):
        raise InvalidArgument(
            f"bad network name {name!r}: use letters, digits, '_', '.', '-' (max 63)"
        )
    if name in RESERVED_NAMES:
        raise InvalidArgument(f"{name!r} is a network mode, not a network name")


def _check_alias(alias: str) -> None:
    if not ALIAS_RE.match(alias):
        raise InvalidArgument(f"bad network alias {alias!r}")


def _parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"bad subnet {text!r}: {exc}") from exc
    if not 8 <= net.prefixlen <= 29:
        raise InvalidArgument(f"subnet {text!r} must be between /8 and /29")
    if not net.is_private or net.overlaps(ipaddress.IPv4Network("169.254.0.0/16")):
        raise InvalidArgument(f"subnet {text!r} must be a private, non-link-local range")
    return net


def _check_port(port: PortMapping) -> PortMapping:
    if port.protocol not in ("tcp", "udp"):
        raise InvalidArgument(f"bad protocol {port.protocol!r} (tcp or udp)")
    if not 1 <= port.container_port <= 65535:
        raise InvalidArgument(f"container port {port.container_port} is out of range (1-65535)")
    if not 0 <= port.host_port <= 65535:
        raise InvalidArgument(f"host port {port.host_port} is out of range (1-65535)")
    host_ip = port.host_ip
    if host_ip == "0.0.0.0":  # noqa: S104
        host_ip = ""
    if host_ip:
        try:
            ipaddress.IPv4Address(host_ip)
        except ValueError as exc:
            raise InvalidArgument(f"bad host address {host_ip!r} for a published port") from exc
    return PortMapping(
        container_port=port.container_port,
        host_port=port.host_port,
        host_ip=host_ip,
        protocol=port.protocol,
    )


def _socket_type(protocol: str) -> int:
    return socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM


def _probe_port(protocol: str, host_ip: str, port: int) -> None:
    """Refuse a host port some process on the node already holds."""
    with socket.socket(socket.AF_INET, _socket_type(protocol)) as s:
        if protocol == "tcp":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host_ip or "0.0.0.0", port))  # noqa: S104
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ResourceExhausted(
                    f"port {port}/{protocol} is already in use on {host_ip or 'this node'}"
                ) from exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise InvalidArgument(f"{host_ip} is not an address of this node") from exc
            raise


def _ephemeral_port(protocol: str, host_ip: str) -> int:
    with socket.socket(socket.AF_INET, _socket_type(protocol)) as s:
        try:
            s.bind((host_ip or "0.0.0.0", 0))  # noqa: S104
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise InvalidArgument(f"{host_ip} is not an address of this node") from exc
            raise
        port: int = s.getsockname()[1]
        return port


def _published(p: PortRecord) -> PublishedPort:
    return PublishedPort(
        host_ip=p.host_ip,
        host_port=p.host_port,
        container_port=p.container_port,
        protocol=p.protocol,
    )


def _owned_link(ifname: str, prefix: str) -> bool:
    rest = ifname[len(prefix) :]
    return (
        ifname.startswith(prefix)
        and len(rest) >= 2
        and rest[0] in "bvc"
        and all(c in "0123456789abcdef" for c in rest[1:])
    )


def _link_exists(ifname: str) -> bool:
    """Whether the host has this link (sysfs: no netlink round trip)."""
    return os.path.exists(f"/sys/class/net/{ifname}")


def _link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _delete_link(ipr: IPRoute, ifname: str) -> None:
    index = _link_index(ipr, ifname)
    if index is not None:
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise


def _ensure_bridge(ipr: IPRoute, name: str, gateway: str, prefixlen: int, mtu: int) -> None:
    index = _link_index(ipr, name)
    if index is None:
        ipr.link("add", ifname=name, kind="bridge", mtu=mtu, address=mac_for(gateway))
        index = _link_index(ipr, name)
    _disable_ipv6(name)
    have = {a.get("address") for a in ipr.get_addr(index=index, family=socket.AF_INET)}
    if gateway not in have:
        ipr.addr("add", index=index, address=gateway, prefixlen=prefixlen)
    ipr.link("set", index=index, state="up")


def _disable_ipv6(ifname: str) -> None:
    """No IPv6 address on a bridge: the node must not answer containers over IPv6."""
    path = Path("/proc/sys/net/ipv6/conf") / ifname / "disable_ipv6"
    with contextlib.suppress(FileNotFoundError):
        path.write_text("1\n")


def _host_subnets(ipr: IPRoute) -> list[ipaddress.IPv4Network]:
    """IPv4 prefixes already routed or addressed on the node (default route excluded)."""
    nets: list[ipaddress.IPv4Network] = []
    for route in ipr.get_routes(family=socket.AF_INET):
        if route.get("table") not in (254, None):
            continue
        length = route["dst_len"]
        dst = route.get("dst")
        if length and dst:
            nets.append(ipaddress.IPv4Network(f"{dst}/{length}", strict=False))
    for addr in ipr.get_addr(family=socket.AF_INET):
        nets.append(
            ipaddress.IPv4Network(f"{addr.get('address')}/{addr['prefixlen']}", strict=False)
        )
    return nets


def _interface_subnets(ipr: IPRoute) -> list[str]:
    """The subnet of every IPv4 address on the node's interfaces (the LAN, docker0 and
    other bridges, VPNs): containers' outbound traffic to them is refused. Sampled at each
    firewall rebuild (network create/remove, published ports, recover)."""
    subnets = set()
    for addr in ipr.get_addr(family=socket.AF_INET):
        for attr in ("IFA_ADDRESS", "IFA_LOCAL"):
            address = addr.get_attr(attr)
            if address:
                net = ipaddress.IPv4Network(f"{address}/{addr['prefixlen']}", strict=False)
                subnets.add(str(net))
    return sorted(subnets)


def _parse_egress_allow(items: Iterable[str]) -> tuple[str, ...]:
    """The operator's egress allow-list as IPv4 CIDRs (networks are IPv4 only)."""
    parsed = []
    for item in items:
        try:
            parsed.append(str(ipaddress.IPv4Network(item, strict=False)))
        except ValueError as exc:
            raise InvalidArgument(
                f"bad BERTH_EGRESS_ALLOW entry {item!r}: an IPv4 address or CIDR ({exc})"
            ) from exc
    return tuple(parsed)


def _uplink_mtu() -> int:
    """The MTU of the interface behind the default route (1500 if there is none)."""
    with IPRoute() as ipr:
        for route in ipr.get_default_routes(family=socket.AF_INET):
            oif = route.get("oif")
            if oif:
                links = ipr.get_links(oif)
                if links:
                    return int(links[0].get("mtu") or 1500)
    return 1500


def _enable_forwarding() -> None:
    path = Path("/proc/sys/net/ipv4/ip_forward")
    if path.read_text().strip() != "1":
        path.write_text("1\n")


def _limit_bandwidth(
    ipr: IPRoute, inside: IPRoute, iface: InterfaceRecord, endpoint: EndpointRecord
) -> None:
    """Token-bucket limits with tc: egress on the container's end, ingress on the host's."""
    if endpoint.egress_bps:
        index = inside.link_lookup(ifname=iface.ifname)[0]
        _tbf(inside, index, endpoint.egress_bps)
    if endpoint.ingress_bps:
        index = _link_index(ipr, iface.host_veth)
        if index is not None:
            _tbf(ipr, index, endpoint.ingress_bps)


def _tbf(ipr: IPRoute, index: int, bits_per_second: int) -> None:
    rate = bits_per_second // 8  # bytes per second
    burst = max(rate // 10, 16 * 1024)
    ipr.tc("add", "tbf", index, 0x10000, rate=rate, burst=burst, latency="50ms")


def _host_file(path: str) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return ""


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """Serialises subnet choice between all agents on the machine (they share routes)."""
    SUBNET_LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(SUBNET_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _wait_for_exit(run_dir: Path, timeout: float = 5.0) -> None:
    """Wait until a stopping daemon released its pid lock (so a new one can start)."""
    pid_path = run_dir / "netd.pid"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fd = os.open(pid_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.01)
        finally:
            os.close(fd)
