"""The one hardened extractor for the archives a tenant makes the node unpack.

Build contexts, the local archives ``ADD`` extracts and image layers all come from
tenants, and the agent unpacks them as root. Everything here assumes the archive is
hostile:

* ``open_tar`` decompresses (gzip, bzip2, xz; detected from magic bytes, never trusted
  from a name) and counts the uncompressed bytes, so a bomb stops at a cap instead of
  filling the disk; extended headers (PAX records, GNU long names) larger than
  ``MAX_HEADER_BYTES`` are refused before ``tarfile`` reads them into memory.
* ``members`` charges every member against ``ArchiveLimits`` (member count, the sum of
  regular files' sizes) *before* any of its data is written, and splits its name into
  safe components: absolute names are taken relative to the root (as tar and docker
  do), a ``..`` that climbs above the root is refused.
* ``extract`` writes members into a directory component by component from directory
  file descriptors opened with ``O_NOFOLLOW``: an entry whose parent is a symlink (or
  not a directory) is refused, so a symlink the archive planted never redirects a later
  write; a name that exists is unlinked before it is written again (a regular file
  after a hard link of the same name never writes through the link); hard links must
  name a file already unpacked in the same tree and are made with ``linkat`` on that
  tree's descriptors, and no owner, mode or time is ever applied through one; device
  nodes are skipped. ``ExtractPolicy`` says which metadata a kind of archive keeps.

Callers that do not unpack into a directory (``ADD`` writes a layer tar) use
``open_tar`` and ``members`` and so get the same caps and name rules.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import lzma
import os
import secrets
import stat
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from runtime_agent.errors import AgentError, InvalidArchive, ResourceExhausted
from runtime_agent.snapshots.tree import remove_tree

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_XATTR_PAX_PREFIX = "SCHILY.xattr."
_CHUNK = 1 << 20
MAX_DEPTH = 1024  # path components; PATH_MAX (4096 bytes) allows at most ~2048
MAX_HEADER_BYTES = 1 << 20  # one PAX record set or GNU long name/link
# Tar bytes allowed per permitted member beyond the files' contents: a header, a PAX
# header and its record (a long name), and the padding to 512 bytes.
_OVERHEAD_PER_ENTRY = 4096
_EXTENDED_HEADERS = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on what one archive may unpack to; ``what`` names the archive in errors and
    the ``*_setting`` fields name the operator's knob, so a refusal says what to raise."""

    what: str
    max_bytes: int  # sum of the regular files' sizes
    max_entries: int  # members of any type
    bytes_setting: str = ""
    entries_setting: str = ""

    @property
    def max_stream_bytes(self) -> int:
        """The uncompressed tar stream may hold the files plus their headers, no more."""
        return self.max_bytes + self.max_entries * _OVERHEAD_PER_ENTRY + _CHUNK

    def too_big(self) -> ResourceExhausted:
        return self._refusal(
            f"is larger than the limit of {self.max_bytes} bytes unpacked",
            self.max_bytes,
            self.bytes_setting,
            "bytes",
        )

    def too_many(self) -> ResourceExhausted:
        return self._refusal(
            f"has more than the limit of {self.max_entries} entries",
            self.max_entries,
            self.entries_setting,
            "entries",
        )

    def _refusal(self, says: str, limit: int, setting: str, unit: str) -> ResourceExhausted:
        where = f" (set by {setting})" if setting else ""
        return ResourceExhausted(
            f"{self.what} {says}{where}", limit=limit, resource=f"{self.what} {unit}"
        )


@dataclass(frozen=True)
class ExtractPolicy:
    """Which of a member's properties an extraction keeps."""

    whiteouts: bool  # OCI whiteouts become overlayfs ones (layers); else plain names
    owners: bool  # chown to the member's uid/gid; else everything stays the agent's
    xattrs: bool  # SCHILY.xattr.* (never trusted.overlay.*)
    fifos: bool
    mode_mask: int
    symlinks_inside: bool  # refuse absolute symlinks and ones whose target climbs out


# An image layer keeps everything a root filesystem needs (setuid bits included, as
# docker keeps them; no-new-privileges neutralises them).
LAYER_POLICY = ExtractPolicy(
    whiteouts=True, owners=True, xattrs=True, fifos=True, mode_mask=0o7777, symlinks_inside=False
)
# A build context is only read by COPY/ADD, which set owners themselves: no owners,
# xattrs, FIFOs, setuid/setgid/sticky or group/other write bits.
CONTEXT_POLICY = ExtractPolicy(
    whiteouts=False, owners=False, xattrs=False, fifos=False, mode_mask=0o755, symlinks_inside=True
)


