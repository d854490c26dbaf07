"""Helpers for build tests: a busybox rootfs tar (no registry needed) and tree dumps."""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from runtime_agent.agent import Agent
from runtime_agent.build.events import BuildEvent
from runtime_agent.config import AgentConfig

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


def write_context(root: Path, files: Mapping[str, str | bytes]) -> Path:
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


CORPUS = Path(__file__).parent


def corpus_cases() -> list[str]:
    return sorted(p.name for p in CORPUS.iterdir() if (p / "expected.json").is_file())


def corpus_context(case: str, dest: Path) -> tuple[Path, dict[str, Any]]:
    """Copy a corpus case to ``dest`` with fixed permissions (git keeps only +x)."""
    import json
    import os

    shutil.copytree(CORPUS / case, dest, symlinks=True)
    for dirpath, _dirnames, filenames in os.walk(dest):
        os.chmod(dirpath, 0o755)  # noqa: S103
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), 0o644)
    expected = json.loads((dest / "expected.json").read_text())
    for name, mode in expected.get("modes", {}).items():
        os.chmod(dest / name, int(mode, 8))
    return dest, expected


def check_expected(
    tree: dict[str, tuple[str, int, int, int, str]], config: dict[str, Any], expected: dict
) -> None:
    """Assert an image tree and config match a corpus case's expected.json."""
    for path, want in expected.get("files", {}).items():
        assert path in tree, f"{path} missing from the image"
        kind, mode, uid, gid, detail = tree[path]
        assert kind == want.get("kind", "file"), path
        if "content" in want:
            assert detail == want["content"], path
        if "target" in want:
            assert detail == want["target"], path
        if "mode" in want:
            assert mode == int(want["mode"], 8), f"{path}: mode {mode:o}"
        if "uid" in want:
            assert uid == want["uid"], f"{path}: uid {uid}"
        if "gid" in want:
            assert gid == want["gid"], f"{path}: gid {gid}"
    for path in expected.get("absent", []):
        assert path not in tree, f"{path} should not be in the image"
    for key, want in expected.get("config", {}).items():
        assert config.get(key) == want, f"config {key}: {config.get(key)!r} != {want!r}"


def run_image(
    agent: Agent, tenant: str, ref: str, argv: list[str] | None = None
) -> tuple[int, str]:
    """Run an image's Entrypoint + Cmd (or ``argv``) once under Berth's runc path."""
    import secrets

    from runtime_agent.build.run import ContainerStepRunner
    from runtime_agent.build.steps import BuildLimits, RunRequest

    image = agent.images.resolve(tenant, ref)
    cfg = image.container_config
    command = argv or [*(cfg.get("Entrypoint") or []), *(cfg.get("Cmd") or [])]
    chunks: list[bytes] = []
    result = ContainerStepRunner(agent).run_step(
        RunRequest(
            tenant,
            f"run-{secrets.token_hex(6)}",
            [dict(layer) for layer in image.layers],
            command,
            list(cfg.get("Env") or []),
            str(cfg.get("User") or ""),
            str(cfg.get("WorkingDir") or "/"),
            BuildLimits(network=None, step_timeout=60),
            chunks.append,
        )
    )
    return result.exit_code, b"".join(chunks).decode()


@pytest.fixture
def build_cgroups_removed(agent_config: AgentConfig) -> Iterator[None]:
    """Remove the test agent's cgroup subtree (tenant parents runc made for RUN steps)."""
    yield
    from runtime_agent.cgroups import driver

    driver(agent_config).remove_all()
