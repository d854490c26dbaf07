"""Helpers for build tests: a busybox rootfs tar (no registry needed) and tree dumps."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path
from typing import Any

from runtime_agent.agent import Agent
from runtime_agent.build.events import BuildEvent

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
APPLETS = [
    "sh",
    "ls",
    "cat",
    "echo",
    "rm",
    "mkdir",
    "id",
    "true",
    "false",
    "sleep",
    "env",
    "touch",
    "whoami",
    "printf",
    "chmod",
    "chown",
    "head",
    "dd",
    "wc",
    "test",
    "ln",
    "cp",
    "mv",
    "pwd",
    "stat",
    "find",
    "tar",
    "grep",
    "sed",
    "yes",
]
PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
GROUP = b"root:x:0:\napp:x:1000:\nstaff:x:50:\n"


def busybox_rootfs_tar(path: Path) -> Path:
    """A minimal busybox root filesystem as a tar (what `docker import` takes too)."""
    with tarfile.open(path, "w") as tar:
        for d in ("bin", "etc", "tmp", "root", "usr", "usr/bin", "var", "home"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, "bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        for name, data in (("etc/passwd", PASSWD), ("etc/group", GROUP)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def make_base(agent: Agent, tenant: str, tmp: Path, ref: str = "busybox:latest") -> str:
    """Build `ref` FROM scratch with the busybox rootfs, using the builder itself."""
    ctx = tmp / "base-ctx"
    ctx.mkdir(parents=True, exist_ok=True)
    busybox_rootfs_tar(ctx / "rootfs.tar")
    (ctx / "Dockerfile").write_text('FROM scratch\nADD rootfs.tar /\nCMD ["sh"]\n')
    events = list(agent.builder.build(tenant, ctx, tag=ref))
    return events[-1].digest or ""


def build(agent: Agent, tenant: str, ctx: Path, **kwargs: Any) -> list[BuildEvent]:
    return list(agent.builder.build(tenant, ctx, **kwargs))


def write_context(root: Path, files: dict[str, str | bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
    return root


def image_tree(agent: Agent, tenant: str, ref: str) -> dict[str, tuple[str, int, int, int, str]]:
    """path -> (kind, mode, uid, gid, content-or-link) of an image's merged tree."""
    from runtime_agent.build.layers import index_for

    image = agent.images.resolve(tenant, ref)
    index = index_for(agent.content, image.layers)
    out: dict[str, tuple[str, int, int, int, str]] = {}
    for path, entry in index.entries.items():
        detail = entry.linkname
        if entry.kind == "file":
            data = index.read_file(agent.content, path) or b""
            detail = data.decode(errors="replace") if len(data) < 4096 else f"<{len(data)}>"
        out[path] = (entry.kind, entry.mode, entry.uid, entry.gid, detail)
    return out
