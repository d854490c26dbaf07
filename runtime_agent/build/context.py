"""The build context: a directory or a tar stream, filtered by ``.dockerignore``.

A tar stream is unpacked into a private directory by the agent's one hardened extractor
(``runtime_agent.archive``): no member can name or touch anything outside it, and it stops
as soon as the tenant's size or member-count limit is passed. COPY/ADD sources are resolved
here: docker's glob rules (``filepath.Match`` per element), no path may leave the context,
and ignored files are invisible. Sources are digested by content and metadata (type,
permission bits, symlink target) but never mtimes, so touching a file keeps the cache warm.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import hashlib
import os
import posixpath
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from runtime_agent.archive import CONTEXT_POLICY, extract
from runtime_agent.build.dockerignore import IgnoreMatcher
from runtime_agent.config import AgentConfig
from runtime_agent.errors import InvalidArchive, InvalidArgument, NotFound, ResourceExhausted

DEFAULT_CONTEXT_LIMIT = 2 * 1024**3


def _refuse_escaping_symlinks(root: Path) -> None:
    """Refuse a tree holding a symlink that resolves outside ``root``.

    The extractor already refuses absolute symlinks and targets that climb out as
    written, but a chain can still get out (``a/b/l -> ../..`` then ``up ->
    a/b/l/../..``: each inside on paper, ``up`` two levels above the root). Once every
    member is in place, resolving each link settles it, so reading the Dockerfile, the
    .dockerignore or a COPY source never follows a link off the context.
    """
    base = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                continue
            real = _resolve(path, base)
            if real != base and not real.startswith(base + os.sep):
                rel = os.path.relpath(path, base)
                raise InvalidArchive(
                    f"symlink {rel!r} resolves outside the build context ({os.readlink(path)!r})"
                )


def _resolve(path: str, base: str) -> str:
    """Where the link at ``path`` leads, resolved by the kernel (``O_PATH``): at most 40
    links deep and one step per component. ``os.path.realpath`` resolves in Python with no
    such bound and no memory between calls: a context of long link chains cost minutes of
    agent CPU, and one past ~1000 links raised ``RecursionError``."""
    try:
        return _kernel_path(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            rel = os.path.relpath(path, base)
            raise InvalidArchive(f"symlink {rel!r} loops or chains too deep") from None
    # A dangling link (it points at nothing): its target read lexically from its
    # directory, which the kernel resolves.
    parent = _kernel_path(os.path.dirname(path))
    return os.path.normpath(os.path.join(parent, os.readlink(path)))


def _kernel_path(path: str) -> str:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class BuildContext:
    """A directory tree the Dockerfile's COPY/ADD read from."""

    def __init__(self, root: Path, *, owned: bool = False) -> None:
        self.root = root.resolve()
        self._owned = owned
        self.ignore = IgnoreMatcher.for_directory(self.root)
        self._digests: dict[str, str] = {}

    @classmethod
    def from_directory(cls, path: Path, limit: int = DEFAULT_CONTEXT_LIMIT) -> BuildContext:
        if not path.is_dir():
            raise NotFound(f"build context {path} is not a directory")
        ctx = cls(path)
        total = 0
        for rel in ctx.walk():
            full = ctx.root / rel
            if full.is_file() and not full.is_symlink():
                total += full.stat().st_size
                if total > limit:
                    raise ResourceExhausted(
                        f"build context is larger than the limit of {limit} bytes",
                        limit=limit,
                    )
        return ctx

    @classmethod
    def from_tar(
        cls,
        stream: IO[bytes],
        limit: int = DEFAULT_CONTEXT_LIMIT,
        workdir: Path | None = None,
        *,
        max_entries: int | None = None,
    ) -> BuildContext:
        """Unpack a (possibly gzip/bzip2/xz-compressed) tar stream with the agent's one
        hardened extractor: no member can name or touch anything outside the context,
        owners are not kept, modes lose setuid/setgid/sticky and group/other write. At most
        ``limit`` bytes of files and ``max_entries`` members (default: the node's
        ``context_max_entries``); nothing is kept if the stream is bad or too big."""
        limits = AgentConfig().context_limits(limit)
        if max_entries is not None:
            limits = dataclasses.replace(limits, max_entries=max_entries)
        tmp = Path(tempfile.mkdtemp(prefix="berth-ctx-", dir=workdir))
        try:
            extract(stream, tmp, limits, CONTEXT_POLICY)
            _refuse_escaping_symlinks(tmp)
            return cls(tmp, owned=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)
            self._owned = False

    def __enter__(self) -> BuildContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------------

    def walk(self, start: str = "") -> list[str]:
        """Context-relative paths under ``start`` that .dockerignore leaves in, sorted."""
        return sorted(self._walk(start))

    def _walk(self, start: str) -> Iterator[str]:
        base = self.root / start if start else self.root
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir
            keep_dirs = []
            for d in dirnames:
                rel = posixpath.join(rel_dir, d) if rel_dir else d
                if self.ignore.ignored(rel) and not self.ignore.has_exceptions:
                    continue
                keep_dirs.append(d)
                if not self.ignore.ignored(rel):
                    yield rel
            dirnames[:] = keep_dirs
            for f in sorted(filenames):
                rel = posixpath.join(rel_dir, f) if rel_dir else f
                if not self.ignore.ignored(rel):
                    yield rel

    def read_text(self, relpath: str) -> str:
        return self._safe(relpath).read_text()

    def _safe(self, relpath: str) -> Path:
        clean = posixpath.normpath("/" + relpath).lstrip("/")
        return self.root / clean if clean else self.root

    def resolve_sources(self, src: str) -> list[str]:
        """Context-relative paths a COPY/ADD source names (globs expanded), sorted."""
        clean = posixpath.normpath("/" + src).lstrip("/")
        if posixpath.normpath(src).startswith("../") or posixpath.normpath(src) == "..":
            raise InvalidArgument(f"COPY failed: forbidden path outside the build context: {src}")
        if clean in ("", "."):
            return [""]
        if _has_glob(clean):
            matches = [rel for rel in self._all_paths() if _glob_match(clean, rel)]
            if not matches:
                raise NotFound(f"COPY failed: no source files were specified (pattern {src!r})")
            return sorted(matches)
        path = self.root / clean
        if not os.path.lexists(path) or self.ignore.ignored(clean):
            raise NotFound(
                f"COPY failed: file not found in build context or excluded by .dockerignore: "
                f"stat {clean}: file does not exist"
            )
        real = path.resolve()
        if real != self.root and self.root not in real.parents:
            raise InvalidArgument(f"COPY failed: forbidden path outside the build context: {src}")
        return [clean]

    def _all_paths(self) -> list[str]:
        return list(self.walk())

    def full_path(self, relpath: str) -> Path:
        return self._safe(relpath)

    def digest(self, relpath: str) -> str:
        """Content-and-metadata digest of a file or directory tree (not mtimes, not owners)."""
        if relpath in self._digests:
            return self._digests[relpath]
        h = hashlib.sha256()
        full = self._safe(relpath)
        st = os.lstat(full)
        if stat.S_ISDIR(st.st_mode):
            h.update(f"dir {stat.S_IMODE(st.st_mode):o}\n".encode())
            for rel in self.walk(relpath):
                sub = rel[len(relpath) + 1 :] if relpath else rel
                h.update(f"{sub}\0{self._entry_digest(self.root / rel)}\n".encode())
        else:
            h.update(self._entry_digest(full).encode())
        out = "sha256:" + h.hexdigest()
        self._digests[relpath] = out
        return out

    @staticmethod
    def _entry_digest(path: Path) -> str:
        st = os.lstat(path)
        mode = f"{stat.S_IMODE(st.st_mode):o}"
        if stat.S_ISLNK(st.st_mode):
            return f"link {mode} {os.readlink(path)}"
        if stat.S_ISDIR(st.st_mode):
            return f"dir {mode}"
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return f"file {mode} {h.hexdigest()}"


_GLOB_CHARS = re.compile(r"[*?\[\\]")


def _has_glob(path: str) -> bool:
    return bool(_GLOB_CHARS.search(path))


def _glob_match(pattern: str, path: str) -> bool:
    """``filepath.Match``: same number of elements, each matched without crossing ``/``."""
    pparts = pattern.split("/")
    parts = path.split("/")
    if len(pparts) != len(parts):
        return False
    return all(fnmatch.fnmatchcase(p, pp) for p, pp in zip(parts, pparts, strict=True))
