"""Layer tars written directly by the builder, and a read-only view of an image's tree.

COPY, ADD and WORKDIR don't need a container: the builder writes their layer as a tar
straight into the content store (uncompressed, PAX), which needs no mounts and no root.
To decide where a file lands (is the destination an existing directory?) and to resolve
``--chown user:group`` names, ``FsIndex`` replays the image's layer tars (whiteouts
included) into a map of path -> entry metadata, without unpacking anything.

Layers are the tenant's bytes: they are read through the agent's one archive reader
(``runtime_agent.archive``), so a layer bomb stops at the node's layer caps, and
``read_file`` (passwd and group lookups) loads at most ``ID_FILE_MAX_BYTES``. What a
build writes into its COPY/ADD layers is charged to its ``LayerBudget``.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from runtime_agent.archive import ArchiveLimits, members, open_tar
from runtime_agent.content.store import ContentStore
from runtime_agent.errors import InvalidArgument, NotFound, ResourceExhausted
from runtime_agent.images import media

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
LAYER_MEDIA_TYPE = media.OCI_LAYER
# /etc/passwd and /etc/group are read whole for USER and --chown lookups: a few thousand
# accounts are well under this; a bigger file is refused, never loaded.
ID_FILE_MAX_BYTES = 4 << 20


def _default_limits() -> ArchiveLimits:
    from runtime_agent.config import AgentConfig

    return AgentConfig().layer_limits


@contextlib.contextmanager
def _layer_members(
    content: ContentStore, digest: str, limits: ArchiveLimits
) -> Iterator[tuple[tarfile.TarFile | None, Iterator[tuple[tarfile.TarInfo, list[str]]]]]:
    """The members of a stored layer, read through the archive reader's caps."""
    with (
        content.open(digest) as raw,
        media.open_uncompressed(raw) as stream,
        open_tar(stream, limits, compressed=False) as (tar, _capped),
    ):
        yield tar, (members(tar, limits) if tar is not None else iter(()))


class LayerBudget:
    """Bytes one build may write into the layers it makes itself (COPY/ADD), across all
    of its steps and stages: each archive is capped on its own, this caps their sum, so
    many ADDs each under the per-archive cap cannot add up to a full disk. Charged before
    a file is written; shared by a build's stage threads."""

    def __init__(self, max_bytes: int, setting: str = "") -> None:
        self.max_bytes = max_bytes
        self.setting = setting
        self.used = 0
        self._lock = threading.Lock()

    def charge(self, size: int, what: str) -> None:
        with self._lock:
            if self.used + size > self.max_bytes:
                where = f" (set by {self.setting})" if self.setting else ""
                raise ResourceExhausted(
                    f"{what}: the build's COPY/ADD layers would hold more than the limit of "
                    f"{self.max_bytes} bytes per build{where}",
                    limit=self.max_bytes,
                    resource="build layer bytes",
                )
            self.used += size


@dataclass(frozen=True)
class Entry:
    kind: str  # "dir", "file", "symlink", "other"
    mode: int
    uid: int
    gid: int
    linkname: str = ""
    layer: str = ""  # digest of the layer holding a regular file's content
    member: str = ""  # its member name there


def _clean(name: str) -> str:
    return posixpath.normpath("/" + name.lstrip("/"))


def _kind(info: tarfile.TarInfo) -> str:
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.isfile() or info.islnk():
        return "file"
    return "other"


