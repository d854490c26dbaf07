"""Content store: verified, atomic, digest-addressed blobs."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from runtime_agent.content.store import ContentStore
from runtime_agent.errors import DigestMismatch, InvalidArgument, NotFound


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path) -> ContentStore:
    return ContentStore(tmp_path / "content")


def test_ingest_stores_under_digest_and_reads_back(store: ContentStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest, size = store.ingest(io.BytesIO(data))
    assert digest == _digest(data)
    assert size == len(data)
    assert store.has(digest)
    assert store.read_bytes(digest) == data
    assert store.size(digest) == len(data)
    assert list(store.digests()) == [digest]
    assert store.verify(digest)


def test_wrong_digest_leaves_nothing(store: ContentStore) -> None:
    data = b"hello"
    wrong = _digest(b"other")
    with pytest.raises(DigestMismatch):
        store.ingest(io.BytesIO(data), expected_digest=wrong)
    assert not store.has(wrong)
    assert not store.has(_digest(data))
    assert list(store.digests()) == []
    assert list(store.ingest_dir.iterdir()) == []


def test_wrong_size_leaves_nothing(store: ContentStore) -> None:
    data = b"0123456789"
    with pytest.raises(DigestMismatch):
        store.ingest(io.BytesIO(data), expected_digest=_digest(data), expected_size=5)
    with pytest.raises(DigestMismatch):
        store.ingest(io.BytesIO(data + b"x"), expected_digest=_digest(data), expected_size=10)
    assert list(store.digests()) == []
    assert list(store.ingest_dir.iterdir()) == []


class _FailingStream(io.RawIOBase):
    def __init__(self) -> None:
        self.sent = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.sent > 2 * 1024 * 1024:
            raise OSError("connection reset")
        self.sent += 1024 * 1024
        return b"x" * 1024 * 1024


def test_interrupted_stream_leaves_no_blob(store: ContentStore) -> None:
    with pytest.raises(OSError, match="connection reset"):
        store.ingest(_FailingStream())  # type: ignore[arg-type]
    assert list(store.digests()) == []
    assert list(store.ingest_dir.iterdir()) == []


def test_write_bytes_is_idempotent_and_delete(store: ContentStore) -> None:
    d1 = store.write_bytes(b"abc")
    d2 = store.write_bytes(b"abc")
    assert d1 == d2 == _digest(b"abc")
    assert store.delete(d1) is True
    assert store.delete(d1) is False
    with pytest.raises(NotFound):
        store.read_bytes(d1)


def test_blobs_are_read_only_files(store: ContentStore) -> None:
    digest = store.write_bytes(b"immutable")
    assert store.path(digest).stat().st_mode & 0o222 == 0


@pytest.mark.parametrize("bad", ["sha256:xyz", "md5:" + "0" * 32, "../../etc/passwd", ""])
def test_bad_digest_is_invalid_argument(store: ContentStore, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        store.path(bad)
