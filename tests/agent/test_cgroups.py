"""cgroup drivers: v2 against a unified-hierarchy file tree (real files in a tmp dir, as
the kernel lays them out), v1 against this machine's hierarchies."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_agent.cgroups import (
    CGROUP_ROOT,
    FAVOR_DYNMODS,
    cgroup2_mounts,
    driver,
    favor_dynamic_moves,
    is_unified,
)
from runtime_agent.cgroups.v1 import CgroupV1, parse_blkio_bytes
from runtime_agent.cgroups.v2 import CgroupV2, parse_io_stat, shares_to_weight
from runtime_agent.config import AgentConfig
from runtime_agent.protocol import Limits


def _fake_v2_root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text("\n")
    return root


class _SubtreeFiles:
    """cgroupfs fills new dirs with interface files; a plain dir needs them made."""

    @staticmethod
    def populate(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "cgroup.controllers").write_text("cpu io memory pids\n")
        (path / "cgroup.subtree_control").write_text("")


def test_driver_detects_unified_hierarchy_by_cgroup_controllers(tmp_path: Path) -> None:
    config = AgentConfig(root=tmp_path, run_root=tmp_path, name="btx")
    v2root = _fake_v2_root(tmp_path)
    assert is_unified(v2root)
    assert isinstance(driver(config, v2root), CgroupV2)
    hybrid = tmp_path / "hybrid"
    (hybrid / "unified").mkdir(parents=True)
    (hybrid / "unified" / "cgroup.controllers").write_text("")
    assert not is_unified(hybrid)
    assert isinstance(driver(config, hybrid), CgroupV1)
    assert driver(config, hybrid).cgroups_path("acme", "c1") == "/btx/acme/c1"


def test_v2_tenant_caps_and_controller_delegation(tmp_path: Path) -> None:
    root = _fake_v2_root(tmp_path)
    _SubtreeFiles.populate(root / "btx")
    _SubtreeFiles.populate(root / "btx" / "acme")
    cg = CgroupV2("btx", root)
    cg.ensure_tenant("acme", Limits(cpus=1.5, memory_bytes=256 << 20, pids=100, cpu_shares=512))
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +io +memory +pids"
    tenant = root / "btx" / "acme"
    assert (tenant / "cpu.max").read_text() == "150000 100000"
    assert (tenant / "memory.max").read_text() == str(256 << 20)
    assert (tenant / "pids.max").read_text() == "100"
    assert (tenant / "cpu.weight").read_text() == str(shares_to_weight(512))
    assert shares_to_weight(1024) == 39 and shares_to_weight(2) == 1


def test_v2_stats_parse_kernel_files(tmp_path: Path) -> None:
    root = _fake_v2_root(tmp_path)
    path = root / "btx" / "acme" / "c1"
    path.mkdir(parents=True)
    (path / "cpu.stat").write_text(
        "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 10\n"
    )
    (path / "memory.current").write_text("1048576\n")
    (path / "memory.max").write_text("max\n")
    (path / "io.stat").write_text(
        "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"
        "7:3 rbytes=100 wbytes=200 rios=1 wios=1 dbytes=0 dios=0\n"
    )
    (path / "pids.current").write_text("3\n")
    (path / "pids.max").write_text("64\n")
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    stats = CgroupV2("btx", root).stats("acme", "c1")
    assert stats.cpu_seconds == 2.5
    assert stats.memory_bytes == 1048576
    assert stats.memory_limit_bytes is None
    assert (stats.io_read_bytes, stats.io_write_bytes) == (4196, 8392)
    assert (stats.pids, stats.pids_limit, stats.oom_kills) == (3, 64, 1)
    assert parse_io_stat(path / "missing") == (0, 0)


def test_v1_blkio_parsing(tmp_path: Path) -> None:
    path = tmp_path / "blkio.throttle.io_service_bytes_recursive"
    path.write_text(
        "254:0 Read 4096\n254:0 Write 6291456\n254:0 Sync 0\n254:0 Async 0\n"
        "254:0 Discard 0\n254:0 Total 6295552\nTotal 6295552\n"
    )
    assert parse_blkio_bytes(path) == (4096, 6291456)


@pytest.mark.privileged
@pytest.mark.skipif(is_unified(), reason="this host is cgroup v2")
def test_v1_tenant_caps_on_this_host(agent_config: AgentConfig) -> None:
    cg = driver(agent_config)
    try:
        cg.ensure_tenant("acme", Limits(cpus=1.0, memory_bytes=128 << 20, pids=200))
        base = CGROUP_ROOT
        rel = Path(agent_config.name) / "acme"
        assert (base / "cpu" / rel / "cpu.cfs_quota_us").read_text().strip() == "100000"
        assert (base / "memory" / rel / "memory.limit_in_bytes").read_text().strip() == str(
            128 << 20
        )
        assert (base / "memory" / rel / "memory.memsw.limit_in_bytes").read_text().strip() == str(
            128 << 20
        )
        assert (base / "pids" / rel / "pids.max").read_text().strip() == "200"
        stats = cg.stats("acme")
        assert stats.memory_limit_bytes == 128 << 20
        assert stats.pids == 0
    finally:
        cg.remove_all()
    assert not (CGROUP_ROOT / "memory" / agent_config.name).exists()


# ---- favordynmods ------------------------------------------------------------------------

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 2, 4, 8, 32
needs_favordynmods = pytest.mark.skipif(
    not cgroup2_mounts() or tuple(map(int, platform.release().split(".")[:2])) < (6, 0),
    reason="needs a cgroup2 mount on Linux 6.0+",
)


def _options(point: str) -> tuple[set[str], set[str]]:
    """(per-mount options, superblock options) of the mount at ``point``."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        head, _, tail = line.partition(" - ")
        if head.split()[4] == point:
            return set(head.split()[5].split(",")), set(tail.split()[2].split(","))
    raise AssertionError(f"{point} is not mounted")