class FsIndex:
    """Path -> metadata for an image's merged tree (what a container would see)."""

    def __init__(
        self, entries: dict[str, Entry] | None = None, limits: ArchiveLimits | None = None
    ) -> None:
        self.entries: dict[str, Entry] = (
            entries if entries is not None else {"/": Entry("dir", 0o755, 0, 0)}
        )
        self.limits = limits or _default_limits()  # caps on reading each layer

    def copy(self) -> FsIndex:
        return FsIndex(dict(self.entries), self.limits)

    def apply_layer(self, content: ContentStore, digest: str) -> None:
        """Replay one layer (read through ``self.limits``: a bomb is refused, with
        ``ResourceExhausted`` naming the cap, before it costs more than the cap)."""
        with _layer_members(content, digest, self.limits) as (_tar, entries):
            for info, parts in entries:
                path = "/" + "/".join(parts)
                parent, base = posixpath.split(path)
                if base == OPAQUE:
                    prefix = parent.rstrip("/") + "/"
                    for key in [k for k in self.entries if k.startswith(prefix)]:
                        del self.entries[key]
                    continue
                if base.startswith(WHITEOUT):
                    gone = posixpath.join(parent, base[len(WHITEOUT) :])
                    self._remove_tree(gone)
                    continue
                if info.islnk():
                    target = self.entries.get(_clean(info.linkname))
                    if target is not None:
                        self.entries[path] = target
                        continue
                kind = _kind(info)
                if kind != "dir" and path in self.entries:
                    self._remove_tree(path)
                self.entries[path] = Entry(
                    kind,
                    info.mode & 0o7777,
                    info.uid,
                    info.gid,
                    info.linkname if info.issym() else "",
                    digest if kind == "file" else "",
                    info.name if kind == "file" else "",
                )

    def _remove_tree(self, path: str) -> None:
        self.entries.pop(path, None)
        prefix = path.rstrip("/") + "/"
        for key in [k for k in self.entries if k.startswith(prefix)]:
            del self.entries[key]

    def resolve(self, path: str, *, follow_last: bool = True, depth: int = 0) -> str:
        """``path`` with symlinks in it resolved inside the image (never escaping /)."""
        if depth > 40:
            raise InvalidArgument(f"too many levels of symbolic links resolving {path}")
        parts = [p for p in _clean(path).split("/") if p]
        current = "/"
        for i, part in enumerate(parts):
            candidate = posixpath.join(current, part)
            entry = self.entries.get(candidate)
            last = i == len(parts) - 1
            if entry is not None and entry.kind == "symlink" and (follow_last or not last):
                target = entry.linkname
                joined = target if target.startswith("/") else posixpath.join(current, target)
                rest = "/".join(parts[i + 1 :])
                return self.resolve(
                    posixpath.join(joined, rest) if rest else joined,
                    follow_last=follow_last,
                    depth=depth + 1,
                )
            current = candidate
        return _clean(current)

    def get(self, path: str) -> Entry | None:
        return self.entries.get(self.resolve(path))

    def is_dir(self, path: str) -> bool:
        entry = self.get(path)
        return entry is not None and entry.kind == "dir"

    def read_file(
        self, content: ContentStore, path: str, max_bytes: int = ID_FILE_MAX_BYTES
    ) -> bytes | None:
        """The content of the image's file ``path`` (``None`` if it is not a file), at
        most ``max_bytes`` of it: a larger file is refused from its header, before any of
        it is read, so a tenant's 2 GiB /etc/passwd costs no memory."""
        entry = self.get(path)
        if entry is None or entry.kind != "file":
            return None
        with _layer_members(content, entry.layer, self.limits) as (tar, entries):
            for info, _parts in entries:
                if info.name != entry.member:
                    continue
                if info.size > max_bytes:
                    raise ResourceExhausted(
                        f"{path} in the image is {info.size} bytes; at most {max_bytes} are "
                        "read to look up users and groups",
                        limit=max_bytes,
                        resource=f"size of {path}",
                    )
                fh = tar.extractfile(info) if tar is not None else None
                return fh.read(max_bytes) if fh is not None else None
        return None


def lookup_ids(
    index: FsIndex, content: ContentStore, spec: str, *, where: str = "--chown"
) -> tuple[int, int]:
    """``user[:group]`` (names or numbers) -> (uid, gid) using the image's passwd/group."""
    user, _, group = spec.partition(":")
    if not user:
        raise InvalidArgument(f"{where}: empty user in {spec!r}")

    def table(path: str) -> dict[str, list[str]]:
        data = index.read_file(content, path)
        rows: dict[str, list[str]] = {}
        for line in (data or b"").decode(errors="replace").splitlines():
            fields = line.split(":")
            if len(fields) >= 3 and fields[0]:
                rows[fields[0]] = fields
        return rows

    passwd: dict[str, list[str]] | None = None
    if user.isdigit():
        uid = int(user)
        primary_gid = uid
        if not group:
            passwd = table("/etc/passwd")
            for fields in passwd.values():
                if fields[2] == user and len(fields) > 3 and fields[3].isdigit():
                    primary_gid = int(fields[3])
                    break
    else:
        passwd = table("/etc/passwd")
        if user not in passwd:
            raise NotFound(
                f"{where}: unable to find user {user}: no matching entries in passwd file"
            )
        uid = int(passwd[user][2])
        primary_gid = int(passwd[user][3]) if len(passwd[user]) > 3 else uid
    if not group:
        return uid, primary_gid
    if group.isdigit():
        return uid, int(group)
    groups = table("/etc/group")
    if group not in groups:
        raise NotFound(f"{where}: unable to find group {group}: no matching entries in group file")
    return uid, int(groups[group][2])


