"""Security defaults for untrusted tenants' containers, applied to an OCI spec dict.

The runtime builds config.json and calls ``apply_security_defaults`` once; everything a
tenant's container is denied lives here:

* Docker's 14 default capabilities (bounding = permitted = effective; nothing inheritable
  or ambient), so root in the container cannot mount, load modules, change the clock, ...
* no-new-privileges: setuid binaries and file capabilities cannot raise privileges.
* Docker's default seccomp profile (``seccomp.default_profile``) for those capabilities.
* Docker's masked paths (bind-mounted over with /dev/null or an empty read-only tmpfs by
  runc) and read-only /proc paths, so /proc/kcore, /proc/keys, /sys/firmware, ... leak
  nothing and /proc/sys cannot be written.
* Only the default device nodes: runc creates null, zero, full, random, urandom, tty,
  console and ptmx itself; the device cgroup denies everything and re-allows just those
  (plus /dev/pts), explicitly denying /dev/fuse (10:229) as Docker does.
* A read-only rootfs on request (``--read-only``).
* Host bind mounts only for privileged callers (operators and the agent itself); a tenant
  asking for one gets ``HostBindNotAllowed``.
* Optionally a user namespace (``UserNamespace``): container root is an unprivileged
  host uid/gid range that belongs to the tenant alone (``IdRangeAllocator``,
  ``apply_user_namespace``, ``shift_ownership``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import os
import re
import secrets
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime_agent.errors import AgentError, InvalidArgument, ResourceExhausted
from runtime_agent.runtime import seccomp

if TYPE_CHECKING:
    from runtime_agent.agent import Agent
    from runtime_agent.config import AgentConfig
    from runtime_agent.protocol import ContainerSpec
    from runtime_agent.snapshots.snapshotter import Snapshotter

DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

# Bit numbers from linux/capability.h, to read CapEff masks back in tests and inspect.
CAPABILITY_BITS: dict[str, int] = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_BROADCAST": 11,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14,
    "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24,
    "CAP_SYS_TIME": 25,
    "CAP_SYS_TTY_CONFIG": 26,
    "CAP_MKNOD": 27,
    "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29,
    "CAP_AUDIT_CONTROL": 30,
    "CAP_SETFCAP": 31,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}

# Paths runc hides: files get /dev/null bind-mounted over them, directories an empty
# read-only tmpfs. Docker's list, plus the per-CPU thermal_throttle dirs found on the host.
BASE_MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
)

READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)


def masked_paths() -> list[str]:
    """Docker's masked paths plus /sys/devices/system/cpu/cpuN/thermal_throttle where present
    (they leak host power state, GHSA-6fw5-f8r9-fgfm)."""
    paths = list(BASE_MASKED_PATHS)
    cpu_root = Path("/sys/devices/system/cpu")
    for cpu in sorted(cpu_root.glob("cpu[0-9]*"), key=lambda p: int(p.name[3:])):
        throttle = cpu / "thermal_throttle"
        if throttle.exists():
            paths.append(str(throttle))
    return paths


def _dev_rule(allow: bool, kind: str | None, major: int | None, minor: int | None) -> dict:
    rule: dict[str, Any] = {"allow": allow, "access": "rwm"}
    if kind is not None:
        rule["type"] = kind
    if major is not None:
        rule["major"] = major
    if minor is not None:
        rule["minor"] = minor
    return rule


# Device cgroup: deny all, then allow the default nodes. Order matters (last match wins in
# runc's emulator), so the deny-all comes first and /dev/fuse is denied explicitly last.
DEFAULT_DEVICE_CGROUP_RULES: tuple[dict[str, Any], ...] = (
    _dev_rule(False, None, None, None),
    _dev_rule(True, "c", 1, 5),  # /dev/zero
    _dev_rule(True, "c", 1, 3),  # /dev/null
    _dev_rule(True, "c", 1, 9),  # /dev/urandom
    _dev_rule(True, "c", 1, 8),  # /dev/random
    _dev_rule(True, "c", 5, 0),  # /dev/tty
    _dev_rule(True, "c", 5, 1),  # /dev/console
    _dev_rule(True, "c", 1, 7),  # /dev/full
    _dev_rule(True, "c", 5, 2),  # /dev/ptmx
    _dev_rule(True, "c", 136, None),  # /dev/pts/*
    _dev_rule(False, "c", 10, 229),  # /dev/fuse
)

# Nodes runc creates in every container's /dev without being asked (runtime-spec
# "default devices"); nothing else appears unless a CDI device is requested.
DEFAULT_DEVICE_NODES: tuple[str, ...] = (
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/console",
    "/dev/ptmx",
)


class HostBindNotAllowed(AgentError):
    """A tenant asked for a host bind mount; only operators and the agent may do that."""

    code = "permission_denied"


def check_host_bind(source: str, target: str, *, privileged_caller: bool) -> None:
    """Refuse a host bind mount unless the caller is privileged.

    Tenants get named volumes and tmpfs; a bind of a host path would let them read or
    write anything on the node.
    """
    if not privileged_caller:
        raise HostBindNotAllowed(
            f"host bind mount {source}:{target} refused: host paths can be mounted only by "
            "privileged callers (operators), never by tenants; use a named volume instead",
            source=source,
            target=target,
        )
    if not os.path.isabs(source):
        raise InvalidArgument(f"bind mount source must be an absolute host path: {source!r}")


@dataclass(frozen=True)
class IdRange:
    """A contiguous host id range: container id 0..size-1 maps to host start..start+size-1."""

    start: int
    size: int = 65536

    def oci_mapping(self) -> list[dict[str, int]]:
        return [{"containerID": 0, "hostID": self.start, "size": self.size}]


def apply_security_defaults(
    spec: dict[str, Any],
    *,
    read_only_rootfs: bool = False,
    capabilities: Iterable[str] = DEFAULT_CAPABILITIES,
    user_namespace: IdRange | None = None,
    userns_path: Path | None = None,
    image_arch: str | None = None,
) -> dict[str, Any]:
    """Harden an OCI runtime spec in place (and return it) for an untrusted tenant.

    Sets capabilities, no-new-privileges, the seccomp profile (for the native ABI, plus
    the compat ABI of an ``image_arch`` image such as ``386``), masked and read-only paths,
    the device allow-list, the read-only rootfs flag and, with ``user_namespace``, a user
    namespace mapping container root to the tenant's host id range (joined at
    ``userns_path``, the tenant's kept namespace, when given: ``tenant_userns``).
    """
    caps = list(dict.fromkeys(capabilities))
    unknown = [cap for cap in caps if cap not in CAPABILITY_BITS]
    if unknown:
        raise InvalidArgument(f"unknown capabilities: {', '.join(unknown)}")
    process = spec.setdefault("process", {})
    process["capabilities"] = {
        "bounding": list(caps),
        "effective": list(caps),
        "permitted": list(caps),
        "inheritable": [],
        "ambient": [],
    }
    process["noNewPrivileges"] = True

    spec.setdefault("root", {})["readonly"] = bool(read_only_rootfs)

    linux = spec.setdefault("linux", {})
    linux["maskedPaths"] = masked_paths()
    linux["readonlyPaths"] = list(READONLY_PATHS)
    linux["devices"] = [
        d for d in linux.get("devices", []) if d.get("path") not in DEFAULT_DEVICE_NODES
    ]
    resources = linux.setdefault("resources", {})
    extra_rules = [r for r in resources.get("devices", []) if r.get("allow")]
    resources["devices"] = [dict(rule) for rule in DEFAULT_DEVICE_CGROUP_RULES] + extra_rules
    linux["seccomp"] = seccomp.default_profile(caps, image_arch=image_arch)

    if user_namespace is not None:
        apply_user_namespace(spec, user_namespace, userns_path)
    return spec


def apply_user_namespace(
    spec: dict[str, Any], ids: IdRange, path: Path | None = None
) -> dict[str, Any]:
    """Run the container in a new user namespace: container uid/gid 0 is host ``ids.start``.

    Capabilities then only count inside the namespace, and a process that escapes is an
    unprivileged host user. The rootfs and volumes must look owned by the mapped ids
    (``idmap_snapshot``, ``VolumeManager.oci_mounts(user_namespace=...)``).

    Call it after the spec's namespaces are final: a fresh sysfs can only be mounted by
    a user namespace that owns the container's network namespace. With ``path`` (the
    tenant's kept user namespace, ``tenant_userns``, which owns the netns the network
    subsystem made) it does, and /sys is the container's own (its interfaces only).
    When the spec joins a network namespace made beforehand without joining the user
    namespace owning it, /sys is instead the host's sysfs bound recursively read-only,
    as Docker does in rootless mode; the masked paths still apply.
    """
    linux = spec.setdefault("linux", {})
    namespaces = [ns for ns in linux.get("namespaces", []) if ns.get("type") != "user"]
    namespaces.append({"type": "user", "path": str(path)} if path else {"type": "user"})
    linux["namespaces"] = namespaces
    linux["uidMappings"] = ids.oci_mapping()
    linux["gidMappings"] = ids.oci_mapping()
    joins_netns = any(ns.get("type") == "network" and ns.get("path") for ns in namespaces)
    if joins_netns and path is None:
        for index, mount in enumerate(spec.get("mounts") or []):
            if mount.get("destination") == "/sys" and mount.get("type") == "sysfs":
                spec["mounts"][index] = {
                    "destination": "/sys",
                    "type": "bind",
                    "source": "/sys",
                    "options": ["rbind", "rro", "nosuid", "noexec", "nodev"],
                }
    return spec


# --- per-tenant id ranges ------------------------------------------------------------------

FIRST_HOST_ID = 1_000_000  # above any distro's regular and /etc/subuid ranges by default
RANGE_SIZE = 65536
MAX_HOST_ID = 2**32 - 2  # 4294967295 is the invalid id (-1)

_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class IdRangeAllocator:
    """Hands out one 65536-id host range per tenant, persisted, never overlapping.

    State is a /etc/subuid-style file (``tenant:start:count`` per line) under the agent's
    root, updated under an flock and replaced atomically, so concurrent agents processes
    agree and a crash never leaves a half-written table. Ranges that overlap the host's
    own /etc/subuid and /etc/subgid entries are skipped.
    """

    def __init__(
        self,
        state_file: Path,
        *,
        first_id: int = FIRST_HOST_ID,
        host_tables: Iterable[Path] = (Path("/etc/subuid"), Path("/etc/subgid")),
    ) -> None:
        self.state_file = state_file
        self.first_id = first_id
        self.host_tables = tuple(host_tables)

    def get(self, tenant: str) -> IdRange | None:
        return self._read().get(tenant)

    def allocate(self, tenant: str) -> IdRange:
        """The tenant's range, allocating the lowest free one on first use."""
        if not _TENANT_RE.match(tenant):
            raise InvalidArgument(f"invalid tenant name {tenant!r}")
        with self._locked():
            table = self._read()
            if tenant in table:
                return table[tenant]
            taken = sorted(
                [(r.start, r.start + r.size) for r in table.values()] + self._host_ranges()
            )
            start = self.first_id
            for lo, hi in taken:
                if start + RANGE_SIZE <= lo:
                    break
                start = max(start, hi)
            if start + RANGE_SIZE > MAX_HOST_ID:
                raise ResourceExhausted("no free host id range left for a user namespace")
            table[tenant] = IdRange(start, RANGE_SIZE)
            self._write(table)
            return table[tenant]

    def release(self, tenant: str) -> None:
        with self._locked():
            table = self._read()
            if table.pop(tenant, None) is not None:
                self._write(table)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.state_file.with_suffix(".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, IdRange]:
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return {}
        return {name: IdRange(start, size) for name, start, size in _parse_subid(text)}

    def _write(self, table: dict[str, IdRange]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        lines = [f"{name}:{r.start}:{r.size}\n" for name, r in sorted(table.items())]
        with open(tmp, "w") as fh:
            fh.writelines(lines)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_file)

    def _host_ranges(self) -> list[tuple[int, int]]:
        ranges = []
        for table in self.host_tables:
            try:
                text = table.read_text()
            except OSError:
                continue
            ranges += [(start, start + size) for _, start, size in _parse_subid(text)]
        return ranges


def _parse_subid(text: str) -> list[tuple[str, int, int]]:
    entries = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            continue
        entries.append((parts[0], int(parts[1]), int(parts[2])))
    return entries


def ensure_traversable(path: Path) -> None:
    """Give every ancestor of ``path`` the search (x) bit for others.

    Inside a user namespace container root is an unprivileged host user, and runc's init
    (already inside the namespace) must walk down to the rootfs; a 0700 directory on the
    way (e.g. a state root) makes that fail with "permission denied". Search without read
    lets it pass through without listing anything.
    """
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & 0o001:
            directory.chmod((mode & 0o7777) | 0o001)


def shift_ownership(root: Path, ids: IdRange) -> None:
    """Re-own a tree for a user namespace: host id n becomes ids.start + n.

    Used on a container's own writable copy (never on shared layers). Ids outside the
    range (n >= ids.size) are mapped to the range's overflow id so nothing stays owned by
    a real host user. Symlinks are re-owned themselves, not followed.
    """
    top = ids.size - 1

    def shifted(n: int) -> int:
        if ids.start <= n < ids.start + ids.size:
            return n  # already shifted (idempotent after a crash)
        return ids.start + min(n, top)

    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, None]:
            path = dirpath if name is None else os.path.join(dirpath, name)
            st = os.lstat(path)
            mode = st.st_mode
            os.lchown(path, shifted(st.st_uid), shifted(st.st_gid))
            # chown clears setuid/setgid bits on regular files; put them back.
            if not os.path.islink(path) and mode & 0o6000:
                os.chmod(path, mode & 0o7777)


