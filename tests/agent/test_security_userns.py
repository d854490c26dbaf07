"""User-namespace mode: per-tenant host id ranges, and a real container whose root is an
unprivileged host uid, running on the shared (unshifted) image layers through idmapped
mounts, with a named volume idmapped the same way."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.errors import InvalidArgument
from runtime_agent.protocol import MountSpec
from runtime_agent.runtime.seccomp import host_kernel
from runtime_agent.runtime.security import (
    RANGE_SIZE,
    IdRange,
    IdRangeAllocator,
    apply_security_defaults,
    ensure_traversable,
    user_namespace_for,
)


def test_allocator_gives_each_tenant_its_own_persistent_range(tmp_path: Path) -> None:
    host_subuid = tmp_path / "subuid"
    # The host already delegates 1000000..1065535 to a user: never hand that out.
    host_subuid.write_text("someone:1000000:65536\n")
    state = tmp_path / "state" / "subids"
    alloc = IdRangeAllocator(state, host_tables=[host_subuid])
    a = alloc.allocate("tenant-a")
    b = alloc.allocate("tenant-b")
    assert a.size == b.size == RANGE_SIZE
    assert a.start == 1_065_536
    assert b.start == a.start + RANGE_SIZE
    assert alloc.allocate("tenant-a") == a  # stable
    # Persisted, /etc/subuid style, and read back by a new allocator.
    assert state.read_text().splitlines() == [
        f"tenant-a:{a.start}:65536",
        f"tenant-b:{b.start}:65536",
    ]
    again = IdRangeAllocator(state, host_tables=[host_subuid])
    assert again.get("tenant-b") == b
    again.release("tenant-a")
    assert again.allocate("tenant-c") == a  # the freed range is reused
    with pytest.raises(InvalidArgument):
        again.allocate("../etc")


def test_concurrent_allocations_never_overlap(tmp_path: Path) -> None:
    state = tmp_path / "subids"
    results: dict[str, IdRange] = {}

    def grab(tenant: str) -> None:
        results[tenant] = IdRangeAllocator(state, host_tables=[]).allocate(tenant)

    threads = [threading.Thread(target=grab, args=(f"t{i}",)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts = sorted(r.start for r in results.values())
    assert len(set(starts)) == 12
    assert all(b - a >= RANGE_SIZE for a, b in itertools.pairwise(starts))


@pytest.mark.privileged
@pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")
@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox-static")
@pytest.mark.skipif(host_kernel() < (5, 19), reason="overlayfs on idmapped layers needs 5.19")
def test_userns_container_on_idmapped_layers(agent: Agent, tmp_path: Path) -> None:
    from runtime_agent.images.bootstrap import bootstrap_busybox

    config = agent.config
    image = bootstrap_busybox(agent)
    key = "userns-test"
    agent.snapshots.prepare(key, image)
    volume = agent.volumes.create("acme", "data", size_bytes=16 * 1024 * 1024)
    (Path(volume.mountpoint) / "from-host").write_text("hello\n")
    secret_dir = config.root / "host-secret"
    secret_dir.mkdir(parents=True)
    (secret_dir / "secret").write_text("host root only")
    (secret_dir / "secret").chmod(0o600)
    vol_views = config.run_root / "vol-views"
    runc_id = f"{config.name}-userns"
    bundle = config.root / "bundle"
    try:
        ids = user_namespace_for(agent, "acme", key)
        assert ids == IdRangeAllocator(config.root / "userns" / "subids").get("acme")
        rootfs = agent.snapshots.get(key).path
        (vol_mount,) = agent.volumes.oci_mounts(
            "acme",
            [MountSpec("volume", "/data", "data")],
            user_namespace=ids,
            idmap_dir=vol_views,
        )
        ensure_traversable(vol_views)
        bundle.mkdir()
        subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
        spec = json.loads((bundle / "config.json").read_text())
        script = (
            "id -u; cat /proc/self/uid_map; stat -c '%u %g' /bin/busybox;"
            " echo new > /made-in-container && echo wrote-rootfs;"
            " cat /data/from-host; echo vol > /data/from-container && echo wrote-volume;"
            " cat /secret/secret 2>&1; grep CapEff /proc/self/status"
        )
        spec["process"].update(terminal=False, args=["/bin/sh", "-c", script])
        spec["root"] = {"path": str(rootfs), "readonly": False}
        spec["mounts"] += [
            vol_mount,
            {
                "destination": "/secret",
                "type": "bind",
                "source": str(secret_dir),
                "options": ["rbind", "ro"],
            },
        ]
        spec["linux"]["cgroupsPath"] = f"/{runc_id}"
        apply_security_defaults(spec, user_namespace=ids)
        ensure_traversable(secret_dir)
        (bundle / "config.json").write_text(json.dumps(spec))
        result = subprocess.run(
            ["runc", "--root", str(config.runc_root), "run", "--bundle", str(bundle), runc_id],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "0"  # root inside the container...
        assert lines[1].split() == ["0", str(ids.start), "65536"]  # ...is the tenant's range
        assert lines[2] == "0 0"  # the shared layer's root-owned files look like its own
        assert {"wrote-rootfs", "wrote-volume", "hello"} <= set(lines), result.stdout
        # Host root's private file stays private: container root is nobody to it.
        assert any("Permission denied" in line for line in lines)
        assert "host root only" not in result.stdout
        assert int(lines[-1].split()[1], 16) == 0xA80425FB
        # On disk nothing is shifted: the upper dir and the volume hold ordinary root
        # files, so layers stay shareable between tenants and diffs need no translation.
        made = agent.snapshots.upper_dir(key) / "made-in-container"
        assert made.read_text() == "new\n"
        assert (made.stat().st_uid, made.stat().st_gid) == (0, 0)
        from_container = Path(volume.mountpoint) / "from-container"
        assert from_container.stat().st_uid == 0
        assert from_container.read_text() == "vol\n"
        # The shared layer itself was not written to.
        assert not any(
            (agent.snapshots.layer_path(c) / "made-in-container").exists() for c in image.chain_ids
        )
    finally:
        subprocess.run(
            ["runc", "--root", str(config.runc_root), "delete", "-f", runc_id],
            capture_output=True,
        )
        agent.volumes.release_idmapped_views(vol_views)
        agent.snapshots.remove(key)
        agent.volumes.unmount_all()
    # Nothing of the idmapped views or the snapshot stays mounted.
    assert not vol_views.exists()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(config.root) not in mounts and str(config.run_root) not in mounts


@pytest.mark.privileged
@pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")
@pytest.mark.skipif(host_kernel() < (5, 19), reason="overlayfs on idmapped layers needs 5.19")
def test_exec_enters_a_user_namespaced_container_on_a_bridge_network(agent: Agent) -> None:
    """runc 1.1 exec joins the container's user namespace before its netns; it may join
    the netns only if that user namespace owns it. The netns is therefore made inside the
    tenant's kept user namespace, which the container joins (it failed with EPERM while
    the host's user namespace owned the netns)."""
    from runtime_agent.images.bootstrap import bootstrap_busybox
    from runtime_agent.namespaces import owning_userns
    from runtime_agent.protocol import ContainerSpec
    from runtime_agent.runtime.security import tenant_userns

    bootstrap_busybox(agent)
    info = agent.containers.run(
        ContainerSpec(tenant="acme", image="busybox", command=("sleep", "300"), user_namespace=True)
    )
    assert agent.containers.exec_capture("acme", info.id, ["id", "-u"]) == (0, b"0\n")
    code, out = agent.containers.exec_capture("acme", info.id, ["ip", "-4", "addr"])
    assert code == 0 and b"eth0" in out  # the exec is in the container's netns
    # Its own sysfs (the userns owns the netns): only its interfaces, not the node's.
    code, out = agent.containers.exec_capture("acme", info.id, ["ls", "/sys/class/net"])
    assert (code, sorted(out.split())) == (0, [b"eth0", b"lo"])
    # Both namespaces belong to the tenant's user namespace.
    userns = os.stat(tenant_userns(agent.config, "acme"))
    pid = agent.containers.inspect("acme", info.id)["State"]["Pid"]
    assert os.stat(f"/proc/{pid}/ns/user").st_ino == userns.st_ino
    endpoint = agent.networks.endpoint("acme", info.id)
    assert endpoint is not None
    assert owning_userns(endpoint.netns_path) == (userns.st_dev, userns.st_ino)
    agent.containers.remove("acme", info.id, force=True)