class LayerWriter:
    """Builds one layer tar into the content store; parent directories come first."""

    def __init__(
        self,
        content: ContentStore,
        index: FsIndex,
        mtime: float,
        budget: LayerBudget | None = None,
    ) -> None:
        self.content = content
        self.index = index
        self.mtime = mtime
        self.budget = budget  # the build's total, charged by every file written
        self._writer = content.writer()
        self._tar = tarfile.open(fileobj=self._writer, mode="w|", format=tarfile.PAX_FORMAT)  # type: ignore[call-overload]
        self._written: set[str] = set()
        self.count = 0

    def ensure_parents(self, path: str, uid: int = 0, gid: int = 0) -> None:
        """Write entries for the directories above ``path``: existing ones keep their
        metadata (as an overlay diff would show them), missing ones are created 0755."""
        parts = [p for p in _clean(path).split("/") if p][:-1]
        current = "/"
        for part in parts:
            current = self.index.resolve(posixpath.join(current, part))
            if current in self._written:
                continue
            entry = self.index.entries.get(current)
            if entry is not None and entry.kind != "dir":
                raise InvalidArgument(f"cannot create {path}: {current} is not a directory")
            if entry is None:
                self.add_dir(current, 0o755, uid, gid)
            else:
                self.add_dir(current, entry.mode, entry.uid, entry.gid, record=False)

    def _info(self, path: str, kind: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(_clean(path).lstrip("/") or ".")
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.uname = info.gname = ""
        info.mtime = self.mtime
        return info

    def add_dir(
        self,
        path: str,
        mode: int,
        uid: int,
        gid: int,
        *,
        mtime: float | None = None,
        record: bool = True,
    ) -> None:
        path = _clean(path)
        if path == "/":
            return
        info = self._info(path + "/", tarfile.DIRTYPE, mode, uid, gid)
        if mtime is not None:
            info.mtime = mtime
        self._add(path, info, None, "dir", record)

    def add_file(
        self,
        path: str,
        data: io.BufferedIOBase | io.BytesIO | Any,
        size: int,
        mode: int,
        uid: int,
        gid: int,
        *,
        mtime: float | None = None,
    ) -> None:
        if self.budget is not None:
            self.budget.charge(size, _clean(path))
        info = self._info(path, tarfile.REGTYPE, mode, uid, gid)
        info.size = size
        if mtime is not None:
            info.mtime = mtime
        self._add(_clean(path), info, data, "file", True)

    def add_symlink(
        self, path: str, target: str, uid: int, gid: int, *, mtime: float | None = None
    ) -> None:
        info = self._info(path, tarfile.SYMTYPE, 0o777, uid, gid)
        info.linkname = target
        if mtime is not None:
            info.mtime = mtime
        self._add(_clean(path), info, None, "symlink", True)

    def add_whiteout(self, path: str) -> None:
        parent, base = posixpath.split(_clean(path))
        info = self._info(posixpath.join(parent, WHITEOUT + base), tarfile.REGTYPE, 0o644, 0, 0)
        self._tar.addfile(info, io.BytesIO(b""))
        self.index._remove_tree(_clean(path))
        self.count += 1

    def _add(self, path: str, info: tarfile.TarInfo, data: Any, kind: str, record: bool) -> None:
        existing = self.index.entries.get(path)
        if existing is not None and (kind != "dir" or existing.kind != "dir"):
            if existing.kind == "dir" and kind != "dir":
                raise InvalidArgument(f"cannot replace directory {path} with a {kind}")
            self.index._remove_tree(path)
        self._tar.addfile(info, data)
        self._written.add(path)
        self.count += 1
        if record or path not in self.index.entries:
            self.index.entries[path] = Entry(
                kind, info.mode, info.uid, info.gid, info.linkname, "", ""
            )

    def commit(self) -> dict[str, Any] | None:
        """Publish the layer; ``None`` if nothing was written (docker's empty layer)."""
        self._tar.close()
        if self.count == 0:
            self._writer.abort()
            return None
        digest, size = self._writer.commit()
        return {"mediaType": LAYER_MEDIA_TYPE, "digest": digest, "size": size}

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._tar.close()
        self._writer.abort()


def index_for(
    content: ContentStore, layers: Iterable[dict[str, Any]], limits: ArchiveLimits | None = None
) -> FsIndex:
    """The merged tree of ``layers``, each read within ``limits`` (default: the node's
    layer caps from the environment)."""
    index = FsIndex(limits=limits)
    for layer in layers:
        index.apply_layer(content, layer["digest"])
    return index


def supplementary_gids(
    index: FsIndex, content: ContentStore, spec: str, uid: int, gid: int
) -> list[int]:
    """Docker's additional groups for ``USER spec``: the primary gid, then (when no group
    is given explicitly) every /etc/group entry listing the user's name as a member."""
    gids = [gid]
    user, _, group = spec.partition(":")
    if group:
        return gids
    name = user if user and not user.isdigit() else None
    if name is None:
        for line in (
            (index.read_file(content, "/etc/passwd") or b"").decode(errors="replace").splitlines()
        ):
            fields = line.split(":")
            if len(fields) >= 3 and fields[2] == str(uid):
                name = fields[0]
                break
    if name is None:
        return gids
    for line in (
        (index.read_file(content, "/etc/group") or b"").decode(errors="replace").splitlines()
    ):
        fields = line.split(":")
        if len(fields) >= 4 and fields[2].isdigit() and name in fields[3].split(","):
            if int(fields[2]) not in gids:
                gids.append(int(fields[2]))
    return gids