def capability_mask(caps: Iterable[str]) -> int:
    """The CapEff-style bit mask of a capability set (e.g. 0xa80425fb for Docker's 14)."""
    mask = 0
    for cap in caps:
        mask |= 1 << CAPABILITY_BITS[cap]
    return mask


# --- idmapped mounts: a user-namespaced container's view of unshifted files ---------------
#
# Shared image layers and the upper dir stay owned by host root on disk (so layers are
# shared between tenants and Snapshotter.diff works unchanged). The container instead sees
# them through idmapped mounts (Linux 5.12+), where on-disk id n appears as
# ids.start + n. overlayfs itself cannot be idmapped (EINVAL), but since 5.19 it accepts
# idmapped layers, so each lower and the upper/work parent are idmapped and a fresh
# overlay is mounted over those. overlayfs takes private clones of its layers, so the
# helper mounts are detached right after and nothing extra stays in the mount table.
#
# overlayfs creates its work dir and does copy-ups with the mounter's (host root's)
# credentials, which an idmapping of just 0..65535 cannot represent (EOVERFLOW, the
# overlay falls back to read-only). So the mount's user namespace also maps host root to
# on-disk id 65536, an id nothing in the container can own: only overlayfs's internal
# work/work directory ends up with it.

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 0x1
_OPEN_TREE_CLOEXEC = 0o2000000
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x00100000
_MNT_DETACH = 2
_CLONE_NEWUSER = 0x10000000


