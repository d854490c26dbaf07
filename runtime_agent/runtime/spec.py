"""The OCI runtime config (config.json) of a container, built the way docker builds it.

Inputs: the ``ContainerSpec`` (what the caller asked for), the image's config (its
Entrypoint/Cmd/Env/WorkingDir/User/StopSignal defaults) and the mounted rootfs (for user
and command lookups). Security hardening (capabilities, seccomp, masked paths, device
rules) is applied afterwards by ``runtime.security.apply_security_defaults``.

Everything the rootfs says is untrusted: files in it are opened through ``resolve_in_root``
so a symlinked /etc/passwd or command can never point the agent at the host's files.
"""

from __future__ import annotations

import os
import resource
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from runtime_agent.errors import CommandNotFound, CommandNotRunnable, InvalidArgument
from runtime_agent.protocol import ContainerSpec, Limits

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CFS_PERIOD_US = 100_000
MIN_MEMORY_BYTES = 6 * 1024 * 1024  # docker's minimum
MAX_NOFILE = 1_048_576  # docker's default; capped by the host's hard limit below
SIGNALS = {
    "HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "BUS": 7, "FPE": 8,
    "KILL": 9, "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14, "TERM": 15,
    "STKFLT": 16, "CHLD": 17, "CONT": 18, "STOP": 19, "TSTP": 20, "TTIN": 21, "TTOU": 22,
    "URG": 23, "XCPU": 24, "XFSZ": 25, "VTALRM": 26, "PROF": 27, "WINCH": 28, "IO": 29,
    "PWR": 30, "SYS": 31,
}  # fmt: skip


def parse_signal(value: str | int | None, default: int = 15) -> int:
    """ "SIGTERM", "TERM", "15" or 15 -> 15; None -> ``default``."""
    if value is None or value == "":
        return default
    if isinstance(value, int):
        number = value
    elif str(value).isdigit():
        number = int(value)
    else:
        name = str(value).upper().removeprefix("SIG")
        if name not in SIGNALS:
            raise InvalidArgument(f"invalid signal {value!r}")
        number = SIGNALS[name]
    if not 1 <= number <= 64:
        raise InvalidArgument(f"invalid signal {value!r}")
    return number


def validate_limits(limits: Limits, host_cpus: int | None = None) -> None:
    """Refuse values docker refuses, with the reason, before anything is created."""
    cpus = host_cpus or os.cpu_count() or 1
    if limits.cpus is not None and not (0.01 <= limits.cpus <= cpus):
        raise InvalidArgument(
            f"invalid --cpus {limits.cpus}: range of CPUs is from 0.01 to {cpus}.00, "
            "as there are only {cpus} CPUs available".replace("{cpus}", str(cpus))
        )
    if limits.memory_bytes is not None and limits.memory_bytes < MIN_MEMORY_BYTES:
        raise InvalidArgument(
            f"invalid --memory {limits.memory_bytes}: minimum memory limit allowed is 6MB"
        )
    if limits.cpu_shares is not None and not (2 <= limits.cpu_shares <= 262144):
        raise InvalidArgument(f"invalid --cpu-shares {limits.cpu_shares}: range is 2 to 262144")
    if limits.pids is not None and limits.pids < 1:
        raise InvalidArgument(f"invalid --pids-limit {limits.pids}: must be at least 1")
    for name in ("device_read_bps", "device_write_bps", "device_read_iops", "device_write_iops"):
        value = getattr(limits, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise InvalidArgument(f"invalid {flag} {value}: must be a positive number")


# --------------------------------------------------------------------------- rootfs lookups


def resolve_in_root(root: Path, path: str, *, max_links: int = 40) -> Path:
    """Join ``path`` onto ``root`` following symlinks as if ``root`` were ``/``.

    Absolute and ``..``-climbing symlinks stay inside ``root`` (like chroot would see
    them), so a hostile image cannot make the agent read or stat host files.
    """
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", "", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            st = os.lstat(candidate)
        except OSError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > max_links:
                raise InvalidArgument(f"too many levels of symbolic links in {path!r}")
            target = os.readlink(candidate)
            target_parts = [p for p in PurePosixPath(target).parts if p not in ("", ".")]
            if target.startswith("/"):
                resolved = []
                target_parts = target_parts[1:]
            parts = target_parts + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def _read_db(root: Path, name: str) -> list[list[str]]:
    path = resolve_in_root(root, name)
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read(1 << 20)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...]
    home: str