@pytest.mark.privileged
@pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")
@pytest.mark.skipif(host_kernel() < (5, 19), reason="overlayfs on idmapped layers needs 5.19")
def test_an_idle_netns_another_user_namespace_owns_is_not_recycled(agent: Agent) -> None:
    """Recycled network namespaces must belong to the tenant's current user namespace
    (after an upgrade, or once its kept namespace was made again, older ones don't)."""
    from runtime_agent.images.bootstrap import bootstrap_busybox
    from runtime_agent.namespaces import owning_userns
    from runtime_agent.protocol import ContainerSpec
    from runtime_agent.runtime.security import release_user_namespaces, tenant_userns

    bootstrap_busybox(agent)

    def run() -> str:
        spec = ContainerSpec(tenant="acme", image="busybox", command=("sleep", "300"))
        info = agent.containers.run(dataclasses.replace(spec, user_namespace=True))
        assert agent.containers.exec_capture("acme", info.id, ["true"])[0] == 0
        endpoint = agent.networks.endpoint("acme", info.id)
        assert endpoint is not None
        agent.containers.remove("acme", info.id, force=True)
        return endpoint.netns_path

    first = run()
    assert agent.networks.store.load().idle  # kept for the next container
    release_user_namespaces(agent.config)  # its owner is gone; a new one gets made
    second = run()
    assert second != first
    userns = os.stat(tenant_userns(agent.config, "acme"))
    assert owning_userns(second) == (userns.st_dev, userns.st_ino)