class IdmapError(AgentError):
    """An idmapped mount could not be made (kernel or filesystem without support)."""

    code = "idmap_failed"


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _syscall_check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise IdmapError(f"{what} failed: {os.strerror(err)}", errno=err)
    return result


@contextlib.contextmanager
def _new_userns(mapping: str, *, setgroups: str) -> Iterator[int]:
    """A new user namespace with ``mapping`` (uid_map = gid_map format), alive while the
    context lasts: yields the pid of the (forked, waiting) process inside it."""
    from runtime_agent.namespaces import held_namespaces

    with contextlib.ExitStack() as stack:
        try:
            pid = stack.enter_context(
                held_namespaces(lambda: _libc.unshare(_CLONE_NEWUSER) == 0, "unshare")
            )
        except OSError as exc:
            raise IdmapError(f"cannot create a user namespace: {exc}") from exc
        Path(f"/proc/{pid}/uid_map").write_text(mapping)
        Path(f"/proc/{pid}/setgroups").write_text(setgroups)
        Path(f"/proc/{pid}/gid_map").write_text(mapping)
        yield pid


@contextlib.contextmanager
def _userns_fd(ids: IdRange) -> Iterator[int]:
    """An fd of a throw-away user namespace mapping on-disk 0..size-1 to the tenant's range
    (and on-disk ``size`` to host root, for overlayfs's own work files)."""
    mapping = f"0 {ids.start} {ids.size}\n{ids.size} 0 1\n"
    with _new_userns(mapping, setgroups="deny") as pid:
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


