"""Fixtures shared by the runtime, limits and container CLI tests (no tests here).

``rt`` is an Agent with the shared busybox image bootstrapped; at teardown every container
it made is force-removed and its cgroup subtree deleted, so a failing test leaves no
processes, mounts, cgroups or runc state behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.cgroups import CGROUP_ROOT
from runtime_agent.config import AgentConfig
from runtime_agent.images.bootstrap import bootstrap_busybox
from runtime_agent.protocol import ContainerSpec
from runtime_agent.runtime.security import release_user_namespaces

# The ``cli`` fixtures (conftest.py, test_cliserver.py): a berth-agent command's result.
Cli = Callable[..., subprocess.CompletedProcess[str]]


def agent_env(config: AgentConfig) -> dict[str, str]:
    """This environment, pointing berth-agent at ``config``'s node."""
    return dict(
        os.environ,
        BERTH_ROOT=str(config.root),
        BERTH_RUN_ROOT=str(config.run_root),
        BERTH_AGENT_NAME=config.name,
    )


def cli_runner(program: list[str], env: dict[str, str]) -> Cli:
    """``run(*args)``: ``program args`` with ``env``, its output captured as text."""

    def run(
        *args: str, timeout: float = 60, input: str | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*program, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input,
            cwd=cwd,
        )

    return run


needs_runtime = [
    pytest.mark.privileged,
    pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc"),
    pytest.mark.skipif(shutil.which("conmon") is None, reason="needs conmon"),
]


def cleanup_agent(agent: Agent) -> None:
    manager = agent.containers
    for record in manager.all_records():
        try:
            manager.remove(record.tenant, record.id, force=True)
        except Exception:  # noqa: S110 - best effort: the assertions already ran
            pass
    manager.cgroups.remove_all()
    agent.snapshots.remove_all_mounts()
    release_user_namespaces(agent.config)


@pytest.fixture
def rt(agent_config: AgentConfig) -> Iterator[Agent]:
    agent = Agent(agent_config)
    bootstrap_busybox(agent)
    try:
        yield agent
    finally:
        cleanup_agent(agent)


def spec(command: str | list[str] | None = None, **kwargs: object) -> ContainerSpec:
    """A busybox container spec; a string command runs through ``sh -c``."""
    if isinstance(command, str):
        command = ["sh", "-c", command]
    values: dict[str, object] = {"tenant": "default", "image": "busybox", "network_mode": "none"}
    values.update(kwargs)
    if command is not None:
        values["command"] = tuple(command)
    return ContainerSpec(**values)  # type: ignore[arg-type]


def until(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def leftovers(agent: Agent, tenant: str, container_id: str) -> list[str]:
    """Every trace a container could leave: cgroups, mounts, runc state, files."""
    config = agent.config
    found = []
    for hierarchy in CGROUP_ROOT.iterdir():
        path = hierarchy / config.name / tenant / container_id
        if path.exists():
            found.append(str(path))
    if (config.containers_dir / tenant / container_id).exists():
        found.append("container dir")
    if (config.snapshots_dir / "active" / container_id).exists():
        found.append("snapshot")
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            if container_id in line.split()[4]:
                found.append("mount " + line.split()[4])
    runc_root = config.runc_root
    if runc_root.exists():
        found += [f"runc state {n}" for n in os.listdir(runc_root) if container_id[:32] in n]
    return found


def cgroup_dir(agent: Agent, controller: str, tenant: str, container_id: str) -> Path:
    return CGROUP_ROOT / controller / agent.config.name / tenant / container_id
