"""Container and tenant cgroups behind one interface, with a v1 and a v2 driver.

runc creates each container's cgroup from ``linux.cgroupsPath`` and ``linux.resources``
(we always tell it to use its cgroupfs manager); this package owns what runc doesn't:
the tenant-level parent that holds tenant-wide caps, reading statistics back, and
removing what is left after a container is gone.

Layout: ``/<config.name>/<tenant>/<container-id>`` under each controller's hierarchy (v1:
``/sys/fs/cgroup/<controller>/...``) or under the unified hierarchy (v2:
``/sys/fs/cgroup/...``). The driver is picked by looking for
``/sys/fs/cgroup/cgroup.controllers``, which only exists when the unified hierarchy is
mounted at the top (a pure v2 host); hybrid hosts like this one use v1 controllers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from runtime_agent.config import AgentConfig
    from runtime_agent.protocol import Limits

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CgroupStats:
    """Counters of one cgroup, in plain units. None when the controller doesn't report it."""

    cpu_seconds: float
    memory_bytes: int
    memory_limit_bytes: int | None  # None = unlimited
    io_read_bytes: int
    io_write_bytes: int
    pids: int
    pids_limit: int | None
    oom_kills: int


class CgroupDriver(Protocol):
    """What the runtime needs from the cgroup hierarchy, whatever its version."""

    version: int

    def cgroups_path(self, tenant: str, container_id: str) -> str:
        """Absolute cgroup path for OCI ``linux.cgroupsPath`` (cgroupfs form)."""
        ...

    def ensure_tenant(self, tenant: str, limits: Limits | None = None) -> None:
        """Create the tenant's parent cgroup; with ``limits``, set tenant-wide caps on it."""
        ...

    def stats(self, tenant: str, container_id: str | None = None) -> CgroupStats:
        """Counters of a container's cgroup (or of the whole tenant with None)."""
        ...

    def exists(self, tenant: str, container_id: str) -> bool: ...

    def remove(self, tenant: str, container_id: str) -> None:
        """Remove a container's cgroup (idempotent; it must hold no processes)."""
        ...

    def remove_tenant(self, tenant: str) -> None:
        """Remove a tenant's parent cgroup once it has no containers (idempotent)."""
        ...

    def remove_all(self) -> None:
        """Remove this agent's whole cgroup subtree (tests and node decommissioning)."""
        ...


def is_unified(root: Path = CGROUP_ROOT) -> bool:
    """True on a pure cgroup v2 host (unified hierarchy mounted at the top)."""
    return (root / "cgroup.controllers").exists()


def driver(config: AgentConfig, root: Path = CGROUP_ROOT) -> CgroupDriver:
    """The driver for this host's cgroup layout."""
    if is_unified(root):
        from runtime_agent.cgroups.v2 import CgroupV2

        return CgroupV2(config.cgroup_parent, root)
    from runtime_agent.cgroups.v1 import CgroupV1

    return CgroupV1(config.cgroup_parent, root)


def remove_tree(path: Path) -> None:
    """rmdir a cgroup directory bottom-up (cgroupfs only lets empty dirs go)."""
    import os

    try:
        os.rmdir(path)  # the usual case, a leaf: one syscall instead of listing it
        return
    except FileNotFoundError:
        return
    except OSError:
        pass  # it has children (or is busy): bottom-up below
    if not path.is_dir():
        return
    for dirpath, dirnames, _files in os.walk(path, topdown=False):
        for name in dirnames:
            try:
                os.rmdir(os.path.join(dirpath, name))
            except FileNotFoundError:
                pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def read_int(path: Path) -> int | None:
    """An integer file ("max" and missing files read as None)."""
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, OSError):
        return None
    if not text or text == "max":
        return None
    return int(text)


def read_keyed(path: Path) -> dict[str, int]:
    """A flat keyed file such as ``cpu.stat`` or ``memory.events`` ("key value" lines)."""
    result: dict[str, int] = {}
    try:
        text = path.read_text()
    except (FileNotFoundError, OSError):
        return result
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            result[parts[0]] = int(parts[1])
    return result