_MS_BIND = 4096


def tenant_userns(config: AgentConfig, tenant: str) -> Path:
    """The tenant's user namespace on this node, bound at ``<run_root>/userns/<tenant>``.

    Container uid/gid 0..65535 are the tenant's host range (``tenant_id_range``). Every
    user-namespaced container and build step of the tenant joins it, and the tenant's
    network namespaces are made inside it (``network.netns.create_netns(userns=...)``):
    a netns belongs to the user namespace it was made in, and ``runc exec`` (runc 1.1)
    enters a container's user namespace before its netns, which it may then only do if
    that user namespace owns the netns. The bind mount keeps the namespace with no
    process in it; after a reboot it is made again with the same (persistent) range.
    """
    path = config.run_root / "userns" / tenant
    if _is_ns_mount(path):
        return path
    ids = tenant_id_range(config, tenant)
    with _file_lock(path.parent / ".lock"):
        if not _is_ns_mount(path):
            path.parent.chmod(0o711)
            path.touch(mode=0o444)
            with _new_userns(f"0 {ids.start} {ids.size}\n", setgroups="allow") as pid:
                source = f"/proc/{pid}/ns/user".encode()
                if _libc.mount(source, str(path).encode(), None, ctypes.c_ulong(_MS_BIND), None):
                    err = ctypes.get_errno()
                    raise IdmapError(f"keeping the user namespace of {tenant}: {os.strerror(err)}")
    return path


