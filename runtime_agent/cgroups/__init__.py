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

import re
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
        """Create the tenant's parent cgroup; with ``limits``, set tenant-wide caps on it.

        A tenant whose parent has no pids cap (just created, or never given one) gets the
        driver's default: all of its containers together can never take the node's pids.
        """
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

        return CgroupV2(config.cgroup_parent, root, config.tenant_pids_max)
    from runtime_agent.cgroups.v1 import CgroupV1

    return CgroupV1(config.cgroup_parent, root, config.tenant_pids_max)


def default_pids(pids_dir: Path, default: int | None) -> None:
    """Cap a tenant's parent cgroup at ``default`` pids unless it has a cap already
    (``pids.max`` reads "max"): what ``set_tenant_limits`` gave it is kept."""
    if default is not None and read_int(pids_dir / "pids.max") is None:
        (pids_dir / "pids.max").write_text(str(default))


FAVOR_DYNMODS = "favordynmods"
_host_tuned: str | None = None  # what tune_host() found or did, once per process


def tune_host(config: AgentConfig) -> str | None:
    """Node-wide cgroup set-up, once per process (a served command inherits the
    server's): ``favordynmods`` unless ``BERTH_CGROUP_FAVORDYNMODS=0``. Returns why it
    couldn't be set, for the daemons' logs; None when it is on (or turned off)."""
    global _host_tuned
    if not config.cgroup_favordynmods:
        return None
    if _host_tuned is None:
        _host_tuned = favor_dynamic_moves()
    return None if _host_tuned in ("on", "enabled") else _host_tuned


def favor_dynamic_moves(mountpoint: str | None = None) -> str:
    """Remount the cgroup2 hierarchy with ``favordynmods`` (Linux 6.0+).

    Every container start moves runc's init process into the container's cgroups, and
    every ``exec`` moves its process. Moving a process write-locks a kernel lock shared
    by all cgroup hierarchies, v1 and v2 alike, and by default that lock is built for
    cheap forks: the first move after a quiet spell blocks until an RCU grace period
    has passed. Measured here: 5-13 ms for the first ``cgroup.procs`` write of a
    container start, 0.1 ms with the option; ``docker run`` got ~50 ms faster too. The
    kernel's documented price is slower forks and exits. Since the lock is shared,
    the option on the v2 hierarchy (on a hybrid host the one at
    /sys/fs/cgroup/unified) speeds up moves in v1 hierarchies as well. Some kernels
    (6.18 here) keep the faster moves until reboot once the option was set.

    util-linux ``mount -o remount`` keeps the mount's other options (``nsdelegate``,
    ``memory_recursiveprot``, ``nosuid``...), which a bare mount(2) would drop.

    Returns ``"on"`` (set already), ``"enabled"`` (set now), or why it couldn't be set
    (no cgroup2 mount, or the kernel's or mount's refusal).
    """
    import subprocess

    mounts = cgroup2_mounts()
    if mountpoint is None:
        preferred = [m for m in mounts if m[0] in (str(CGROUP_ROOT), f"{CGROUP_ROOT}/unified")]
        if not (preferred or mounts):
            return "no cgroup2 hierarchy is mounted"
        mountpoint = (preferred or mounts)[0][0]
    options = dict(mounts).get(mountpoint)
    if options is None:
        return f"{mountpoint} is not a cgroup2 mount"
    if FAVOR_DYNMODS in options:
        return "on"
    result = subprocess.run(
        ["mount", "-o", f"remount,{FAVOR_DYNMODS}", mountpoint],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return (result.stderr.strip() or f"mount exited with {result.returncode}").splitlines()[0]
    return "enabled"


def cgroup2_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, set[str]]]:
    """(mount point, superblock options) of each cgroup2 mount, in mount order."""
    found = []
    with open(mountinfo) as fh:
        for line in fh:
            head, sep, tail = line.partition(" - ")
            fields = tail.split()
            if not sep or len(fields) < 3 or fields[0] != "cgroup2":
                continue
            point = head.split()[4]
            # mountinfo escapes space, tab, newline and backslash as octal (\040)
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
            found.append((point, set(fields[2].split(","))))
    return found


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
