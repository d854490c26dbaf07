"""Snapshots on real overlayfs mounts (root only)."""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.errors import AlreadyExists, InvalidArgument
from runtime_agent.images.bootstrap import bootstrap_busybox
from runtime_agent.images.media import OCI_LAYER
from runtime_agent.snapshots.mount import is_mounted, mounts_under

pytestmark = pytest.mark.privileged


def _sh(rootfs, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(rootfs), "/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )


def test_is_mounted_reads_mountinfos_escapes(tmp_path: Path) -> None:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    odd = tmp_path / "a b\\c\td"
    odd.mkdir()
    assert not is_mounted(odd)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(odd)], check=True)
    try:
        assert is_mounted(odd)
        assert not is_mounted(tmp_path / "a b")
    finally:
        subprocess.run(["umount", str(odd)], check=True)
    assert not is_mounted(odd)


def test_prepare_mounts_a_writable_busybox_rootfs(agent: Agent) -> None:
    image = bootstrap_busybox(agent)
    rootfs = agent.snapshots.prepare("c1", image)
    try:
        assert is_mounted(rootfs)
        out = _sh(
            rootfs, "echo hello > /tmp/f && cat /tmp/f && ls /bin /usr/bin /sbin | wc -l && id -un"
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.split()
        assert lines[0] == "hello"
        assert int(lines[1]) > 200
        assert lines[2] == "root"
        # The write went to this snapshot's upper dir, not the shared layer.
        layer = agent.snapshots.layer_path(image.chain_ids[0])
        assert not (layer / "tmp" / "f").exists()
        assert agent.snapshots.usage("c1") == len("hello\n")
    finally:
        agent.snapshots.remove("c1")
    assert not mounts_under(agent.config.root)


def test_snapshots_share_layers_but_not_writes(agent: Agent) -> None:
    image = bootstrap_busybox(agent)
    try:
        a = agent.snapshots.prepare("a", image)
        b = agent.snapshots.prepare("b", image)
        assert _sh(a, "rm /bin/ls && echo a > /etc/who").returncode == 0
        assert _sh(b, "test -e /bin/ls && test ! -e /etc/who").returncode == 0
        layers = list(agent.snapshots.layers_dir.iterdir())
        assert len(layers) == 1  # unpacked once
    finally:
        agent.snapshots.remove("a")
        agent.snapshots.remove("b")
    assert not mounts_under(agent.config.root)


def test_prepare_is_idempotent_and_remove_too(agent: Agent) -> None:
    image = bootstrap_busybox(agent)
    try:
        p1 = agent.snapshots.prepare("k", image)
        p2 = agent.snapshots.prepare("k", image)
        assert p1 == p2
        assert len([m for m in mounts_under(agent.config.root) if m == str(p1)]) == 1
        other = agent.images.commit("acme", "other", {"config": {"Cmd": ["x"]}}, image.layers)
        with pytest.raises(AlreadyExists):
            agent.snapshots.prepare("k", other)
    finally:
        agent.snapshots.remove("k")
    agent.snapshots.remove("k")
    assert not mounts_under(agent.config.root)
    assert agent.snapshots.list() == []


def test_remount_after_unmount(agent: Agent) -> None:
    """After a reboot the mount is gone but the upper dir remains: prepare re-mounts."""
    image = bootstrap_busybox(agent)
    try:
        rootfs = agent.snapshots.prepare("k", image)
        assert _sh(rootfs, "echo kept > /root/note").returncode == 0
        subprocess.run(["umount", str(rootfs)], check=True)
        rootfs = agent.snapshots.prepare("k", image)
        assert _sh(rootfs, "cat /root/note").stdout == "kept\n"
        # Without the image (it may have been untagged since): from the snapshot's records.
        subprocess.run(["umount", str(rootfs)], check=True)
        agent.images.remove("library", "busybox")
        assert agent.snapshots.ensure_mounted("k") == rootfs
        assert _sh(rootfs, "cat /root/note").stdout == "kept\n"
    finally:
        agent.snapshots.remove("k")


def _mount_options(target: Path) -> set[str]:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[4] == str(target):
                return set(line.split(" - ", 1)[1].split()[2].split(","))
    raise AssertionError(f"{target} is not mounted")


def _volatile(target: Path) -> bool:
    options = _mount_options(target)
    return "volatile" in options or "fsync=volatile" in options  # 6.x kernels show the latter


def test_volatile_snapshot_skips_syncs_and_remounts(agent: Agent) -> None:
    """--rm containers' rootfs: mounted `volatile` (no sync at unmount); a re-mount after
    an unmount (a reboot before the container started) clears overlayfs' marker."""
    image = bootstrap_busybox(agent)
    try:
        rootfs = agent.snapshots.prepare("v", image, volatile=True)
        assert _volatile(rootfs)
        assert _sh(rootfs, "echo kept > /root/note").returncode == 0
        subprocess.run(["umount", str(rootfs)], check=True)
        assert agent.snapshots.ensure_mounted("v") == rootfs
        assert _volatile(rootfs)
        assert _sh(rootfs, "cat /root/note").stdout == "kept\n"
        plain = agent.snapshots.prepare("p", image)
        assert not _volatile(plain)
    finally:
        agent.snapshots.remove("v")
        agent.snapshots.remove("p")
    assert mounts_under(agent.snapshots.active_dir) == []


@pytest.mark.parametrize("key", ["", "../x", "a/b", ".hidden"])
def test_bad_keys(agent: Agent, key: str) -> None:
    image = bootstrap_busybox(agent)
    with pytest.raises(InvalidArgument):
        agent.snapshots.prepare(key, image)


def test_gc_keeps_layers_of_images_and_snapshots(agent: Agent) -> None:
    image = bootstrap_busybox(agent)
    try:
        agent.snapshots.prepare("live", image)
        removed = agent.snapshots.gc(referenced_chain_ids=set())
        assert removed["layers"] == []  # the live snapshot stacks on it
        # A young snapshot may belong to a container being created right now.
        removed = agent.snapshots.gc(referenced_chain_ids=set(), keys_in_use=set())
        assert removed == {"snapshots": [], "layers": []}
        removed = agent.snapshots.gc(
            referenced_chain_ids=set(), keys_in_use={"live"}, orphan_grace_seconds=0
        )
        assert removed == {"snapshots": [], "layers": []}
        removed = agent.snapshots.gc(
            referenced_chain_ids=set(), keys_in_use=set(), orphan_grace_seconds=0
        )
        assert removed == {"snapshots": ["live"], "layers": image.chain_ids}
        assert not mounts_under(agent.config.root)
    finally:
        agent.snapshots.remove("live")


def _layer_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_deep_image_beyond_mount_option_page(agent: Agent) -> None:
    """150 layers: their lowerdir list is far beyond the 4 KiB mount(2) option page."""
    descs = []
    for i in range(150):
        data = _layer_bytes({f"layer{i:03d}": str(i).encode(), "top": str(i).encode()})
        descs.append(
            {"mediaType": OCI_LAYER, "digest": agent.content.write_bytes(data), "size": len(data)}
        )
    image = agent.images.commit("acme", "deep", {}, descs)
    total = sum(len(str(agent.snapshots.layer_path(c))) + 1 for c in image.chain_ids)
    assert total > 4096
    try:
        rootfs = agent.snapshots.prepare("deep", image)
        names = os.listdir(rootfs)
        assert len([n for n in names if n.startswith("layer")]) == 150
        assert (rootfs / "top").read_text() == "149"  # the top layer wins
        assert (rootfs / "layer000").read_text() == "0"
    finally:
        agent.snapshots.remove("deep")
    assert not mounts_under(agent.config.root)


def test_diff_round_trips_changes_as_a_layer(agent: Agent) -> None:
    base = bootstrap_busybox(agent)
    try:
        rootfs = agent.snapshots.prepare("build", base)
        script = (
            "mkdir -p /app/sub && echo hello > /app/sub/f && ln /app/sub/f /app/hard"
            " && ln -s sub/f /app/soft && chmod 4750 /app/sub/f && chown 1000:1000 /app/sub"
            " && rm /bin/ls && rm -rf /etc && mkdir /etc && echo only > /etc/only"
            " && touch -t 200102030405.06 /app/sub/f"
        )
        out = _sh(rootfs, script)
        assert out.returncode == 0, out.stderr
        layer = agent.snapshots.diff("build")
    finally:
        agent.snapshots.remove("build")
    with tarfile.open(fileobj=agent.content.open(layer["digest"])) as tar:
        names = tar.getnames()
        assert "bin/.wh.ls" in names
        assert "etc/.wh..wh..opq" in names
        f = tar.getmember("app/sub/f")
        assert f.mode == 0o4750
        assert f.mtime == 981173106
        assert tar.getmember("app/hard").islnk() or tar.getmember("app/sub/f").islnk()
        assert tar.getmember("app/soft").linkname == "sub/f"
        assert tar.getmember("app/sub").uid == 1000
    assert layer["digest"] == agent.images.diff_id(layer)
    child = agent.images.commit(
        "acme", "child", {"config": base.container_config}, [*base.layers, layer]
    )
    try:
        rootfs = agent.snapshots.prepare("run", child)
        assert (rootfs / "app" / "sub" / "f").read_text() == "hello\n"
        assert (rootfs / "app" / "hard").read_text() == "hello\n"
        assert not (rootfs / "bin" / "ls").exists()
        assert (rootfs / "bin" / "sh").exists()
        assert sorted(os.listdir(rootfs / "etc")) == ["only"]
        assert os.stat(rootfs / "app" / "sub").st_uid == 1000
        st = os.stat(rootfs / "app" / "sub" / "f")
        assert stat.S_IMODE(st.st_mode) == 0o4750
        assert int(st.st_mtime) == 981173106
    finally:
        agent.snapshots.remove("run")


def test_diff_of_identical_changes_is_reproducible(agent: Agent) -> None:
    base = bootstrap_busybox(agent)
    digests = []
    for key in ("one", "two"):
        try:
            rootfs = agent.snapshots.prepare(key, base)
            assert (
                _sh(rootfs, "mkdir /a && echo x > /a/b && touch -t 202001010000 /a/b /a").returncode
                == 0
            )
            digests.append(agent.snapshots.diff(key)["digest"])
        finally:
            agent.snapshots.remove(key)
    assert digests[0] == digests[1]


def test_sized_writable_layer_is_a_hard_limit_on_its_own_device(agent: Agent) -> None:
    image = bootstrap_busybox(agent)
    try:
        rootfs = agent.snapshots.prepare("small", image, size_bytes=16 << 20)
        with pytest.raises(OSError) as excinfo, open(rootfs / "fill", "wb") as fh:
            for _ in range(32):
                fh.write(b"x" * (1 << 20))
                fh.flush()
        assert excinfo.value.errno == errno.ENOSPC
        assert agent.snapshots.usage("small") < 16 << 20
        device = agent.snapshots.device("small")
        assert device is not None and device.startswith("7:")  # a loop device
        assert (rootfs / "bin" / "busybox").exists()
        # Writes of the container go to that device.
        loop_file = Path(f"/sys/dev/block/{device}/loop/backing_file").read_text().strip()
        assert loop_file.startswith(str(agent.config.root))
    finally:
        agent.snapshots.remove("small")
    assert not mounts_under(agent.config.root)
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(agent.config.root) not in losetup


def test_default_device_is_the_disk_under_the_state_dir(agent: Agent) -> None:
    image = bootstrap_busybox(agent)
    try:
        agent.snapshots.prepare("plain", image)
        device = agent.snapshots.device("plain")
        st = os.stat(agent.config.root)
        if device is not None:
            assert Path(f"/sys/dev/block/{device}").exists()
            assert not Path(f"/sys/dev/block/{device}/partition").exists()
            assert device.split(":")[0] == str(os.major(st.st_dev))
    finally:
        agent.snapshots.remove("plain")


def test_sized_layer_too_small_is_invalid(agent: Agent) -> None:
    image = bootstrap_busybox(agent)
    with pytest.raises(InvalidArgument):
        agent.snapshots.prepare("tiny", image, size_bytes=1024)
    assert agent.snapshots.list() == []


def test_concurrent_prepares_unpack_each_layer_once(agent: Agent) -> None:
    from concurrent.futures import ThreadPoolExecutor

    image = bootstrap_busybox(agent)
    keys = [f"par{i}" for i in range(6)]
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            roots = list(pool.map(lambda k: agent.snapshots.prepare(k, image), keys))
        assert all((root / "bin" / "busybox").exists() for root in roots)
        entries = sorted(p.name for p in agent.snapshots.layers_dir.iterdir())
        assert entries == [image.chain_ids[0].split(":")[1]]  # no leftover temp dirs
    finally:
        for key in keys:
            agent.snapshots.remove(key)
    assert not mounts_under(agent.config.root)


def test_layer_paths_longer_than_fsconfig_strings(agent: Agent) -> None:
    """fsconfig takes at most 256-byte strings; long state roots go through a dir fd."""
    from runtime_agent.config import AgentConfig

    deep_root = agent.config.root / ("d" * 120) / ("e" * 120)
    config = AgentConfig(root=deep_root, run_root=agent.config.run_root, name=agent.config.name)
    long_agent = Agent(config)
    image = bootstrap_busybox(long_agent)
    assert len(str(long_agent.snapshots.layer_path(image.chain_ids[0]))) > 256
    try:
        rootfs = long_agent.snapshots.prepare("long", image)
        assert _sh(rootfs, "echo ok > /tmp/x && cat /tmp/x").stdout == "ok\n"
    finally:
        long_agent.snapshots.remove("long")
    assert not mounts_under(agent.config.root)


def test_half_prepared_snapshot_from_a_crash_is_recovered(agent: Agent) -> None:
    image = bootstrap_busybox(agent)
    partial = agent.snapshots.active_dir / "crashed"
    (partial / "merged").mkdir(parents=True)
    with pytest.raises(AlreadyExists):  # young: maybe another prepare is under way
        agent.snapshots.prepare("crashed", image)
    old = time.time() - 7200
    os.utime(partial, (old, old))
    try:
        rootfs = agent.snapshots.prepare("crashed", image)
        assert (rootfs / "bin" / "busybox").exists()
    finally:
        agent.snapshots.remove("crashed")
    (agent.snapshots.active_dir / "crashed2").mkdir()
    os.utime(agent.snapshots.active_dir / "crashed2", (old, old))
    assert agent.snapshots.gc(image.chain_ids)["snapshots"] == ["crashed2"]
    assert not (agent.snapshots.active_dir / "crashed2").exists()