def release_user_namespaces(config: AgentConfig) -> None:
    """Unbind every tenant user namespace this agent kept (decommissioning, tests); the
    kernel frees each once no container or netns uses it. Idempotent."""
    directory = config.run_root / "userns"
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if _is_ns_mount(path):
            _libc.umount2(str(path).encode(), _MNT_DETACH)
        with contextlib.suppress(OSError):
            path.unlink()


def _is_ns_mount(path: Path) -> bool:
    """Whether a namespace is bound at ``path`` (an nsfs file: not the directory's device);
    one stat each, cheap enough for every container start."""
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An flock between agent processes (the CLI server's children, the worker)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


_idmap_fds: dict[IdRange, int] = {}
_idmap_lock = threading.Lock()


def _idmap_userns(ids: IdRange) -> int:
    """This process's kept fd of the idmapping user namespace for ``ids`` (``_userns_fd``):
    made once per tenant, since a fork per idmapped mount costs the agent ~3 ms each."""
    with _idmap_lock:
        fd = _idmap_fds.get(ids)
        if fd is None:
            with _userns_fd(ids) as made:
                fd = _idmap_fds[ids] = os.dup(made)
        return fd


def idmapped_bind(source: Path, target: Path, ids: IdRange) -> None:
    """Bind ``source`` at ``target`` (recursively) with on-disk id n shown as start + n."""
    ns_fd = _idmap_userns(ids)
    tree = _syscall_check(
        _libc.syscall(
            _SYS_OPEN_TREE,
            ctypes.c_int(_AT_FDCWD),
            str(source).encode(),
            ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_RECURSIVE),
        ),
        f"cloning {source}",
    )
    try:
        attr = _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, ns_fd)
        _syscall_check(
            _libc.syscall(
                _SYS_MOUNT_SETATTR,
                ctypes.c_int(tree),
                b"",
                ctypes.c_uint(_AT_EMPTY_PATH | _AT_RECURSIVE),
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            ),
            f"idmapping {source}",
        )
        _syscall_check(
            _libc.syscall(
                _SYS_MOVE_MOUNT,
                ctypes.c_int(tree),
                b"",
                ctypes.c_int(_AT_FDCWD),
                str(target).encode(),
                ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
            ),
            f"attaching the idmapped {source} at {target}",
        )
    finally:
        os.close(tree)


def _detach(target: Path) -> None:
    _libc.umount2(str(target).encode(), _MNT_DETACH)


def mount_idmapped_overlay(
    lowers: Sequence[Path],
    upper: Path | None,
    work: Path | None,
    target: Path,
    ids: IdRange,
    scratch_root: Path,
    *,
    volatile: bool = False,
) -> None:
    """Mount an overlay at ``target`` whose layers are idmapped for ``ids`` (``volatile``:
    see ``mount.mount_overlay``).

    ``upper`` and ``work`` must share a parent (one mount is idmapped for both). Helper
    mounts live briefly under ``scratch_root`` and are detached before returning, on
    failure too.
    """
    from runtime_agent.snapshots.mount import mount_overlay

    if (upper is None) != (work is None) or (upper and work and upper.parent != work.parent):
        raise InvalidArgument("upper and work dirs must be given together, in one parent")
    scratch = scratch_root / f"idmap-{secrets.token_hex(6)}"
    scratch.mkdir(parents=True)
    attached: list[Path] = []
    try:
        mapped_lowers = []
        for index, lower in enumerate(lowers):
            point = scratch / f"l{index}"
            point.mkdir()
            idmapped_bind(lower, point, ids)
            attached.append(point)
            mapped_lowers.append(point)
        mapped_upper = mapped_work = None
        if upper is not None and work is not None:
            point = scratch / "rw"
            point.mkdir()
            idmapped_bind(upper.parent, point, ids)
            attached.append(point)
            mapped_upper, mapped_work = point / upper.name, point / work.name
        mount_overlay(mapped_lowers, mapped_upper, mapped_work, target, volatile=volatile)
    finally:
        for point in reversed(attached):
            _detach(point)
        for point in attached:
            with contextlib.suppress(OSError):
                point.rmdir()
        with contextlib.suppress(OSError):
            scratch.rmdir()


