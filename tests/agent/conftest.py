"""Agent fixtures: every test gets its own state roots and kernel-object prefix.

``agent_config.name`` prefixes cgroups, bridges and nftables tables, so tests never touch
a real agent's objects (or each other's), and a failed test's leftovers are findable.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.cgroups import CGROUP_ROOT, driver
from runtime_agent.config import AgentConfig
from tests.agent.test_runtime_fixtures import Cli, agent_env, cleanup_agent, cli_runner

TEST_STATE = Path("/var/lib/berth-test")


@pytest.fixture
def agent_config() -> Iterator[AgentConfig]:
    token = secrets.token_hex(3)
    root = TEST_STATE / token
    config = AgentConfig(root=root / "state", run_root=root / "run", name=f"bt{token}")
    yield config
    # A safety net for tests that made Agents of their own (a second Agent on the same
    # state, a simulated reboot) or failed half-way: processes still running in this
    # node's cgroups or under conmon with its paths are killed, and its cgroup trees go.
    _kill_leftovers(config, root)
    driver(config).remove_all()
    # Anything still mounted under the test's roots is a clean-up bug in the code under
    # test; unmount it so one failure doesn't cascade, and keep the tree for inspection
    # only when asked.
    if root.exists():
        mounts = [
            line.split()[1]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(root))
        ]
        for mountpoint in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], check=False)
        shutil.rmtree(root, ignore_errors=True)


def _kill_leftovers(config: AgentConfig, root: Path) -> None:
    """SIGKILL the processes left in this test node's cgroups and its conmon monitors."""
    pids: set[int] = set()
    for procs in CGROUP_ROOT.glob(f"*/{config.cgroup_parent}/**/cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(p) for p in procs.read_text().split())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"conmon") and str(root).encode() in b" ".join(argv):
                pids.add(int(proc.name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # A killed process leaves its cgroup only once it has exited (rmdir says EBUSY before).
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = {pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)}
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@pytest.fixture
def agent(agent_config: AgentConfig) -> Iterator[Agent]:
    agent = Agent(agent_config)
    yield agent
    # A safety net for tests that fail half-way: their containers and networks go with
    # the agent's own clean-up code (subsystems the test never touched aren't built).
    if "containers" in agent.__dict__:
        for info in agent.containers.list_all():
            with contextlib.suppress(Exception):
                agent.containers.remove(info.tenant, info.id, force=True)
    if "networks" in agent.__dict__:
        agent.networks.teardown()


@pytest.fixture
def cli(agent_config: AgentConfig) -> Iterator[Cli]:
    """berth-agent's main in a fresh Python process, on this test's node."""
    program = [sys.executable, "-m", "runtime_agent.cli.main"]
    try:
        yield cli_runner(program, agent_env(agent_config))
    finally:
        cleanup_agent(Agent(agent_config))