@dataclass
class ExtractResult:
    size: int = 0  # bytes of regular file content written
    entries: int = 0
    skipped_devices: list[str] = field(default_factory=list)


class _CappedTarInfo(tarfile.TarInfo):
    """Refuses an extended header too large to be real before tarfile buffers it."""

    def _proc_member(self, tarfile: tarfile.TarFile) -> Any:
        if self.type in _EXTENDED_HEADERS and self.size > MAX_HEADER_BYTES:
            raise InvalidArchive(
                f"archive entry {self.name[:80]!r} has an extended header of {self.size} bytes "
                f"(at most {MAX_HEADER_BYTES})"
            )
        return super()._proc_member(tarfile)  # type: ignore[misc]


class _Prefixed:
    """A stream with the bytes already read from its start put back in front."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = head
        self._rest = rest

    def read(self, size: int = -1) -> bytes:
        if self._head:
            data = self._head if size < 0 else self._head[:size]
            self._head = self._head[len(data) :]
            return data
        return self._rest.read(size)


class CappedStream:
    """The uncompressed tar bytes, counted: past ``limits.max_stream_bytes`` every read
    raises ``ResourceExhausted`` (padding and trailing data are charged too)."""

    def __init__(self, stream: Any, limits: ArchiveLimits) -> None:
        self._stream = stream
        self._limits = limits
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > _CHUNK:
            size = _CHUNK
        data: bytes = self._stream.read(size)
        self.count += len(data)
        if self.count > self._limits.max_stream_bytes:
            raise self._limits.too_big()
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def decompressed(stream: IO[bytes]) -> Any:
    """``stream`` decompressed if it starts with a gzip, bzip2 or xz header."""
    head = b""
    while len(head) < 6:  # a pipe may hand over fewer bytes than asked
        chunk = stream.read(6 - len(head))
        if not chunk:
            break
        head += chunk
    source = _Prefixed(head, stream)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=source, mode="rb")  # type: ignore[call-overload]
    if head[:3] == b"BZh":
        return bz2.BZ2File(source)  # type: ignore[call-overload]
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(source)  # type: ignore[arg-type]
    return source


@contextlib.contextmanager
def open_tar(
    stream: IO[bytes], limits: ArchiveLimits, *, compressed: bool = True
) -> Iterator[tuple[tarfile.TarFile | None, CappedStream]]:
    """A streaming tar reader over ``stream`` (decompressed first when ``compressed``),
    and the capped stream under it. The reader is ``None`` for an empty stream (an empty
    archive). Corrupt data raises ``InvalidArchive`` naming ``limits.what``."""
    capped = CappedStream(decompressed(stream) if compressed else stream, limits)
    try:
        try:
            tar = tarfile.open(fileobj=capped, mode="r|", tarinfo=_CappedTarInfo)  # type: ignore[call-overload]
        except tarfile.ReadError as exc:
            if capped.count == 0:
                yield None, capped
                return
            raise InvalidArchive(f"{limits.what} is not a valid tar archive: {exc}") from exc
        with tar:
            yield tar, capped
    except (tarfile.TarError, EOFError, ValueError, lzma.LZMAError, zlib.error) as exc:
        raise InvalidArchive(f"{limits.what} is not a valid tar archive: {exc}") from exc
    except OSError as exc:
        if isinstance(exc, gzip.BadGzipFile) or exc.errno is None:
            raise InvalidArchive(f"{limits.what} is not valid compressed data: {exc}") from exc
        raise


def members(
    tar: tarfile.TarFile, limits: ArchiveLimits
) -> Iterator[tuple[tarfile.TarInfo, list[str]]]:
    """Each member with its name split by ``clean_member_path``, charged against
    ``limits`` before the caller sees it (a sparse file counts its full size).

    A streaming ``tarfile`` keeps every header it has read in ``tar.members``; a million
    members with long PAX names would pile up in memory, so each is dropped once the
    caller is done with it (only the current member is ever needed here)."""
    entries = size = 0
    while (member := tar.next()) is not None:
        del tar.members[:]  # type: ignore[attr-defined]
        entries += 1
        if entries > limits.max_entries:
            raise limits.too_many()
        if member.isreg():
            size += member.size
            if size > limits.max_bytes:
                raise limits.too_big()
        _check_numbers(member, limits)
        yield member, clean_member_path(member.name, limits.what)


#: Owners above this are no real ids (a user namespace maps 32-bit ids).
_MAX_ID = 1 << 32
#: Times past this (year ~36812) are no real times; PAX can say 1e400, which is infinity.
_MAX_MTIME = 1 << 40


def _check_numbers(member: tarfile.TarInfo, limits: ArchiveLimits) -> None:
    """PAX headers carry numbers as text of any size: an owner or a time no file can have
    is refused here, before ``os.chown``/``os.utime`` or a layer writer overflow on it
    (``OverflowError`` is no ``AgentError``: it escaped as a crash)."""
    if not (0 <= member.uid < _MAX_ID and 0 <= member.gid < _MAX_ID):
        raise InvalidArchive(f"{limits.what} entry {member.name!r} has an impossible owner")
    if not (-_MAX_MTIME < member.mtime < _MAX_MTIME):  # also refuses NaN
        raise InvalidArchive(f"{limits.what} entry {member.name!r} has an impossible time")


def scan(stream: IO[bytes], limits: ArchiveLimits, *, compressed: bool = True) -> ExtractResult:
    """Read the whole archive ``stream`` through the caps without writing anything:
    what a checker (the control plane, before it accepts a build context) uses to refuse
    what ``extract`` would refuse, at the same cost bound. Returns the members' count and
    the regular files' total size; raises ``InvalidArchive``/``ResourceExhausted``."""
    result = ExtractResult()
    with open_tar(stream, limits, compressed=compressed) as (tar, capped):
        if tar is not None:
            for member, _parts in members(tar, limits):
                result.entries += 1
                if member.isreg():
                    result.size += member.size
        capped.drain()
    return result


