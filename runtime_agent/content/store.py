"""Digest-addressed blobs on local disk.

Every blob is written to a temporary file under ``ingest/``, fsynced, hashed while it is
written, checked against the digest (and size) it was announced under, and only then
renamed to ``blobs/sha256/<hex>``. A crash or a bad stream therefore never leaves a
half-written or wrong blob under a digest: readers either see the whole verified blob or
nothing. Leftover temporary files are harmless and removed by ``gc_ingest``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from runtime_agent.errors import DigestMismatch, InvalidArgument, NotFound

_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_CHUNK = 1 << 20


def parse_digest(digest: str) -> str:
    """Return the hex part of a ``sha256:<hex>`` digest, or raise InvalidArgument."""
    match = _DIGEST_RE.match(digest) if isinstance(digest, str) else None
    if match is None:
        raise InvalidArgument(f"invalid digest {digest!r}: expected sha256:<64 hex digits>")
    return match.group(1)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobWriter:
    """A blob being written: hashes as it goes, becomes visible only on ``commit``.

    Use as a context manager; leaving the block without ``commit`` (or with an exception)
    discards the temporary file.
    """

    def __init__(self, store: ContentStore) -> None:
        self._store = store
        store.ingest_dir.mkdir(parents=True, exist_ok=True)
        self.temp_path = store.ingest_dir / f"{secrets.token_hex(12)}.tmp"
        self._file: BinaryIO | None = open(self.temp_path, "xb")
        self._hash = hashlib.sha256()
        self.size = 0
        self.digest: str | None = None

    def write(self, data: bytes) -> int:
        if self._file is None:
            raise ValueError("blob writer is closed")
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def copy_from(self, stream: BinaryIO, limit: int | None = None) -> None:
        """Copy ``stream`` (up to ``limit`` bytes, if given) into the blob."""
        remaining = limit
        while remaining is None or remaining > 0:
            want = _CHUNK if remaining is None else min(_CHUNK, remaining)
            chunk = stream.read(want)
            if not chunk:
                break
            self.write(chunk)
            if remaining is not None:
                remaining -= len(chunk)

    def commit(
        self, expected_digest: str | None = None, expected_size: int | None = None
    ) -> tuple[str, int]:
        """Verify, fsync and publish the blob; return ``(digest, size)``."""
        if self._file is None:
            raise ValueError("blob writer is closed")
        digest = "sha256:" + self._hash.hexdigest()
        try:
            if expected_size is not None and expected_size != self.size:
                raise DigestMismatch(
                    f"blob {expected_digest or digest} is {self.size} bytes, "
                    f"expected {expected_size}",
                    expected_size=expected_size,
                    actual_size=self.size,
                )
            if expected_digest is not None and expected_digest != digest:
                parse_digest(expected_digest)
                raise DigestMismatch(
                    f"content hashes to {digest}, not to the announced {expected_digest}",
                    expected=expected_digest,
                    actual=digest,
                )
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            target = self._store.path(digest)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(self.temp_path, 0o444)
            os.rename(self.temp_path, target)
            _fsync_dir(target.parent)
        except BaseException:
            self.abort()
            raise
        self.digest = digest
        return digest, self.size

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.digest is None:
            self.abort()


class ContentStore:
    """Blobs under ``root/blobs/sha256/<hex>``, temporary files under ``root/ingest``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.ingest_dir = self.root / "ingest"

    def path(self, digest: str) -> Path:
        return self.blobs_dir / parse_digest(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found", digest=digest) from None

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def ingest(
        self,
        stream: BinaryIO,
        expected_digest: str | None = None,
        expected_size: int | None = None,
    ) -> tuple[str, int]:
        """Store everything ``stream`` yields; return ``(digest, size)``.

        With ``expected_size`` the stream is read up to that many bytes (plus one, to
        detect a longer stream) so a blob embedded in a larger stream can be ingested.
        If the expected blob is already present the stream is not read at all.
        """
        if expected_digest is not None:
            parse_digest(expected_digest)
            if self.has(expected_digest) and (
                expected_size is None or self.size(expected_digest) == expected_size
            ):
                return expected_digest, self.size(expected_digest)
        with self.writer() as writer:
            writer.copy_from(stream, None if expected_size is None else expected_size + 1)
            return writer.commit(expected_digest, expected_size)

    def write_bytes(self, data: bytes, expected_digest: str | None = None) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if expected_digest is not None and expected_digest != digest:
            parse_digest(expected_digest)
            raise DigestMismatch(
                f"content hashes to {digest}, not to the announced {expected_digest}",
                expected=expected_digest,
                actual=digest,
            )
        if self.has(digest):
            return digest
        with self.writer() as writer:
            writer.write(data)
            writer.commit(digest)
        return digest

    def read_bytes(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found", digest=digest) from None

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found", digest=digest) from None

    def delete(self, digest: str) -> bool:
        """Remove a blob; True if it existed. Idempotent."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def digests(self) -> Iterator[str]:
        if not self.blobs_dir.is_dir():
            return
        for entry in os.scandir(self.blobs_dir):
            if _DIGEST_RE.match("sha256:" + entry.name):
                yield "sha256:" + entry.name

    def verify(self, digest: str) -> bool:
        """Re-hash a stored blob; False if the bytes on disk no longer match its name."""
        hasher = hashlib.sha256()
        with self.open(digest) as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                hasher.update(chunk)
        return "sha256:" + hasher.hexdigest() == digest

    def gc_ingest(self, older_than_seconds: float = 3600.0) -> int:
        """Remove abandoned temporary files (from crashed writers); return how many."""
        if not self.ingest_dir.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - older_than_seconds
        for entry in os.scandir(self.ingest_dir):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def usage(self) -> int:
        """Bytes used by all blobs."""
        return sum(self.path(d).stat().st_size for d in self.digests())
