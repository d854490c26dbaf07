"""Dashboard fixtures: tenants and signed-in Django test clients for page tests, and for
the browser tests a Berth with ONE real agent (the e2e cluster's helpers, one node to keep
the run short) plus Playwright launching Debian's Chromium — no browser download."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tenants import services
from tenants.choices import Role
from tenants.models import Membership, Tenant, User
from tests.control.conftest import seed_plans

# Playwright's sync API keeps an event loop in this thread; Django's ORM calls made by the
# test itself (fixtures, assertions) are still synchronous and safe.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

SYSTEM = services.Actor.for_system("tests")
PASSWORD = "a-Long-test-passw0rd"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
HTMX = Path(__file__).resolve().parents[2] / "dashboard/static/dashboard/vendor/htmx.min.js"


@pytest.fixture(autouse=True)
def _plans(request: pytest.FixtureRequest) -> None:
    """Plans come from a data migration that transactional tests truncate: re-seed."""
    names = set(request.fixturenames)
    if "transactional_db" in names or "live_server" in names:
        request.getfixturevalue("transactional_db")
    elif "db" in names:
        request.getfixturevalue("db")
    else:
        return
    seed_plans()


@pytest.fixture
def make_tenant(db: None) -> Callable[..., tuple[Tenant, User]]:
    def make(slug: str, *, plan: str = "team", seats: int = 5) -> tuple[Tenant, User]:
        return services.create_tenant(
            slug=slug,
            owner_email=f"owner@{slug}.example",
            owner_password=PASSWORD,
            plan_code=plan,
            seats=seats,
            actor=SYSTEM,
        )

    return make


@pytest.fixture
def member(db: None) -> Callable[..., User]:
    def add(tenant: Tenant, role: str) -> User:
        user, _ = services.get_or_create_user(f"{role}@{tenant.slug}.example", password=PASSWORD)
        Membership.objects.create(tenant=tenant, user=user, role=role)
        return user

    return add


@pytest.fixture
def login() -> Callable[[User], Client]:
    def make(user: User) -> Client:
        client = Client()
        client.force_login(user)
        return client

    return make


__all__ = ["PASSWORD", "Role"]


# --------------------------------------------------------------------------- browser


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: infra/setup.sh installs Debian's chromium")
    if not HTMX.exists():
        pytest.fail(f"{HTMX} missing: infra/setup.sh installs htmx (npm pack htmx.org)")
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    }


@pytest.fixture
def screenshot(page: Any) -> Callable[..., Path]:
    """Save a full-page screenshot (of ``page``, or another one given) under
    artifacts/screenshots/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(name: str, of: Any = None) -> Path:
        path = ARTIFACTS / f"{name}.png"
        (of or page).screenshot(path=str(path), full_page=True)
        return path

    return take


def _off_the_event_loop(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn`` in a fresh thread: Playwright's sync API keeps an asyncio loop running in
    this one, and the agent's clean-up code (pyroute2) runs its own loop."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn(*args)
        except BaseException as exc:  # handed back to the caller below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@pytest.fixture
def one_node(live_server: Any, transactional_db: None) -> Iterator[Any]:
    """Control plane (live server + Celery worker with the reconciler beat) and one agent,
    built from tests/e2e/conftest.py's helpers."""
    from tests.e2e.conftest import (
        STATE,
        AgentProcess,
        Cluster,
        _database_url,
        remove_all_containers,
    )
    from workloads.services.nodes import create_join_token

    seed_plans()
    token = secrets.token_hex(3)
    base_env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "BERTH_NODE_TIMEOUT_SECONDS": "6",
        "BERTH_RECONCILE_SECONDS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    STATE.mkdir(parents=True, exist_ok=True)
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
            str(STATE / f"beat-dash-{token}"),
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
        cwd=Path(__file__).resolve().parents[2],
        stdout=(STATE / f"control-dash-{token}.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    agents: list[AgentProcess] = []
    try:
        root = STATE / f"dash-{token}-n1"
        root.mkdir(parents=True)
        env = {
            **base_env,
            "BERTH_ROOT": str(root / "state"),
            "BERTH_RUN_ROOT": str(root / "run"),
            "BERTH_AGENT_NAME": f"bd{token}1",
        }
        agent = AgentProcess("n1", root, env)
        agent.cli("bootstrap")
        _, secret = create_join_token(actor=SYSTEM)
        agent.cli("join", live_server.url, secret, "--name", "n1")
        agent.start()
        agents.append(agent)
        yield Cluster(live_server.url, agents, control)
    finally:
        for agent in agents:
            agent.kill()
        os.killpg(control.pid, signal.SIGKILL)
        control.wait(timeout=10)
        for agent in agents:
            _off_the_event_loop(remove_all_containers, agent)
            if os.environ.get("BERTH_KEEP_E2E_STATE") != "1":
                shutil.rmtree(agent.root, ignore_errors=True)
