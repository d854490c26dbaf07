"""Named volumes: per-tenant namespacing, size limits enforced by ext4 on a loop device,
in-use protection, MountSpec -> OCI mounts, and the ``berth-agent volume`` CLI."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime_agent.config import AgentConfig
from runtime_agent.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from runtime_agent.protocol import MountSpec
from runtime_agent.runtime.security import HostBindNotAllowed
from runtime_agent.volumes import VolumeManager
from runtime_agent.volumes.manager import _mounted

pytestmark = pytest.mark.privileged

MiB = 1024 * 1024


@pytest.fixture
def volumes(agent_config: AgentConfig) -> Iterator[VolumeManager]:
    manager = VolumeManager(agent_config)
    try:
        yield manager
    finally:
        manager.unmount_all()


def loop_devices_of(image: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "-j", str(image)], capture_output=True, text=True, check=True
    ).stdout
    return [line.split(":")[0] for line in out.splitlines() if line]


def test_create_list_inspect_remove(volumes: VolumeManager) -> None:
    vol = volumes.create("acme", "data", labels={"app": "web"})
    assert Path(vol.mountpoint).is_dir()
    assert Path(vol.mountpoint) == volumes.config.volumes_dir / "acme" / "data" / "_data"
    assert [v.name for v in volumes.list("acme")] == ["data"]
    assert volumes.list("acme", labels={"app": "db"}) == []
    info = volumes.get("acme", "data").docker_inspect()
    assert info["Name"] == "data" and info["Labels"] == {"app": "web"}
    assert info["Driver"] == "local"
    # Creating the same volume again is a no-op, as in docker; different options are not.
    assert volumes.create("acme", "data").created_at == vol.created_at
    with pytest.raises(AlreadyExists):
        volumes.create("acme", "data", size_bytes=16 * MiB)
    (Path(vol.mountpoint) / "file").write_text("x")
    volumes.remove("acme", "data")
    assert volumes.list("acme") == []
    assert not (volumes.config.volumes_dir / "acme" / "data").exists()
    with pytest.raises(NotFound):
        volumes.get("acme", "data")


@pytest.mark.parametrize(
    ("tenant", "name"),
    [("acme", "../other"), ("acme", "a/b"), ("acme", ".hidden"), ("Acme", "ok"), ("../x", "ok")],
)
def test_bad_names_are_refused_without_leaving_state(
    volumes: VolumeManager, tenant: str, name: str
) -> None:
    with pytest.raises(InvalidArgument):
        volumes.create(tenant, name)
    root = volumes.config.volumes_dir
    assert not root.exists() or all(p.name == ".lock" for p in root.rglob("*") if p.is_file())


def test_bad_sizes_are_refused(volumes: VolumeManager) -> None:
    with pytest.raises(InvalidArgument):
        volumes.create("acme", "tiny", size_bytes=4096)
    assert volumes.list("acme") == []


def test_tenants_never_see_each_others_volumes(volumes: VolumeManager) -> None:
    a = volumes.create("tenant-a", "shared-name")
    (Path(a.mountpoint) / "secret").write_text("a's data")
    assert volumes.list("tenant-b") == []
    with pytest.raises(NotFound):
        volumes.get("tenant-b", "shared-name")
    # Tenant b asking to mount "shared-name" gets its own, empty volume.
    (mount,) = volumes.oci_mounts("tenant-b", [MountSpec("volume", "/data", "shared-name")])
    assert mount["source"] != a.mountpoint
    assert Path(mount["source"]).is_relative_to(volumes.config.volumes_dir / "tenant-b")
    assert list(Path(mount["source"]).iterdir()) == []


def test_sized_volume_enforces_its_limit_and_cleans_up(volumes: VolumeManager) -> None:
    vol = volumes.create("acme", "capped", size_bytes=16 * MiB)
    data = Path(vol.mountpoint)
    image = data.parent / "disk.img"
    assert _mounted(data)
    (loop,) = loop_devices_of(image)
    assert os.stat(image).st_blocks * 512 < 16 * MiB  # sparse
    assert list(data.iterdir()) == []  # no lost+found in the user's way
    written = 0
    with pytest.raises(OSError) as excinfo, open(data / "fill", "wb") as fh:
        chunk = b"\0" * MiB
        for _ in range(64):
            fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
            written += len(chunk)
    assert excinfo.value.errno == errno.ENOSPC
    assert 8 * MiB <= written < 16 * MiB
    used, available = volumes.usage("acme", "capped")
    assert used >= written and available is not None and available < MiB

    volumes.remove("acme", "capped")
    assert not _mounted(data)
    assert loop_devices_of(image) == []
    assert not Path(f"/sys/block/{Path(loop).name}/loop/backing_file").exists() or (
        str(image) not in Path(f"/sys/block/{Path(loop).name}/loop/backing_file").read_text()
    )
    assert not data.parent.exists()


def test_sized_volume_data_survives_unmount_and_recover(volumes: VolumeManager) -> None:
    vol = volumes.create("acme", "keep", size_bytes=16 * MiB)
    (Path(vol.mountpoint) / "note").write_text("persisted")
    volumes.unmount_all()
    assert not _mounted(Path(vol.mountpoint))
    volumes.recover()
    assert (Path(vol.mountpoint) / "note").read_text() == "persisted"


def test_in_use_volume_is_protected_unless_forced(volumes: VolumeManager) -> None:
    cid = "c" * 64
    volumes.oci_mounts("acme", [MountSpec("volume", "/data", "db")], container_id=cid)
    assert volumes.get("acme", "db").users == [cid]
    with pytest.raises(FailedPrecondition, match="in use"):
        volumes.remove("acme", "db")
    assert volumes.prune("acme", all=True) == []
    volumes.release("acme", cid)
    assert volumes.get("acme", "db").users == []
    volumes.oci_mounts("acme", [MountSpec("volume", "/data", "db")], container_id=cid)
    volumes.remove("acme", "db", force=True)
    assert volumes.list("acme") == []


def test_prune_removes_only_unused(volumes: VolumeManager) -> None:
    anonymous = volumes.create("acme")
    assert anonymous.anonymous and len(anonymous.name) == 64
    volumes.create("acme", "idle")
    volumes.create("acme", "busy")
    volumes.acquire("acme", "busy", "d" * 64)
    # Like docker volume prune: anonymous volumes only, unless --all.
    assert volumes.prune("acme") == [anonymous.name]
    assert volumes.prune("acme", all=True) == ["idle"]
    assert [v.name for v in volumes.list("acme")] == ["busy"]


def test_oci_mounts_for_each_kind(volumes: VolumeManager, tmp_path: Path) -> None:
    mounts = volumes.oci_mounts(
        "acme",
        [
            MountSpec("volume", "/var/lib/db", "db", read_only=True),
            MountSpec("tmpfs", "/run", size_bytes=64 * MiB),
        ],
    )
    vol, tmpfs = mounts
    assert vol["type"] == "bind" and "ro" in vol["options"] and "nosuid" in vol["options"]
    assert vol["destination"] == "/var/lib/db"
    assert tmpfs == {
        "destination": "/run",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "nodev", "noexec", "mode=1777", "rw", f"size={64 * MiB}"],
    }


def test_host_binds_only_for_privileged_callers(volumes: VolumeManager, tmp_path: Path) -> None:
    bind = MountSpec("bind", "/host", str(tmp_path))
    with pytest.raises(HostBindNotAllowed, match="never by tenants"):
        volumes.oci_mounts("acme", [MountSpec("volume", "/data", "v"), bind])
    assert volumes.list("acme") == []  # validated before anything was created
    (mount,) = volumes.oci_mounts("acme", [bind], privileged_caller=True)
    assert mount["source"] == str(tmp_path) and mount["type"] == "bind"


@pytest.mark.parametrize("target", ["relative", "/", "/a/../../etc", "/dup"])
def test_bad_targets_are_refused(volumes: VolumeManager, target: str) -> None:
    specs = [MountSpec("tmpfs", target)]
    if target == "/dup":
        specs.append(MountSpec("tmpfs", "/dup/"))
    with pytest.raises(InvalidArgument):
        volumes.oci_mounts("acme", specs)


def test_cli_volume_commands(
    agent_config: AgentConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from runtime_agent.cli.main import main

    monkeypatch.setenv("BERTH_ROOT", str(agent_config.root))
    monkeypatch.setenv("BERTH_RUN_ROOT", str(agent_config.run_root))
    monkeypatch.setenv("BERTH_AGENT_NAME", agent_config.name)
    try:
        assert main(["volume", "create", "--tenant", "t1", "--size", "16m", "-l", "a=b", "v1"]) == 0
        assert main(["volume", "create", "--tenant", "t1", "v2"]) == 0
        capsys.readouterr()
        assert main(["volume", "ls", "--tenant", "t1", "-q"]) == 0
        assert capsys.readouterr().out.split() == ["v1", "v2"]
        assert main(["volume", "ls", "--tenant", "t1"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[1].split() == ["local", "16MiB", "v1"]
        assert table[2].split() == ["local", "-", "v2"]
        assert main(["volume", "ls", "--tenant", "t2", "-q"]) == 0
        assert capsys.readouterr().out.split() == []
        assert main(["volume", "inspect", "--tenant", "t1", "v1"]) == 0
        (info,) = json.loads(capsys.readouterr().out)
        assert info["Options"] == {"size": str(16 * MiB)} and info["Labels"] == {"a": "b"}
        assert main(["volume", "inspect", "--tenant", "t2", "v1"]) == 1
        assert "no such volume" in capsys.readouterr().err
        assert main(["volume", "create", "--tenant", "t1", "--size", "10q", "v3"]) == 125
        assert main(["volume", "rm", "--tenant", "t1", "v1"]) == 0
        assert main(["volume", "prune", "--tenant", "t1", "-f", "--all"]) == 0
        assert "v2" in capsys.readouterr().out
        assert VolumeManager(agent_config).list("t1") == []
    finally:
        VolumeManager(agent_config).unmount_all()
