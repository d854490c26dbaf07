"""Dispatch benchmark: REST API request to container running on a node (target p50 < 250 ms).

    .venv/bin/python benchmarks/bench_dispatch.py [--services 30] [--network none|bridge]

As root, with Postgres and Redis running. Starts a real control plane (``manage.py
runserver``), a control Celery worker (queue ``control``) and one node agent (``berth-agent
worker`` in its own state directory, joined with a join token), then creates services one
at a time through the API (``POST /api/v1/tenants/<slug>/services/``, one busybox replica
each) and measures, per service:

- *accepted*: until the API answered 201;
- *running on the node*: until the container started (the node's own start time of the
  container, as its report carries it; same clock on this machine);
- *visible as running*: until the API's database shows it running (the node's report has
  reached the control plane).

Prints p50 / p95 / max of each and the ratio of the p50 to the target. On failure the
state directory with the processes' logs is kept (and named). Uses database
``berth_bench`` (``BENCH_DATABASE_URL``) and Redis db 14 (``BENCH_REDIS_URL``) unless told
otherwise; everything it started is stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TARGET_P50_MS = 250.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ensure_database(url: str) -> None:
    """A fresh database each run: nodes left "ready" by an earlier run would otherwise get
    containers placed on them that no agent ever takes."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=30)
    parser.add_argument("--network", choices=["none", "bridge"], default="bridge")
    args = parser.parse_args()

    db_url = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/berth_bench")
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    _ensure_database(db_url)
    token = secrets.token_hex(3)
    state = Path(f"/var/lib/berth-bench/{token}")
    state.mkdir(parents=True)
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "SECRET_KEY": os.environ.get("SECRET_KEY", "bench-" + token),
        "STRIPE_WEBHOOK_SECRET": os.environ.get("STRIPE_WEBHOOK_SECRET", "whsec_bench_" + token),
        "DEBUG": "0",
        "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "BERTH_DEFAULT_NETWORK_MODE": args.network,
        "BERTH_API_RATE_LIMIT": "0",
        "BERTH_API_ADDRESS_RATE_LIMIT": "0",  # every request comes from 127.0.0.1
        "PYTHONPATH": str(ROOT),
    }
    os.environ.update(
        {
            k: env[k]
            for k in (
                "DATABASE_URL",
                "REDIS_URL",
                "SECRET_KEY",
                "STRIPE_WEBHOOK_SECRET",
                "DEBUG",
                "EMAIL_BACKEND",
            )
        }
    )
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    python = sys.executable
    subprocess.run(
        [python, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True
    )
    import redis

    redis.Redis.from_url(redis_url).flushdb()

    import django

    django.setup()
    from tenants.choices import Scope
    from tenants.services import Actor, create_api_token, create_tenant, set_quota_overrides
    from workloads.models import Container
    from workloads.services.nodes import create_join_token

    actor = Actor.for_system("bench")
    slug = f"bench{token}"
    tenant, owner = create_tenant(
        slug=slug, owner_email=f"o@{slug}.example", plan_code="team", seats=5, actor=actor
    )
    set_quota_overrides(
        tenant,
        {"containers": 1000, "cpu_millicores": 1_000_000, "memory_mib": 1_000_000},
        actor=actor,
    )
    _, api_token = create_api_token(tenant, owner, name="bench", scope=Scope.WRITE, actor=actor)
    _, join_token = create_join_token(actor=actor)

    logs = state / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, argv: list[str], extra: dict[str, str] | None = None) -> None:
        processes.append(
            subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**env, **(extra or {})},
                stdout=(logs / f"{name}.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    agent_env = {
        "BERTH_ROOT": str(state / "agent"),
        "BERTH_RUN_ROOT": str(state / "run"),
        "BERTH_AGENT_NAME": f"bb{token}",
    }
    base = f"http://127.0.0.1:{port}"
    finished = False
    try:
        start("web", [python, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"])
        start(
            "control",
            [
                python,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "-Q",
                "control",
                "--pool",
                "threads",
                "--concurrency",
                "4",
                "-l",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
            ],
        )
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{base}/api/v1/schema/", timeout=2)  # noqa: S310
                break
            except OSError:
                time.sleep(0.1)
        agent = [python, "-m", "runtime_agent.cli.main"]
        for step in (["bootstrap"], ["join", base, join_token, "--name", "bench"]):
            subprocess.run(
                [*agent, *step], cwd=ROOT, env={**env, **agent_env}, check=True, capture_output=True
            )
        start("agent", [*agent, "worker"], agent_env)

        def create(name: str) -> tuple[float, float]:
            body = json.dumps(
                {
                    "name": name,
                    "image": "busybox",
                    "command": ["sleep", "100000"],
                    "memory_mib": 16,
                    "cpu_millicores": 50,
                    "replicas": 1,
                }
            ).encode()
            request = urllib.request.Request(  # noqa: S310 - our own http:// URL
                f"{base}/api/v1/tenants/{slug}/services/",
                data=body,
                headers={
                    "Authorization": f"Bearer {api_token}",
                    "Content-Type": "application/json",
                },
            )
            t0 = time.time()
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                assert response.status == 201, response.status
            return t0, time.time()

        def wait_running(name: str, timeout: float = 60) -> tuple[float, float]:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                row = (
                    Container.objects.filter(service__tenant=tenant, service__name=name)
                    .values("state", "started_at", "pending_reason")
                    .first()
                )
                if row and row["state"] == "running" and row["started_at"] is not None:
                    return row["started_at"].timestamp(), time.time()
                time.sleep(0.005)
            raise SystemExit(f"{name} did not run within {timeout}s: {row}; see {logs}")

        # Warm up: the first start pays for imports, the image's unpacking, the network.
        for index in range(3):
            create(f"warm{index}")
            wait_running(f"warm{index}", timeout=120)

        accepted, on_node, visible = [], [], []
        for index in range(args.services):
            t0, t_answer = create(f"svc{index}")
            started, seen = wait_running(f"svc{index}")
            accepted.append((t_answer - t0) * 1000)
            on_node.append((started - t0) * 1000)
            visible.append((seen - t0) * 1000)
            time.sleep(0.05)

        load = os.getloadavg()[0]
        print(
            f"API request -> container running, {args.services} services one after another "
            f"(network {args.network}, 1 agent, load average {load:.1f}, "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC)"
        )
        print(f"{'':28} {'p50':>8} {'p95':>8} {'max':>8}")
        for label, values in (
            ("accepted (201)", accepted),
            ("running on the node", on_node),
            ("visible as running in API", visible),
        ):
            print(
                f"{label:28} {statistics.median(values):7.0f}ms "
                f"{_percentile(values, 0.95):7.0f}ms {max(values):7.0f}ms"
            )
        p50 = statistics.median(on_node)
        verdict = "met" if p50 < TARGET_P50_MS else "NOT met"
        print(
            f"target: p50 request -> running under {TARGET_P50_MS:.0f} ms: {p50:.0f} ms "
            f"({p50 / TARGET_P50_MS:.2f}x the target, {verdict})"
        )
        finished = True
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        _cleanup_agent(agent_env, state, keep=not finished)


def _cleanup_agent(agent_env: dict[str, str], state: Path, *, keep: bool) -> None:
    """Remove the agent's containers and networks, unmount what is left, drop its state."""
    try:
        from runtime_agent.agent import Agent
        from runtime_agent.config import AgentConfig

        api = Agent(
            AgentConfig(
                root=Path(agent_env["BERTH_ROOT"]),
                run_root=Path(agent_env["BERTH_RUN_ROOT"]),
                name=agent_env["BERTH_AGENT_NAME"],
            )
        )
        for info in api.containers.list_all():
            api.containers.remove(info.tenant, info.id, force=True)
        api.networks.teardown()
        api.containers.cgroups.remove_all()  # the agent's parent and tenant cgroups
    finally:
        mounts = [
            line.split()[1]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(state))
        ]
        for mountpoint in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], check=False)
        if keep or os.environ.get("BENCH_KEEP_STATE") == "1":
            print(f"kept the state and logs in {state}", file=sys.stderr)
        else:
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
