"""OCI / docker media types, layer decompression and chain ids."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import subprocess
import threading
from collections.abc import Iterator, Sequence
from typing import IO, BinaryIO

from runtime_agent.content.store import ContentStore
from runtime_agent.errors import InvalidArgument

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
LAYER_TYPES = (
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI chain ids.

    ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)).
    """
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            text = f"{chains[-1]} {diff_id}".encode()
            chains.append("sha256:" + hashlib.sha256(text).hexdigest())
    return chains


def compression_of(head: bytes) -> str:
    """'gzip', 'zstd' or 'none', from a blob's first bytes."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return "none"


@contextlib.contextmanager
def open_uncompressed(raw: BinaryIO) -> Iterator[IO[bytes]]:
    """A stream of the uncompressed bytes of a (possibly gzip/zstd-compressed) layer.

    Compression is detected from magic bytes, not trusted from the media type.
    """
    head = raw.read(4)
    raw.seek(0)
    kind = compression_of(head)
    if kind == "gzip":
        with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
            yield stream  # type: ignore[misc]
    elif kind == "zstd":
        proc = subprocess.Popen(
            ["zstd", "-dcq"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdin is not None and proc.stdout is not None
        feeder = threading.Thread(target=_feed, args=(raw, proc.stdin), daemon=True)
        feeder.start()
        try:
            yield proc.stdout
            while proc.stdout.read(1 << 20):
                pass
        finally:
            proc.stdout.close()
            feeder.join()
            if proc.wait() != 0:
                raise InvalidArgument("layer is not valid zstd data")
    else:
        yield raw


def _feed(source: BinaryIO, sink: IO[bytes]) -> None:
    """Copy a blob into a decompressor's stdin (a thread, so reading never deadlocks)."""
    try:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            sink.write(chunk)
    except (BrokenPipeError, ValueError):
        pass  # the reader stopped early; its exit status reports why
    finally:
        with contextlib.suppress(BrokenPipeError):
            sink.close()


def uncompressed_digest(content: ContentStore, digest: str) -> str:
    """sha256 of a layer blob's uncompressed bytes (its diff id)."""
    hasher = hashlib.sha256()
    try:
        with content.open(digest) as raw, open_uncompressed(raw) as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                hasher.update(chunk)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InvalidArgument(f"layer {digest} is corrupt: {exc}", digest=digest) from exc
    return "sha256:" + hasher.hexdigest()


def host_platform() -> tuple[str, str]:
    """(os, architecture) in OCI terms for this machine."""
    import platform

    machine = platform.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )
    return "linux", arch