def _drop_favordynmods(point: str, flags: int) -> None:
    """Clear the option on the hierarchy's superblock, keeping its other options (a bare
    remount resets whatever it isn't given)."""
    _, options = _options(point)
    data = ",".join(sorted(options - {FAVOR_DYNMODS, "rw", "ro"})).encode()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"none", point.encode(), b"cgroup2", MS_REMOUNT | flags, data) != 0:
        raise OSError(ctypes.get_errno(), "remount without favordynmods")
    assert FAVOR_DYNMODS not in _options(point)[1]


def _host_cgroup2() -> str:
    points = [point for point, _ in cgroup2_mounts()]
    return next((p for p in points if p in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")), points[0])


@pytest.mark.privileged
@needs_favordynmods
def test_favordynmods_remount_keeps_the_mounts_other_options(tmp_path: Path) -> None:
    """A second mount of the v2 hierarchy with nosuid,nodev,noexec: turning the option on
    there must not drop them (mount(2)'s remount would)."""
    point = tmp_path / "cg2"
    point.mkdir()
    subprocess.run(
        ["mount", "-t", "cgroup2", "-o", "nosuid,nodev,noexec", "none", str(point)], check=True
    )
    try:
        _drop_favordynmods(str(point), MS_NOSUID | MS_NODEV | MS_NOEXEC)
        assert favor_dynamic_moves(str(point)) == "enabled"
        mount_options, super_options = _options(str(point))
        assert FAVOR_DYNMODS in super_options
        assert {"nosuid", "nodev", "noexec"} <= mount_options
        assert favor_dynamic_moves(str(point)) == "on"
    finally:
        favor_dynamic_moves()  # the host's hierarchy as the agent leaves it
        subprocess.run(["umount", str(point)], check=True)
    assert FAVOR_DYNMODS in _options(_host_cgroup2())[1]


def test_favordynmods_refuses_what_is_not_a_cgroup2_mount(tmp_path: Path) -> None:
    assert favor_dynamic_moves(str(tmp_path)) == f"{tmp_path} is not a cgroup2 mount"


def _first_container_use(config: AgentConfig, env: dict[str, str]) -> None:
    """A fresh process (the once-per-process flag unset) that builds the container
    manager's cgroup driver, as the first container operation of a command does."""
    code = (
        "from pathlib import Path; from runtime_agent.agent import Agent; "
        "from runtime_agent.config import AgentConfig; "
        f"Agent(AgentConfig(root=Path({str(config.root)!r}), "
        f"run_root=Path({str(config.run_root)!r}), name={config.name!r})).containers.cgroups"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


@pytest.mark.privileged
@needs_favordynmods
def test_agent_sets_favordynmods_unless_told_not_to(agent_config: AgentConfig) -> None:
    point = _host_cgroup2()
    flags = sum(
        flag
        for name, flag in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC))
        if name in _options(point)[0]
    )
    mount_options = _options(point)[0]
    try:
        _drop_favordynmods(point, flags)
        _first_container_use(agent_config, dict(os.environ, BERTH_CGROUP_FAVORDYNMODS="0"))
        assert FAVOR_DYNMODS not in _options(point)[1]
        _first_container_use(
            agent_config, {k: v for k, v in os.environ.items() if k != "BERTH_CGROUP_FAVORDYNMODS"}
        )
        assert FAVOR_DYNMODS in _options(point)[1]
        assert _options(point)[0] == mount_options
    finally:
        favor_dynamic_moves(point)
