"""Snapshots: layers unpacked once (by chain id) and per-key overlayfs mounts.

Layout under ``config.snapshots_dir``::

  layers/<chain-hex>/fs         one unpacked layer, shared read-only by every image and
  layers/<chain-hex>/meta.json  snapshot whose stack contains it
  active/<key>/upper, work      the writable layer of one snapshot (a container's rootfs)
  active/<key>/merged           where the overlay is mounted; what ``prepare`` returns
  active/<key>/meta.json        image, chain ids (so GC keeps their layers)
  empty/                        the lower dir of an image without layers
  tenants/<tenant>/disk.img     a tenant's writable layers: a sparse ext4 file of
  tenants/<tenant>/fs/<key>/    ``config.tenant_layer_bytes``, loop-mounted on fs/; a
                                tenant's snapshot keeps its upper and work dirs there

A container's writes go to its tenant's filesystem, never straight to the node's disk:
writing past the tenant's size fails with ENOSPC inside the container, and all of a
tenant's containers and build steps together take at most that much of the node. One
filesystem per tenant, not per container: it is made and mounted once (~35 ms) by the
tenant's first snapshot on the node, so a container start costs only two mkdirs more.

A layer is unpacked into a temporary directory and renamed into place only after its
diff id matched the image config, so a crash or a corrupt blob never leaves a half layer
under a chain id; concurrent unpacks of the same layer race harmlessly on the rename.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import stat
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime_agent.config import AgentConfig
from runtime_agent.content.store import ContentStore, parse_digest
from runtime_agent.errors import (
    AlreadyExists,
    DigestMismatch,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from runtime_agent.snapshots import mount
from runtime_agent.snapshots.device import block_device_of
from runtime_agent.snapshots.tree import remove_tree

if TYPE_CHECKING:
    from runtime_agent.images.store import Image

MIN_LAYER_SIZE = 8 << 20
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class SnapshotInfo:
    key: str
    path: Path  # the merged (mounted) root filesystem
    upper: Path
    image: str | None  # manifest digest
    chain_ids: tuple[str, ...]
    mounted: bool
    created: str


class Snapshotter:
    def __init__(self, config: AgentConfig, content: ContentStore) -> None:
        self.config = config
        self.content = content
        self.root = Path(config.snapshots_dir)
        self.layers_dir = self.root / "layers"
        self.active_dir = self.root / "active"
        self.empty_dir = self.root / "empty"

    # ----------------------------------------------------------------- layers
    def layer_path(self, chain_id: str) -> Path:
        return self.layers_dir / parse_digest(chain_id) / "fs"

    def has_layer(self, chain_id: str) -> bool:
        return (self.layers_dir / parse_digest(chain_id) / "meta.json").is_file()

    def ensure_layers(self, image: Image) -> list[Path]:
        """Unpack every layer of ``image`` not unpacked yet; return their dirs, bottom first."""
        paths = []
        parent: str | None = None
        for desc, diff_id, chain_id in zip(
            image.layers, image.diff_ids, image.chain_ids, strict=True
        ):
            if not self.has_layer(chain_id):
                self._unpack(desc, diff_id, chain_id, parent)
            paths.append(self.layer_path(chain_id))
            parent = chain_id
        return paths

    def _unpack(
        self, desc: dict[str, Any], diff_id: str, chain_id: str, parent: str | None
    ) -> None:
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.layers_dir / f".tmp-{secrets.token_hex(8)}"
        (tmp / "fs").mkdir(parents=True)
        try:
            from runtime_agent.images.media import open_uncompressed
            from runtime_agent.snapshots.unpack import unpack_layer  # tar code: only to unpack

            with self.content.open(desc["digest"]) as raw, open_uncompressed(raw) as stream:
                result = unpack_layer(stream, tmp / "fs", self.config.layer_limits)
            if result.diff_id != diff_id:
                raise DigestMismatch(
                    f"layer {desc['digest']} unpacks to {result.diff_id}, but the image "
                    f"config says {diff_id}",
                    expected=diff_id,
                    actual=result.diff_id,
                )
            meta = {
                "chain_id": chain_id,
                "diff_id": diff_id,
                "parent": parent,
                "blob": desc["digest"],
                "size": result.size,
                "skipped_devices": result.skipped_devices,
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(tmp, self.layers_dir / parse_digest(chain_id))
            except OSError:
                if not self.has_layer(chain_id):
                    raise
                # Another prepare unpacked the same layer first; ours is redundant.
        finally:
            remove_tree(tmp)

    # ----------------------------------------------------------------- snapshots
    def _dir(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise InvalidArgument(f"invalid snapshot key {key!r}")
        return self.active_dir / key

    def prepare(
        self,
        key: str,
        image: Image,
        *,
        read_only: bool = False,
        size_bytes: int | None = None,
        volatile: bool = False,
        tenant: str | None = None,
    ) -> Path:
        """Mount a writable (or read-only) root filesystem of ``image`` for ``key``.

        ``tenant``: the writable layer lives on that tenant's size-capped filesystem
        (``tenant_fs``) unless the node has none (``tenant_layer_bytes`` 0).

        ``volatile``: the overlay never syncs its writable layer (see
        ``mount.mount_overlay``), for disposable root filesystems such as ``--rm``
        containers'; remembered in the snapshot's records for re-mounts.

        With ``size_bytes`` the writable layer lives on its own loop-mounted ext4 file
        of that size: writes beyond it fail with ENOSPC, and the loop device is a block
        device the runtime can throttle (see ``device``).

        Idempotent for the same image: preparing an existing key re-mounts it if needed
        (after a reboot) and returns the same path; for another image it is an error.
        """
        if size_bytes is not None and (
            not isinstance(size_bytes, int) or size_bytes < MIN_LAYER_SIZE
        ):
            raise InvalidArgument(
                f"writable layer size must be at least {MIN_LAYER_SIZE // (1 << 20)} MiB",
                size_bytes=size_bytes,
            )
        sdir = self._dir(key)
        meta_path = sdir / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("image") != image.manifest_digest:
                raise AlreadyExists(f"snapshot {key} already exists for another image", key=key)
            return self._mount(sdir, meta)
        lowers = [*reversed(self.ensure_layers(image))]
        self.active_dir.mkdir(parents=True, exist_ok=True)
        try:
            sdir.mkdir()
        except FileExistsError:
            if not self._is_stale_partial(sdir):
                raise AlreadyExists(f"snapshot {key} is being prepared", key=key) from None
            self.remove(key)  # left by a crash between mkdir and meta.json
            sdir.mkdir()
        meta = {
            "key": key,
            "image": image.manifest_digest,
            "chain_ids": image.chain_ids,
            "read_only": read_only,
            "size_bytes": size_bytes,
            "volatile": volatile,
            "created": datetime.now(UTC).isoformat(),
        }
        on_tenant_fs = (
            tenant is not None
            and size_bytes is None
            and not read_only
            and self.config.tenant_layer_bytes > 0
        )
        if on_tenant_fs:
            meta["tenant"] = tenant
        try:
            (sdir / "merged").mkdir()
            if size_bytes is not None:
                _make_ext4_image(sdir / "rw.img", size_bytes)
                (sdir / "rw").mkdir()
            elif on_tenant_fs:
                assert tenant is not None
                self._make_tenant_dirs(tenant, key)
            else:
                (sdir / "upper").mkdir()
                (sdir / "work").mkdir()
            tmp = sdir / "meta.json.tmp"
            tmp.write_text(json.dumps(meta))
            os.rename(tmp, meta_path)
            return self._mount(sdir, meta, lowers, fresh=True)
        except BaseException:
            with contextlib.suppress(Exception):
                self.remove(key)
            raise

    @staticmethod
    def _is_stale_partial(sdir: Path, age_seconds: float = 60.0) -> bool:
        """A snapshot dir without meta.json, untouched for a while: a crashed prepare."""
        try:
            return (
                not (sdir / "meta.json").exists()
                and time.time() - sdir.stat().st_mtime > age_seconds
            )
        except FileNotFoundError:
            return False

    def ensure_mounted(self, key: str) -> Path:
        """Re-mount an existing snapshot (after a reboot) from its own records.

        Needs no image: the chain ids were recorded at ``prepare``, and the layers stay
        while the snapshot exists, even if its image has been untagged since.
        """
        sdir = self._dir(key)
        try:
            meta = json.loads((sdir / "meta.json").read_text())
        except FileNotFoundError:
            raise NotFound(f"snapshot {key} not found", key=key) from None
        return self._mount(sdir, meta)

    def _mount(
        self,
        sdir: Path,
        meta: dict[str, Any],
        lowers: list[Path] | None = None,
        *,
        fresh: bool = False,
    ) -> Path:
        """Mount the snapshot at ``sdir/merged`` unless it is; ``fresh``: its directory
        was just made by this caller, so nothing can be mounted there yet."""
        merged = sdir / "merged"
        if not fresh and mount.is_mounted(merged):
            return merged
        if lowers is None:
            lowers = [self.layer_path(c) for c in reversed(meta["chain_ids"])]
            missing = [p for p in lowers if not p.is_dir()]
            if missing:
                raise NotFound(f"snapshot {meta['key']}: layer {missing[0].parent.name} is gone")
        if not lowers:
            self.empty_dir.mkdir(parents=True, exist_ok=True)
            lowers = [self.empty_dir]
        if meta.get("read_only"):
            if len(lowers) == 1:
                lowers = [*lowers, self._empty_lower()]
            mount.mount_overlay(lowers, None, None, merged)
        else:
            upper, work = self._writable_dirs(sdir, meta)
            volatile = bool(meta.get("volatile"))
            if volatile:
                # Left by the previous volatile mount; its owner (a disposable --rm
                # container, not yet started before a reboot) accepts losing writes.
                marker = mount.volatile_marker(work)
                if marker.exists():
                    remove_tree(marker)
            mount.mount_overlay(lowers, upper, work, merged, volatile=volatile)
        return merged

    def _writable_dirs(self, sdir: Path, meta: dict[str, Any]) -> tuple[Path, Path]:
        """The upper and work dirs; on the snapshot's own loop device when it has one, on
        its tenant's filesystem when it belongs to one."""
        if meta.get("tenant"):
            rw = self.tenant_fs(meta["tenant"]) / meta["key"]
            return rw / "upper", rw / "work"
        if not meta.get("size_bytes"):
            return sdir / "upper", sdir / "work"
        rw = sdir / "rw"
        if not mount.is_mounted(rw):
            subprocess.run(
                ["mount", "-t", "ext4", "-o", "loop,nodev,nosuid", str(sdir / "rw.img"), str(rw)],
                check=True,
                capture_output=True,
            )
        for name in ("upper", "work"):
            (rw / name).mkdir(exist_ok=True)
        if (rw / "lost+found").exists():
            remove_tree(rw / "lost+found")
        return rw / "upper", rw / "work"

    def upper_dir(self, key: str) -> Path:
        sdir = self._dir(key)
        if (sdir / "rw.img").exists():
            return sdir / "rw" / "upper"
        if not (sdir / "upper").is_dir():
            tenant = self._tenant_of(sdir)
            if tenant is not None:
                return self._tenant_dir(tenant) / "fs" / key / "upper"
        return sdir / "upper"

    @staticmethod
    def _tenant_of(sdir: Path) -> str | None:
        """The tenant whose filesystem holds the snapshot's writable layer, if any."""
        try:
            tenant = json.loads((sdir / "meta.json").read_text()).get("tenant")
        except (FileNotFoundError, ValueError):
            return None
        return tenant if isinstance(tenant, str) else None

    # ----------------------------------------------------------------- tenant filesystems
    def _make_tenant_dirs(self, tenant: str, key: str) -> None:
        """The snapshot's upper and work dirs on its tenant's filesystem; a full one is
        the tenant's cap reached, said as such."""
        fs = self.tenant_fs(tenant)
        rw = fs / key
        if rw.exists():  # left by a snapshot of this key whose directory went
            remove_tree(rw)
        try:
            rw.mkdir()
            for name in ("upper", "work"):
                (rw / name).mkdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ResourceExhausted(
                f"tenant {tenant!r} has used all {self.config.tenant_layer_bytes} bytes of "
                "its containers' writable layers on this node; remove containers to free "
                "space",
                tenant=tenant,
                limit=self.config.tenant_layer_bytes,
            ) from None

    def _tenant_dir(self, tenant: str) -> Path:
        if not isinstance(tenant, str) or not _TENANT_RE.match(tenant):
            raise InvalidArgument(f"invalid tenant {tenant!r}")
        return self.root / "tenants" / tenant

    def tenant_fs(self, tenant: str) -> Path:
        """Where the tenant's writable layers live: its own ext4 filesystem of
        ``config.tenant_layer_bytes`` (a sparse file, so only what is written takes
        space), made and mounted on first use, mounted again after a reboot.

        ``noinit_itable``: the kernel would otherwise zero the inode tables in the
        background, writing ~1.5% of the size into the file for nothing. ``discard``:
        what a tenant deletes (a removed container's layer) is punched out of the file
        again, so the node's disk gets it back instead of keeping the high-water mark.
        """
        tdir = self._tenant_dir(tenant)
        fs = tdir / "fs"
        if _is_mount_point(fs):
            return fs
        tdir.mkdir(parents=True, exist_ok=True)
        with open(tdir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one mkfs and mount, however many prepare
            if _is_mount_point(fs):
                return fs
            image = tdir / "disk.img"
            if not image.exists():
                tmp = tdir / f".disk-{secrets.token_hex(4)}.img"
                try:
                    _make_ext4_image(tmp, self.config.tenant_layer_bytes, journal=True)
                    os.rename(tmp, image)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
            fs.mkdir(exist_ok=True)
            subprocess.run(
                [
                    "mount",
                    "-t",
                    "ext4",
                    "-o",
                    "loop,nodev,nosuid,noatime,noinit_itable,discard",
                    str(image),
                    str(fs),
                ],
                check=True,
                capture_output=True,
            )
            lost = fs / "lost+found"
            if lost.is_dir() and not lost.is_symlink():
                remove_tree(lost)
        return fs

    def device(self, key: str) -> str | None:
        """``major:minor`` of the block device the snapshot writes to.

        The snapshot's own loop device when it was prepared with ``size_bytes``,
        otherwise the disk holding the state directory (what --device-write-bps
        throttles by default). None when no block device is behind it.
        """
        sdir = self._dir(key)
        if not (sdir / "meta.json").is_file():
            raise NotFound(f"snapshot {key} not found", key=key)
        if (sdir / "rw.img").exists() and mount.is_mounted(sdir / "rw"):
            return mount.mount_source_device(sdir / "rw")
        tenant = self._tenant_of(sdir)
        if tenant is not None and _is_mount_point(self._tenant_dir(tenant) / "fs"):
            return mount.mount_source_device(self._tenant_dir(tenant) / "fs")
        return block_device_of(sdir)

    def devices(self, key: str) -> list[str]:
        """Every block device the snapshot's root filesystem reads or writes: its writable
        layer's (``device``) and, when another, the disk under the image layers. Block
        I/O throttles go on each, or reading the image would escape them."""
        found = [d for d in (self.device(key),) if d is not None]
        layers = block_device_of(self.layers_dir if self.layers_dir.is_dir() else self.root)
        if layers is not None and layers not in found:
            found.append(layers)
        return found

    def diff(self, key: str) -> dict[str, Any]:
        """The snapshot's changes as an uncompressed OCI layer stored in the content store.

        Returns the layer descriptor (its digest is also its diff id).
        """
        from runtime_agent.images.media import OCI_LAYER
        from runtime_agent.snapshots.diff import write_layer

        upper = self.upper_dir(key)
        if not upper.is_dir():
            raise NotFound(f"snapshot {key} not found (or not mounted)", key=key)
        with self.content.writer() as writer:
            try:
                write_layer(upper, writer)  # type: ignore[arg-type]
            except RecursionError:
                raise InvalidArgument(
                    f"snapshot {key}: its directory tree is too deep to export as a layer"
                ) from None
            digest, size = writer.commit()
        return {"mediaType": OCI_LAYER, "digest": digest, "size": size}

    def _empty_lower(self) -> Path:
        self.empty_dir.mkdir(parents=True, exist_ok=True)
        return self.empty_dir

    def remove(self, key: str) -> None:
        """Unmount and delete a snapshot. Idempotent: a missing key is not an error."""
        sdir = self._dir(key)
        if not sdir.exists():
            return
        for mount_point in sorted(mount.mounts_under(sdir), key=len, reverse=True):
            mount.unmount(Path(mount_point))
        # Its writable layer on a tenant filesystem; looked for in all of them, so a
        # prepare that crashed before writing meta.json leaves nothing behind either.
        for rw in (self.root / "tenants").glob(f"*/fs/{key}"):
            remove_tree(rw)
        remove_tree(sdir)

    def remove_all_mounts(self) -> None:
        """Unmount every snapshot (agent shutdown in tests); keeps their contents."""
        for mount_point in sorted(mount.mounts_under(self.root), key=len, reverse=True):
            mount.unmount(Path(mount_point))

    def get(self, key: str) -> SnapshotInfo:
        sdir = self._dir(key)
        try:
            meta = json.loads((sdir / "meta.json").read_text())
        except FileNotFoundError:
            raise NotFound(f"snapshot {key} not found", key=key) from None
        return SnapshotInfo(
            key=key,
            path=sdir / "merged",
            upper=self.upper_dir(key),
            image=meta.get("image"),
            chain_ids=tuple(meta.get("chain_ids") or ()),
            mounted=mount.is_mounted(sdir / "merged"),
            created=meta.get("created", ""),
        )

    def list(self) -> list[SnapshotInfo]:
        if not self.active_dir.is_dir():
            return []
        result = []
        for entry in sorted(self.active_dir.iterdir()):
            if _KEY_RE.match(entry.name):
                with contextlib.suppress(NotFound):
                    result.append(self.get(entry.name))
        return result

    def usage(self, key: str) -> int:
        """Bytes written to the snapshot's writable layer (docker's container SizeRw)."""
        return tree_size(self.get(key).upper)

    def layers_usage(self) -> int:
        return tree_size(self.layers_dir) if self.layers_dir.is_dir() else 0

    # ----------------------------------------------------------------- GC
    def gc(
        self,
        referenced_chain_ids: Iterable[str],
        keys_in_use: Iterable[str] | None = None,
        *,
        orphan_grace_seconds: float = 3600.0,
    ) -> dict[str, builtins.list[str]]:
        """Remove unreferenced layers and (if ``keys_in_use`` is given) orphan snapshots.

        A snapshot is an orphan when its key is not in ``keys_in_use`` and it is older
        than ``orphan_grace_seconds`` (a container being created or a build step running
        right now owns a young snapshot the caller may not know about). Layers are kept
        when an image references their chain id or a remaining snapshot stacks on them.
        Returns what was removed.
        """
        removed: dict[str, builtins.list[str]] = {"snapshots": [], "layers": []}
        if self.active_dir.is_dir():
            for entry in self.active_dir.iterdir():
                if _KEY_RE.match(entry.name) and self._is_stale_partial(
                    entry, orphan_grace_seconds
                ):
                    self.remove(entry.name)
                    removed["snapshots"].append(entry.name)
        if keys_in_use is not None:
            keep = set(keys_in_use)
            cutoff = datetime.now(UTC).timestamp() - orphan_grace_seconds
            for info in self.list():
                if info.key in keep:
                    continue
                try:
                    created = datetime.fromisoformat(info.created).timestamp()
                except ValueError:
                    created = 0.0
                if created > cutoff:
                    continue
                self.remove(info.key)
                removed["snapshots"].append(info.key)
        keep_chains = set(referenced_chain_ids)
        for info in self.list():
            keep_chains.update(info.chain_ids)
        keep_hex = {parse_digest(c) for c in keep_chains}
        if self.layers_dir.is_dir():
            stale = time.time() - 3600
            for entry in self.layers_dir.iterdir():
                if entry.name.startswith(".tmp-") and entry.stat().st_mtime > stale:
                    continue  # an unpack in progress
                if entry.name.startswith(".tmp-") or entry.name not in keep_hex:
                    with contextlib.suppress(OSError):
                        remove_tree(entry)
                    if not entry.name.startswith(".tmp-"):
                        removed["layers"].append("sha256:" + entry.name)
        return removed


def tree_size(path: Path) -> int:
    """Apparent size of regular files under ``path``, hard links counted once.

    Iterative, so a tenant's very deep directory tree cannot exhaust the recursion
    limit; parts deeper than PATH_MAX are not counted.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    pending = [str(path)]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                pending.append(entry.path)
            elif stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _is_mount_point(path: Path) -> bool:
    """``path`` is the root of another filesystem than its parent's (two stats, where
    ``mount.is_mounted`` reads the whole mount table)."""
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except FileNotFoundError:
        return False


def _make_ext4_image(path: Path, size_bytes: int, *, journal: bool = False) -> None:
    """A sparse file with an ext4 filesystem. No journal for a scratch layer of one
    snapshot; a tenant's filesystem, which holds its containers' layers across node
    crashes, has one."""
    with open(path, "wb") as fh:
        fh.truncate(size_bytes)
    features = [] if journal else ["-O", "^has_journal"]
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            *features,
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            str(path),
        ],
        check=True,
        capture_output=True,
    )
