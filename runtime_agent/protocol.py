"""Payloads exchanged between the control plane and node agents, as plain dataclasses.

The control plane builds these (from its models) and sends them as Celery task arguments
via ``to_dict``; the agent rebuilds them with ``from_dict``. The CLI builds the same specs
from docker-like flags. Nothing here imports Django.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one container, in kernel units. None means unlimited."""

    cpus: float | None = None  # CFS quota as a fraction of CPUs (0.5 = half a CPU)
    cpu_shares: int | None = None  # relative weight, docker's 1024 = default
    memory_bytes: int | None = None  # hard limit; swap is never allowed beyond it
    pids: int | None = None
    device_read_bps: int | None = None  # on the device behind the container's storage
    device_write_bps: int | None = None
    device_read_iops: int | None = None
    device_write_iops: int | None = None
    network_ingress_bps: int | None = None  # bits/s into the container (tc on the host veth)
    network_egress_bps: int | None = None  # bits/s out of the container (tc inside its netns)


@dataclass(frozen=True)
class MountSpec:
    """A mount into the container.

    kind "volume": source is a tenant volume name; "tmpfs": source unused, size_bytes caps
    it; "bind": source is a host path (privileged callers only, never tenants).
    """

    kind: Literal["volume", "tmpfs", "bind"]
    target: str
    source: str = ""
    read_only: bool = False
    size_bytes: int | None = None


@dataclass(frozen=True)
class PortMapping:
    """Publish container_port on the node: host_ip:host_port -> container_port/protocol.

    host_port 0 means "pick an ephemeral port"; host_ip "" means all addresses.
    """

    container_port: int
    host_port: int = 0
    host_ip: str = ""
    protocol: Literal["tcp", "udp"] = "tcp"


@dataclass(frozen=True)
class NetworkAttachment:
    """Attach the container to one of its tenant's networks."""

    network: str
    aliases: tuple[str, ...] = ()
    ipv4_address: str | None = None


@dataclass(frozen=True)
class RestartPolicy:
    """docker's restart policies: no, on-failure[:max_retries], always, unless-stopped."""

    name: Literal["no", "on-failure", "always", "unless-stopped"] = "no"
    max_retries: int = 0


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to create a container on a node.

    network_mode: "bridge" attaches to ``networks`` (the tenant's default network when
    empty); "none" gives only loopback; "host" shares the node's network (privileged only).
    """

    tenant: str
    image: str
    name: str | None = None
    command: tuple[str, ...] | None = None  # None = the image's Cmd
    entrypoint: tuple[str, ...] | None = None  # None = the image's Entrypoint
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    mounts: tuple[MountSpec, ...] = ()
    read_only_rootfs: bool = False
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    network_mode: Literal["bridge", "none", "host"] = "bridge"
    networks: tuple[NetworkAttachment, ...] = ()
    ports: tuple[PortMapping, ...] = ()
    devices: tuple[str, ...] = ()  # CDI names, e.g. "nvidia.com/gpu=0"
    privileged_caller: bool = False  # set only by operators/the agent itself, never tenants
    # Container root = an unprivileged host uid range of the tenant (security.user_namespace_for).
    user_namespace: bool = False
    auto_remove: bool = False
    # docker's -i: the container's stdin is a pipe fed through the monitor's attach socket
    # (``ContainerManager.attach_stdin``); otherwise it is /dev/null.
    stdin_open: bool = False
    stop_timeout: int = 10
    stop_signal: str | None = None  # None = the image's StopSignal or SIGTERM
    # The control plane's container id whose service secrets the node fetches over HTTP
    # (``CONTAINER_SECRETS_PATH``) and adds to ``env`` when it applies the spec: secrets
    # never travel through the broker. None: no secrets.
    secrets_from: str | None = None


def to_dict(obj: Any) -> dict[str, Any]:
    """JSON-safe dict of a payload dataclass (tuples become lists)."""
    return dataclasses.asdict(obj)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a payload dataclass, nested dataclasses and tuples included.

    Unknown keys are an error: a newer control plane must not be silently half-understood.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(hints)
    if unknown:
        raise ValueError(f"unknown fields for {cls.__name__}: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    resolved = _resolved_types(cls)
    for name, value in data.items():
        kwargs[name] = _coerce(resolved[name], value)
    return cls(**kwargs)


def _resolved_types(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _coerce(tp: Any, value: Any) -> Any:
    import typing

    origin = typing.get_origin(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value)  # type: ignore[arg-type]
    if origin is tuple:
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v) for v in value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value)  # type: ignore[arg-type]
            if typing.get_origin(arg) is tuple and isinstance(value, list):
                return _coerce(arg, value)
        return value
    return value


# --------------------------------------------------------------------------- dispatch

#: Celery task names. The control plane sends ``agent.*`` tasks to queue ``node.<id>``;
#: agents send ``control.*`` tasks to the control plane's queue ``control``.
AGENT_APPLY_CONTAINER = "berth.agent.apply_container"
AGENT_STOP_CONTAINER = "berth.agent.stop_container"
AGENT_REMOVE_CONTAINER = "berth.agent.remove_container"
AGENT_EXEC = "berth.agent.exec"
AGENT_LOGS = "berth.agent.logs"
AGENT_STATS = "berth.agent.stats"
AGENT_REPORT = "berth.agent.report"
CONTROL_NODE_REPORT = "berth.control.node_report"
CONTROL_QUEUE = "control"


def node_transport_options(queue: str) -> dict[str, str]:
    """kombu's unacked bookkeeping under keys of the node's own queue (kombu's defaults,
    ``unacked*``, are shared by every consumer, which a node's broker user may not touch;
    ``workloads.services.broker`` grants ``unacked.<queue>*``)."""
    return {
        "unacked_key": f"unacked.{queue}",
        "unacked_index_key": f"unacked.{queue}.index",
        "unacked_mutex_key": f"unacked.{queue}.mutex",
    }


#: Label carrying the control plane's container id on every container it asks for.
CONTAINER_UID_LABEL = "berth.container"


@dataclass(frozen=True)
class ContainerReport:
    """What a node says about one of the control plane's containers."""

    uid: str
    tenant: str
    name: str
    state: str  # starting (apply under way), created, running, paused, stopped, or missing
    exit_code: int | None = None
    oom_killed: bool = False
    started_at: str | None = None  # ISO 8601
    finished_at: str | None = None
    cpu_seconds: float | None = None
    memory_bytes: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class NodeReport:
    """A heartbeat. ``full`` reports list every container with the uid label on the node."""

    node_id: str
    credential: str
    sent_at: str
    full: bool = True
    capacity: dict[str, Any] = field(default_factory=dict)
    containers: tuple[ContainerReport, ...] = ()