def clean_member_path(name: str, what: str = "layer") -> list[str]:
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
                raise InvalidArchive(f"archive entry {name!r} points outside the {what}")
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

    Directory fds are cached (least recently used first out, so an archive with a
    million directories never runs out of descriptors); paths are walked iteratively,
    so depth costs no recursion.
    """

    _CACHE_SIZE = 128

    def __init__(self, root: Path, what: str) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self.what = what
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

    def _open_child(
        self, parent: int, parts: list[str], index: int, *, create: bool, name: str
    ) -> int:
        component = parts[index]
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(component, flags, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise InvalidArchive(
                    f"archive entry {name!r} refers to {'/'.join(parts[: index + 1])!r}, "
                    f"which is not in this {self.what}"
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


def _apply_metadata(
    parent_fd: int, base: str, member: tarfile.TarInfo, fd: int | None, policy: ExtractPolicy
) -> None:
    """Owner, mode (after chown, which clears setuid), xattrs, then mtime; never through
    a symlink (the ``*at`` calls don't follow it, ``fd`` is the object itself)."""
    if policy.owners:
        os.chown(base, member.uid, member.gid, dir_fd=parent_fd, follow_symlinks=False)
    if not member.issym():
        mode = member.mode & policy.mode_mask
        if fd is not None:
            os.fchmod(fd, mode)
        else:
            os.chmod(base, mode, dir_fd=parent_fd)  # a FIFO this call just made
    for name, value in _xattrs(member).items() if policy.xattrs else ():
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


def extract(
    stream: IO[bytes],
    dest: Path,
    limits: ArchiveLimits,
    policy: ExtractPolicy,
    *,
    compressed: bool = True,
) -> ExtractResult:
    """Unpack the tar ``stream`` into the empty directory ``dest``.

    Raises ``InvalidArchive`` for corrupt or hostile input and ``ResourceExhausted`` past
    ``limits``; the caller owns ``dest`` and removes it on failure. The whole stream is
    read (through the cap), so a caller hashing it sees every byte.
    """
    tree = _Tree(dest, limits.what)
    result = ExtractResult()
    dir_times: list[tuple[list[str], tarfile.TarInfo]] = []
    try:
        with open_tar(stream, limits, compressed=compressed) as (tar, capped):
            if tar is not None:
                for member, parts in members(tar, limits):
                    try:
                        _extract_member(tar, member, parts, tree, policy, result, dir_times)
                    except OSError as exc:
                        raise _os_error(member, exc) from exc
            capped.drain()
        for parts, member in reversed(dir_times):
            with contextlib.suppress(InvalidArchive, FileNotFoundError):
                parent_fd = tree.open_dir(parts[:-1], create=False, name=member.name)
                mtime_ns = int(member.mtime * 1_000_000_000)
                os.utime(
                    parts[-1], ns=(mtime_ns, mtime_ns), dir_fd=parent_fd, follow_symlinks=False
                )
    finally:
        tree.close()
    return result


def _os_error(member: tarfile.TarInfo, exc: OSError) -> AgentError:
    """What a failed filesystem call while unpacking means for the user."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"no space left while unpacking {member.name!r}")
    return InvalidArchive(f"archive entry {member.name!r} cannot be unpacked: {exc.strerror}")


def _check_symlink(member: tarfile.TarInfo, parts: list[str], what: str) -> None:
    """A symlink whose target is absolute or climbs above the root (read from where the
    link sits) is refused; readers still resolve paths and check they stay inside."""
    target = member.linkname
    escapes = target.startswith("/")
    if not escapes:
        try:
            clean_member_path("/".join([*parts[:-1], target]), what)
        except InvalidArchive:
            escapes = True
    if escapes:
        raise InvalidArchive(f"symlink {member.name!r} points outside the {what} ({target!r})")


def _extract_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    parts: list[str],
    tree: _Tree,
    policy: ExtractPolicy,
    result: ExtractResult,
    dir_times: list[tuple[list[str], tarfile.TarInfo]],
) -> None:
    if not parts:
        return  # the root itself
    result.entries += 1
    base = parts[-1]
    parent_parts = parts[:-1]
    if policy.whiteouts and base.startswith(WHITEOUT_PREFIX):
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
    if member.ischr() or member.isblk():
        result.skipped_devices.append("/".join(parts))  # containers get /dev from runc
        return
    if member.isfifo() and not policy.fifos:
        return
    if member.issym() and policy.symlinks_inside:
        _check_symlink(member, parts, tree.what)
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
        _apply_metadata(parent_fd, base, member, fd, policy)
        dir_times.append((parts, member))
        return

    # Whatever had this name goes first: a later member never writes through an earlier
    # hard link or symlink of the same name.
    tree.remove(parent_fd, parts)
    if member.isreg():
        fd = os.open(
            base,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent_fd,
        )
        try:
            source = tar.extractfile(member)
            if source is not None:
                remaining = member.size
                while remaining > 0:
                    chunk = source.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise InvalidArchive(f"archive entry {member.name!r} is truncated")
                    os.write(fd, chunk)
                    remaining -= len(chunk)
                result.size += member.size
            _apply_metadata(parent_fd, base, member, fd, policy)
        finally:
            os.close(fd)
    elif member.issym():
        os.symlink(member.linkname, base, dir_fd=parent_fd)
        _apply_metadata(parent_fd, base, member, None, policy)
    elif member.islnk():
        _link(member, base, parent_fd, tree)
    elif member.isfifo():
        os.mkfifo(base, 0o600, dir_fd=parent_fd)
        _apply_metadata(parent_fd, base, member, None, policy)
    # Other types (GNU volume headers, etc.) carry nothing for a file tree.


def _link(member: tarfile.TarInfo, base: str, parent_fd: int, tree: _Tree) -> None:
    """A hard link to a file already in this tree (its name taken from the tree's root,
    walked without following symlinks); the link gets none of the member's metadata."""
    try:
        target = clean_member_path(member.linkname, tree.what)
    except InvalidArchive:
        raise InvalidArchive(
            f"hard link {member.name!r} points outside the {tree.what} ({member.linkname!r})"
        ) from None
    missing = InvalidArchive(
        f"hard link {member.name!r} points at {member.linkname!r}, which is not a file in "
        f"this {tree.what}"
    )
    if not target:
        raise missing
    try:
        target_parent = tree.open_dir(target[:-1], create=False, name=member.name)
        os.link(
            target[-1],
            base,
            src_dir_fd=target_parent,
            dst_dir_fd=parent_fd,
            follow_symlinks=False,
        )
    except (InvalidArchive, FileNotFoundError, PermissionError):
        raise missing from None
