"""Snapshots on real overlayfs mounts (root only)."""

from __future__ import annotations

import subprocess

import pytest

from runtime_agent.agent import Agent
from runtime_agent.errors import AlreadyExists, InvalidArgument
from runtime_agent.images.bootstrap import bootstrap_busybox
from runtime_agent.snapshots.mount import is_mounted, mounts_under

pytestmark = pytest.mark.privileged


def _sh(rootfs, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(rootfs), "/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )


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
    finally:
        agent.snapshots.remove("k")


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
        removed = agent.snapshots.gc(referenced_chain_ids=set(), keys_in_use=set())
        assert removed == {"snapshots": ["live"], "layers": image.chain_ids}
        assert not mounts_under(agent.config.root)
    finally:
        agent.snapshots.remove("live")
