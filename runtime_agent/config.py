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
    container_pids_max: int = field(
        default_factory=lambda: int(os.environ.get("BERTH_CONTAINER_PIDS_MAX", "2048"))
    )
    tenant_pids_max: int = field(
        default_factory=lambda: int(
            os.environ.get("BERTH_TENANT_PIDS_MAX") or max(1024, AgentConfig.node_pid_max() // 8)
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
