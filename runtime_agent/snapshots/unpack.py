"""Unpack one OCI layer tarball into an empty directory, safely.

Layers come from strangers (pushed by tenants, pulled from registries), so they go
through the agent's one hardened extractor (``runtime_agent.archive``): every path is
walked from directory descriptors with ``O_NOFOLLOW``, absolute names are taken relative
to the layer root, a ``..`` above it is refused, hard links must point at a file of this
same layer, device nodes are skipped, and the layer's unpacked size and member count are
capped (``AgentConfig.layer_max_bytes`` / ``layer_max_entries``).

What a layer keeps (``LAYER_POLICY``): modes (setuid included, as docker keeps them;
no-new-privileges neutralises them), owners, timestamps, FIFOs and extended attributes,
except ``trusted.overlay.*`` which only the unpacker itself may set. OCI whiteouts become
overlayfs whiteouts: ``.wh.NAME`` -> a 0/0 character device NAME, ``.wh..wh..opq`` ->
``trusted.overlay.opaque=y`` on the directory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from runtime_agent.archive import (
    LAYER_POLICY,
    OPAQUE_MARKER,
    OVERLAY_OPAQUE_XATTR,
    WHITEOUT_PREFIX,
    ArchiveLimits,
    clean_member_path,
    extract,
)
from runtime_agent.snapshots.tree import remove_tree

# Re-exported: the layer differ and the image importer use the same names and rules.
__all__ = [
    "OPAQUE_MARKER",
    "OVERLAY_OPAQUE_XATTR",
    "WHITEOUT_PREFIX",
    "UnpackResult",
    "clean_member_path",
    "remove_tree",
    "unpack_layer",
]


@dataclass
class UnpackResult:
    diff_id: str  # sha256 of the uncompressed tar stream
    size: int  # bytes of regular file content written
    entries: int = 0
    skipped_devices: list[str] = field(default_factory=list)


class _HashingReader:
    """Wraps a stream, hashing everything read through it (the layer's diff id)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.hash.update(data)
        return data


def unpack_layer(
    stream: IO[bytes], dest: Path, limits: ArchiveLimits | None = None
) -> UnpackResult:
    """Unpack the uncompressed tar ``stream`` into the empty directory ``dest``.

    Returns the diff id (sha256 of the tar bytes) so the caller can check it against the
    image config. Raises ``InvalidArchive`` for corrupt or hostile input and
    ``ResourceExhausted`` past ``limits`` (default: the node's configured layer caps);
    the caller owns ``dest`` and removes it on failure.
    """
    if limits is None:
        from runtime_agent.config import AgentConfig

        limits = AgentConfig().layer_limits
    reader = _HashingReader(stream)
    done = extract(reader, dest, limits, LAYER_POLICY, compressed=False)  # type: ignore[arg-type]
    return UnpackResult(
        diff_id="sha256:" + reader.hash.hexdigest(),
        size=done.size,
        entries=done.entries,
        skipped_devices=done.skipped_devices,
    )
