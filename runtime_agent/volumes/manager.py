"""Per-tenant named volumes, optionally with a hard size limit.

Layout (one directory per volume, namespaced by tenant so names never meet)::

    <root>/volumes/<tenant>/<name>/volume.json   metadata (labels, size, users)
    <root>/volumes/<tenant>/<name>/_data/        what containers see
    <root>/volumes/<tenant>/<name>/disk.img      sized volumes only: sparse ext4 image

A sized volume is a sparse file formatted as ext4 and loop-mounted on ``_data``. That
choice, over project quotas: the limit is enforced by a real filesystem (writes past it
fail with ENOSPC inside the container), it works whatever filesystem the state root is on
(project quotas need ext4/xfs mounted with ``prjquota``, which the agent cannot demand of a
node), each volume is a block device the I/O throttle can target, and removing the volume
is one unmount and one unlink. The cost is a loop device per mounted sized volume (the
mount uses autoclear, so unmounting frees it) and space reserved for ext4 metadata.

Volume names are validated like docker's (``[a-zA-Z0-9][a-zA-Z0-9_.-]*``) and tenants are
slugs, so ``(tenant, name)`` can never resolve outside the tenant's own directory; one
tenant asking for another's volume name just finds (or auto-creates) its own.

A volume used by a container (``acquire``) can't be removed until the container releases
it, unless forced: docker's in-use protection.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime_agent.config import AgentConfig
from runtime_agent.errors import (
    AgentError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from runtime_agent.protocol import MountSpec
from runtime_agent.runtime.security import IdRange, check_host_bind, idmapped_bind

TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
VOLUME_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
ANONYMOUS_NAME_RE = re.compile(r"^[0-9a-f]{64}$")  # docker's random volume names
MIN_SIZE_BYTES = 8 * 1024 * 1024  # ext4 with a journal needs a few MiB for itself
MAX_SIZE_BYTES = 16 * 1024**4
METADATA = "volume.json"
DATA = "_data"
DISK = "disk.img"


class VolumeMountError(AgentError):
    """Formatting or mounting a sized volume's filesystem failed."""

    code = "volume_mount_failed"


@dataclass
class Volume:
    """A named volume as ``volume inspect`` shows it."""

    tenant: str
    name: str
    mountpoint: str
    created_at: float
    size_bytes: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    users: list[str] = field(default_factory=list)  # container ids holding it
    anonymous: bool = False  # created without a name (``-v /path``); what prune removes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def docker_inspect(self) -> dict[str, Any]:
        """Shaped like ``docker volume inspect``'s output."""
        options = {"size": str(self.size_bytes)} if self.size_bytes else None
        return {
            "CreatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at)),
            "Driver": "local",
            "Labels": dict(self.labels),
            "Mountpoint": self.mountpoint,
            "Name": self.name,
            "Options": options,
            "Scope": "local",
            "UsedBy": list(self.users),
        }


def validate_tenant(tenant: str) -> None:
    if not TENANT_RE.match(tenant):
        raise InvalidArgument(
            f"invalid tenant name {tenant!r}: use lowercase letters, digits and dashes"
        )


def validate_volume_name(name: str) -> None:
    if not VOLUME_NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid volume name {name!r}: must match [a-zA-Z0-9][a-zA-Z0-9_.-]* "
            "(at most 128 characters)"
        )


def validate_target(target: str) -> str:
    """A mount target must be an absolute, normalised container path other than /."""
    if not target.startswith("/"):
        raise InvalidArgument(f"mount target must be an absolute path: {target!r}")
    normal = os.path.normpath(target)
    if normal == "/" or ".." in target.split("/"):
        raise InvalidArgument(f"invalid mount target {target!r}")
    return normal


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == target for line in fh)


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise VolumeMountError(
            f"{cmd[0]} failed: {result.stderr.strip() or result.stdout.strip()}", command=cmd
        )


