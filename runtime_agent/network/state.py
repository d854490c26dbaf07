"""The network subsystem's persisted state: networks, IPAM, endpoints, published ports,
and idle namespaces kept for recycling.

One JSON document per agent (``<root>/networks/state.json``), replaced atomically (temp
file, fsync, rename) and only changed under an exclusive ``flock``. Every allocation
(a subnet, an address, a host port) is written *before* the kernel object that uses it is
made, so a crash can leave an allocation without its object (``recover()`` releases it)
but never an object whose address someone else can be handed: no double allocation.

The helper daemon (DNS responders, loopback port proxies) only ever reads this file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_VERSION = 1


@dataclass
class NetworkRecord:
    """A tenant network: a bridge with a subnet; ``gateway`` is the bridge's address."""

    id: str
    tenant: str
    name: str
    subnet: str
    gateway: str
    bridge: str
    mtu: int
    created: str
    internal: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    # address -> container id, for every address handed out on this network
    allocated: dict[str, str] = field(default_factory=dict)


@dataclass
class InterfaceRecord:
    """One container interface: a veth pair between the container's netns and a bridge."""

    network: str  # network id
    ifname: str  # inside the container: eth0, eth1, ...
    host_veth: str
    address: str
    prefixlen: int
    gateway: str
    mac: str = ""
    aliases: list[str] = field(default_factory=list)


@dataclass
class PortRecord:
    """A published port: host_ip:host_port/protocol -> target address:container_port."""

    host_ip: str  # "" = every host address
    host_port: int
    container_port: int
    protocol: str
    target: str  # container address the port forwards to


@dataclass
class EndpointRecord:
    """A container's network presence: its netns and everything attached to it."""

    container_id: str
    tenant: str
    name: str
    hostname: str
    netns: str
    mode: str = "bridge"  # "bridge" or "none"
    interfaces: list[InterfaceRecord] = field(default_factory=list)
    ports: list[PortRecord] = field(default_factory=list)
    ingress_bps: int | None = None
    egress_bps: int | None = None


@dataclass
class IdleRecord:
    """A detached container's netns kept for the next container of the same network.

    Its veth pair stays (host end on the bridge, ``eth0`` inside with ``address`` and the
    default route); the address stays allocated to it (owner ``IDLE_OWNER``) until it is
    claimed or destroyed. ``since`` is when it went idle (epoch seconds).
    """

    netns: str
    network: str  # network id
    host_veth: str
    address: str
    mac: str
    since: float


# The owner recorded in NetworkRecord.allocated for an idle entry's address.
IDLE_OWNER = "idle"


@dataclass
class State:
    next_bridge: int = 1
    networks: dict[str, NetworkRecord] = field(default_factory=dict)  # id -> record
    endpoints: dict[str, EndpointRecord] = field(default_factory=dict)  # container id -> record
    # Host veths of removed containers that the kernel deletes along with their netns
    # (asynchronously): name -> epoch seconds of the removal (see NetworkManager.detach).
    doomed: dict[str, float] = field(default_factory=dict)
    # Recyclable namespaces, oldest first (see NetworkManager.detach).
    idle: list[IdleRecord] = field(default_factory=list)
    saved_text: str = field(default="", compare=False, repr=False)  # as last read or written

    def network(self, tenant: str, name: str) -> NetworkRecord | None:
        for record in self.networks.values():
            if record.tenant == tenant and record.name == name:
                return record
        return None

    def to_json(self) -> dict[str, Any]:
        # Hand-written rather than dataclasses.asdict: this runs on every container start.
        endpoints = {}
        for key, e in self.endpoints.items():
            raw = dict(vars(e))
            raw["interfaces"] = [dict(vars(i)) for i in e.interfaces]
            raw["ports"] = [dict(vars(p)) for p in e.ports]
            endpoints[key] = raw
        return {
            "version": STATE_VERSION,
            "next_bridge": self.next_bridge,
            "networks": {k: dict(vars(v)) for k, v in self.networks.items()},
            "endpoints": endpoints,
            "doomed": dict(self.doomed),
            "idle": [dict(vars(i)) for i in self.idle],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported network state version {data.get('version')!r}")
        endpoints = {}
        for key, raw in data.get("endpoints", {}).items():
            raw = dict(raw)
            raw["interfaces"] = [InterfaceRecord(**i) for i in raw.get("interfaces", [])]
            raw["ports"] = [PortRecord(**p) for p in raw.get("ports", [])]
            endpoints[key] = EndpointRecord(**raw)
        return cls(
            next_bridge=int(data.get("next_bridge", 1)),
            networks={k: NetworkRecord(**v) for k, v in data.get("networks", {}).items()},
            endpoints=endpoints,
            doomed={str(k): float(v) for k, v in data.get("doomed", {}).items()},
            idle=[IdleRecord(**i) for i in data.get("idle", [])],
        )


class StateStore:
    """Load and save ``State`` with an exclusive lock around read-modify-write."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "state.json"
        self.lock_path = directory / "state.lock"

    def load(self) -> State:
        """A snapshot of the state (no lock: the file is only ever replaced atomically)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return State()
        state = State.from_json(json.loads(text))
        state.saved_text = text
        return state

    @contextlib.contextmanager
    def locked(self, *, durable: bool = True) -> Iterator[State]:
        """Hold the lock, yield the current state; save it if the block ends normally.

        Nothing is written when the state is unchanged since it was loaded or last saved.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = self.load()
            yield state
            if _dumps(state) != state.saved_text:
                self.save(state, durable=durable)
        finally:
            os.close(fd)

    def save(self, state: State, *, durable: bool = True) -> None:
        """Replace the state file atomically (temp file, rename).

        ``durable`` adds the fsyncs that make it survive a power loss. Endpoints don't
        need them: a power loss is a reboot, after which every netns is gone and
        ``recover()`` releases their addresses anyway; networks (subnets) do.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        text = _dumps(state)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".state-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.rename(tmp, self.path)
            state.saved_text = text
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if durable:
            dirfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)


def _dumps(state: State) -> str:
    return json.dumps(state.to_json(), sort_keys=True)