def lookup_user(root: Path, user: str | None) -> ResolvedUser:
    """docker's ``-u user[:group]``: names looked up in the image's /etc/passwd and /etc/group.

    Numeric ids need no entry (a missing one gets gid = uid's entry or 0, home /).
    """
    user = (user or "").strip()
    if not user:
        user = "0"
    user_part, _, group_part = user.partition(":")
    passwd = _read_db(root, "/etc/passwd")
    entry: list[str] | None = None
    if user_part.isdigit():
        uid = int(user_part)
        entry = next((e for e in passwd if len(e) >= 4 and e[2] == user_part), None)
    else:
        entry = next((e for e in passwd if len(e) >= 4 and e[0] == user_part), None)
        if entry is None:
            raise InvalidArgument(
                f"unable to find user {user_part}: no matching entries in passwd file"
            )
        uid = int(entry[2])
    gid = int(entry[3]) if entry and entry[3].isdigit() else 0
    home = entry[5] if entry and len(entry) >= 6 and entry[5] else "/"
    groups = _read_db(root, "/etc/group")
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            gentry = next((g for g in groups if len(g) >= 3 and g[0] == group_part), None)
            if gentry is None or not gentry[2].isdigit():
                raise InvalidArgument(
                    f"unable to find group {group_part}: no matching entries in group file"
                )
            gid = int(gentry[2])
    name = entry[0] if entry else None
    extra: list[int] = []
    if name and not group_part:
        for g in groups:
            if len(g) >= 4 and g[2].isdigit() and name in g[3].split(","):
                number = int(g[2])
                if number != gid and number not in extra:
                    extra.append(number)
    return ResolvedUser(uid=uid, gid=gid, additional_gids=tuple(extra), home=home)


