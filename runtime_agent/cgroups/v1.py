"""cgroup v1: one hierarchy per controller under /sys/fs/cgroup/<controller>/."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from runtime_agent.cgroups import CgroupStats, default_pids, read_int, read_keyed, remove_tree

if TYPE_CHECKING:
    from runtime_agent.protocol import Limits

# v1 reports "no limit" as a page-aligned LONG_MAX; anything this large is unlimited.
UNLIMITED_THRESHOLD = 1 << 62
CFS_PERIOD_US = 100_000


class CgroupV1:
    version = 1

    def __init__(self, parent: str, root: Path, tenant_pids: int | None = None) -> None:
        self.parent = parent
        self.root = root
        self.tenant_pids = tenant_pids  # a tenant parent's pids.max unless told otherwise
        self._found: list[Path] = []

    def cgroups_path(self, tenant: str, container_id: str) -> str:
        return f"/{self.parent}/{tenant}/{container_id}"

    def _rel(self, tenant: str, container_id: str | None = None) -> str:
        rel = f"{self.parent}/{tenant}"
        return f"{rel}/{container_id}" if container_id else rel

    def _hierarchies(self) -> list[Path]:
        """Each mounted hierarchy once (``cpu`` and ``cpuacct`` may be one mount).

        Includes the hybrid layout's ``unified`` (v2) tree: runc makes the container's
        path there too, so removal must cover it. Looked up once per driver (the mounts
        don't change under a running agent; every container removal asks).
        """
        if not self._found:
            self._found = self._find_hierarchies()
        return list(self._found)

    def _find_hierarchies(self) -> list[Path]:
        seen: set[str] = set()
        result = []
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        for name in entries:
            path = self.root / name
            real = os.path.realpath(path)
            if real in seen or not path.is_dir():
                continue
            seen.add(real)
            result.append(path)
        return result

    def ensure_tenant(self, tenant: str, limits: Limits | None = None) -> None:
        rel = self._rel(tenant)
        for controller in ("memory", "cpu", "pids"):
            (self.root / controller / rel).mkdir(parents=True, exist_ok=True)
        if limits is None or limits.pids is None:
            default_pids(self.root / "pids" / rel, self.tenant_pids)
        if limits is None:
            return
        memory = self.root / "memory" / rel
        cpu = self.root / "cpu" / rel
        pids = self.root / "pids" / rel
        if limits.memory_bytes is not None:
            # memsw must stay >= limit: raise the order of writes depending on direction.
            current = read_int(memory / "memory.limit_in_bytes") or 0
            pairs = [
                ("memory.limit_in_bytes", limits.memory_bytes),
                ("memory.memsw.limit_in_bytes", limits.memory_bytes),
            ]
            if limits.memory_bytes > current:
                pairs.reverse()
            for name, value in pairs:
                if (memory / name).exists():
                    (memory / name).write_text(str(value))
        if limits.cpus is not None:
            (cpu / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (cpu / "cpu.cfs_quota_us").write_text(str(round(limits.cpus * CFS_PERIOD_US)))
        if limits.cpu_shares is not None:
            (cpu / "cpu.shares").write_text(str(limits.cpu_shares))
        if limits.pids is not None:
            (pids / "pids.max").write_text(str(limits.pids))

    def exists(self, tenant: str, container_id: str) -> bool:
        rel = self._rel(tenant, container_id)
        return any((h / rel).is_dir() for h in self._hierarchies())

    def stats(self, tenant: str, container_id: str | None = None) -> CgroupStats:
        rel = self._rel(tenant, container_id)
        memory = self.root / "memory" / rel
        limit = read_int(memory / "memory.limit_in_bytes")
        if limit is not None and limit >= UNLIMITED_THRESHOLD:
            limit = None
        read_bytes, write_bytes = parse_blkio_bytes(
            self.root / "blkio" / rel / "blkio.throttle.io_service_bytes_recursive"
        )
        pids_max = read_int(self.root / "pids" / rel / "pids.max")
        return CgroupStats(
            cpu_seconds=(read_int(self.root / "cpuacct" / rel / "cpuacct.usage") or 0) / 1e9,
            memory_bytes=read_int(memory / "memory.usage_in_bytes") or 0,
            memory_limit_bytes=limit,
            io_read_bytes=read_bytes,
            io_write_bytes=write_bytes,
            pids=read_int(self.root / "pids" / rel / "pids.current") or 0,
            pids_limit=pids_max,
            oom_kills=read_keyed(memory / "memory.oom_control").get("oom_kill", 0),
        )

    def remove(self, tenant: str, container_id: str) -> None:
        rel = self._rel(tenant, container_id)
        for hierarchy in self._hierarchies():
            remove_tree(hierarchy / rel)

    def remove_tenant(self, tenant: str) -> None:
        rel = self._rel(tenant)
        for hierarchy in self._hierarchies():
            try:
                os.rmdir(hierarchy / rel)
            except (FileNotFoundError, OSError):
                pass

    def remove_all(self) -> None:
        for hierarchy in self._hierarchies():
            remove_tree(hierarchy / self.parent)


def parse_blkio_bytes(path: Path) -> tuple[int, int]:
    """(read, write) byte totals from a ``blkio.*io_service_bytes*`` file."""
    read_total = write_total = 0
    try:
        text = path.read_text()
    except (FileNotFoundError, OSError):
        return 0, 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        if parts[1] == "Read":
            read_total += int(parts[2])
        elif parts[1] == "Write":
            write_total += int(parts[2])
    return read_total, write_total
