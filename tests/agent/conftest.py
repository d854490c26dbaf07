"""Agent fixtures: every test gets its own state roots and kernel-object prefix.

``agent_config.name`` prefixes cgroups, bridges and nftables tables, so tests never touch
a real agent's objects (or each other's), and a failed test's leftovers are findable.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.config import AgentConfig
from tests.agent.test_runtime_fixtures import Cli, cleanup_agent

TEST_STATE = Path("/var/lib/berth-test")


@pytest.fixture
def agent_config() -> Iterator[AgentConfig]:
    token = secrets.token_hex(3)
    root = TEST_STATE / token
    config = AgentConfig(root=root / "state", run_root=root / "run", name=f"bt{token}")
    yield config
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
    env = dict(
        os.environ,
        BERTH_ROOT=str(agent_config.root),
        BERTH_RUN_ROOT=str(agent_config.run_root),
        BERTH_AGENT_NAME=agent_config.name,
    )

    def run(
        *args: str, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runtime_agent.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input,
        )

    try:
        yield run
    finally:
        cleanup_agent(Agent(agent_config))