def find_command(root: Path, argv0: str, env: list[str], workdir: str) -> None:
    """Raise CommandNotFound (127) / CommandNotRunnable (126) like docker, before start."""
    if "/" in argv0:
        base = argv0 if argv0.startswith("/") else str(PurePosixPath(workdir) / argv0)
        candidates = [base]
    else:
        path_value = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
        candidates = [str(PurePosixPath(d or "/") / argv0) for d in path_value.split(":")]
    for candidate in candidates:
        host_path = resolve_in_root(root, candidate)
        try:
            st = os.stat(host_path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if "/" in argv0:
                raise CommandNotRunnable(
                    f"failed to start container: exec: {argv0!r}: is a directory"
                )
            continue
        if not st.st_mode & 0o111:
            if "/" in argv0:
                raise CommandNotRunnable(
                    f"failed to start container: exec: {argv0!r}: permission denied"
                )
            continue
        return
    if "/" in argv0:
        raise CommandNotFound(
            f"failed to start container: exec: {argv0!r}: no such file or directory"
        )
    raise CommandNotFound(
        f"failed to start container: exec: {argv0!r}: executable file not found in $PATH"
    )


# --------------------------------------------------------------------------- process


@dataclass(frozen=True)
class ProcessSettings:
    """The container process after merging the request with the image's defaults."""

    args: list[str]
    env: list[str]
    cwd: str
    user: str
    stop_signal: int


def merge_image_config(
    spec: ContainerSpec, image_config: dict[str, Any], hostname: str
) -> ProcessSettings:
    """docker's rules: --entrypoint replaces the image's Entrypoint and drops its Cmd;
    a command replaces Cmd; -e overrides image Env by name; -w/-u override WorkingDir/User."""
    if spec.entrypoint is not None:
        entrypoint = list(spec.entrypoint)
        cmd = list(spec.command) if spec.command is not None else []
    else:
        entrypoint = list(image_config.get("Entrypoint") or [])
        cmd = list(spec.command if spec.command is not None else image_config.get("Cmd") or [])
    args = entrypoint + cmd
    if not args or not args[0]:
        raise InvalidArgument("no command specified (the image has no Cmd or Entrypoint)")
    env: dict[str, str] = {}
    for item in image_config.get("Env") or []:
        key, _, value = str(item).partition("=")
        env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env["HOSTNAME"] = hostname
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise InvalidArgument(f"invalid environment variable name {key!r}")
        env[key] = value
    cwd = spec.workdir or image_config.get("WorkingDir") or "/"
    if not cwd.startswith("/"):
        raise InvalidArgument(f"the working directory {cwd!r} is invalid, it needs to be absolute")
    user = spec.user if spec.user is not None else (image_config.get("User") or "")
    stop_signal = parse_signal(spec.stop_signal or image_config.get("StopSignal"))
    return ProcessSettings(
        args=args,
        env=[f"{k}={v}" for k, v in env.items()],
        cwd=cwd,
        user=user,
        stop_signal=stop_signal,
    )


# --------------------------------------------------------------------------- config.json


def standard_mounts(read_only_sys: bool = True) -> list[dict[str, Any]]:
    """The mounts every container gets, as docker gives them."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",  # noqa: S108
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro" if read_only_sys else "rw"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]  # fmt: skip


def rlimits() -> list[dict[str, Any]]:
    """RLIMIT_NOFILE as docker sets it, but never above this host's hard limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    value = MAX_NOFILE if hard == resource.RLIM_INFINITY else min(MAX_NOFILE, hard)
    return [{"type": "RLIMIT_NOFILE", "hard": value, "soft": value}]


def _device_numbers(device: str | None) -> tuple[int, int] | None:
    if not device:
        return None
    major, _, minor = device.partition(":")
    return int(major), int(minor)


def linux_resources(limits: Limits, device: str | Sequence[str] | None) -> dict[str, Any]:
    """``linux.resources`` for the limits; block I/O throttles apply to ``device`` (each of
    them, when the container's storage spans several: its writable layer on its tenant's
    filesystem, the image layers it reads on the state disk)."""
    resources: dict[str, Any] = {}
    if limits.memory_bytes is not None:
        # swap = memory + swap in OCI terms: equal means no swap at all beyond the limit.
        resources["memory"] = {
            "limit": limits.memory_bytes,
            "swap": limits.memory_bytes,
            "disableOOMKiller": False,
        }
    cpu: dict[str, Any] = {}
    if limits.cpus is not None:
        cpu["quota"] = round(limits.cpus * CFS_PERIOD_US)
        cpu["period"] = CFS_PERIOD_US
    if limits.cpu_shares is not None:
        cpu["shares"] = limits.cpu_shares
    if cpu:
        resources["cpu"] = cpu
    if limits.pids is not None:
        resources["pids"] = {"limit": limits.pids}
    devices = [device] if isinstance(device, str) or device is None else list(device)
    numbers = [n for n in map(_device_numbers, devices) if n is not None]
    block: dict[str, Any] = {}
    for field, key in (
        ("device_read_bps", "throttleReadBpsDevice"),
        ("device_write_bps", "throttleWriteBpsDevice"),
        ("device_read_iops", "throttleReadIOPSDevice"),
        ("device_write_iops", "throttleWriteIOPSDevice"),
    ):
        rate = getattr(limits, field)
        if rate is None:
            continue
        if not numbers:
            raise InvalidArgument(
                f"--{field.replace('_', '-')}: no block device is behind this container's storage"
            )
        block[key] = [{"major": major, "minor": minor, "rate": rate} for major, minor in numbers]
    if block:
        resources["blockIO"] = block
    return resources


def build_config(
    *,
    rootfs: Path,
    process: ProcessSettings,
    user: ResolvedUser,
    hostname: str,
    cgroups_path: str,
    resources: dict[str, Any],
    netns_path: str | None,
    network_mode: str,
    extra_mounts: list[dict[str, Any]],
    cgroup_namespace: bool,
) -> dict[str, Any]:
    """The OCI runtime config (before security defaults are applied)."""
    env = list(process.env)
    if not any(e.startswith("HOME=") for e in env):
        env.append(f"HOME={user.home}")
    namespaces: list[dict[str, Any]] = [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
    ]
    if network_mode != "host":
        network: dict[str, Any] = {"type": "network"}
        if netns_path:
            network["path"] = netns_path
        namespaces.append(network)
    if cgroup_namespace:
        namespaces.append({"type": "cgroup"})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {
                "uid": user.uid,
                "gid": user.gid,
                **({"additionalGids": list(user.additional_gids)} if user.additional_gids else {}),
            },
            "args": process.args,
            "env": env,
            "cwd": process.cwd,
            "rlimits": rlimits(),
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": standard_mounts() + extra_mounts,
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": resources,
            "namespaces": namespaces,
        },
    }
