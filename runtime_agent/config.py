"""Where the agent keeps its state, and the node-wide knobs.

Every path hangs off two roots so tests (and a second agent on the same machine) can run
side by side with their own state:

  root      persistent state   (default /var/lib/berth,  env BERTH_ROOT)
  run_root  volatile state     (default /run/berth,      env BERTH_RUN_ROOT)

Layout under root:
  content/blobs/sha256/<hex>        content store (digest-addressed blobs)
  images/<tenant>/refs.json         image references per tenant ("library" = shared base images)
  snapshots/layers/<chainid>/fs     unpacked layers, shared read-only
  containers/<tenant>/<id>/         container records, bundles, logs, upper/work dirs
  volumes/<tenant>/<name>/          named volumes
  networks/                         network and IPAM state
  build-cache/<tenant>/             builder cache index
Under run_root: runc state (runc --root), conmon pid files and sockets, netns bind mounts.

``name`` distinguishes agents sharing a machine: it prefixes cgroup parents, bridges and
nftables tables so two agents never touch each other's kernel objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime_agent.archive import ArchiveLimits

GiB = 1024**3


def _env_int(name: str, default: int) -> int:
    """An integer setting from the environment (a typo fails loudly, never 0)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, not {value}")
    return value


def _archive_limits(what: str, max_bytes: int, max_entries: int, setting: str) -> ArchiveLimits:
    """``ArchiveLimits`` naming the BERTH_<setting>_MAX_* variables that set them (a build
    context's byte cap is the build's own, not a node setting)."""
    from runtime_agent.archive import ArchiveLimits

    return ArchiveLimits(
        what,
        max_bytes,
        max_entries,
        "" if setting == "CONTEXT" else f"BERTH_{setting}_MAX_BYTES",
        f"BERTH_{setting}_MAX_ENTRIES",
    )


