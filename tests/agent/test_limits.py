"""Limits measured on real containers: memory (OOM kill), CPU quota, pids, block I/O,
and isolation of processes, hostname and filesystem."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.cgroups import CGROUP_ROOT, is_unified
from runtime_agent.errors import ResourceExhausted
from runtime_agent.protocol import Limits
from tests.agent.test_runtime_fixtures import needs_runtime, rt, spec, until

pytestmark = needs_runtime
__all__ = ["rt"]
MiB = 1024 * 1024


def test_memory_hog_is_oom_killed_with_137(rt: Agent) -> None:
    c = rt.containers
    info = c.run(spec(["tail", "/dev/zero"], limits=Limits(memory_bytes=32 * MiB)))
    assert c.wait("default", info.id, timeout=60) == 137
    state = c.inspect("default", info.id)["State"]
    assert state["OOMKilled"] is True
    assert state["ExitCode"] == 137


def _favour_agent_cgroup(agent: Agent) -> None:
    """Other work shares this machine: give the agent's top cgroup a big CPU weight so
    the container can always use its quota (the quota is still the cap being tested)."""
    if is_unified():
        path = CGROUP_ROOT / agent.config.name / "cpu.weight"
        value = "10000"
    else:
        path = CGROUP_ROOT / "cpu" / agent.config.name / "cpu.shares"
        value = "262144"
    if path.exists():
        path.write_text(value)


def test_cpu_quota_holds_at_half_a_cpu(rt: Agent) -> None:
    c = rt.containers
    rt.containers.cgroups.ensure_tenant("default")
    _favour_agent_cgroup(rt)
    info = c.run(
        spec("while :; do :; done & while :; do :; done", limits=Limits(cpus=0.5))
    )  # two busy loops: without the quota they would take both CPUs
    time.sleep(1.0)
    cpu0, t0 = c.stats("default", info.id).cpu_seconds, time.monotonic()
    time.sleep(4.0)
    cpu1, t1 = c.stats("default", info.id).cpu_seconds, time.monotonic()
    usage = (cpu1 - cpu0) / (t1 - t0)
    c.remove("default", info.id, force=True)
    assert 0.4 <= usage <= 0.6, f"measured {usage:.3f} CPUs under --cpus 0.5"


def test_fork_bomb_stops_at_the_pids_limit_and_the_node_stays_responsive(rt: Agent) -> None:
    c = rt.containers
    info = c.run(spec("bomb() { bomb | bomb & }; bomb; sleep 30", limits=Limits(pids=64)))
    until(lambda: c.stats("default", info.id).pids >= 60, timeout=30)
    time.sleep(1.0)
    stats = c.stats("default", info.id)
    assert stats.pids <= 64
    assert stats.pids_limit == 64
    started = time.monotonic()
    subprocess.run(["true"], check=True)
    assert time.monotonic() - started < 2.0
    c.remove("default", info.id, force=True)
    assert c.list("default", all=True) == []


def test_direct_writes_stay_within_the_write_bps_limit(rt: Agent) -> None:
    c = rt.containers
    limit = 2 * MiB
    size = 6 * MiB
    info = c.run(
        spec(
            "cut -d' ' -f1 /proc/uptime; "
            "dd if=/dev/zero of=/ddtest bs=256k count=24 oflag=direct 2>/dev/null; "
            "cut -d' ' -f1 /proc/uptime; wc -c < /ddtest",
            limits=Limits(device_write_bps=limit),
        )
    )
    assert c.wait("default", info.id, timeout=60) == 0
    before, after, written = (e.line.decode() for e in c.logs("default", info.id))
    assert int(written) == size
    seconds = float(after) - float(before)
    rate = size / seconds
    assert rate <= limit * 1.15, f"{rate / MiB:.2f} MiB/s under a {limit / MiB} MiB/s limit"


def test_container_sees_only_its_own_processes_hostname_and_files(rt: Agent) -> None:
    c = rt.containers
    marker = rt.config.root / "host-marker"
    marker.write_text("host")
    other = c.run(spec("sleep 300", name="neighbour"))
    info = c.run(
        spec(
            "ps -o pid,comm; echo host=$(hostname); ls /; "
            f"test -e {marker} && echo SEES-HOST-FILE; test -e /work && echo SEES-WORK; "
            "cat /proc/1/cmdline | tr '\\0' ' '; echo",
            hostname="isolated",
        )
    )
    assert c.wait("default", info.id, timeout=30) == 0
    lines = [e.line.decode() for e in c.logs("default", info.id)]
    processes = [line.split() for line in lines[1:] if re.match(r"^\s*\d+\s", line)]
    assert [p[0] for p in processes][:1] == ["1"]
    assert {p[1] for p in processes} <= {"sh", "ps"}
    assert "host=isolated" in lines
    assert "SEES-HOST-FILE" not in lines and "SEES-WORK" not in lines
    assert any(line.startswith("sh -c ps") for line in lines)
    assert Path(f"/proc/{c.inspect('default', other.id)['State']['Pid']}").exists()


def test_tenant_wide_memory_cap_holds_and_bigger_requests_are_refused(rt: Agent) -> None:
    c = rt.containers
    c.set_tenant_limits("capped", Limits(memory_bytes=48 * MiB, pids=200))
    with pytest.raises(ResourceExhausted, match="cap"):
        c.create(spec("true", tenant="capped", limits=Limits(memory_bytes=64 * MiB)))
    assert c.list("capped", all=True) == []
    # No per-container limit: the tenant's cap is what stops the hog.
    info = c.run(spec(["tail", "/dev/zero"], tenant="capped"))
    assert c.wait("capped", info.id, timeout=60) == 137
    assert c.inspect("capped", info.id)["State"]["OOMKilled"] is True
    assert c.cgroups.stats("capped").memory_limit_bytes == 48 * MiB
