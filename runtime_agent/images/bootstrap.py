"""``library/busybox:latest`` from the host's statically linked busybox.

No registry is reachable from the nodes we target, so the base image of tests and demos
is built locally: a one-layer rootfs with /bin/busybox, a hard link per applet (as the
official busybox image has), /etc/passwd and /etc/group (root, nobody), /tmp, /root and
the mount points the runtime fills in (/proc, /sys, /dev). Timestamps come from the
busybox binary, so the same binary always yields the same image id.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from runtime_agent.errors import NotFound
from runtime_agent.images.media import OCI_LAYER
from runtime_agent.images.reference import SHARED_NAMESPACE

if TYPE_CHECKING:
    from runtime_agent.agent import Agent
    from runtime_agent.images.store import Image

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ETC_USERS = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnobody:x:65534:\n"


def find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    found = shutil.which("busybox")
    if found:
        return Path(found)
    raise NotFound("busybox not found on this host: install the busybox-static package")


def _no_interp(fh: io.BufferedReader) -> bool:
    """True if the ELF has no PT_INTERP program header (i.e. it is statically linked)."""
    import struct

    fh.seek(0)
    header = fh.read(64)
    if header[:4] != b"\x7fELF" or header[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", header, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
    fh.seek(phoff)
    table = fh.read(phentsize * phnum)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def busybox_rootfs_tar(busybox: Path, out: io.BufferedIOBase) -> None:
    """Write the rootfs tar of the busybox image to ``out``."""
    mtime = int(busybox.stat().st_mtime)
    applets = subprocess.run(
        [str(busybox), "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()

    def info(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.size = size
        ti.mtime = mtime
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        return ti

    dirs = {
        "bin": 0o755,
        "dev": 0o755,
        "etc": 0o755,
        "home": 0o755,
        "proc": 0o555,
        "root": 0o700,
        "sbin": 0o755,
        "sys": 0o555,
        "tmp": 0o1777,
        "usr": 0o755,
        "usr/bin": 0o755,
        "usr/sbin": 0o755,
        "var": 0o755,
        "var/spool": 0o755,
        "var/www": 0o755,
    }
    for applet in applets:
        parent = os.path.dirname(applet)
        while parent:
            dirs.setdefault(parent, 0o755)
            parent = os.path.dirname(parent)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(dirs):
            tar.addfile(info(name + "/", tarfile.DIRTYPE, dirs[name]))
        size = busybox.stat().st_size
        with open(busybox, "rb") as fh:
            tar.addfile(info("bin/busybox", tarfile.REGTYPE, 0o755, size), fh)
        for applet in sorted(set(applets)):
            if applet == "bin/busybox":
                continue
            link = info(applet, tarfile.LNKTYPE, 0o755)
            link.linkname = "bin/busybox"
            tar.addfile(link)
        for name, text in (("etc/passwd", ETC_USERS), ("etc/group", GROUP)):
            data = text.encode()
            tar.addfile(info(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))


def bootstrap_busybox(agent: Agent, ref: str = "busybox:latest") -> Image:
    """Create (or refresh) ``library/busybox:latest``; idempotent for the same binary."""
    busybox = find_busybox()
    with open(busybox, "rb") as fh:
        static = _no_interp(fh)
    if not static:
        raise NotFound(f"{busybox} is dynamically linked: install the busybox-static package")
    version = subprocess.run(
        [str(busybox)], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    agent.content.ingest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=agent.content.ingest_dir) as tmp:
        busybox_rootfs_tar(busybox, tmp)
        tmp.seek(0)
        digest, size = agent.content.ingest(tmp)
    created = _iso(int(busybox.stat().st_mtime))
    config = {
        "created": created,
        "config": {"Env": [DEFAULT_PATH], "Cmd": ["sh"]},
        "history": [
            {
                "created": created,
                "created_by": f"berth-agent bootstrap from {busybox}"
                + (f" ({version[0].strip()})" if version else ""),
            }
        ],
    }
    return agent.images.commit(
        SHARED_NAMESPACE, ref, config, [{"mediaType": OCI_LAYER, "digest": digest, "size": size}]
    )


def _iso(epoch: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