def idmap_snapshot(
    snapshotter: Snapshotter,
    key: str,
    ids: IdRange,
    scratch_root: Path,
    *,
    volatile: bool = False,
) -> Path:
    """Re-mount a prepared snapshot's rootfs so a user-namespaced container owns it.

    The snapshot's plain overlay is replaced in place by one over idmapped layers; on disk
    nothing changes, so the layers stay shared and ``diff`` still sees real ids. Call it
    after every ``prepare`` of a user-namespaced container (prepare re-mounts plainly
    after a reboot). Returns the rootfs path.

    Prepare the plain overlay volatile: unmounting a non-volatile one syncs the whole
    disk under the state directory (see ``mount.mount_overlay``), a cost paid here for
    nothing, since the container hasn't written yet. The volatile mount's marker is then
    removed and the idmapped overlay is volatile only if ``volatile`` (``--rm``).
    """
    from runtime_agent.snapshots.mount import unmount, volatile_marker
    from runtime_agent.snapshots.tree import remove_tree

    info = snapshotter.get(key)
    lowers = [snapshotter.layer_path(chain_id) for chain_id in reversed(info.chain_ids)]
    if not lowers:
        lowers = [snapshotter.empty_dir]
    upper: Path | None = info.upper
    work: Path | None = info.upper.parent / "work"
    if not info.upper.is_dir():  # a read-only snapshot: lowers only
        upper = work = None
        if len(lowers) == 1:
            lowers = [*lowers, snapshotter.empty_dir]
    unmount(info.path)
    if work is not None and volatile_marker(work).exists():
        remove_tree(volatile_marker(work))
    mount_idmapped_overlay(lowers, upper, work, info.path, ids, scratch_root, volatile=volatile)
    ensure_traversable(info.path)
    return info.path


def tenant_id_range(config: AgentConfig, tenant: str) -> IdRange:
    """The tenant's host id range on this node, allocated on first use and kept in the
    agent's state (``<root>/userns/subids``), so a restarted agent, or one after a reboot,
    maps the tenant's containers, build steps and volumes exactly as before."""
    return IdRangeAllocator(config.root / "userns" / "subids").allocate(tenant)


def tenant_container_spec(config: AgentConfig, spec: ContainerSpec) -> ContainerSpec:
    """The spec the node runs for a container the control plane asked for on a tenant's
    behalf.

    Such a container always runs in a user namespace, unless the node's operator opted
    out (``AgentConfig.tenant_userns``, ``BERTH_TENANT_USERNS=0``), and never with a
    privileged caller's rights (host binds, host network): what the payload says about
    either is ignored, so no field of a tenant's request can turn them on or off.
    """
    return dataclasses.replace(spec, user_namespace=config.tenant_userns, privileged_caller=False)


def user_namespace_for(
    agent: Agent, tenant: str, snapshot_key: str, *, volatile: bool = False
) -> IdRange:
    """Everything a user-namespaced container needs before its spec is written.

    Allocates (or looks up) the tenant's host id range and re-mounts the container's
    prepared snapshot (best prepared volatile, see ``idmap_snapshot``; ``volatile``
    says whether the container's rootfs is) over idmapped layers. The runtime then
    passes the returned range to ``VolumeManager.oci_mounts(user_namespace=...,
    idmap_dir=...)`` and
    ``apply_security_defaults(user_namespace=...)``, and must keep the container's own
    directory (bundle, /etc files) traversable (``ensure_traversable``).
    """
    ids = tenant_id_range(agent.config, tenant)
    idmap_snapshot(
        agent.snapshots, snapshot_key, ids, agent.config.run_root / "idmap", volatile=volatile
    )
    return ids