# ----------------------------------------------------------- volumes, networks, builds

AGENT_REMOVE_VOLUME = "berth.agent.remove_volume"
AGENT_REMOVE_NETWORK = "berth.agent.remove_network"
#: Build an image: fetch the context from the control plane, build, report back.
AGENT_BUILD = "berth.agent.build"
AGENT_CANCEL_BUILD = "berth.agent.cancel_build"
#: The agent sends a build's log (the kept tail, with a growing sequence number) and its
#: result to these control-plane tasks, signed with the node credential.
CONTROL_BUILD_LOG = "berth.control.build_log"
CONTROL_BUILD_RESULT = "berth.control.build_result"
#: HTTP headers a node authenticates with when it fetches a build context or asks for
#: a build's push token.
NODE_ID_HEADER = "X-Berth-Node"
NODE_CREDENTIAL_HEADER = "X-Berth-Node-Credential"
#: Where the node running a build POSTs (node headers, no body) for the registry token
#: it pushes the image with: ``{"token", "expires_in", "issued_at"}``, or an error in the
#: API's format (403 not this node's running build, or the tenant may not push).
BUILD_PUSH_TOKEN_PATH = "/api/v1/nodes/builds/{build_id}/push-token/"  # noqa: S105 - a path
#: Where a node POSTs ``{"tenant", "image"}`` (node headers) right before pulling an image
#: for one of that tenant's containers placed on it: ``{"token", "expires_in",
#: "issued_at"}``, a registry token with the tenant's rights for that one repository
#: (``token`` null: not the platform's registry, pull anonymously), or an error in the
#: API's format (403: no such container here, or the tenant may not read that image).
PULL_TOKEN_PATH = "/api/v1/nodes/pull-token/"  # noqa: S105 - a path
#: Where a node POSTs its :class:`NodeReport` (node headers; the report's node must be
#: the authenticated one): reports travel over HTTP, not the broker, so a node's broker
#: user can enqueue nothing for the control plane.
NODE_REPORT_PATH = "/api/v1/nodes/report/"
#: Where the node running a build POSTs its :class:`BuildReport` (log or result).
BUILD_REPORT_PATH = "/api/v1/nodes/builds/{build_id}/report/"
#: Where a node GETs (node headers) the service secrets of a container placed on it,
#: right before it creates the container: ``{"env": {NAME: value}}`` (403 for any other
#: container). ``Cache-Control: no-store``; neither side logs the values.
CONTAINER_SECRETS_PATH = "/api/v1/nodes/containers/{container_id}/secrets/"


@dataclass(frozen=True)
class BuildRequest:
    """What the control plane asks a node to build (task ``AGENT_BUILD``).

    With ``push_to`` (``<registry-host>/<tenant>/<repo>:<tag>``) the node pushes the built
    image there. The request carries no registry credential: right before pushing, the
    node asks for a short-lived token for exactly that repository at
    ``BUILD_PUSH_TOKEN_PATH`` with its node credential, so no push credential waits in
    the broker, and none exists for a build that never gets to its push.
    """

    build_id: str
    tenant: str
    context_url: str  # path on the control plane; GET with the node headers -> a tar
    tag: str
    dockerfile: str = "Dockerfile"
    build_args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    log_keep_bytes: int = 256 * 1024
    timeout_seconds: int = 3600
    push_to: str | None = None


@dataclass(frozen=True)
class BuildReport:
    """A build's log so far (``log`` is the kept tail; ``log_size`` counts every character
    produced) or, with ``state`` set, its end: succeeded, failed or cancelled."""

    build_id: str
    node_id: str
    credential: str
    seq: int
    log: str
    log_size: int
    state: str | None = None  # None while running
    digest: str | None = None  # the image's config digest (its id)
    reference: str | None = None  # the tag in the tenant's store on the node
    #: When the request said ``push_to``: where the image was pushed, and the manifest
    #: digest the registry stored it under. A build whose push failed is ``failed``.
    pushed_reference: str | None = None
    manifest_digest: str | None = None
    error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
