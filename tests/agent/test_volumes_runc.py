"""Volumes inside real (bare ``runc run``) containers with the security defaults applied:
size limits hold inside the container, data outlives the container, and one tenant can
neither see nor reach another tenant's volume — not by name, not by path, not through the
loop device behind it."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime_agent.config import AgentConfig
from runtime_agent.errors import InvalidArgument
from runtime_agent.protocol import MountSpec
from runtime_agent.runtime.security import apply_security_defaults
from runtime_agent.volumes import VolumeManager
from runtime_agent.volumes.manager import _mounted
from tests.agent.test_security_runc import build_rootfs

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc"),
    pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox-static"),
]

MiB = 1024 * 1024
RunFn = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def volumes(agent_config: AgentConfig) -> Iterator[VolumeManager]:
    manager = VolumeManager(agent_config)
    try:
        yield manager
    finally:
        manager.unmount_all()


@pytest.fixture
def run_with_mounts(agent_config: AgentConfig, volumes: VolumeManager) -> Iterator[RunFn]:
    """Run a shell script for ``tenant`` with its MountSpecs turned into OCI mounts."""
    counter = iter(range(100))
    started: list[str] = []

    def run(tenant: str, mounts: list[MountSpec], script: str, container_id: str = "") -> Any:
        n = next(counter)
        bundle = agent_config.root / f"vbundle{n}"
        build_rootfs(bundle / "rootfs")
        for applet in ("dd", "rm", "wc", "losetup"):
            (bundle / "rootfs" / "bin" / applet).symlink_to("busybox")
        subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
        spec = json.loads((bundle / "config.json").read_text())
        spec["process"].update(terminal=False, args=["/bin/sh", "-c", script])
        spec["root"]["path"] = str(bundle / "rootfs")
        spec["mounts"] += volumes.oci_mounts(tenant, mounts, container_id=container_id or None)
        runc_id = f"{agent_config.name}-vol{n}"
        spec["linux"]["cgroupsPath"] = f"/{runc_id}"
        apply_security_defaults(spec)
        (bundle / "config.json").write_text(json.dumps(spec))
        started.append(runc_id)
        try:
            return subprocess.run(
                ["runc", "--root", str(agent_config.runc_root), "run", "-b", str(bundle), runc_id],
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
        finally:
            # "docker rm": the container and its bundle go, volumes stay.
            subprocess.run(
                ["runc", "--root", str(agent_config.runc_root), "delete", "-f", runc_id],
                capture_output=True,
            )
            shutil.rmtree(bundle, ignore_errors=True)
            if container_id:
                volumes.release(tenant, container_id)

    yield run


def test_sized_volume_refuses_writes_beyond_its_size_in_a_container(
    run_with_mounts: RunFn, volumes: VolumeManager
) -> None:
    volumes.create("acme", "capped", size_bytes=16 * MiB)
    result = run_with_mounts(
        "acme",
        [MountSpec("volume", "/data", "capped")],
        "dd if=/dev/zero of=/data/big bs=1M count=40 conv=fsync; echo dd=$?; wc -c < /data/big",
    )
    assert "No space left on device" in result.stderr
    assert "dd=0" not in result.stdout
    written = int(result.stdout.split()[-1])
    assert 8 * MiB <= written < 16 * MiB


def test_data_survives_the_container_and_in_use_protection(
    run_with_mounts: RunFn, volumes: VolumeManager
) -> None:
    cid = "a" * 64
    first = run_with_mounts(
        "acme",
        [MountSpec("volume", "/data", "keep", size_bytes=None)],
        "echo persisted > /data/note; echo done",
        container_id=cid,
    )
    assert "done" in first.stdout, first.stderr
    second = run_with_mounts(
        "acme",
        [MountSpec("volume", "/data", "keep", read_only=True)],
        "cat /data/note; touch /data/x",
    )
    assert second.stdout.strip() == "persisted"
    assert "Read-only file system" in second.stderr
    assert volumes.get("acme", "keep").users == []  # released when the container went


def test_other_tenant_cannot_see_or_reach_a_volume(
    run_with_mounts: RunFn, volumes: VolumeManager
) -> None:
    secret = volumes.create("tenant-a", "db", size_bytes=16 * MiB)
    Path(secret.mountpoint, "secret").write_text("tenant a only\n")
    mount_source = next(
        line.split()[2]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == secret.mountpoint
    )  # major:minor of tenant a's loop device
    major, minor = mount_source.split(":")
    # By name: tenant b's "db" is its own, empty volume.
    result = run_with_mounts(
        "tenant-b",
        [MountSpec("volume", "/data", "db")],
        f"ls -A /data | wc -l; cat /data/secret 2>&1;"
        f" mknod /tmp/disk b {major} {minor} && cat /tmp/disk > /dev/null; echo read=$?;"
        f" mount -t ext4 /tmp/disk /mnt; echo mount=$?",
    )
    lines = result.stdout.split()
    assert lines[0] == "0"
    assert "tenant a only" not in result.stdout
    assert "read=0" not in lines and "mount=0" not in lines
    assert "Operation not permitted" in result.stderr or "Permission denied" in result.stderr
    assert "tenant-b" in volumes.get("tenant-b", "db").mountpoint
    # By path: names can't climb out of the tenant's directory.
    for sneaky in ("../tenant-a/db", "/var/lib/berth/volumes/tenant-a/db", "..", "db/../x"):
        with pytest.raises(InvalidArgument):
            volumes.oci_mounts("tenant-b", [MountSpec("volume", "/data", sneaky)])


def test_volume_rm_releases_loop_device_and_mount(
    run_with_mounts: RunFn, volumes: VolumeManager
) -> None:
    vol = volumes.create("acme", "gone", size_bytes=16 * MiB)
    image = Path(vol.mountpoint).parent / "disk.img"
    result = run_with_mounts("acme", [MountSpec("volume", "/data", "gone")], "echo x > /data/f")
    assert result.returncode == 0, result.stderr
    assert _mounted(Path(vol.mountpoint))
    volumes.remove("acme", "gone")
    assert not _mounted(Path(vol.mountpoint))
    losetup = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
    assert losetup.stdout == ""
    assert not Path(vol.mountpoint).parent.exists()
    assert not any(
        str(image) in line for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )
