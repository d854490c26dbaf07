"""Security defaults and volumes as a tenant sees them through ``agent.containers``
(ContainerManager): the real create/start/wait/rm path, not a hand-built bundle."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.errors import FailedPrecondition
from runtime_agent.protocol import ContainerSpec, MountSpec
from runtime_agent.runtime.security import (
    DEFAULT_CAPABILITIES,
    HostBindNotAllowed,
    capability_mask,
)

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc"),
    pytest.mark.skipif(shutil.which("conmon") is None, reason="needs conmon"),
    pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox-static"),
]

MiB = 1024 * 1024


@pytest.fixture
def node(agent: Agent) -> Iterator[Agent]:
    from runtime_agent.images.bootstrap import bootstrap_busybox

    bootstrap_busybox(agent)
    try:
        yield agent
    finally:
        for info in agent.containers.list_all():
            agent.containers.remove(info.tenant, info.id, force=True)
        agent.volumes.unmount_all()
        agent.snapshots.remove_all_mounts()
        agent.containers.cgroups.remove_all()  # the tenants' parent cgroups


def run_script(agent: Agent, tenant: str, script: str, **spec: object) -> tuple[int, str, str, str]:
    """Run ``sh -c script`` to completion; (exit code, stdout, stderr, container id)."""
    info = agent.containers.run(
        ContainerSpec(
            tenant=tenant,
            image="busybox",
            command=("sh", "-c", script),
            network_mode="none",
            **spec,  # type: ignore[arg-type]
        )
    )
    code = agent.containers.wait(tenant, info.id, timeout=60)
    out = err = ""
    for entry in agent.containers.logs(tenant, info.id):
        text = entry.line.decode(errors="replace") + "\n"
        if entry.stream == "stdout":
            out += text
        else:
            err += text
    return code, out, err, info.id


def status_fields(text: str) -> dict[str, str]:
    return {
        key.strip(): value.strip()
        for key, _, value in (line.partition(":") for line in text.splitlines())
    }


def test_container_has_default_caps_nnp_seccomp_and_cannot_mount(node: Agent) -> None:
    _, out, err, _ = run_script(
        node,
        "acme",
        "cat /proc/self/status; mount -t tmpfs none /mnt && echo MOUNTED;"
        " unshare -U true && echo UNSHARED; unshare -n true && echo NETNS;"
        " if [ -e /proc/kcore ]; then wc -c < /proc/kcore; fi;"
        " echo TIMER $(wc -c < /proc/timer_list); echo FW $(ls -A /sys/firmware | wc -l);"
        " echo 1 > /proc/sys/vm/drop_caches && echo SYSCTL",
    )
    status = status_fields(out)
    assert int(status["CapEff"], 16) == capability_mask(DEFAULT_CAPABILITIES) == 0xA80425FB
    assert int(status["CapBnd"], 16) == 0xA80425FB
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    for forbidden in ("MOUNTED", "UNSHARED", "NETNS", "SYSCTL"):
        assert forbidden not in out
    assert "TIMER 0" in out and "FW 0" in out
    assert "Operation not permitted" in err or "Permission denied" in err


def test_seccomp_filter_covers_the_images_own_abi(node: Agent) -> None:
    """The filter lists the native ABI only; an image whose config says 386 also gets
    the i386 ABI (its programs make 32-bit system calls)."""
    import json

    busybox = node.images.resolve("acme", "busybox")
    config = {**busybox.config, "architecture": "386"}
    node.images.commit("acme", "busybox-386:latest", config, busybox.layers)

    def architectures(image: str) -> list[str]:
        info = node.containers.create(
            ContainerSpec(tenant="acme", image=image, command=("true",), network_mode="none")
        )
        bundle = node.containers.store.dir("acme", info.id)
        spec = json.loads((bundle / "config.json").read_text())
        return list(spec["linux"]["seccomp"]["architectures"])

    native = architectures("busybox")
    i386 = architectures("busybox-386")
    if os.uname().machine == "x86_64":
        assert native == ["SCMP_ARCH_X86_64"]
        assert i386 == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]
    else:
        assert len(native) == 1


def test_read_only_rootfs_through_the_manager(node: Agent) -> None:
    code, out, err, _ = run_script(
        node,
        "acme",
        "touch /x && echo ROOT-WRITABLE; touch /scratch/y && echo TMPFS-WRITABLE",
        read_only_rootfs=True,
        mounts=(MountSpec("tmpfs", "/scratch", size_bytes=4 * MiB),),
    )
    assert code == 0
    assert "ROOT-WRITABLE" not in out
    assert "TMPFS-WRITABLE" in out
    assert "Read-only file system" in err


def test_tenant_cannot_bind_mount_host_paths(node: Agent) -> None:
    with pytest.raises(HostBindNotAllowed):
        node.containers.create(
            ContainerSpec(
                tenant="acme",
                image="busybox",
                command=("true",),
                network_mode="none",
                mounts=(MountSpec("bind", "/host-etc", "/etc"),),
            )
        )
    assert node.containers.list("acme", all=True) == []


def test_volumes_between_tenants_sizes_and_lifetimes(node: Agent) -> None:
    node.volumes.create("tenant-a", "db", size_bytes=16 * MiB)
    _, out, err, cid = run_script(
        node,
        "tenant-a",
        "echo secret-a > /data/secret; dd if=/dev/zero of=/data/fill bs=1M count=40; echo dd=$?",
        mounts=(MountSpec("volume", "/data", "db"),),
    )
    assert "secret-a" not in out
    assert "No space left on device" in err
    assert "dd=0" not in out
    # In use by the (stopped) container: rm refused until the container is removed.
    with pytest.raises(FailedPrecondition):
        node.volumes.remove("tenant-a", "db")
    node.containers.remove("tenant-a", cid)
    assert node.volumes.get("tenant-a", "db").users == []
    # Data survived the container.
    assert (node.volumes.host_path("tenant-a", "db") / "secret").read_text() == "secret-a\n"

    # Tenant b naming "db" gets its own empty volume; it can't see a's data.
    code, out, _, _ = run_script(
        node,
        "tenant-b",
        "ls -A /data | wc -l; cat /data/secret 2>&1 || true",
        mounts=(MountSpec("volume", "/data", "db"),),
    )
    assert code == 0
    assert out.split()[0] == "0"
    assert "secret-a" not in out
    assert [v.name for v in node.volumes.list("tenant-b")] == ["db"]
    assert [v.name for v in node.volumes.list("tenant-a")] == ["db"]

    # rm of a's volume frees its mount and loop device.
    image = Path(node.volumes.get("tenant-a", "db").mountpoint).parent / "disk.img"
    node.volumes.remove("tenant-a", "db")
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(image.parent) not in mounts
    assert not image.parent.exists()


def test_exec_gets_the_same_confinement(node: Agent) -> None:
    info = node.containers.run(
        ContainerSpec(tenant="acme", image="busybox", command=("sleep", "60"), network_mode="none")
    )
    code, output = node.containers.exec_capture(
        "acme", info.id, ["sh", "-c", "cat /proc/self/status; mount -t proc p /mnt || echo DENIED"]
    )
    status = status_fields(output.decode())
    assert int(status["CapEff"], 16) == 0xA80425FB
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    assert "DENIED" in output.decode()
    assert code == 0  # the "|| echo" ran
    node.containers.remove("acme", info.id, force=True)
