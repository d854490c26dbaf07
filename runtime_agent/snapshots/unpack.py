"""Unpack one OCI layer tarball into an empty directory, safely.

Layers come from strangers, so nothing in the tarball may touch anything outside the
target directory:

* every path is walked component by component from a directory file descriptor with
  ``O_NOFOLLOW``; an entry whose parent is a symlink (or not a directory) is refused, so
  a symlink planted by the archive can never redirect a later write;
* absolute names are taken relative to the layer root (as docker does); a ``..`` that
  climbs above the root is refused;
* hard links must point at a file already unpacked in this same layer;
* device nodes are skipped (containers get their /dev from the runtime); FIFOs, modes
  (setuid included, as docker keeps them; no-new-privileges neutralises them), owners,
  timestamps and extended attributes are kept, except ``trusted.overlay.*`` which only
  the unpacker itself may set.

OCI whiteouts become overlayfs whiteouts: ``.wh.NAME`` -> a 0/0 character device NAME,
``.wh..wh..opq`` -> ``trusted.overlay.opaque=y`` on the directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from runtime_agent.errors import AgentError, InvalidArchive, ResourceExhausted
from runtime_agent.snapshots.tree import remove_tree as remove_tree  # re-exported

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_XATTR_PAX_PREFIX = "SCHILY.xattr."
_CHUNK = 1 << 20
MAX_DEPTH = 1024  # path components; PATH_MAX (4096 bytes) allows at most ~2048


@dataclass
class UnpackResult:
    diff_id: str  # sha256 of the uncompressed tar stream
    size: int  # bytes of regular file content written
    entries: int = 0
    skipped_devices: list[str] = field(default_factory=list)


class _HashingReader:
    """Wraps a stream, hashing and counting everything read through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.hash.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def clean_member_path(name: str) -> list[str]:
    """Split an archive member name into safe components (empty list = the root).

    Leading slashes and ``.`` components are dropped; ``..`` is resolved lexically and
    refused when it would leave the root. Paths deeper than ``MAX_DEPTH`` are refused:
    no real image needs them, and they would make each entry cost quadratic work.
    """
    if name.count("/") > 4 * MAX_DEPTH:
        raise InvalidArchive(f"archive entry {name[:80]!r}... is nested too deeply")
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise InvalidArchive(f"archive entry {name!r} points outside the layer")
            parts.pop()
            continue
        parts.append(part)
    if len(parts) > MAX_DEPTH:
        raise InvalidArchive(
            f"archive entry {name[:80]!r}... is nested {len(parts)} levels deep "
            f"(at most {MAX_DEPTH})"
        )
    return parts


