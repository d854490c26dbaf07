"""``berth-agent`` image commands, run through the CLI entry point."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.cli.main import main
from runtime_agent.config import AgentConfig


@pytest.fixture
def cli(agent_config: AgentConfig, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.setenv("BERTH_ROOT", str(agent_config.root))
    monkeypatch.setenv("BERTH_RUN_ROOT", str(agent_config.run_root))
    monkeypatch.setenv("BERTH_AGENT_NAME", agent_config.name)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_bootstrap_then_images_lists_busybox_for_any_tenant(cli) -> None:
    code, out, _ = cli("bootstrap")
    assert code == 0 and out.startswith("library/busybox:latest sha256:")
    code, out, _ = cli("images", "--tenant", "acme")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert row.split()[:2] == ["busybox", "latest"]
    assert row.endswith("MB")
    code, out, _ = cli("images", "-q")
    assert code == 0 and len(out.strip()) == 12


def test_tag_save_load_rmi(cli, tmp_path: Path) -> None:
    cli("bootstrap")
    assert cli("tag", "--tenant", "acme", "busybox", "mine/box:v1")[0] == 0
    archive = tmp_path / "box.tar"
    assert cli("save", "--tenant", "acme", "-o", str(archive), "mine/box:v1")[0] == 0
    assert archive.stat().st_size > 1_000_000
    assert not Path(f"{archive}.partial").exists()
    code, out, _ = cli("load", "--tenant", "beta", "-i", str(archive))
    assert (code, out) == (0, "Loaded image: mine/box:v1\n")
    code, out, _ = cli("images", "--tenant", "beta", "mine/box")
    assert "mine/box" in out and "busybox" not in out
    code, out, _ = cli("rmi", "--tenant", "beta", "mine/box:v1")
    assert (code, out) == (0, "Untagged: mine/box:v1\n")
    code, _, err = cli("rmi", "--tenant", "beta", "mine/box:v1")
    assert code == 1 and "No such image" in err
    # Tenants cannot remove the shared base image.
    code, _, err = cli("rmi", "--tenant", "beta", "busybox")
    assert code == 1 and "shared base image" in err


def test_import_with_changes_and_inspect(cli, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("etc/motd")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    (tmp_path / "rootfs.tgz").write_bytes(buf.getvalue())
    code, out, err = cli(
        "import",
        "--tenant",
        "acme",
        "-c",
        'CMD ["cat", "/etc/motd"]',
        "-c",
        "ENV A=b",
        str(tmp_path / "rootfs.tgz"),
        "motd:1",
    )
    assert code == 0, err
    image_id = out.strip()
    assert image_id.startswith("sha256:")
    code, out, _ = cli("image", "inspect", "--tenant", "acme", "motd:1")
    [doc] = json.loads(out)
    assert doc["Id"] == image_id
    assert doc["Config"]["Cmd"] == ["cat", "/etc/motd"]
    assert doc["Config"]["Env"] == ["A=b"]
    assert doc["RepoTags"] == ["motd:1"]


def test_errors_exit_125(cli, tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"junk" * 100)
    code, _, err = cli("load", "-i", str(tmp_path / "junk.tar"))
    assert code == 125 and "not a tar archive" in err
    code, _, err = cli("save", "-o", str(tmp_path / "x.tar"), "nope")
    assert code == 125 and "No such image: nope" in err
    assert not (tmp_path / "x.tar").exists() and not (tmp_path / "x.tar.partial").exists()
    code, _, err = cli("tag", "nope", "x")
    assert code == 125
    code, _, err = cli("import", "-c", "FROM x", str(tmp_path / "junk.tar"))
    assert code == 125 and "--change" in err
    code, _, err = cli("images", "--tenant", "Bad_Tenant")
    assert code == 125 and "invalid tenant" in err


def test_system_prune_reclaims_removed_images(cli, agent_config: AgentConfig) -> None:
    cli("bootstrap")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("big")
        info.size = 1 << 20
        tar.addfile(info, io.BytesIO(os.urandom(1 << 20)))
    agent = Agent(agent_config)
    image = agent.images.import_rootfs("acme", io.BytesIO(buf.getvalue()), "big")
    # Blobs younger than the grace period are spared (an import may be in flight).
    old = time.time() - 3600
    for digest in agent.content.digests():
        os.utime(agent.content.path(digest), (old, old))
    code, out, _ = cli("system", "prune", "-f", "-a", "--tenant", "acme")
    assert code == 0
    assert "untagged: big:latest" in out
    assert "Total reclaimed space: 1.0" in out
    assert not agent.content.has(image.layers[0]["digest"])
    # The shared busybox survives a tenant's prune.
    assert agent.images.resolve("acme", "busybox")
    assert agent.content.has(agent.images.resolve("acme", "busybox").layers[0]["digest"])