@dataclass(frozen=True)
class AgentConfig:
    root: Path = field(default_factory=lambda: Path(os.environ.get("BERTH_ROOT", "/var/lib/berth")))
    run_root: Path = field(
        default_factory=lambda: Path(os.environ.get("BERTH_RUN_ROOT", "/run/berth"))
    )
    name: str = field(default_factory=lambda: os.environ.get("BERTH_AGENT_NAME", "berth"))
    runc: str = field(default_factory=lambda: os.environ.get("BERTH_RUNC", "runc"))
    conmon: str = field(default_factory=lambda: os.environ.get("BERTH_CONMON", "conmon"))
    # Remount the cgroup2 hierarchy with favordynmods (see cgroups.favor_dynamic_moves):
    # container starts ~10 ms faster, at a kernel-documented cost to forks and exits.
    cgroup_favordynmods: bool = field(
        default_factory=lambda: os.environ.get("BERTH_CGROUP_FAVORDYNMODS", "1") != "0"
    )
    # Containers and build steps the control plane dispatches run in a user namespace
    # (container root = the tenant's unprivileged host id range). Only the node's operator
    # can turn that off, here (BERTH_TENANT_USERNS=0): no payload field can.
    tenant_userns: bool = field(
        default_factory=lambda: os.environ.get("BERTH_TENANT_USERNS", "1") != "0"
    )
    # Destinations tenant containers may reach although they are private or on one of the
    # node's own subnets (network/firewall.py refuses those): CIDRs, comma-separated in
    # BERTH_EGRESS_ALLOW, e.g. an internal package mirror.
    egress_allow: tuple[str, ...] = field(default_factory=lambda: _env_tuple("BERTH_EGRESS_ALLOW"))

    # Caps on the archives a tenant makes the node unpack (runtime_agent/archive.py): the
    # sum of regular files' sizes and the member count, checked before anything is
    # written. A build context's unpacked size is capped per build (BuildLimits.
    # context_bytes, 2 GiB; the control plane caps the upload itself with
    # BERTH_BUILD_CONTEXT_MAX_BYTES); its member count is capped here.
    # Layers: docker has no cap; 16 GiB / 1M files covers the largest public images
    # (CUDA, TeX) while a gzip bomb of a few MB stops long before the node's disk fills.
    context_max_entries: int = field(
        default_factory=lambda: _env_int("BERTH_CONTEXT_MAX_ENTRIES", 500_000)
    )
    add_archive_max_bytes: int = field(
        default_factory=lambda: _env_int("BERTH_ADD_ARCHIVE_MAX_BYTES", 4 * GiB)
    )
    add_archive_max_entries: int = field(
        default_factory=lambda: _env_int("BERTH_ADD_ARCHIVE_MAX_ENTRIES", 500_000)
    )
    layer_max_bytes: int = field(
        default_factory=lambda: _env_int("BERTH_LAYER_MAX_BYTES", 16 * GiB)
    )
    layer_max_entries: int = field(
        default_factory=lambda: _env_int("BERTH_LAYER_MAX_ENTRIES", 1_000_000)
    )
    # What one build may write into the layers it makes itself (COPY/ADD, all steps and
    # stages together; layers/LayerBudget): each ADD archive is capped above, this caps
    # their sum. Default: the default size of a tenant's layer filesystem, which caps what
    # its RUN steps write.
    build_layers_max_bytes: int = field(
        default_factory=lambda: _env_int("BERTH_BUILD_LAYERS_MAX_BYTES", 10 * GiB)
    )

    def context_limits(self, max_bytes: int) -> ArchiveLimits:
        """Caps for a build context of at most ``max_bytes`` (the build's own limit)."""
        return _archive_limits("build context", max_bytes, self.context_max_entries, "CONTEXT")

    # Fetches a tenant causes on the node (ADD <url> in a build; runtime_agent/netpolicy.py,
    # runtime_agent/fetch.py): only public addresses, unless the operator allows internal
    # mirrors here (addresses, CIDRs or host names; BERTH_FETCH_ALLOW), within a size and a
    # time cap. Tenants' images may name only the registries this node logs in to and those
    # in BERTH_ALLOWED_REGISTRIES (host[:port], as written in image references).
    fetch_allow: tuple[str, ...] = field(default_factory=lambda: _env_tuple("BERTH_FETCH_ALLOW"))
    fetch_max_bytes: int = field(
        default_factory=lambda: _env_int("BERTH_FETCH_MAX_BYTES", 512 * 1024**2)
    )
    fetch_timeout_seconds: float = field(
        default_factory=lambda: _env_int("BERTH_FETCH_TIMEOUT_SECONDS", 300)
    )
    allowed_registries: tuple[str, ...] = field(
        default_factory=lambda: _env_tuple("BERTH_ALLOWED_REGISTRIES")
    )

    @property
    def add_archive_limits(self) -> ArchiveLimits:
        """Caps for one local archive that ADD extracts into a layer."""
        return _archive_limits(
            "ADD archive", self.add_archive_max_bytes, self.add_archive_max_entries, "ADD_ARCHIVE"
        )

    @property
    def layer_limits(self) -> ArchiveLimits:
        """Caps for one image layer (pulled, pushed, imported or built) when unpacked."""
        return _archive_limits("layer", self.layer_max_bytes, self.layer_max_entries, "LAYER")

    @property
    def content_dir(self) -> Path:
        return self.root / "content"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    # Defaults a tenant's containers get when they ask for nothing (see cgroups/ and
    # snapshots/snapshotter.py): processes per container (podman's default) and per
    # tenant (its parent cgroup; default an eighth of the node's pid_max), and the size of
    # the filesystem that holds the tenant's writable layers (0: on the state disk, uncapped).
    # (Positive or refused: runc reads a pids limit of 0 or less as "unlimited".)
    container_pids_max: int = field(
        default_factory=lambda: _env_int("BERTH_CONTAINER_PIDS_MAX", 2048)
    )
    tenant_pids_max: int = field(
        default_factory=lambda: _env_int(
            "BERTH_TENANT_PIDS_MAX", max(1024, AgentConfig.node_pid_max() // 8)
        )
    )
    tenant_layer_bytes: int = field(
        default_factory=lambda: int(os.environ.get("BERTH_TENANT_LAYER_BYTES", str(10 << 30)))
    )

    @staticmethod
    def node_pid_max() -> int:
        """The kernel's pid_max: how many processes and threads the whole node may have."""
        try:
            return int(Path("/proc/sys/kernel/pid_max").read_text())
        except (OSError, ValueError):
            return 32768

    @property
    def containers_dir(self) -> Path:
        return self.root / "containers"

    @property
    def volumes_dir(self) -> Path:
        return self.root / "volumes"

    @property
    def networks_dir(self) -> Path:
        return self.root / "networks"

    @property
    def build_cache_dir(self) -> Path:
        return self.root / "build-cache"

    @property
    def runc_root(self) -> Path:
        return self.run_root / "runc"

    @property
    def netns_dir(self) -> Path:
        return self.run_root / "netns"

    @property
    def cgroup_parent(self) -> str:
        """Top cgroup under which each tenant gets a child and each container a grandchild."""
        return self.name


def _env_tuple(name: str) -> tuple[str, ...]:
    """A comma-separated environment variable as a tuple of its non-empty items."""
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())
