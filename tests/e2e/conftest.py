"""A whole Berth on this machine: the control plane (live server + a Celery worker with
the reconciler's beat) and two node agents as separate processes with their own state
directories, queues and kernel-object prefixes — real Postgres, Redis, runc, cgroups.

``cluster`` has no image registry (builds stay on their node); ``registry_cluster`` adds a
real docker-registry whose token realm and notifications are the live server."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import connection

from tests.control.conftest import seed_plans
from tests.registry_process import RegistryProcess, start_registry

ROOT = Path(__file__).resolve().parents[2]
STATE = Path("/var/lib/berth-test")


def _database_url() -> str:
    s = connection.settings_dict
    auth = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


@dataclass
class AgentProcess:
    name: str
    root: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "agent.log"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runtime_agent.cli.main", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def start(self) -> None:
        handle = self.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runtime_agent.cli.main", "worker", "--report-interval", "1"],
            env=self.env,
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL the worker, as a crashed node would stop; its containers keep running."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@dataclass
class Cluster:
    url: str
    agents: list[AgentProcess]
    control: subprocess.Popen[bytes]
    registry: RegistryProcess | None = None

    def agent_named(self, name: str) -> AgentProcess:
        return next(a for a in self.agents if a.name == name)


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def cluster(
    live_server: Any, transactional_db: None, tmp_path: Path, settings: Any
) -> Iterator[Cluster]:
    settings.BERTH_REGISTRY_DIR = tmp_path / "no-registry"
    yield from _run_cluster(live_server, {"BERTH_REGISTRY_DIR": str(settings.BERTH_REGISTRY_DIR)})


@pytest.fixture
def registry_cluster(
    live_server: Any, transactional_db: None, tmp_path: Path, settings: Any
) -> Iterator[Cluster]:
    registry = start_registry(
        tmp_path / "registry",
        realm=f"{live_server.url}/registry/token",
        notify_url=f"{live_server.url}/registry/events/",
    )
    settings.BERTH_REGISTRY_DIR = registry.directory
    settings.BERTH_REGISTRY_HOST = registry.host
    settings.BERTH_REGISTRY_URL = registry.url
    env = {
        "BERTH_REGISTRY_DIR": str(registry.directory),
        "BERTH_REGISTRY_HOST": registry.host,
        "BERTH_REGISTRY_URL": registry.url,
    }
    try:
        yield from _run_cluster(live_server, env, registry)
    finally:
        registry.stop()


def _run_cluster(
    live_server: Any, extra_env: dict[str, str], registry: RegistryProcess | None = None
) -> Iterator[Cluster]:
    from tenants.services import Actor
    from workloads.services.nodes import create_join_token

    seed_plans()
    # Tasks other tests enqueued for workers that never ran (the broker is a real Redis)
    # would otherwise keep this cluster's control worker busy with ghosts.
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    token = secrets.token_hex(3)
    base_env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "BERTH_NODE_TIMEOUT_SECONDS": "6",
        "BERTH_RECONCILE_SECONDS": "1",
        "PYTHONPATH": str(ROOT),
        **extra_env,
    }
    control_log = STATE / f"control-{token}.log"
    control_log.parent.mkdir(parents=True, exist_ok=True)
    control = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "-B",
            "-s",
            str(STATE / f"beat-{token}"),
            "-Q",
            "control",
            "--pool",
            "threads",
            "--concurrency",
            "4",
            "-l",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        env=base_env,
        cwd=ROOT,
        stdout=control_log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    agents = []
    try:
        for index in (1, 2):
            name = f"n{index}"
            root = STATE / f"e2e-{token}-{name}"
            root.mkdir(parents=True)
            env = {
                **base_env,
                "BERTH_ROOT": str(root / "state"),
                "BERTH_RUN_ROOT": str(root / "run"),
                "BERTH_AGENT_NAME": f"be{token}{index}",
            }
            agent = AgentProcess(name, root, env)
            agent.cli("bootstrap")
            _, secret = create_join_token(actor=Actor.for_system("e2e"))
            agent.cli("join", live_server.url, secret, "--name", name)
            agent.start()
            agents.append(agent)
        yield Cluster(live_server.url, agents, control, registry)
    finally:
        for agent in agents:
            agent.kill()
        os.killpg(control.pid, signal.SIGKILL)
        control.wait(timeout=10)
        for agent in agents:
            remove_all_containers(agent)
            if os.environ.get("BERTH_KEEP_E2E_STATE") != "1":
                shutil.rmtree(agent.root, ignore_errors=True)


def agent_api(agent: AgentProcess) -> Any:
    from runtime_agent.agent import Agent
    from runtime_agent.config import AgentConfig

    return Agent(
        AgentConfig(
            root=Path(agent.env["BERTH_ROOT"]),
            run_root=Path(agent.env["BERTH_RUN_ROOT"]),
            name=agent.env["BERTH_AGENT_NAME"],
        )
    )


def remove_all_containers(agent: AgentProcess) -> None:
    """Remove what the agent still runs and its networks, with the agent's own clean-up
    code; then unmount whatever is left under its roots so one failure can't cascade."""
    api = agent_api(agent)
    for info in api.containers.list_all():
        api.containers.remove(info.tenant, info.id, force=True)
    api.networks.teardown()
    api.containers.cgroups.remove_all()  # the agent's parent and tenant cgroups
    mounts = [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(str(agent.root))
    ]
    for mountpoint in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=False)