class VolumeManager:
    """Create, list, inspect, mount and remove tenants' named volumes (``agent.volumes``)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.root = config.volumes_dir

    # --- paths and locking -----------------------------------------------------------

    def _tenant_dir(self, tenant: str) -> Path:
        validate_tenant(tenant)
        return self.root / tenant

    def _dir(self, tenant: str, name: str) -> Path:
        validate_volume_name(name)
        return self._tenant_dir(tenant) / name

    @contextlib.contextmanager
    def _locked(self, tenant: str, lock_name: str = ".lock") -> Iterator[None]:
        """Serialise changes to a tenant's volumes (``.lock``) or mounts (``.mount.lock``;
        separate so mounting inside a locked create does not wait on itself)."""
        tenant_dir = self._tenant_dir(tenant)
        tenant_dir.mkdir(parents=True, exist_ok=True)
        with open(tenant_dir / lock_name, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self, tenant: str, name: str) -> Volume:
        meta = self._dir(tenant, name) / METADATA
        try:
            data = json.loads(meta.read_text())
        except FileNotFoundError:
            raise NotFound(f"no such volume: {name}", tenant=tenant, volume=name) from None
        return Volume(**data)

    def _save(self, volume: Volume, directory: Path | None = None) -> None:
        directory = directory or self._dir(volume.tenant, volume.name)
        tmp = directory / f".{METADATA}.tmp"
        tmp.write_text(json.dumps(volume.to_dict()))
        os.replace(tmp, directory / METADATA)

    # --- the API ---------------------------------------------------------------------

    def create(
        self,
        tenant: str,
        name: str | None = None,
        size_bytes: int | None = None,
        labels: dict[str, str] | None = None,
    ) -> Volume:
        """Create a volume; an identical existing one is returned as docker does.

        ``size_bytes`` caps it with its own ext4 filesystem; None means it shares the
        node's disk. A name of None generates a random 64-hex one (an anonymous volume).
        """
        name = name or uuid.uuid4().hex + uuid.uuid4().hex
        labels = dict(labels or {})
        if size_bytes is not None and not MIN_SIZE_BYTES <= size_bytes <= MAX_SIZE_BYTES:
            raise InvalidArgument(
                f"volume size must be between {MIN_SIZE_BYTES} and {MAX_SIZE_BYTES} bytes, "
                f"got {size_bytes}"
            )
        final = self._dir(tenant, name)
        with self._locked(tenant):
            if (final / METADATA).exists():
                existing = self._load(tenant, name)
                if existing.size_bytes == size_bytes and (not labels or labels == existing.labels):
                    self._ensure_mounted(existing)
                    return existing
                raise AlreadyExists(
                    f"volume {name} already exists with different options",
                    tenant=tenant,
                    volume=name,
                )
            staging = final.parent / f".{name}.creating-{uuid.uuid4().hex[:8]}"
            volume = Volume(
                tenant=tenant,
                name=name,
                mountpoint=str(final / DATA),
                created_at=time.time(),
                size_bytes=size_bytes,
                labels=labels,
                anonymous=bool(ANONYMOUS_NAME_RE.match(name)),
            )
            try:
                (staging / DATA).mkdir(parents=True)
                if size_bytes is not None:
                    self._format(staging / DISK, size_bytes)
                self._save(volume, staging)
                if final.exists():  # leftover of a crashed create without metadata
                    shutil.rmtree(final)
                os.rename(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            try:
                self._ensure_mounted(volume)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
            return volume

    def get(self, tenant: str, name: str) -> Volume:
        return self._load(tenant, name)

    inspect = get

    def list(self, tenant: str, labels: dict[str, str] | None = None) -> list[Volume]:
        """The tenant's volumes (only its own), optionally filtered by labels."""
        tenant_dir = self._tenant_dir(tenant)
        if not tenant_dir.is_dir():
            return []
        volumes = []
        for entry in sorted(tenant_dir.iterdir()):
            if entry.name.startswith(".") or not (entry / METADATA).exists():
                continue
            volume = self._load(tenant, entry.name)
            if labels and any(volume.labels.get(k) != v for k, v in labels.items()):
                continue
            volumes.append(volume)
        return volumes

    def host_path(self, tenant: str, name: str) -> Path:
        """Where the volume's data is on the node (mounted, for sized volumes)."""
        volume = self._load(tenant, name)
        self._ensure_mounted(volume)
        return Path(volume.mountpoint)

    def remove(self, tenant: str, name: str, force: bool = False) -> None:
        """Delete a volume and its data; refused while a container uses it unless forced."""
        with self._locked(tenant):
            volume = self._load(tenant, name)
            if volume.users and not force:
                raise FailedPrecondition(
                    f"volume {name} is in use by container(s) "
                    f"{', '.join(u[:12] for u in volume.users)}; remove them first or force",
                    tenant=tenant,
                    volume=name,
                    users=volume.users,
                )
            directory = self._dir(tenant, name)
            data = directory / DATA
            if _mounted(data):
                # A forced removal may find the filesystem still mounted in a container;
                # detach it here (the loop device goes when the last user unmounts).
                flags = ["-l"] if force else []
                _run(["umount", *flags, str(data)])
            # Rename first so a crash mid-delete never leaves a half-volume under its name.
            doomed = directory.parent / f".{name}.removing-{uuid.uuid4().hex[:8]}"
            os.rename(directory, doomed)
            shutil.rmtree(doomed)

    def prune(
        self, tenant: str, labels: dict[str, str] | None = None, *, all: bool = False
    ) -> builtins.list[str]:
        """Remove the tenant's unused anonymous volumes (named ones too with ``all``), as
        ``docker volume prune [-a]`` does; returns their names."""
        removed = []
        for volume in self.list(tenant, labels):
            if volume.users or not (all or volume.anonymous):
                continue
            try:
                self.remove(tenant, volume.name)
            except FailedPrecondition:
                continue  # picked up by a container meanwhile
            removed.append(volume.name)
        return removed

    def usage(self, tenant: str, name: str) -> tuple[int, int | None]:
        """(bytes used, bytes available to the volume or None when unsized)."""
        volume = self._load(tenant, name)
        data = self.host_path(tenant, name)
        if volume.size_bytes is not None:
            st = os.statvfs(data)
            return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize
        total = 0
        for dirpath, _dirs, files in os.walk(data):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
        return total, None

    # --- use by containers -----------------------------------------------------------

    def acquire(self, tenant: str, name: str, container_id: str) -> Volume:
        """Record that a container uses the volume (blocks a plain rm)."""
        with self._locked(tenant):
            volume = self._load(tenant, name)
            if container_id not in volume.users:
                volume.users.append(container_id)
                self._save(volume)
            return volume

    def release(self, tenant: str, container_id: str, names: Iterable[str] | None = None) -> None:
        """Forget a container's use of the tenant's volumes (idempotent; on container rm)."""
        with self._locked(tenant):
            for volume in self.list(tenant):
                if names is not None and volume.name not in names:
                    continue
                if container_id in volume.users:
                    volume.users.remove(container_id)
                    self._save(volume)

    def oci_mounts(
        self,
        tenant: str,
        mounts: Iterable[MountSpec],
        *,
        privileged_caller: bool = False,
        container_id: str | None = None,
        auto_create: bool = True,
        user_namespace: IdRange | None = None,
        idmap_dir: Path | None = None,
    ) -> builtins.list[dict[str, Any]]:
        """Turn a container's MountSpecs into OCI mount entries for config.json.

        volume: the tenant's named volume (created on first use like ``docker run -v``),
        bind-mounted rw/ro with nosuid,nodev; tmpfs: noexec,nosuid,nodev with its size
        cap; bind: host paths, only when ``privileged_caller``. With ``container_id`` the
        volumes are recorded as in use by that container. Validates everything before
        touching anything, so bad input leaves no state.

        With ``user_namespace`` each volume is shown to the container through an
        idmapped mount made under ``idmap_dir`` (container root then owns what host root
        owns on disk, and files it writes are stored as plain root files). The runtime
        detaches those with ``release_idmapped_views(idmap_dir)`` once ``runc create`` has
        mounted them (the container keeps its own clones), and again on removal.
        """
        if user_namespace is not None and idmap_dir is None:
            raise InvalidArgument("idmap_dir is required with user_namespace")
        specs = list(mounts)
        seen: set[str] = set()
        for spec in specs:
            target = validate_target(spec.target)
            if target in seen:
                raise InvalidArgument(f"duplicate mount point {target}")
            seen.add(target)
            if spec.kind == "volume":
                validate_volume_name(spec.source)
            elif spec.kind == "bind":
                check_host_bind(spec.source, target, privileged_caller=privileged_caller)
                if not os.path.exists(spec.source):
                    raise NotFound(f"bind source path does not exist: {spec.source}")
            elif spec.kind == "tmpfs":
                if spec.size_bytes is not None and spec.size_bytes <= 0:
                    raise InvalidArgument(f"tmpfs size must be positive: {spec.size_bytes}")
            else:
                raise InvalidArgument(f"unknown mount kind {spec.kind!r}")
            if spec.kind == "volume" and not auto_create:
                self._load(tenant, spec.source)

        result = []
        for spec in specs:
            target = validate_target(spec.target)
            access = "ro" if spec.read_only else "rw"
            if spec.kind == "volume":
                try:
                    volume = self._load(tenant, spec.source)
                except NotFound:
                    volume = self.create(tenant, spec.source)
                self._ensure_mounted(volume)
                if container_id is not None:
                    self.acquire(tenant, spec.source, container_id)
                source = volume.mountpoint
                if user_namespace is not None and idmap_dir is not None:
                    view = idmap_dir / volume.name
                    view.mkdir(parents=True, exist_ok=True)
                    if not _mounted(view):
                        idmapped_bind(Path(volume.mountpoint), view, user_namespace)
                    source = str(view)
                result.append(
                    {
                        "destination": target,
                        "type": "bind",
                        "source": source,
                        "options": ["rbind", access, "nosuid", "nodev", "rprivate"],
                    }
                )
            elif spec.kind == "tmpfs":
                options = ["nosuid", "nodev", "noexec", "mode=1777", access]
                if spec.size_bytes is not None:
                    options.append(f"size={spec.size_bytes}")
                result.append(
                    {"destination": target, "type": "tmpfs", "source": "tmpfs", "options": options}
                )
            else:
                result.append(
                    {
                        "destination": target,
                        "type": "bind",
                        "source": os.path.realpath(spec.source),
                        "options": ["rbind", access, "rprivate"],
                    }
                )
        return result

    @staticmethod
    def release_idmapped_views(idmap_dir: Path) -> None:
        """Detach the idmapped volume views made by ``oci_mounts`` (idempotent)."""
        if not idmap_dir.is_dir():
            return
        for view in sorted(idmap_dir.iterdir()):
            if _mounted(view):
                _run(["umount", "-l", str(view)])
            with contextlib.suppress(OSError):
                view.rmdir()
        with contextlib.suppress(OSError):
            idmap_dir.rmdir()

    def recover(self) -> None:
        """Re-mount every sized volume after a node restart (idempotent)."""
        if not self.root.is_dir():
            return
        for tenant_dir in sorted(self.root.iterdir()):
            if not tenant_dir.is_dir() or not TENANT_RE.match(tenant_dir.name):
                continue
            for volume in self.list(tenant_dir.name):
                self._ensure_mounted(volume)

    def unmount_all(self) -> None:
        """Unmount every sized volume (node shutdown, test teardown); data stays."""
        if not self.root.is_dir():
            return
        for data in sorted(self.root.glob(f"*/*/{DATA}")):
            if _mounted(data):
                _run(["umount", str(data)])

    # --- sized volumes ---------------------------------------------------------------

    @staticmethod
    def _format(image: Path, size_bytes: int) -> None:
        with open(image, "wb") as fh:
            fh.truncate(size_bytes)  # sparse: takes no space until written
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",  # no root-reserved blocks: the tenant gets the whole size
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
                str(image),
            ]
        )

    def _ensure_mounted(self, volume: Volume) -> None:
        if volume.size_bytes is None:
            return
        directory = self._dir(volume.tenant, volume.name)
        data = directory / DATA
        if _mounted(data):
            return
        with self._locked(volume.tenant, ".mount.lock"):
            if not _mounted(data):  # another process may have won the race
                self._mount_disk(directory)

    @staticmethod
    def _mount_disk(directory: Path) -> None:
        data = directory / DATA
        _run(
            [
                "mount",
                "-t",
                "ext4",
                "-o",
                "loop,nosuid,nodev,noatime",
                str(directory / DISK),
                str(data),
            ]
        )
        lost = data / "lost+found"
        if not lost.is_symlink() and lost.is_dir() and not any(lost.iterdir()):
            lost.rmdir()  # e2fsck recreates it if ever needed; users expect an empty volume