class _Tree:
    """Confined operations on a directory tree, always relative to an open root fd.

    Directory fds are cached (least recently used first out, so a layer with a million
    directories never runs out of descriptors); paths are walked iteratively, so depth
    is unbounded too.
    """

    _CACHE_SIZE = 128

    def __init__(self, root: Path) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self._dir_cache: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self.trash = root.parent / f".{root.name}.trash-{secrets.token_hex(4)}"
        self._trash_fd: int | None = None
        self._trashed = 0

    def close(self) -> None:
        for fd in self._dir_cache.values():
            os.close(fd)
        self._dir_cache.clear()
        os.close(self.root_fd)
        if self._trash_fd is not None:
            os.close(self._trash_fd)
            self._trash_fd = None
            remove_tree(self.trash)

    def open_dir(self, parts: list[str], *, create: bool, name: str) -> int:
        """fd of the directory ``parts`` (owned by the cache: do not close), creating
        missing ones when ``create``. Valid until the next two ``open_dir`` calls."""
        if not parts:
            return self.root_fd
        key = tuple(parts)
        cached = self._dir_cache.get(key)
        if cached is not None:
            self._dir_cache.move_to_end(key)
            return cached
        # Tar order makes the parent the usual hit; otherwise walk from the root (depth
        # is capped, so this stays linear in the path length).
        depth = len(parts) - 1
        current = self._dir_cache.get(key[:-1]) if depth else None
        if current is None:
            depth, current = 0, self.root_fd
        owned = False
        try:
            for index in range(depth, len(parts)):
                child = self._open_child(current, parts, index, create=create, name=name)
                if owned:
                    os.close(current)
                current, owned = child, True
        except BaseException:
            if owned:
                os.close(current)
            raise
        self._dir_cache[key] = current
        while len(self._dir_cache) > self._CACHE_SIZE:
            _, old = self._dir_cache.popitem(last=False)
            os.close(old)
        return current

    @staticmethod
    def _open_child(parent: int, parts: list[str], index: int, *, create: bool, name: str) -> int:
        component = parts[index]
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(component, flags, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise InvalidArchive(
                    f"archive entry {name!r} refers to {'/'.join(parts[: index + 1])!r}, "
                    "which is not in this layer"
                ) from None
            os.mkdir(component, 0o755, dir_fd=parent)
            return os.open(component, flags, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise InvalidArchive(
                    f"archive entry {name!r} goes through {'/'.join(parts[: index + 1])!r}, "
                    "which is not a directory (symlink escapes are refused)"
                ) from None
            raise

    def forget(self, parts: list[str]) -> None:
        """Drop cached fds at or below ``parts`` (the directory was removed/replaced)."""
        prefix = tuple(parts)
        for key in [k for k in self._dir_cache if k[: len(prefix)] == prefix]:
            os.close(self._dir_cache.pop(key))

    def remove(self, parent_fd: int, parts: list[str]) -> None:
        """Remove whatever is at ``parts`` (a file or a whole directory), if anything.

        A directory is moved out of the tree in O(1) and deleted after the unpack, so a
        hostile archive's million-deep directory costs no recursion here.
        """
        base = parts[-1]
        try:
            st = os.stat(base, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self.forget(parts)
            if self._trash_fd is None:
                self.trash.mkdir()
                self._trash_fd = os.open(self.trash, os.O_RDONLY | os.O_DIRECTORY)
            self._trashed += 1
            os.rename(base, str(self._trashed), src_dir_fd=parent_fd, dst_dir_fd=self._trash_fd)
        else:
            os.unlink(base, dir_fd=parent_fd)


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    result: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if not key.startswith(_XATTR_PAX_PREFIX):
            continue
        name = key[len(_XATTR_PAX_PREFIX) :]
        if name.startswith("trusted.overlay.") or not name:
            continue
        result[name] = value.encode("utf-8", "surrogateescape")
    return result


def _apply_metadata(parent_fd: int, base: str, member: tarfile.TarInfo, fd: int | None) -> None:
    """Owner, mode (after chown, which clears setuid), xattrs, then mtime."""
    os.chown(base, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
    if not member.issym():
        if fd is not None:
            os.fchmod(fd, member.mode & 0o7777)
        else:
            os.chmod(base, member.mode & 0o7777, dir_fd=parent_fd)
    for name, value in _xattrs(member).items():
        try:
            if fd is not None:
                os.setxattr(fd, name, value)
            else:
                os.setxattr(f"/proc/self/fd/{parent_fd}/{base}", name, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EINVAL):
                raise
    mtime_ns = int(member.mtime * 1_000_000_000)
    os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=parent_fd, follow_symlinks=False)


def unpack_layer(stream: IO[bytes], dest: Path) -> UnpackResult:
    """Unpack the uncompressed tar ``stream`` into the empty directory ``dest``.

    Returns the diff id (sha256 of the tar bytes) so the caller can check it against the
    image config. Raises ``InvalidArchive`` for corrupt or hostile input; the caller owns
    ``dest`` and removes it on failure.
    """
    reader = _HashingReader(stream)
    tree = _Tree(dest)
    result = UnpackResult(diff_id="", size=0)
    dir_times: list[tuple[list[str], tarfile.TarInfo]] = []
    try:
        try:
            archive = tarfile.open(fileobj=reader, mode="r|")  # type: ignore[call-overload]
        except tarfile.ReadError as exc:
            if reader.count == 0:
                # An empty stream is an empty layer (some tools emit those).
                result.diff_id = "sha256:" + reader.hash.hexdigest()
                return result
            raise InvalidArchive(f"layer is not a tar archive: {exc}") from exc
        with archive:
            for member in archive:
                try:
                    _unpack_member(archive, member, tree, result, dir_times)
                except OSError as exc:
                    raise _os_error(member, exc) from exc
        reader.drain()
        for parts, member in reversed(dir_times):
            with contextlib.suppress(InvalidArchive, FileNotFoundError):
                parent_fd = tree.open_dir(parts[:-1], create=False, name=member.name)
                mtime_ns = int(member.mtime * 1_000_000_000)
                os.utime(
                    parts[-1], ns=(mtime_ns, mtime_ns), dir_fd=parent_fd, follow_symlinks=False
                )
    except (tarfile.TarError, EOFError, ValueError) as exc:
        raise InvalidArchive(f"layer tarball is corrupt: {exc}") from exc
    finally:
        tree.close()
    result.diff_id = "sha256:" + reader.hash.hexdigest()
    return result


def _os_error(member: tarfile.TarInfo, exc: OSError) -> AgentError:
    """What a failed filesystem call while unpacking means for the user."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"no space left while unpacking {member.name!r}")
    return InvalidArchive(f"archive entry {member.name!r} cannot be unpacked: {exc.strerror}")


def _unpack_member(
    archive: tarfile.TarFile,
    member: tarfile.TarInfo,
    tree: _Tree,
    result: UnpackResult,
    dir_times: list[tuple[list[str], tarfile.TarInfo]],
) -> None:
    parts = clean_member_path(member.name)
    if not parts:
        return  # the layer root itself
    result.entries += 1
    base = parts[-1]
    parent_parts = parts[:-1]
    if base.startswith(WHITEOUT_PREFIX):
        parent_fd = tree.open_dir(parent_parts, create=True, name=member.name)
        if base == OPAQUE_MARKER:
            os.setxattr(f"/proc/self/fd/{parent_fd}", OVERLAY_OPAQUE_XATTR, b"y")
            return
        hidden = base[len(WHITEOUT_PREFIX) :]
        if hidden.startswith(WHITEOUT_PREFIX) or hidden in ("", ".", ".."):
            return  # aufs metadata (.wh..wh.plnk etc.) has no meaning here
        tree.remove(parent_fd, [*parent_parts, hidden])
        os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=parent_fd)
        return
    parent_fd = tree.open_dir(parent_parts, create=True, name=member.name)

    if member.isdir():
        try:
            st = os.stat(base, dir_fd=parent_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                tree.remove(parent_fd, parts)
                os.mkdir(base, 0o755, dir_fd=parent_fd)
        except FileNotFoundError:
            os.mkdir(base, 0o755, dir_fd=parent_fd)
        fd = tree.open_dir(parts, create=False, name=member.name)
        _apply_metadata(parent_fd, base, member, fd)
        dir_times.append((parts, member))
        return

    tree.remove(parent_fd, parts)
    if member.isreg():
        fd = os.open(
            base,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent_fd,
        )
        try:
            source = archive.extractfile(member)
            if source is not None:
                remaining = member.size
                while remaining > 0:
                    chunk = source.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise InvalidArchive(f"archive entry {member.name!r} is truncated")
                    os.write(fd, chunk)
                    remaining -= len(chunk)
                result.size += member.size
            _apply_metadata(parent_fd, base, member, fd)
        finally:
            os.close(fd)
    elif member.issym():
        os.symlink(member.linkname, base, dir_fd=parent_fd)
        _apply_metadata(parent_fd, base, member, None)
    elif member.islnk():
        target = clean_member_path(member.linkname)
        if not target:
            raise InvalidArchive(f"hard link {member.name!r} points at the layer root")
        target_parent = tree.open_dir(target[:-1], create=False, name=member.name)
        try:
            os.link(
                target[-1],
                base,
                src_dir_fd=target_parent,
                dst_dir_fd=parent_fd,
                follow_symlinks=False,
            )
        except (FileNotFoundError, PermissionError):
            raise InvalidArchive(
                f"hard link {member.name!r} points at {member.linkname!r}, which is not "
                "a file in this layer"
            ) from None
    elif member.isfifo():
        os.mkfifo(base, 0o600, dir_fd=parent_fd)
        _apply_metadata(parent_fd, base, member, None)
    elif member.ischr() or member.isblk():
        result.skipped_devices.append("/".join(parts))
    # Other types (GNU volume headers, etc.) carry nothing for a root filesystem.
