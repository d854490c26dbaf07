"""Turn a snapshot's upper directory back into an OCI layer tarball.

The inverse of ``unpack``: overlayfs whiteouts (0/0 character devices) become
``.wh.NAME`` entries, opaque directories (``trusted.overlay.opaque=y``) get a
``.wh..wh..opq`` entry. Owners, modes, extended attributes (except overlayfs' own) and
hard links inside the layer are kept; timestamps are truncated to seconds and access /
change times dropped, as docker does, and entries are sorted so the same changes give
the same layer digest (which lets the builder's cache hit).
"""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO

from runtime_agent.snapshots.unpack import (
    OPAQUE_MARKER,
    OVERLAY_OPAQUE_XATTR,
    WHITEOUT_PREFIX,
)

_XATTR_PAX_PREFIX = "SCHILY.xattr."


def _xattr_headers(path: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return headers
    for name in sorted(names):
        if name.startswith("trusted.overlay.") or name.startswith("user.overlay."):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        headers[_XATTR_PAX_PREFIX + name] = value.decode("utf-8", "surrogateescape")
    return headers


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OVERLAY_OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _header(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid = st.st_uid
    info.gid = st.st_gid
    info.mtime = int(st.st_mtime)
    return info


def write_layer(upper: Path, out: BinaryIO) -> int:
    """Write the tar of ``upper`` to ``out``; return the number of entries."""
    count = 0
    links: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(upper):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, upper)
            entries = sorted(dirnames + filenames)
            if rel_dir != "." and _is_opaque(dirpath):
                st = os.lstat(dirpath)
                marker = _header(os.path.join(rel_dir, OPAQUE_MARKER), st, tarfile.REGTYPE)
                marker.mode = 0o644
                marker.uid = marker.gid = 0
                tar.addfile(marker)
                count += 1
            for name in entries:
                path = os.path.join(dirpath, name)
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                st = os.lstat(path)
                mode = st.st_mode
                if stat.S_ISCHR(mode) and st.st_rdev == 0:
                    parent = os.path.dirname(rel)
                    whiteout = _header(
                        os.path.join(parent, WHITEOUT_PREFIX + name), st, tarfile.REGTYPE
                    )
                    whiteout.mode = 0o644
                    tar.addfile(whiteout)
                elif stat.S_ISDIR(mode):
                    info = _header(rel, st, tarfile.DIRTYPE)
                    info.pax_headers = _xattr_headers(path)
                    tar.addfile(info)
                elif stat.S_ISLNK(mode):
                    info = _header(rel, st, tarfile.SYMTYPE)
                    info.linkname = os.readlink(path)
                    info.pax_headers = _xattr_headers(path)
                    tar.addfile(info)
                elif stat.S_ISREG(mode):
                    key = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and key in links:
                        info = _header(rel, st, tarfile.LNKTYPE)
                        info.linkname = links[key]
                        tar.addfile(info)
                    else:
                        if st.st_nlink > 1:
                            links[key] = rel
                        info = _header(rel, st, tarfile.REGTYPE)
                        info.size = st.st_size
                        info.pax_headers = _xattr_headers(path)
                        with open(path, "rb") as fh:
                            tar.addfile(info, fh)
                elif stat.S_ISFIFO(mode):
                    info = _header(rel, st, tarfile.FIFOTYPE)
                    tar.addfile(info)
                else:
                    continue  # device nodes and sockets do not belong in an image layer
                count += 1
    return count
