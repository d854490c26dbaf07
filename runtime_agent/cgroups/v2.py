"""cgroup v2: the unified hierarchy at /sys/fs/cgroup (controllers enabled top-down)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from runtime_agent.cgroups import CgroupStats, default_pids, read_int, read_keyed, remove_tree

if TYPE_CHECKING:
    from runtime_agent.protocol import Limits

CPU_PERIOD_US = 100_000
WANTED_CONTROLLERS = ("cpu", "io", "memory", "pids")


class CgroupV2:
    version = 2

    def __init__(self, parent: str, root: Path, tenant_pids: int | None = None) -> None:
        self.parent = parent
        self.root = root
        self.tenant_pids = tenant_pids  # a tenant parent's pids.max unless told otherwise

    def cgroups_path(self, tenant: str, container_id: str) -> str:
        return f"/{self.parent}/{tenant}/{container_id}"

    def _dir(self, tenant: str, container_id: str | None = None) -> Path:
        path = self.root / self.parent / tenant
        return path / container_id if container_id else path

    def _enable_controllers(self, path: Path) -> None:
        """Delegate the controllers we use from ``path`` to its children."""
        available = set((path / "cgroup.controllers").read_text().split())
        enabled = set((path / "cgroup.subtree_control").read_text().split())
        missing = [c for c in WANTED_CONTROLLERS if c in available and c not in enabled]
        if missing:
            (path / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))

    def ensure_tenant(self, tenant: str, limits: Limits | None = None) -> None:
        tenant_dir = self._dir(tenant)
        current = self.root
        for part in (self.parent, tenant):
            self._enable_controllers(current)
            current = current / part
            current.mkdir(exist_ok=True)
        self._enable_controllers(tenant_dir)
        if limits is None or limits.pids is None:
            default_pids(tenant_dir, self.tenant_pids)
        if limits is None:
            return
        if limits.memory_bytes is not None:
            (tenant_dir / "memory.max").write_text(str(limits.memory_bytes))
            if (tenant_dir / "memory.swap.max").exists():
                (tenant_dir / "memory.swap.max").write_text("0")
        if limits.cpus is not None:
            quota = round(limits.cpus * CPU_PERIOD_US)
            (tenant_dir / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        if limits.cpu_shares is not None:
            (tenant_dir / "cpu.weight").write_text(str(shares_to_weight(limits.cpu_shares)))
        if limits.pids is not None:
            (tenant_dir / "pids.max").write_text(str(limits.pids))

    def exists(self, tenant: str, container_id: str) -> bool:
        return self._dir(tenant, container_id).is_dir()

    def stats(self, tenant: str, container_id: str | None = None) -> CgroupStats:
        path = self._dir(tenant, container_id)
        read_bytes, write_bytes = parse_io_stat(path / "io.stat")
        return CgroupStats(
            cpu_seconds=read_keyed(path / "cpu.stat").get("usage_usec", 0) / 1e6,
            memory_bytes=read_int(path / "memory.current") or 0,
            memory_limit_bytes=read_int(path / "memory.max"),
            io_read_bytes=read_bytes,
            io_write_bytes=write_bytes,
            pids=read_int(path / "pids.current") or 0,
            pids_limit=read_int(path / "pids.max"),
            oom_kills=read_keyed(path / "memory.events").get("oom_kill", 0),
        )

    def remove(self, tenant: str, container_id: str) -> None:
        remove_tree(self._dir(tenant, container_id))

    def remove_tenant(self, tenant: str) -> None:
        try:
            os.rmdir(self._dir(tenant))
        except (FileNotFoundError, OSError):
            pass

    def remove_all(self) -> None:
        remove_tree(self.root / self.parent)


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares (2..262144) to v2 cpu.weight (1..10000), as runc converts."""
    return 1 + ((shares - 2) * 9999) // 262142


def parse_io_stat(path: Path) -> tuple[int, int]:
    """(read, write) byte totals over all devices of an ``io.stat`` file.

    Lines look like ``8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0``.
    """
    read_total = write_total = 0
    try:
        text = path.read_text()
    except (FileNotFoundError, OSError):
        return 0, 0
    for line in text.splitlines():
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            if key == "rbytes":
                read_total += int(value)
            elif key == "wbytes":
                write_total += int(value)
    return read_total, write_total
