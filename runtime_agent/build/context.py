"""The build context: a directory or a tar stream, filtered by ``.dockerignore``.

A tar stream is unpacked into a private directory, refusing members that would escape it
and stopping as soon as the tenant's size limit is passed. COPY/ADD sources are resolved
here: docker's glob rules (``filepath.Match`` per element), no path may leave the context,
and ignored files are invisible. Sources are digested by content and metadata (type,
permission bits, symlink target) but never mtimes, so touching a file keeps the cache warm.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from runtime_agent.build.dockerignore import IgnoreMatcher
from runtime_agent.errors import InvalidArgument, NotFound, ResourceExhausted

DEFAULT_CONTEXT_LIMIT = 2 * 1024**3


# tarfile's own "tar" filter where this Python has it (3.11.4+; Debian 12's 3.11.2 has not):
# the checks in _check_lands_inside and the mode mask apply either way.
_TAR_FILTER: dict[str, Any] = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}


def _check_lands_inside(root: Path, member: tarfile.TarInfo) -> None:
    """Refuse a member that would be written outside ``root``: through a symlink an
    earlier member made (``link -> /etc`` then ``link/passwd``), onto such a symlink, or
    as a symlink pointing out of the context (absolute or ``..``)."""
    base = os.path.realpath(root)

    def inside(path: str) -> bool:
        return path == base or path.startswith(base + os.sep)

    target = os.path.join(base, member.name)
    if not inside(os.path.realpath(target)):
        raise InvalidArgument(f"build context tar member {member.name!r} escapes the context")
    if member.issym() and (
        member.linkname.startswith("/")
        or not inside(os.path.realpath(os.path.join(os.path.dirname(target), member.linkname)))
    ):
        raise InvalidArgument(f"symlink {member.name!r} points outside the context")


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
        cls, stream: IO[bytes], limit: int = DEFAULT_CONTEXT_LIMIT, workdir: Path | None = None
    ) -> BuildContext:
        """Unpack a (possibly compressed) tar stream; nothing is kept if it is bad or too big."""
        tmp = Path(tempfile.mkdtemp(prefix="berth-ctx-", dir=workdir))
        try:
            total = 0
            try:
                with tarfile.open(fileobj=stream, mode="r|*") as tar:
                    for member in tar:
                        total += member.size if member.isfile() else 0
                        if total > limit:
                            raise ResourceExhausted(
                                f"build context is larger than the limit of {limit} bytes",
                                limit=limit,
                            )
                        name = posixpath.normpath(member.name.lstrip("/"))
                        if name == ".":
                            continue
                        if name.startswith("../") or name == "..":
                            raise InvalidArgument(
                                f"build context tar member {member.name!r} escapes the context"
                            )
                        if member.islnk():
                            target = posixpath.normpath(member.linkname.lstrip("/"))
                            if target.startswith(".."):
                                raise InvalidArgument(
                                    f"hard link {member.name!r} points outside the context"
                                )
                        if not (
                            member.isfile() or member.isdir() or member.issym() or member.islnk()
                        ):
                            continue
                        member.name = name
                        _check_lands_inside(tmp, member)
                        member.mode &= 0o755  # no setuid/setgid/sticky, no group/other write
                        tar.extract(member, tmp, set_attrs=True, **_TAR_FILTER)
            except tarfile.TarError as exc:
                raise InvalidArgument(f"build context is not a valid tar stream: {exc}") from exc
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
